// Fused linear-divergence on the CPU: plain C++ over pointers and sizes (no torch headers).
//
// For student rows h_s [N, Ds] with output weight W_s [V, Ds] and teacher rows h_t [N, Dt] with W_t [V, Dt],
// the logits are s = h_s W_s^T and t = h_t W_t^T; with temperature T, q = softmax(s / T) (student) and
// p = softmax(t / T) (teacher). The kernel returns
//   loss = T^2 * sum_r kd_weight[r] * D(p_r || q_r) + sum_r ce_weight[r] * CE(softmax(s_r), label_r)
// and, in the same call, the gradients of that loss with respect to h_s and W_s (the loss is terminal, so the
// caller scales them by the upstream gradient later). D is one of the divergences of
// distillkit/ops/divergences.py; the closed-form gradient with respect to the scaled student logits z = s / T is
// q * (g - sum(q * g)) with g = dD/dq (forward KL: q - p).
//
// Algorithm: the rows with a non-zero weight are processed in blocks of R rows. For one block, the
// vocabulary is split into one contiguous range per worker; each worker computes its [R, range] tiles of s
// and t with the caller's GEMM into a block buffer, and the per-row (max, sum of exp) of each distribution over
// its range. The partial statistics are merged into log-normalisers (online softmax). A second sweep over the
// same tiles computes each row's divergence (and sum(q * g) where the gradient needs it); a last sweep writes
// the logit gradient G in place of s and folds it into grad_W[range] += G^T h_s (the worker owns those rows of
// grad_W, so there is no per-thread copy of a [V, Ds] gradient) and grad_h += G W_s[range] (a small [R, Ds]
// partial per worker, summed after). Memory: two [R, V] buffers plus O(R * (Ds + Dt)) per block; R is chosen
// so the buffers stay near 32 MiB. The N x V logits are never stored.
#pragma once

#include <cstdint>
#include <functional>

#include "common/gemm.h"
#include "linear_divergence/args.h"

namespace distillkit {
namespace cpu {
namespace fld {

// Runs body(item) for every item in [0, n), possibly in parallel; returns when all are done.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t item)>& body)>;

// The typed view of one call's LinearDivergenceArgs that the kernel works on (acc_t: float for kFloat32,
// double for kFloat64).
template <typename acc_t>
struct Problem {
  int64_t N = 0;   // rows (tokens)
  int64_t V = 0;   // vocabulary
  int64_t Ds = 0;  // student hidden size
  int64_t Dt = 0;  // teacher hidden size
  Divergence kind = Divergence::kForwardKL;
  acc_t temperature = 1;
  acc_t beta = 0.5;   // jsd's mixing weight
  acc_t alpha = 0.1;  // the skew forms' mixing weight
  const acc_t* student_hidden = nullptr;  // [N, Ds]
  const acc_t* student_weight = nullptr;  // [V, Ds]
  const acc_t* teacher_hidden = nullptr;  // [N, Dt]
  const acc_t* teacher_weight = nullptr;  // [V, Dt]
  const acc_t* kd_weight = nullptr;       // [N] weight of each row's divergence (0: not counted)
  const acc_t* ce_weight = nullptr;       // [N] weight of each row's cross-entropy, or null (no CE)
  const int64_t* labels = nullptr;        // [N] in [0, V), or -100 (ignored); required with ce_weight
  acc_t* grad_hidden = nullptr;           // [N, Ds] output
  acc_t* grad_weight = nullptr;           // [V, Ds] output

  // The view of `a`, whose arrays hold acc_t (the fields above, in order).
  static Problem of(const LinearDivergenceArgs& a) {
    auto in = [](const void* x) { return static_cast<const acc_t*>(x); };
    auto out = [](void* x) { return static_cast<acc_t*>(x); };
    return {a.N,
            a.V,
            a.Ds,
            a.Dt,
            a.divergence,
            static_cast<acc_t>(a.temperature),
            static_cast<acc_t>(a.beta),
            static_cast<acc_t>(a.alpha),
            in(a.student_hidden),
            in(a.student_weight),
            in(a.teacher_hidden),
            in(a.teacher_weight),
            in(a.kd_weight),
            in(a.ce_weight),
            a.labels,
            out(a.grad_hidden),
            out(a.grad_weight)};
  }
};

// Rows per block so that the two [R, V] logit buffers take about `buffer_bytes`; `override_rows` > 0 forces R.
int64_t plan_rows(int64_t N, int64_t V, int64_t elem_bytes, int64_t buffer_bytes, int64_t override_rows);

// Computes the loss (returned) and writes grad_hidden and grad_weight (overwritten, not accumulated).
// `parts` workers split the vocabulary; `rows` is the block size from plan_rows.
template <typename acc_t>
double run(const Problem<acc_t>& p, int64_t rows, int64_t parts, GemmFn<acc_t> gemm, const ParallelFor& par);

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
