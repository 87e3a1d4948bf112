// Fused linear-divergence on the CPU with a sparse teacher: its top-k tokens per row and one tail bucket.
//
// The teacher's distribution over V tokens is known on its top k tokens (log-probabilities at temperature 1)
// and as the mass r of the others. At temperature T the k known logits are logp / T; the tail is taken as
// spread evenly over the V - k other tokens (each log(r / (V - k)) / T), as the dense reading of a top-k
// cache does (distillkit/teacher_cache/reader.py: densify_topk). D compares k + 1 buckets: each top-k token,
// and the tail, against the student's probabilities of the same tokens and its mass outside the top k:
//   P = (p_1 .. p_k, p_tail),  Q = (q_1 .. q_k, q_tail = 1 - sum q_i),  loss term T^2 * D(P || Q).
// The gradient with respect to the student's scaled logit z_j is q_j * h_b(j) with h_b = dD/dQ_b -
// sum_b Q_b dD/dQ_b (b(j): the bucket of token j), so every tail logit shares one factor.
//
// Per block: the student's GEMM tile, then per row and part the top-k logits are read and set to -inf, so that
// the part's sum of exponentials is the tail's alone (no cancellation when the top k hold nearly all the
// mass); the k + 1 buckets are merged per row in double; the last sweep scales the tail's exponentials by
// their factor, writes the top-k entries, and folds the gradient into grad_W and grad_h as the dense kernel
// does. No teacher GEMM, one exp per student logit, and one [R, V] buffer.
#include <algorithm>
#include <cmath>
#include <vector>

#include "linear_divergence/block.h"
#include "linear_divergence/cpu_kernel.h"
#include "linear_divergence/row_math.h"

namespace distillkit {
namespace cpu {
namespace fld {
namespace {

double log_add(double a, double b) {
  const double m = std::max(a, b);
  if (m == -INFINITY) return m;
  return m + std::log(std::exp(a - m) + std::exp(b - m));
}

// One row's buckets: the divergence, each top-k entry's gradient (gtop = Q_i h_i) and the tail's factor.
struct Buckets {
  double lse_s = 0;   // the student's log-normaliser over all V tokens
  double d = 0;       // D(P || Q)
  double h_tail = 0;  // the tail's gradient factor
};

// log-probabilities of the k + 1 buckets: lq, lp [K + 1] (the tail last) from the student's top-k logits z
// (scaled by 1/T) and tail normaliser, and the teacher's top-k log-probabilities and log tail at T = 1.
template <typename acc_t>
double bucket_logs(const acc_t* z, double lse_tail, const acc_t* logp, double log_tail, int64_t K, int64_t V,
                   double T, std::vector<double>* lq, std::vector<double>* lp) {
  double lse_s = lse_tail, lse_t = -INFINITY;
  for (int64_t i = 0; i < K; ++i) lse_s = log_add(lse_s, z[i]);
  const double rest = static_cast<double>(V - K);
  const double tail_t = V > K ? std::log(rest) + (log_tail - std::log(rest)) / T : -INFINITY;
  for (int64_t i = 0; i < K; ++i) lse_t = log_add(lse_t, logp[i] / T);
  lse_t = log_add(lse_t, tail_t);
  for (int64_t i = 0; i < K; ++i) {
    (*lq)[i] = z[i] - lse_s;
    (*lp)[i] = logp[i] / T - lse_t;
  }
  (*lq)[K] = lse_tail - lse_s;
  (*lp)[K] = tail_t - lse_t;
  return lse_s;
}

// The divergence over the buckets and its gradient factors h_b (written over lp), from lq and lp.
double bucket_divergence(Divergence kind, double beta, std::vector<double>* lq_in, std::vector<double>* lp_in) {
  std::vector<double>& lq = *lq_in;
  std::vector<double>& lp = *lp_in;
  const size_t B = lq.size();
  double d = 0;
  if (kind == Divergence::kForwardKL) {  // g_b = -P_b / Q_b, sum Q g = -1: h_b = 1 - P_b / Q_b
    for (size_t b = 0; b < B; ++b) {
      const bool live = lp[b] > -INFINITY;
      d += live ? std::exp(lp[b]) * (lp[b] - lq[b]) : 0.0;
      lp[b] = live ? 1.0 - std::exp(lp[b] - lq[b]) : 1.0;
    }
    return d;
  }
  if (kind == Divergence::kReverseKL) {  // g_b = log(Q_b / P_b) + 1, sum Q g = D + 1: h_b = log(Q_b/P_b) - D
    for (size_t b = 0; b < B; ++b) d += lq[b] > -INFINITY ? std::exp(lq[b]) * (lq[b] - lp[b]) : 0.0;
    for (size_t b = 0; b < B; ++b) lp[b] = lq[b] > -INFINITY ? lq[b] - lp[b] - d : 0.0;
    return d;
  }
  // jsd: M = beta P + (1 - beta) Q; g_b = (1 - beta) log(Q_b / M_b); h_b = g_b - sum Q g.
  const double log_beta = std::log(beta), log_rest = std::log1p(-beta);
  double sqg = 0;
  for (size_t b = 0; b < B; ++b) {
    const double lm = log_add(log_beta + lp[b], log_rest + lq[b]);
    const double q = std::exp(lq[b]), p = std::exp(lp[b]);
    const double g = q > 0 ? (1 - beta) * (lq[b] - lm) : 0.0;
    d += (p > 0 ? beta * p * (lp[b] - lm) : 0.0) + q * g;
    sqg += q * g;
    lp[b] = g;
  }
  for (size_t b = 0; b < B; ++b) lp[b] -= sqg;
  return d;
}

// The block loop over the rows idx[0..count) (see the top of this file); returns their loss.
template <typename acc_t>
double topk_blocks(const Problem<acc_t>& p, const Plan& plan, const int64_t* rows, int64_t count,
                   GemmFn<acc_t> gemm, const ParallelFor& par) {
  const int64_t V = p.V, Ds = p.Ds, K = p.K;
  const std::vector<int64_t> active(rows, rows + count);
  const RowKernels<acc_t>& rk = row_kernels<acc_t>();
  const VocabParts vocab{V, std::max<int64_t>(1, std::min(plan.parts, V))};
  const int64_t P = vocab.count, R = std::max<int64_t>(1, plan.rows);
  const acc_t T = p.temperature, inv_t = acc_t(1) / T;
  const bool own_ce = separate_ce(p);

  Buffer<acc_t> sbuf(R * V), cbuf(own_ce ? R * V : 0), hs(R * Ds), gh(P * R * Ds);
  Buffer<acc_t> ztop(R * K), gtop(R * K), qtop(R * K);  // per row: top-k z, then Q_i h_i and Q_i
  std::vector<PartRow<acc_t>> stats(static_cast<size_t>(P * R));
  std::vector<Buckets> state(static_cast<size_t>(R));
  std::vector<acc_t> lse_c(static_cast<size_t>(R));
  auto stat = [&](int64_t part, int64_t r) -> PartRow<acc_t>& { return stats[part * R + r]; };
  double loss = 0.0;

  for (int64_t start = 0; start < static_cast<int64_t>(active.size()); start += R) {
    const int64_t nb = std::min<int64_t>(R, static_cast<int64_t>(active.size()) - start);
    const int64_t* idx = active.data() + start;
    gather_rows(p.student_hidden, Ds, idx, nb, hs.get());
    // Sweep 1: the student's logits; its top-k logits read and removed; the tail's exponentials.
    par(P, [&](int64_t part) {
      int64_t v0, v1;
      vocab.range(part, &v0, &v1);
      const int64_t nv = v1 - v0;
      for (int64_t r = 0; r < nb; ++r) {
        stat(part, r) = PartRow<acc_t>{neg_inf<acc_t>(), 0, neg_inf<acc_t>(), 0, 0, neg_inf<acc_t>(), 0, 0, 0, 0};
      }
      if (nv <= 0) return;
      gemm(true, false, nv, nb, Ds, acc_t(1), p.student_weight + v0 * Ds, Ds, hs.get(), Ds, acc_t(0),
           sbuf.get() + v0, V);
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t row = idx[r];
        PartRow<acc_t>& st = stat(part, r);
        acc_t* s = sbuf.get() + r * V + v0;
        const int64_t label = p.ce_weight != nullptr ? p.labels[row] : -1;
        if (label >= v0 && label < v1) st.label_logit = s[label - v0];
        if (own_ce && ce_coef(p, row) != 0) rk.ce_row(s, cbuf.get() + r * V + v0, nv, &st);
        const int64_t* ids = p.teacher_index + row * K;
        for (int64_t i = 0; i < K; ++i) {
          if (ids[i] < v0 || ids[i] >= v1) continue;
          ztop.get()[r * K + i] = s[ids[i] - v0] * inv_t;
          s[ids[i] - v0] = neg_inf<acc_t>();
        }
        rk.exp_row_student(s, nv, inv_t, &st);
      }
    });
    // Per row: the k + 1 buckets of both models, the divergence and the gradient factors.
    par(nb, [&](int64_t r) {
      const int64_t row = idx[r];
      const PartRow<acc_t>* first = &stat(0, r);
      const double lse_tail = merge_lse(first, P, R, &PartRow<acc_t>::max_s, &PartRow<acc_t>::sum_s);
      std::vector<double> lq(static_cast<size_t>(K + 1)), lp(static_cast<size_t>(K + 1));
      Buckets& out = state[r];
      out.lse_s = bucket_logs(ztop.get() + r * K, lse_tail, p.teacher_logp + row * K,
                              static_cast<double>(p.teacher_log_tail[row]), K, V, static_cast<double>(T), &lq, &lp);
      const std::vector<double> p_top(lp.begin(), lp.end());  // the teacher's log-probabilities
      out.d = bucket_divergence(p.kind, static_cast<double>(p.beta), &lq, &lp);
      for (int64_t i = 0; i < K; ++i) {
        const double q = std::exp(lq[i]);
        // forward KL: Q_i (1 - P_i / Q_i) = Q_i - P_i, also where Q_i underflows
        const double g = p.kind == Divergence::kForwardKL ? q - std::exp(p_top[i]) : q * lp[i];
        gtop.get()[r * K + i] = static_cast<acc_t>(g);
        qtop.get()[r * K + i] = static_cast<acc_t>(q);
      }
      // The tail's logits share h_tail; with no student mass there they have no gradient.
      out.h_tail = lq[K] > -INFINITY ? lp[K] : 0.0;
      lse_c[r] = own_ce ? merge_lse(first, P, R, &PartRow<acc_t>::max_c, &PartRow<acc_t>::sum_c)
                        : static_cast<acc_t>(out.lse_s);
    });
    // Sweep 2: the logit gradient in place of the exponentials, then the gradient GEMMs of this part.
    par(P, [&](int64_t part) {
      int64_t v0, v1;
      vocab.range(part, &v0, &v1);
      const int64_t nv = v1 - v0;
      if (nv <= 0) return;
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t row = idx[r];
        const PartRow<acc_t>& st = stat(part, r);
        const acc_t c_kd = p.kd_weight[row] * T;
        const acc_t c_ce = ce_coef(p, row);
        const acc_t b = own_ce ? acc_t(0) : c_ce;  // the cross-entropy's softmax is q at T = 1
        const acc_t fs = part_factor(st.max_s, static_cast<acc_t>(state[r].lse_s));
        acc_t* s = sbuf.get() + r * V + v0;
        rk.scale_row(s, nv, fs * (c_kd * static_cast<acc_t>(state[r].h_tail) + b));
        const int64_t* ids = p.teacher_index + row * K;
        for (int64_t i = 0; i < K; ++i) {
          if (ids[i] < v0 || ids[i] >= v1) continue;
          s[ids[i] - v0] = c_kd * gtop.get()[r * K + i] + b * qtop.get()[r * K + i];
        }
        if (own_ce && c_ce != 0) rk.axpy_row(s, cbuf.get() + r * V + v0, nv, c_ce * part_factor(st.max_c, lse_c[r]));
        const int64_t label = p.ce_weight != nullptr ? p.labels[row] : -1;
        if (c_ce != 0 && label >= v0 && label < v1) s[label - v0] -= c_ce;
      }
      fold_gradient(p, gemm, hs.get(), sbuf.get() + v0, nb, v0, nv, gh.get() + part * R * Ds, start == 0);
    });
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t row = idx[r];
      if (p.kd_weight[row] != 0) loss += static_cast<double>(T * T * p.kd_weight[row]) * state[r].d;
      const acc_t c_ce = ce_coef(p, row);
      if (c_ce != 0) {
        acc_t label_logit = 0;
        for (int64_t part = 0; part < P; ++part) label_logit += stat(part, r).label_logit;
        loss += static_cast<double>(c_ce * (lse_c[r] - label_logit));
      }
    }
    add_hidden_gradient(p, vocab, gh.get(), R, idx, nb);
  }
  return loss;
}

}  // namespace

template <typename acc_t>
double run_topk(const Problem<acc_t>& p, const Plan& plan, GemmFn<acc_t> gemm, const ParallelFor& par) {
  return run_active_rows(p, plan, par,
                         [&](const Problem<acc_t>& view, const int64_t* rows, int64_t count, const ParallelFor& each) {
                           return topk_blocks(view, plan, rows, count, gemm, each);
                         });
}

template double run_topk<float>(const Problem<float>&, const Plan&, GemmFn<float>, const ParallelFor&);
template double run_topk<double>(const Problem<double>&, const Plan&, GemmFn<double>, const ParallelFor&);

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
