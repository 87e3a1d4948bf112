// CPU kernel of distillkit::membank_infonce_fwd (schema in csrc/registration.cpp).
//
// Inputs and outputs: see binding.h (shared with the CUDA binding).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "common/blas_gemm.h"
#include "membank_infonce/binding.h"
#include "membank_infonce/cpu_kernel.h"

namespace distillkit {
namespace {

int64_t tile_override() {
  const char* env = std::getenv("DISTILLKIT_CPU_TILE");
  return env != nullptr ? std::atoll(env) : 0;
}

template <typename in_t, typename acc_t>
void run(cpu::Problem<in_t, acc_t>& p, at::ScalarType acc_dtype) {
  const int64_t rows = p.L * p.B;
  if (p.negative_index != nullptr) {
    int64_t bad = 0;
    bool ok = true;
    std::mutex bad_mutex;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(static_cast<size_t>(cpu::indexed_scratch_size(p)));
      int64_t local_bad = 0;
      if (!cpu::indexed_rows(p, begin, end, scratch.data(), &local_bad)) {
        std::lock_guard<std::mutex> lock(bad_mutex);
        ok = false;
        bad = local_bad;
      }
    });
    TORCH_CHECK_INDEX(ok, "membank_infonce: negative_index holds ", bad, ", outside [0, ", p.bank_rows,
                      ") for the bank's ", p.bank_rows, " rows");
    return;
  }
  const cpu::DensePlan plan =
      cpu::plan_dense(p.L, p.B, p.D, p.bank_rows, at::get_num_threads(), tile_override());
  const int64_t items = plan.items();
  auto opts = at::TensorOptions().dtype(acc_dtype);
  at::Tensor part_max = at::empty({items, p.B}, opts);
  at::Tensor part_sum = at::empty({items, p.B}, opts);
  at::Tensor part_w = at::empty({items, p.B, p.D}, opts);
  acc_t* pm = part_max.data_ptr<acc_t>();
  acc_t* ps = part_sum.data_ptr<acc_t>();
  acc_t* pw = part_w.data_ptr<acc_t>();
  const cpu::GemmFn<acc_t> gemm = cpu_gemm::pick_gemm<acc_t>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(static_cast<size_t>(cpu::dense_scratch_size(p, plan)));
    for (int64_t item = begin; item < end; ++item) {
      cpu::dense_item(p, plan, item, pm + item * p.B, ps + item * p.B, pw + item * p.B * p.D, scratch.data(),
                      gemm);
    }
  });
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    cpu::dense_merge(p, plan, begin, end, pm, ps, pw);
  });
}

template <typename in_t, typename acc_t>
void run_typed(const MembankInfonceCall& call) {
  const at::Tensor q = call.query.to(call.acc_dtype).contiguous();
  const at::Tensor pos = call.positive.to(call.acc_dtype).contiguous();
  auto p = cpu::Problem<in_t, acc_t>::of(call.args, q.data_ptr<acc_t>(), pos.data_ptr<acc_t>());
  run(p, call.acc_dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> membank_infonce_fwd_cpu(
    const at::Tensor& query, const at::Tensor& positive, const at::Tensor& bank, double temperature,
    const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& bank_labels,
    const std::optional<at::Tensor>& negative_index) {
  const MembankInfonceCall call =
      membank_infonce_call(query, positive, bank, temperature, query_labels, bank_labels, negative_index);
  if (!call.empty()) {
    switch (call.args.dtype) {
      case MembankDType::kFloat32:
        run_typed<float, float>(call);
        break;
      case MembankDType::kFloat64:
        run_typed<double, double>(call);
        break;
      case MembankDType::kBFloat16:
        run_typed<cpu::bf16_t, float>(call);
        break;
      case MembankDType::kFloat16:
        run_typed<cpu::fp16_t, float>(call);
        break;
    }
  }
  return {call.loss, call.lse, call.wsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("membank_infonce_fwd", &membank_infonce_fwd_cpu); }

}  // namespace distillkit
