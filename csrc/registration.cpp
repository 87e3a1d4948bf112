// The distillkit operator library: every op's schema, and the `distillkit._C` Python module that carries
// them.
//
// Kernels are added per op and backend with TORCH_LIBRARY_IMPL: csrc/<op>/cpu_binding.cpp (built into
// distillkit._C) and csrc/<op>/cuda_binding.cpp (distillkit._C_cuda).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(distillkit, m) {
  // Memory-bank InfoNCE forward (csrc/membank_infonce/binding.h describes inputs and outputs).
  m.def(
      "membank_infonce_fwd(Tensor query, Tensor positive, Tensor bank, float temperature, "
      "Tensor? query_labels, Tensor? bank_labels, Tensor? negative_index) -> (Tensor loss, Tensor lse, "
      "Tensor wsum)");
  // Fused linear-divergence loss and its gradients (csrc/linear_divergence/cpu_binding.cpp).
  m.def(
      "fused_linear_divergence_fwd(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, "
      "Tensor teacher_weight, Tensor kd_weight, Tensor? ce_weight, Tensor? labels, str divergence, "
      "float temperature, float beta, float alpha) -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight)");
  // The same against a sparse teacher: top-k ids and log-probabilities plus the log tail mass, the tail spread
  // evenly or one bucket (csrc/linear_divergence/cpu_topk_binding.cpp).
  m.def(
      "fused_linear_divergence_topk_fwd(Tensor student_hidden, Tensor student_weight, Tensor teacher_index, "
      "Tensor teacher_logp, Tensor teacher_log_tail, Tensor kd_weight, Tensor? ce_weight, Tensor? labels, "
      "str divergence, float temperature, float beta, float alpha, str tail) -> (Tensor loss, "
      "Tensor grad_hidden, Tensor grad_weight)");
}

extern "C" {
// An empty Python module: importing distillkit._C runs the registrations above and the CPU kernels'.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
