// The `distillkit._C_cuda` Python module: importing it (after distillkit._C, which defines the schemas) runs
// the CUDA kernels' registrations in csrc/<op>/cuda_binding.cpp.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr,
                                          nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}
