// CPU kernel of distillkit::fused_linear_divergence_topk_fwd (schema in csrc/registration.cpp): the fused
// linear divergence against a sparse teacher (cpu_topk_kernel.cpp).
//
// Canonical inputs (the Python wrapper distillkit/ops/linear_divergence/topk.py produces them):
//   student_hidden [N, Ds], student_weight [V, Ds]: floating tensors, converted to the accumulation type
//     (float64 when student_hidden is float64, else float32);
//   teacher_index [N, K] integer token ids, distinct within a row, in [0, V);
//   teacher_logp [N, K] their log-probabilities (temperature 1), teacher_log_tail [N] log of the rest's mass;
//   kd_weight [N], ce_weight [N] and labels [N] (both or neither) as for fused_linear_divergence_fwd;
//   divergence: one of kDivergenceNames (forward_kl, reverse_kl or jsd with tail "bucket");
//   tail: "spread" (the tail mass spread evenly over the other V - K tokens: the dense divergence against
//     that teacher, cpu_kernel.cpp) or "bucket" (the tail as one bucket, cpu_topk_kernel.cpp).
// Outputs (accumulation type): loss [] and the loss's gradients grad_hidden [N, Ds], grad_weight [V, Ds].
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "linear_divergence/args.h"
#include "linear_divergence/binding.h"

namespace distillkit {
namespace {

constexpr const char* kOp = "fused_linear_divergence_topk_fwd";

// Ids in [0, V) and distinct within each row, as int64.
at::Tensor checked_index(const at::Tensor& index, int64_t V) {
  TORCH_CHECK(!index.is_floating_point() && !index.is_complex(), kOp, ": teacher_index must hold integer ids");
  at::Tensor out = index.to(at::kLong).contiguous();
  const int64_t N = out.size(0), K = out.size(1);
  const int64_t* ids = out.data_ptr<int64_t>();
  std::vector<int64_t> seen(static_cast<size_t>(V), -1);  // the last row that used each id
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t i = 0; i < K; ++i) {
      const int64_t id = ids[r * K + i];
      TORCH_CHECK_INDEX(id >= 0 && id < V, kOp, ": teacher_index ", id, " at row ", r, " is outside [0, ", V,
                        ")");
      TORCH_CHECK(seen[id] != r, kOp, ": teacher_index repeats token ", id, " in row ", r,
                  "; the top-k ids of a row must be distinct");
      seen[id] = r;
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_divergence_topk_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_index,
    const at::Tensor& teacher_logp, const at::Tensor& teacher_log_tail, const at::Tensor& kd_weight,
    const std::optional<at::Tensor>& ce_weight, const std::optional<at::Tensor>& labels,
    c10::string_view divergence, double temperature, double beta, double alpha, c10::string_view tail) {
  TORCH_CHECK(student_hidden.dim() == 2 && student_weight.dim() == 2, kOp,
              ": student_hidden and student_weight must be 2-D");
  const int64_t N = student_hidden.size(0), Ds = student_hidden.size(1), V = student_weight.size(0);
  TORCH_CHECK(student_weight.size(1) == Ds, kOp, ": student_weight is ", student_weight.sizes(), ", expected [V, ",
              Ds, "]");
  TORCH_CHECK(teacher_index.dim() == 2 && teacher_index.size(0) == N, kOp, ": teacher_index must be [", N,
              ", K]");
  const int64_t K = teacher_index.size(1);
  TORCH_CHECK(K <= V, kOp, ": teacher_index has K = ", K, " entries per row, more than V = ", V);
  TORCH_CHECK(teacher_logp.sizes() == teacher_index.sizes(), kOp, ": teacher_logp is ", teacher_logp.sizes(),
              ", expected [", N, ", ", K, "]");
  TORCH_CHECK(teacher_log_tail.dim() == 1 && teacher_log_tail.size(0) == N, kOp, ": teacher_log_tail must be [",
              N, "]");
  TORCH_CHECK(kd_weight.dim() == 1 && kd_weight.size(0) == N, kOp, ": kd_weight must be [", N, "]");
  TORCH_CHECK(ce_weight.has_value() == labels.has_value(), kOp, ": ce_weight and labels go together");
  TORCH_CHECK(temperature > 0, kOp, ": temperature must be > 0");
  const std::string_view tail_name(tail.data(), tail.size());
  TORCH_CHECK(tail_name == "spread" || tail_name == "bucket", kOp, ": tail must be 'spread' or 'bucket', got '",
              std::string(tail_name), "'");
  const bool buckets = tail_name == "bucket";
  // The bucket form has forward KL, reverse KL and JSD (the first three of the table); spread has them all.
  const Divergence kind = fld_binding::parse_divergence(std::string_view(divergence.data(), divergence.size()),
                                                        kOp, buckets ? 3 : kNumDivergences);
  const fld_binding::StudentSide side(student_hidden, student_weight, kd_weight, ce_weight, labels, kOp);
  at::Tensor index = checked_index(teacher_index, V);
  at::Tensor logp = teacher_logp.to(side.acc).contiguous(), log_tail = teacher_log_tail.to(side.acc).contiguous();
  LinearDivergenceArgs args;
  side.fill(args, kind, temperature, beta, alpha);
  args.K = K;
  args.teacher_index = index.data_ptr<int64_t>();
  args.teacher_logp = logp.data_ptr();
  args.teacher_log_tail = log_tail.data_ptr();
  return fld_binding::run_call(side, args, buckets);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CPU, m) {
  m.impl("fused_linear_divergence_topk_fwd", &fused_linear_divergence_topk_fwd_cpu);
}

}  // namespace distillkit
