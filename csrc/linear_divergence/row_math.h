// The per-logit work of the fused linear-divergence kernels: one row of logits over one vocabulary part.
//
// The block drivers (cpu_kernel.cpp, cpu_topk_kernel.cpp) compute a tile of logits with a GEMM, then call
// these functions on each row of it, in three sweeps:
//
//   1. exp_row (exp_row_student for a student alone): z = logit / T, the part's maxima and, in place, the
//      exponentials e = exp(z - max) with their sums: one exp per logit and model, the only ones the sweeps
//      take. The part statistics merge into the row's log-normalisers, so q = fs * e_s and p = ft * e_t with
//      one factor per part (fs = exp(max_s - lse_s)).
//   2. mix_row (divergences whose gradient needs the whole row's sum(q * g), g = dD/dq): the divergence and
//      that sum, writing g in place of e_t (one log per logit; jsd two).
//   3. grad_row: the logit gradient in place of e_s, from what the first two sweeps stored (no exp, no log).
//
// What each divergence keeps between sweeps (s, t: the two row buffers):
//   forward_kl       s = e_s, t = e_t            KL = sum p (z_t - z_s) - lse_t + lse_s     G = c (q - p)
//   reverse_kl       s = e_s, t = z_s - z_t      KL = sum q (z_s - z_t) - lse_s + lse_t     G = c q (t - k)
//   tvd              s = e_s, t = e_t            mix_row: sum |p - q| / 2                   G = c q (sign / 2 - k)
//   jsd, skew forms  s = e_s, t = e_t -> g       mix_row: D and sum(q g)                    G = c q (g - k)
// with k the row constant that makes sum(G) = 0 (sum(q g), or lse_s - lse_t + KL for reverse_kl).
//
// The code is compiled once per instruction set (cpu_row_math.cpp: the portable baseline and, on x86-64, AVX2
// with FMA) and row_kernels() picks the best one the CPU runs, once.
#pragma once

#include <cstdint>

#include "linear_divergence/args.h"

namespace distillkit {
namespace cpu {
namespace fld {

// Statistics of one row over one vocabulary part.
template <typename acc_t>
struct PartRow {
  acc_t max_s;        // max of z_s over the part (-inf when empty)
  acc_t sum_s;        // sum exp(z_s - max_s)
  acc_t max_t;        // the same for the teacher
  acc_t sum_t;        //
  acc_t cross;        // forward_kl: sum e_t (z_t - z_s); reverse_kl: sum e_s (z_s - z_t)
  acc_t max_c;        // max of the raw student logits (cross-entropy at T != 1)
  acc_t sum_c;        // sum exp(s - max_c)
  acc_t value;        // mix_row: the part's divergence terms
  acc_t sqg;          // mix_row: the part's sum(q * g)
  acc_t label_logit;  // the raw student logit of the row's label when it lies in this part, else 0
};

// Coefficients of grad_row: G = a * s - b * t (forward_kl), else G = s * (a * (x - k) + b) with x = t (or
// sign(fs s - ft t) / 2 for tvd). b carries the cross-entropy's softmax at T = 1 (it is q then).
template <typename acc_t>
struct GradCoef {
  acc_t a = 0;
  acc_t b = 0;
  acc_t k = 0;
  acc_t fs = 0;  // tvd: the parts' factors, to rebuild q and p
  acc_t ft = 0;
};

// The row functions of one instruction set (see the top of this file).
template <typename acc_t>
struct RowKernels {
  // Sweep 1 on one row of both models' logits s and t (n columns), in place.
  void (*exp_row)(Divergence kind, acc_t* s, acc_t* t, int64_t n, acc_t inv_t, PartRow<acc_t>* st);
  // Sweep 1 of the student alone (the sparse-teacher kernel): s = exp(s / T - max_s), max_s and sum_s.
  void (*exp_row_student)(acc_t* s, int64_t n, acc_t inv_t, PartRow<acc_t>* st);
  // The raw logits' softmax numerators for the cross-entropy at T != 1: c = exp(s - max_c), max_c, sum_c.
  void (*ce_row)(const acc_t* s, acc_t* c, int64_t n, PartRow<acc_t>* st);
  // Sweep 2 (tvd, jsd, skew forms): st->value and st->sqg from q = fs * s and p = ft * t; writes g over t.
  void (*mix_row)(Divergence kind, const acc_t* s, acc_t* t, int64_t n, acc_t fs, acc_t ft, acc_t beta,
                  acc_t alpha, PartRow<acc_t>* st);
  // Sweep 3: the logit gradient in place of s.
  void (*grad_row)(Divergence kind, acc_t* s, const acc_t* t, int64_t n, const GradCoef<acc_t>& c);
  // s += a * c (the cross-entropy's softmax at T != 1).
  void (*axpy_row)(acc_t* s, const acc_t* c, int64_t n, acc_t a);
  // s *= a (the sparse teacher's tail: one gradient factor for every student logit outside the top k).
  void (*scale_row)(acc_t* s, int64_t n, acc_t a);
  // Name of the instruction set ("avx2" or "baseline").
  const char* isa;
};

// The row functions of the best instruction set this CPU runs (DISTILLKIT_CPU_ISA=baseline forces the
// portable ones).
template <typename acc_t>
const RowKernels<acc_t>& row_kernels();

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
