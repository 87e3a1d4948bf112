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
// Algorithm (run): the rows with a non-zero weight are processed in blocks of R rows. For one block, the
// vocabulary is split into contiguous parts that the workers take in turn (with a vocabulary too small to give
// every worker parts, the rows are split among the workers instead); for its part, a worker computes
// the [R, part] tiles of s and t with the caller's GEMM into the block buffers and runs the first sweep of
// row_math.h on each row (the exponentials, one exp per logit and model, and per-part normalisers). The
// parts' statistics merge into log-normalisers (online softmax). The divergences whose gradient needs the
// row's sum(q * g) take a second sweep (mix_row); the last sweep writes the logit gradient G in place and
// folds it into grad_W[part] += G^T h_s (the worker owns those rows of grad_W, so there is no per-thread copy
// of a [V, Ds] gradient) and grad_h += G W_s[part] (a small [R, Ds] partial per part, summed after). The
// N x V logits are never stored: the buffers hold two [R, V] tiles (three with the cross-entropy at T != 1).
//
// Sparse teacher: the teacher is given as its top-k token ids and log-probabilities per row plus the log of
// the remaining mass; no teacher GEMM runs. Either the tail is spread evenly over the other tokens and the
// dense algorithm runs on those teacher logits (run with teacher_index set), or D compares the k + 1 buckets
// (each top-k token, and the rest) of p with the same buckets of q, whose tail is the student's mass outside
// the top k (run_topk, cpu_topk_kernel.cpp).
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
  int64_t Dt = 0;  // teacher hidden size (dense teacher)
  int64_t K = 0;   // top-k entries per row (sparse teacher)
  Divergence kind = Divergence::kForwardKL;
  acc_t temperature = 1;
  acc_t beta = 0.5;   // jsd's mixing weight
  acc_t alpha = 0.1;  // the skew forms' mixing weight
  const acc_t* student_hidden = nullptr;    // [N, Ds]
  const acc_t* student_weight = nullptr;    // [V, Ds]
  const acc_t* teacher_hidden = nullptr;    // [N, Dt] (dense teacher)
  const acc_t* teacher_weight = nullptr;    // [V, Dt] (dense teacher)
  const int64_t* teacher_index = nullptr;   // [N, K] distinct ids in [0, V) (sparse teacher)
  const acc_t* teacher_logp = nullptr;      // [N, K] their log-probabilities at temperature 1
  const acc_t* teacher_log_tail = nullptr;  // [N] log of the mass outside the top K
  const acc_t* kd_weight = nullptr;         // [N] weight of each row's divergence (0: not counted)
  const acc_t* ce_weight = nullptr;         // [N] weight of each row's cross-entropy, or null (no CE)
  const int64_t* labels = nullptr;          // [N] in [0, V), or -100 (ignored); required with ce_weight
  acc_t* grad_hidden = nullptr;             // [N, Ds] output
  acc_t* grad_weight = nullptr;             // [V, Ds] output

  // The view of `a`, whose arrays hold acc_t.
  static Problem of(const LinearDivergenceArgs& a) {
    auto in = [](const void* x) { return static_cast<const acc_t*>(x); };
    Problem p;
    p.N = a.N;
    p.V = a.V;
    p.Ds = a.Ds;
    p.Dt = a.Dt;
    p.K = a.K;
    p.kind = a.divergence;
    p.temperature = static_cast<acc_t>(a.temperature);
    p.beta = static_cast<acc_t>(a.beta);
    p.alpha = static_cast<acc_t>(a.alpha);
    p.student_hidden = in(a.student_hidden);
    p.student_weight = in(a.student_weight);
    p.teacher_hidden = in(a.teacher_hidden);
    p.teacher_weight = in(a.teacher_weight);
    p.teacher_index = a.teacher_index;
    p.teacher_logp = in(a.teacher_logp);
    p.teacher_log_tail = in(a.teacher_log_tail);
    p.kd_weight = in(a.kd_weight);
    p.ce_weight = in(a.ce_weight);
    p.labels = a.labels;
    p.grad_hidden = static_cast<acc_t*>(a.grad_hidden);
    p.grad_weight = static_cast<acc_t*>(a.grad_weight);
    return p;
  }
};

// How one call is cut up: rows per block, vocabulary parts per block, and the workers `par` runs on.
struct Plan {
  int64_t rows = 1;     // R
  int64_t parts = 1;    // vocabulary parts of a block (several per worker, so that slower cores take fewer)
  int64_t threads = 1;  // workers
};

// Rows per block so that `buffers` [R, V] buffers take about `buffer_bytes`; `override_rows` > 0 forces R.
int64_t plan_rows(int64_t N, int64_t V, int64_t elem_bytes, int64_t buffers, int64_t buffer_bytes,
                  int64_t override_rows);

// The [R, V] buffers `run` (2, or 3 with a cross-entropy at T != 1) or `run_topk` (`buckets`: 1 or 2) needs.
template <typename acc_t>
int64_t block_buffers(const Problem<acc_t>& p, bool buckets);

// Computes the loss (returned) and writes grad_hidden and grad_weight (overwritten, not accumulated). The
// workers split each block's vocabulary into plan.parts; when that gives them too few parts (a small
// vocabulary), the rows are split into groups that run concurrently instead (block.h: run_active_rows). With
// teacher_index set (a sparse teacher, teacher_hidden and teacher_weight unused), the teacher's logits are its
// top-k log-probabilities and its tail mass spread evenly over the other tokens ("spread" tail): the dense
// divergence against the densified teacher, any divergence, without the teacher's GEMM.
template <typename acc_t>
double run(const Problem<acc_t>& p, const Plan& plan, GemmFn<acc_t> gemm, const ParallelFor& par);

// The sparse teacher (teacher_index, teacher_logp, teacher_log_tail) with its tail as one bucket ("bucket"
// tail; forward KL, reverse KL and JSD).
template <typename acc_t>
double run_topk(const Problem<acc_t>& p, const Plan& plan, GemmFn<acc_t> gemm, const ParallelFor& par);

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
