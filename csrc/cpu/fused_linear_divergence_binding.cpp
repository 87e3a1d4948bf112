// Registers distillkit::fused_linear_divergence_fwd (schema + CPU kernel).
//
// Canonical inputs (the Python wrapper distillkit/ops/fused_linear_divergence.py produces them):
//   student_hidden [N, Ds], student_weight [V, Ds], teacher_hidden [N, Dt], teacher_weight [V, Dt]: floating
//     tensors (float32, float64, bfloat16, float16), converted here to the accumulation type (float64 when
//     student_hidden is float64, else float32);
//   kd_weight [N] (accumulation type): each row's weight of T^2 * divergence;
//   ce_weight [N] and labels [N] int64 (both or neither): each row's weight of the hard-label cross-entropy,
//     labels in [0, V) or -100;
//   divergence: forward_kl | reverse_kl | jsd | tvd | skew_forward_kl | skew_reverse_kl.
// Outputs (accumulation type): loss [] and the loss's gradients grad_hidden [N, Ds], grad_weight [V, Ds].
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <string>
#include <type_traits>

#include "cpu/blas_gemm.h"
#include "cpu/fused_linear_divergence_kernel.h"

namespace distillkit {
namespace {

cpu::fld::Divergence parse_divergence(const std::string& name) {
  if (name == "forward_kl") return cpu::fld::Divergence::kForwardKL;
  if (name == "reverse_kl") return cpu::fld::Divergence::kReverseKL;
  if (name == "jsd") return cpu::fld::Divergence::kJSD;
  if (name == "tvd") return cpu::fld::Divergence::kTVD;
  if (name == "skew_forward_kl") return cpu::fld::Divergence::kSkewForwardKL;
  if (name == "skew_reverse_kl") return cpu::fld::Divergence::kSkewReverseKL;
  TORCH_CHECK(false, "fused_linear_divergence_fwd: unknown divergence '", name,
              "'; use forward_kl, reverse_kl, jsd, tvd, skew_forward_kl or skew_reverse_kl");
}

// DISTILLKIT_FLD_ROWS=R forces the row-block size (tests use it to cross block boundaries).
int64_t rows_override() {
  const char* env = std::getenv("DISTILLKIT_FLD_ROWS");
  return env != nullptr ? std::atoll(env) : 0;
}

constexpr int64_t kBufferBytes = int64_t(48) << 20;  // the two [R, V] logit buffers
constexpr int64_t kPartsPerThread = 4;
constexpr int64_t kMinPartColumns = 512;

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_divergence_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const at::Tensor& kd_weight, const std::optional<at::Tensor>& ce_weight,
    const std::optional<at::Tensor>& labels, c10::string_view divergence, double temperature, double beta,
    double alpha) {
  TORCH_CHECK(student_hidden.dim() == 2 && student_weight.dim() == 2 && teacher_hidden.dim() == 2 &&
                  teacher_weight.dim() == 2,
              "fused_linear_divergence_fwd: hidden and weight tensors must be 2-D");
  const int64_t N = student_hidden.size(0), Ds = student_hidden.size(1), Dt = teacher_hidden.size(1);
  const int64_t V = student_weight.size(0);
  TORCH_CHECK(student_weight.size(1) == Ds, "fused_linear_divergence_fwd: student_weight is ",
              student_weight.sizes(), ", expected [V, ", Ds, "]");
  TORCH_CHECK(teacher_weight.size(0) == V && teacher_weight.size(1) == Dt,
              "fused_linear_divergence_fwd: teacher_weight is ", teacher_weight.sizes(), ", expected [", V, ", ",
              Dt, "]");
  TORCH_CHECK(teacher_hidden.size(0) == N, "fused_linear_divergence_fwd: teacher_hidden has ",
              teacher_hidden.size(0), " rows, student_hidden ", N);
  TORCH_CHECK(kd_weight.dim() == 1 && kd_weight.size(0) == N, "fused_linear_divergence_fwd: kd_weight must be [",
              N, "]");
  TORCH_CHECK(ce_weight.has_value() == labels.has_value(),
              "fused_linear_divergence_fwd: ce_weight and labels go together");
  TORCH_CHECK(temperature > 0, "fused_linear_divergence_fwd: temperature must be > 0");
  const cpu::fld::Divergence kind = parse_divergence(std::string(divergence));
  const at::ScalarType acc = student_hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = student_hidden.options().dtype(acc);
  at::Tensor hs = student_hidden.to(acc).contiguous(), ws = student_weight.to(acc).contiguous();
  at::Tensor ht = teacher_hidden.to(acc).contiguous(), wt = teacher_weight.to(acc).contiguous();
  at::Tensor kw = kd_weight.to(acc).contiguous();
  std::optional<at::Tensor> cw, lb;
  if (labels.has_value()) {
    TORCH_CHECK(labels->dim() == 1 && labels->size(0) == N && ce_weight->dim() == 1 && ce_weight->size(0) == N,
                "fused_linear_divergence_fwd: ce_weight and labels must be [", N, "]");
    cw = ce_weight->to(acc).contiguous();
    lb = labels->to(at::kLong).contiguous();
    const int64_t* l = lb->data_ptr<int64_t>();
    for (int64_t r = 0; r < N; ++r) {
      TORCH_CHECK_INDEX(l[r] == -100 || (l[r] >= 0 && l[r] < V), "fused_linear_divergence: label ", l[r],
                        " at row ", r, " is outside [0, ", V, ") and is not -100 (ignored)");
    }
  }
  at::Tensor loss = at::zeros({}, opts);
  at::Tensor grad_hidden = at::empty({N, Ds}, opts);
  at::Tensor grad_weight = at::empty({V, Ds}, opts);
  const int64_t rows = cpu::fld::plan_rows(N, V, acc == at::kDouble ? 8 : 4, kBufferBytes, rows_override());
  // Several vocabulary parts per thread, taken from a shared counter: a core slowed by other work takes
  // fewer parts instead of holding up the block.
  const int64_t threads = at::get_num_threads();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads * kPartsPerThread, V / kMinPartColumns));
  const cpu::fld::ParallelFor par = [threads](int64_t n, const std::function<void(int64_t)>& body) {
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min(threads, n), 1, [&](int64_t begin, int64_t end) {
      for (int64_t worker = begin; worker < end; ++worker) {
        for (int64_t item = next++; item < n; item = next++) body(item);
      }
    });
  };
  auto solve = [&](auto* tag) {
    using acc_t = std::remove_pointer_t<decltype(tag)>;
    cpu::fld::Problem<acc_t> p;
    p.N = N;
    p.V = V;
    p.Ds = Ds;
    p.Dt = Dt;
    p.kind = kind;
    p.temperature = static_cast<acc_t>(temperature);
    p.beta = static_cast<acc_t>(beta);
    p.alpha = static_cast<acc_t>(alpha);
    p.student_hidden = hs.data_ptr<acc_t>();
    p.student_weight = ws.data_ptr<acc_t>();
    p.teacher_hidden = ht.data_ptr<acc_t>();
    p.teacher_weight = wt.data_ptr<acc_t>();
    p.kd_weight = kw.data_ptr<acc_t>();
    p.ce_weight = cw.has_value() ? cw->data_ptr<acc_t>() : nullptr;
    p.labels = lb.has_value() ? lb->data_ptr<int64_t>() : nullptr;
    p.grad_hidden = grad_hidden.data_ptr<acc_t>();
    p.grad_weight = grad_weight.data_ptr<acc_t>();
    const double value = cpu::fld::run<acc_t>(p, rows, parts, cpu_gemm::pick_gemm<acc_t>(), par);
    loss.fill_(value);
  };
  if (acc == at::kDouble) {
    solve(static_cast<double*>(nullptr));
  } else {
    solve(static_cast<float*>(nullptr));
  }
  return {loss, grad_hidden, grad_weight};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distillkit, m) {
  m.def(
      "fused_linear_divergence_fwd(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
      "Tensor teacher_weight, Tensor kd_weight, Tensor? ce_weight, Tensor? labels, str divergence, "
      "float temperature, float beta, float alpha) -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("fused_linear_divergence_fwd", &fused_linear_divergence_fwd_cpu); }

}  // namespace distillkit
