// The row functions of row_math.h, compiled once per instruction set, and the choice between them.
//
// The extension is built for a portable target (SSE2 on x86-64), where the exp/log polynomials run four
// lanes wide. The same source compiled for AVX2 with FMA runs eight; the CPU is asked once which one it can
// run. Every header with inline functions or templates is included before the target pragma, so that none of
// them is compiled for AVX2 (the linker could otherwise hand an AVX2 copy to portable callers); row_math_impl.h
// defines only functions of its own namespace.
//
// Floating-point operations may be evaluated in lanes whose result is then not selected (nothing here reads
// the FP exception flags): without that, GCC keeps the selects as branches and the loops scalar. The pragma
// comes first so that every inline function this file calls (std::floor, the exp/log helpers) has the same
// attributes as the loops and inlines into them.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "common/fast_exp.h"
#include "linear_divergence/row_math.h"

#define DISTILLKIT_FLD_ISA baseline
#include "linear_divergence/row_math_impl.h"
#undef DISTILLKIT_FLD_ISA

#if defined(__x86_64__) && defined(__GNUC__)
#define DISTILLKIT_FLD_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define DISTILLKIT_FLD_ISA avx2
#include "linear_divergence/row_math_impl.h"
#undef DISTILLKIT_FLD_ISA
#pragma GCC pop_options
#endif

namespace distillkit {
namespace cpu {
namespace fld {
namespace {

// Whether the AVX2 copies may run: the CPU (and the OS, which libgcc's check includes) supports AVX2 and FMA,
// and DISTILLKIT_CPU_ISA does not ask for the baseline.
bool use_avx2() {
#if defined(DISTILLKIT_FLD_HAVE_AVX2)
  const char* env = std::getenv("DISTILLKIT_CPU_ISA");
  if (env != nullptr && std::strcmp(env, "baseline") == 0) return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <typename acc_t>
RowKernels<acc_t> pick() {
#if defined(DISTILLKIT_FLD_HAVE_AVX2)
  if (use_avx2()) return avx2::table<acc_t>("avx2");
#endif
  return baseline::table<acc_t>("baseline");
}

}  // namespace

template <typename acc_t>
const RowKernels<acc_t>& row_kernels() {
  static const RowKernels<acc_t> kernels = pick<acc_t>();
  return kernels;
}

template const RowKernels<float>& row_kernels<float>();
template const RowKernels<double>& row_kernels<double>();

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
