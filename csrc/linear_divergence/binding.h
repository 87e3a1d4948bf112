// What the two CPU bindings of the fused linear-divergence ops share (cpu_binding.cpp: dense teacher,
// cpu_topk_binding.cpp: sparse teacher): argument parsing, the thread plan, running the typed kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "common/blas_gemm.h"
#include "linear_divergence/args.h"
#include "linear_divergence/cpu_kernel.h"

namespace distillkit {
namespace fld_binding {

// The Divergence called `name`; the error lists every name `op` accepts (the first `count` of the table).
inline Divergence parse_divergence(std::string_view name, const char* op, int count = kNumDivergences) {
  Divergence kind = Divergence::kForwardKL;
  if (divergence_from_name(name, &kind) && static_cast<int>(kind) < count) return kind;
  std::string choices;
  for (int i = 0; i < count; ++i) {
    choices += i == 0 ? "" : (i + 1 == count ? " or " : ", ");
    choices += kDivergenceNames[i];
  }
  TORCH_CHECK(false, op, ": unknown divergence '", std::string(name), "'; use ", choices);
}

// DISTILLKIT_FLD_ROWS=R forces the row-block size (tests use it to cross block boundaries).
inline int64_t rows_override() {
  const char* env = std::getenv("DISTILLKIT_FLD_ROWS");
  return env != nullptr ? std::atoll(env) : 0;
}

// The [R, V] row-block buffers together. Each block reads W_s (twice) and W_t and reads and writes grad_W, so
// larger blocks save memory traffic: at V = 49,152 this gives R = 240 (the rows are capped at 256).
constexpr int64_t kBufferBytes = int64_t(96) << 20;
constexpr int64_t kPartsPerThread = 4;
constexpr double kMinParallelFlops = 64e6;  // about a millisecond of GEMM on one core
constexpr int64_t kMinPartColumns = 512;

// Runs body(item) for every item in [0, n) on at most `threads` workers taking items from a shared counter:
// a core slowed by other work takes fewer items instead of holding up the others. One worker runs the items
// in order, without entering the thread pool.
inline cpu::fld::ParallelFor shared_counter_for(int64_t threads) {
  return [threads](int64_t n, const std::function<void(int64_t)>& body) {
    if (threads <= 1 || n <= 1) {
      for (int64_t item = 0; item < n; ++item) body(item);
      return;
    }
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t worker = begin; worker < end; ++worker) {
        for (int64_t item = next++; item < n; item = next++) body(item);
      }
    });
  };
}

// Labels in [0, V) or -100, as int64; the error names the first bad row.
inline at::Tensor checked_labels(const at::Tensor& labels, int64_t V) {
  at::Tensor out = labels.to(at::kLong).contiguous();
  const int64_t* l = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < out.numel(); ++r) {
    TORCH_CHECK_INDEX(l[r] == -100 || (l[r] >= 0 && l[r] < V), "fused_linear_divergence: label ", l[r],
                      " at row ", r, " is outside [0, ", V, ") and is not -100 (ignored)");
  }
  return out;
}

// The student's side of a call, shared by both forms of the op: its inputs in the accumulation dtype, the
// per-row weights and labels, and the outputs (loss, grad_hidden [N, Ds], grad_weight [V, Ds]).
struct StudentSide {
  at::ScalarType acc;
  at::Tensor hs, ws, kw, loss, grad_hidden, grad_weight;
  std::optional<at::Tensor> cw, lb;

  StudentSide(const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& kd_weight,
              const std::optional<at::Tensor>& ce_weight, const std::optional<at::Tensor>& labels, const char* op)
      : acc(student_hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat) {
    const int64_t N = student_hidden.size(0), Ds = student_hidden.size(1), V = student_weight.size(0);
    hs = student_hidden.to(acc).contiguous();
    ws = student_weight.to(acc).contiguous();
    kw = kd_weight.to(acc).contiguous();
    if (labels.has_value()) {
      TORCH_CHECK(labels->dim() == 1 && labels->size(0) == N && ce_weight->dim() == 1 && ce_weight->size(0) == N,
                  op, ": ce_weight and labels must be [", N, "]");
      cw = ce_weight->to(acc).contiguous();
      lb = checked_labels(*labels, V);
    }
    auto opts = student_hidden.options().dtype(acc);
    loss = at::zeros({}, opts);
    grad_hidden = at::empty({N, Ds}, opts);
    grad_weight = at::empty({V, Ds}, opts);
  }

  // Fills every field of `args` but the teacher's; N, V, Ds from the tensors.
  void fill(LinearDivergenceArgs& args, Divergence kind, double temperature, double beta, double alpha) const {
    args.dtype = acc == at::kDouble ? LinearDivergenceDType::kFloat64 : LinearDivergenceDType::kFloat32;
    args.N = hs.size(0);
    args.V = ws.size(0);
    args.Ds = hs.size(1);
    args.divergence = kind;
    args.temperature = temperature;
    args.beta = beta;
    args.alpha = alpha;
    args.student_hidden = hs.data_ptr();
    args.student_weight = ws.data_ptr();
    args.kd_weight = kw.data_ptr();
    args.ce_weight = cw.has_value() ? cw->data_ptr() : nullptr;
    args.labels = lb.has_value() ? lb->data_ptr<int64_t>() : nullptr;
    args.grad_hidden = grad_hidden.data_ptr();
    args.grad_weight = grad_weight.data_ptr();
  }
};

// Runs the kernel on `args` with this process's threads (`buckets`: the sparse teacher's tail as one bucket,
// run_topk; else run, with a dense teacher or a sparse one spread evenly); returns the loss.
template <typename acc_t>
double run_typed(const LinearDivergenceArgs& args, bool buckets) {
  const auto problem = cpu::fld::Problem<acc_t>::of(args);
  const int64_t buffers = cpu::fld::block_buffers(problem, buckets);
  cpu::fld::Plan plan;
  plan.rows = cpu::fld::plan_rows(args.N, args.V, sizeof(acc_t), buffers, kBufferBytes, rows_override());
  // Several vocabulary parts per thread, so that the shared counter can balance them.
  // A call smaller than kMinParallelFlops runs on this thread: waking the pool would cost more than the work
  // (and much more on a busy machine, where a worker may wait for a core).
  const double flops = 2.0 * args.N * args.V * (3.0 * args.Ds + args.Dt);
  plan.threads = flops < kMinParallelFlops ? 1 : at::get_num_threads();
  plan.parts = std::max<int64_t>(1, std::min<int64_t>(plan.threads * kPartsPerThread, args.V / kMinPartColumns));
  const cpu::fld::ParallelFor par = shared_counter_for(plan.threads);
  const auto gemm = cpu_gemm::pick_gemm<acc_t>();
  return buckets ? cpu::fld::run_topk<acc_t>(problem, plan, gemm, par) : cpu::fld::run<acc_t>(problem, plan, gemm, par);
}

// Runs the kernel on `args` (filled by `side`) and returns (loss, grad_hidden, grad_weight).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> run_call(const StudentSide& side,
                                                             const LinearDivergenceArgs& args, bool buckets) {
  const double value = args.dtype == LinearDivergenceDType::kFloat64 ? run_typed<double>(args, buckets)
                                                                     : run_typed<float>(args, buckets);
  side.loss.fill_(value);
  return {side.loss, side.grad_hidden, side.grad_weight};
}

}  // namespace fld_binding
}  // namespace distillkit
