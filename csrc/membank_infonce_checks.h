// Argument checks of distillkit::membank_infonce_fwd shared by the CPU and CUDA bindings.
//
// The Python wrapper (distillkit/ops/_validate.py) already raises clear errors for user input; these checks
// guard direct calls of torch.ops.distillkit.membank_infonce_fwd and never let bad sizes reach a kernel.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace distillkit {

// Checks ranks, sizes and dtypes of the canonical inputs (see the schema comment in the bindings). Device
// placement is checked by each backend.
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

}  // namespace distillkit
