// The arguments of distillkit::fused_linear_divergence_fwd as the kernel takes them: plain C++ over
// pointers and sizes (no torch headers).
//
// The bindings (cpu_binding.cpp, cpu_topk_binding.cpp) fill one LinearDivergenceArgs from the canonical
// tensors; the CPU kernel takes a typed view of it (cpu::fld::Problem).
#pragma once

#include <cstdint>
#include <string_view>

namespace distillkit {

/// The divergence D(p || q) between the teacher's p and the student's q.
enum class Divergence : int { kForwardKL = 0, kReverseKL, kJSD, kTVD, kSkewForwardKL, kSkewReverseKL };

/// The names the op's `divergence` argument takes, indexed by Divergence: the list and order of
/// distillkit.ops.divergences.DIVERGENCES.
constexpr std::string_view kDivergenceNames[] = {"forward_kl", "reverse_kl",      "jsd",
                                                 "tvd",        "skew_forward_kl", "skew_reverse_kl"};
constexpr int kNumDivergences = static_cast<int>(sizeof(kDivergenceNames) / sizeof(kDivergenceNames[0]));

/// The Divergence called `name`; false when there is none.
inline bool divergence_from_name(std::string_view name, Divergence* out) {
  for (int i = 0; i < kNumDivergences; ++i) {
    if (kDivergenceNames[i] == name) {
      *out = static_cast<Divergence>(i);
      return true;
    }
  }
  return false;
}

/// Element type of every floating array of one call: the accumulation type.
enum class LinearDivergenceDType : int { kFloat32 = 0, kFloat64 = 1 };

/// Inputs and outputs of one call. Every array is row-major and contiguous.
struct LinearDivergenceArgs {
  LinearDivergenceDType dtype = LinearDivergenceDType::kFloat32;
  int64_t N = 0;   ///< rows (tokens)
  int64_t V = 0;   ///< vocabulary
  int64_t Ds = 0;  ///< student hidden size
  int64_t Dt = 0;  ///< teacher hidden size (dense teacher)
  int64_t K = 0;   ///< top-k entries per row (sparse teacher)

  Divergence divergence = Divergence::kForwardKL;
  double temperature = 1.0;
  double beta = 0.5;   ///< jsd's mixing weight
  double alpha = 0.1;  ///< the skew forms' mixing weight

  const void* student_hidden = nullptr;  ///< [N, Ds]
  const void* student_weight = nullptr;  ///< [V, Ds]
  const void* teacher_hidden = nullptr;  ///< [N, Dt]
  const void* teacher_weight = nullptr;  ///< [V, Dt]
  // The sparse teacher, in place of teacher_hidden and teacher_weight (fused_linear_divergence_topk_fwd):
  const int64_t* teacher_index = nullptr;  ///< [N, K] distinct token ids in [0, V)
  const void* teacher_logp = nullptr;      ///< [N, K] their log-probabilities (temperature 1)
  const void* teacher_log_tail = nullptr;  ///< [N] log of the probability mass outside the top K
  const void* kd_weight = nullptr;       ///< [N] weight of each row's divergence (0: not counted)
  const void* ce_weight = nullptr;       ///< [N] weight of each row's cross-entropy, or null (no CE)
  const int64_t* labels = nullptr;       ///< [N] in [0, V), or -100 (ignored); given with ce_weight

  void* grad_hidden = nullptr;  ///< [N, Ds] output
  void* grad_weight = nullptr;  ///< [V, Ds] output
};

}  // namespace distillkit
