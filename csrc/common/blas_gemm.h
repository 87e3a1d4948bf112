// Column-major gemm for the CPU bindings: the Fortran BLAS that torch links, or at::mm without one.
//
// The kernels take a gemm function pointer (cpu::GemmFn, common/gemm.h); pick_gemm<acc_t>() returns the one
// to pass. DISTILLKIT_CPU_GEMM=aten forces the at::mm path (for testing it).
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <type_traits>

#include "common/gemm.h"

// The Fortran BLAS that torch links (MKL or OpenBLAS) exports sgemm_/dgemm_ (32-bit integers). They are
// looked up weakly so that a torch without BLAS still loads the extension and falls back to at::mm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace distillkit {
namespace cpu_gemm {

template <typename acc_t>
void fortran_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
                  int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<acc_t, float>) {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
}

// Column-major gemm through at::mm on tensors viewing the buffers (row-major C^T = op(B)^T op(A)^T).
template <typename acc_t>
void aten_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
               int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Column-major X (rows x cols, ld) is the row-major tensor [cols, rows] with stride ld.
  auto view = [&](const acc_t* ptr, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<acc_t*>(ptr), {cols, rows}, {ld, 1}, opts);
  };
  at::Tensor at_ = trans_a ? view(a, k, m, lda).t() : view(a, m, k, lda);  // op(A)^T [k, m]
  at::Tensor bt = trans_b ? view(b, n, k, ldb).t() : view(b, k, n, ldb);  // op(B)^T [n, k]
  at::Tensor ct = at::from_blob(c, {n, m}, {ldc, 1}, opts);               // C^T [n, m]
  at::Tensor prod = at::mm(bt, at_);
  if (beta == acc_t(0)) {
    ct.copy_(prod.mul_(alpha));
  } else {
    ct.mul_(beta).add_(prod, alpha);
  }
}

// The BLAS gemm when torch links one and DISTILLKIT_CPU_GEMM is not `aten`, else the at::mm one.
template <typename acc_t>
cpu::GemmFn<acc_t> pick_gemm() {
  const char* env = std::getenv("DISTILLKIT_CPU_GEMM");
  const bool force_aten = env != nullptr && std::string(env) == "aten";
  const bool have_blas = std::is_same_v<acc_t, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  return have_blas && !force_aten ? &fortran_gemm<acc_t> : &aten_gemm<acc_t>;
}

}  // namespace cpu_gemm
}  // namespace distillkit
