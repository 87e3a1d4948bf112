// CPU kernel of distillkit::fused_linear_divergence_fwd (schema in csrc/registration.cpp).
//
// Canonical inputs (the Python wrapper distillkit/ops/linear_divergence/op.py produces them):
//   student_hidden [N, Ds], student_weight [V, Ds], teacher_hidden [N, Dt], teacher_weight [V, Dt]: floating
//     tensors (float32, float64, bfloat16, float16), converted here to the accumulation type (float64 when
//     student_hidden is float64, else float32);
//   kd_weight [N] (accumulation type): each row's weight of T^2 * divergence;
//   ce_weight [N] and labels [N] int64 (both or neither): each row's weight of the hard-label cross-entropy,
//     labels in [0, V) or -100;
//   divergence: one of kDivergenceNames (linear_divergence/args.h).
// Outputs (accumulation type): loss [] and the loss's gradients grad_hidden [N, Ds], grad_weight [V, Ds].
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string_view>

#include "linear_divergence/args.h"
#include "linear_divergence/binding.h"

namespace distillkit {
namespace {

// Checks ranks, sizes and the temperature; labels are checked once converted.
void check_inputs(const at::Tensor& student_hidden, const at::Tensor& student_weight,
                  const at::Tensor& teacher_hidden, const at::Tensor& teacher_weight, const at::Tensor& kd_weight,
                  const std::optional<at::Tensor>& ce_weight, const std::optional<at::Tensor>& labels,
                  double temperature) {
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
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_divergence_fwd_cpu(
    const at::Tensor& student_hidden, const at::Tensor& student_weight, const at::Tensor& teacher_hidden,
    const at::Tensor& teacher_weight, const at::Tensor& kd_weight, const std::optional<at::Tensor>& ce_weight,
    const std::optional<at::Tensor>& labels, c10::string_view divergence, double temperature, double beta,
    double alpha) {
  check_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, kd_weight, ce_weight, labels,
               temperature);
  const int64_t Dt = teacher_hidden.size(1);
  const Divergence kind = fld_binding::parse_divergence(std::string_view(divergence.data(), divergence.size()),
                                                        "fused_linear_divergence_fwd");
  const fld_binding::StudentSide side(student_hidden, student_weight, kd_weight, ce_weight, labels,
                                      "fused_linear_divergence_fwd");
  at::Tensor ht = teacher_hidden.to(side.acc).contiguous(), wt = teacher_weight.to(side.acc).contiguous();
  LinearDivergenceArgs args;
  side.fill(args, kind, temperature, beta, alpha);
  args.Dt = Dt;
  args.teacher_hidden = ht.data_ptr();
  args.teacher_weight = wt.data_ptr();
  return fld_binding::run_call(side, args, false);
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("fused_linear_divergence_fwd", &fused_linear_divergence_fwd_cpu); }

}  // namespace distillkit
