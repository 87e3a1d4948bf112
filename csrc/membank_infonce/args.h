// The arguments of distillkit::membank_infonce_fwd as every backend's kernel takes them: plain C++ over
// pointers and sizes (no torch or CUDA headers), the C++ counterpart of
// distillkit.ops.infonce.validate.InfonceArgs.
//
// The bindings fill one MembankInfonceArgs from the canonical tensors (binding.h); the CUDA kernels take it
// extended by their launch options (cuda::MembankInfonceParams), the CPU kernel a typed view of it
// (cpu::Problem).
#pragma once

#include <cstdint>

namespace distillkit {

/// Element type of query, positive and bank (all three share it).
enum class MembankDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

/// Raw inputs and outputs of one forward call. Strides are in elements; the feature dim D is contiguous.
struct MembankInfonceArgs {
  MembankDType dtype = MembankDType::kFloat32;
  int64_t L = 0;  ///< leading (layer) dimension
  int64_t B = 0;  ///< query rows per layer
  int64_t K = 0;  ///< negatives per query row (bank rows, or index columns with negative_index)
  int64_t D = 0;  ///< feature dimension
  int64_t N = 0;  ///< bank rows (== K without negative_index)

  const void* query = nullptr;  ///< [L, B, D]
  int64_t query_stride_l = 0, query_stride_b = 0;
  const void* positive = nullptr;  ///< [L, B, D]
  int64_t positive_stride_l = 0, positive_stride_b = 0;
  const void* bank = nullptr;  ///< [L, N, D], or [N, D] shared by all layers (bank_stride_l = 0)
  int64_t bank_stride_l = 0, bank_stride_n = 0;

  const int64_t* query_labels = nullptr;    ///< [B] or null; given together with bank_labels
  const int64_t* bank_labels = nullptr;     ///< [N] or null
  const int64_t* negative_index = nullptr;  ///< [L, B, K] rows of the bank, values in [0, N), or null
  int64_t index_stride_l = 0, index_stride_b = 0;

  double temperature = 1.0;

  void* loss = nullptr;  ///< [L, B] contiguous, float32 (float64 for fp64 inputs)
  void* lse = nullptr;   ///< [L, B] contiguous, same dtype as loss
  void* wsum = nullptr;  ///< [L, B, D] contiguous, same dtype as loss
};

}  // namespace distillkit
