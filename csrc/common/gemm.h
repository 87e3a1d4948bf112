// The gemm the CPU kernels take as a function pointer (no torch headers); blas_gemm.h picks one.
#pragma once

#include <cstdint>

namespace distillkit {
namespace cpu {

// Column-major BLAS gemm: C = alpha * op(A) * op(B) + beta * C, op(A) is m x k, op(B) is k x n.
template <typename acc_t>
using GemmFn = void (*)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha,
                        const acc_t* a, int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c,
                        int64_t ldc);

}  // namespace cpu
}  // namespace distillkit
