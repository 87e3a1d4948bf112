// The part of distillkit::membank_infonce_fwd's bindings that every backend shares: argument checks,
// canonical layouts, output allocation, and the torch-free MembankInfonceArgs the kernels take.
//
// Canonical inputs (the Python wrapper distillkit/ops/infonce/validate.py produces them):
//   query, positive  [L, B, D], same dtype (float32, float64, bfloat16, float16)
//   bank             [L, K, D], or [K, D] shared by all L layers (read with layer stride 0, never copied)
//   query_labels     [B] int64 and bank_labels [K] int64, both or neither
//   negative_index   [L, B, K] int64 into the bank's rows (then the bank is [L, N, D] or [N, D])
// Outputs: loss [L, B], lse [L, B], wsum [L, B, D] in float32 (float64 for float64 inputs).
//
// The Python wrapper already raises clear errors for user input; these checks guard direct calls of
// torch.ops.distillkit.membank_infonce_fwd and never let bad sizes reach a kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "membank_infonce/args.h"

namespace distillkit {

// Checks ranks, sizes and dtypes of the canonical inputs (see the file comment). Device placement is
// checked by each backend.
inline void check_membank_infonce_args(const at::Tensor& query, const at::Tensor& positive,
                                       const at::Tensor& bank, double temperature,
                                       const std::optional<at::Tensor>& query_labels,
                                       const std::optional<at::Tensor>& bank_labels,
                                       const std::optional<at::Tensor>& negative_index) {
  TORCH_CHECK(query.dim() == 3, "membank_infonce_fwd: query must be [L, B, D], got ", query.sizes());
  TORCH_CHECK(positive.sizes() == query.sizes(), "membank_infonce_fwd: positive must match query ",
              query.sizes(), ", got ", positive.sizes());
  TORCH_CHECK(bank.dim() == 3 || bank.dim() == 2, "membank_infonce_fwd: bank must be [L, K, D] or [K, D]");
  const int64_t L = query.size(0), B = query.size(1), D = query.size(2);
  TORCH_CHECK(bank.dim() == 2 || bank.size(0) == L, "membank_infonce_fwd: bank has ", bank.size(0),
              " layers, query ", L);
  TORCH_CHECK(bank.size(-1) == D, "membank_infonce_fwd: bank feature size ", bank.size(-1), " != ", D);
  TORCH_CHECK(positive.scalar_type() == query.scalar_type() && bank.scalar_type() == query.scalar_type(),
              "membank_infonce_fwd: query, positive and bank must share a dtype");
  TORCH_CHECK(temperature > 0, "membank_infonce_fwd: temperature must be > 0, got ", temperature);
  TORCH_CHECK(query_labels.has_value() == bank_labels.has_value(),
              "membank_infonce_fwd: give both query_labels and bank_labels or neither");
  const int64_t rows = bank.size(-2);
  if (query_labels.has_value()) {
    TORCH_CHECK(query_labels->dim() == 1 && query_labels->size(0) == B &&
                    query_labels->scalar_type() == at::kLong,
                "membank_infonce_fwd: query_labels must be int64 [B]");
    TORCH_CHECK(bank_labels->dim() == 1 && bank_labels->size(0) == rows &&
                    bank_labels->scalar_type() == at::kLong,
                "membank_infonce_fwd: bank_labels must be int64 [rows of bank]");
  }
  if (negative_index.has_value()) {
    TORCH_CHECK(negative_index->dim() == 3 && negative_index->size(0) == L && negative_index->size(1) == B &&
                    negative_index->scalar_type() == at::kLong,
                "membank_infonce_fwd: negative_index must be int64 [L, B, K]");
  }
}

inline MembankDType membank_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return MembankDType::kFloat32;
    case at::kDouble:
      return MembankDType::kFloat64;
    case at::kBFloat16:
      return MembankDType::kBFloat16;
    case at::kHalf:
      return MembankDType::kFloat16;
    default:
      TORCH_CHECK(false, "membank_infonce_fwd: unsupported dtype ", t,
                  "; use float32, float64, bfloat16 or float16");
  }
}

// One call: its contiguous inputs and allocated outputs, kept alive while `args` points into them.
struct MembankInfonceCall {
  at::Tensor query, positive, bank;                     // [L, B, D], [L, B, D], [L, N, D] or [N, D]
  at::Tensor query_labels, bank_labels, negative_index;  // undefined when not given
  at::Tensor loss, lse, wsum;                            // [L, B], [L, B], [L, B, D] in acc_dtype
  at::ScalarType acc_dtype = at::kFloat;                 // float32, or float64 for float64 inputs
  MembankInfonceArgs args;                               // filled unless empty()

  bool empty() const { return loss.numel() == 0; }
};

// Checks the op's inputs (device placement excepted: each backend checks its own), makes them contiguous
// (a no-op for canonical inputs), allocates the outputs on the query's device and fills `args`.
inline MembankInfonceCall membank_infonce_call(const at::Tensor& query, const at::Tensor& positive,
                                               const at::Tensor& bank, double temperature,
                                               const std::optional<at::Tensor>& query_labels,
                                               const std::optional<at::Tensor>& bank_labels,
                                               const std::optional<at::Tensor>& negative_index) {
  check_membank_infonce_args(query, positive, bank, temperature, query_labels, bank_labels, negative_index);
  const int64_t L = query.size(0), B = query.size(1), D = query.size(2);
  const int64_t rows = bank.size(-2);
  MembankInfonceCall c;
  c.acc_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  c.query = query.contiguous();
  c.positive = positive.contiguous();
  c.bank = bank.contiguous();
  if (query_labels.has_value()) {
    c.query_labels = query_labels->contiguous();
    c.bank_labels = bank_labels->contiguous();
  }
  if (negative_index.has_value()) c.negative_index = negative_index->contiguous();
  const auto opts = query.options().dtype(c.acc_dtype);
  c.loss = at::empty({L, B}, opts);
  c.lse = at::empty({L, B}, opts);
  c.wsum = at::empty({L, B, D}, opts);
  if (c.empty()) return c;

  MembankInfonceArgs& a = c.args;
  a.dtype = membank_dtype(query.scalar_type());
  a.L = L;
  a.B = B;
  a.D = D;
  a.N = rows;
  a.K = negative_index.has_value() ? c.negative_index.size(2) : rows;
  a.query = c.query.data_ptr();
  a.query_stride_l = B * D;
  a.query_stride_b = D;
  a.positive = c.positive.data_ptr();
  a.positive_stride_l = B * D;
  a.positive_stride_b = D;
  a.bank = c.bank.data_ptr();
  a.bank_stride_l = bank.dim() == 2 ? 0 : rows * D;
  a.bank_stride_n = D;
  if (query_labels.has_value()) {
    a.query_labels = c.query_labels.data_ptr<int64_t>();
    a.bank_labels = c.bank_labels.data_ptr<int64_t>();
  }
  if (negative_index.has_value()) {
    a.negative_index = c.negative_index.data_ptr<int64_t>();
    a.index_stride_l = B * a.K;
    a.index_stride_b = a.K;
  }
  a.temperature = temperature;
  a.loss = c.loss.data_ptr();
  a.lse = c.lse.data_ptr();
  a.wsum = c.wsum.data_ptr();
  return c;
}

}  // namespace distillkit
