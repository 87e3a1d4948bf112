// Fused linear-divergence on the CPU, dense teacher; see cpu_kernel.h for the algorithm and row_math.h for the
// per-logit sweeps.
#include "linear_divergence/cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "linear_divergence/block.h"
#include "linear_divergence/row_math.h"

namespace distillkit {
namespace cpu {
namespace fld {
namespace {

// Whether the divergence's gradient needs the row's sum(q * g) from a sweep of its own (mix_row).
bool needs_mix(Divergence kind) { return kind != Divergence::kForwardKL && kind != Divergence::kReverseKL; }

// Per row of a block: the log-normalisers and the divergence's row constants.
template <typename acc_t>
struct RowState {
  acc_t lse_s = 0;  // of z_s = s / T
  acc_t lse_t = 0;  // of z_t
  acc_t lse_c = 0;  // of the raw s (cross-entropy)
  acc_t d = 0;      // the divergence
  acc_t sqg = 0;    // sum(q * g)
};

}  // namespace

int64_t plan_rows(int64_t N, int64_t V, int64_t elem_bytes, int64_t buffers, int64_t buffer_bytes,
                  int64_t override_rows) {
  if (override_rows > 0) return std::max<int64_t>(1, std::min(override_rows, std::max<int64_t>(N, 1)));
  int64_t rows = buffer_bytes / std::max<int64_t>(1, buffers * V * elem_bytes);
  rows = std::max<int64_t>(8, std::min<int64_t>(rows, 256));
  if (rows >= 16) rows -= rows % 16;
  return std::max<int64_t>(1, std::min(rows, std::max<int64_t>(N, 1)));
}

template <typename acc_t>
int64_t block_buffers(const Problem<acc_t>& p, bool buckets) {
  return (buckets ? 1 : 2) + (separate_ce(p) ? 1 : 0);
}

namespace {

// A sparse teacher's rows as logits, in place of the teacher's GEMM: its top-k log-probabilities, and the
// tail mass spread evenly over the other V - K tokens (log(r / (V - K)) each), for columns [v0, v1).
template <typename acc_t>
void spread_teacher_rows(const Problem<acc_t>& p, const int64_t* idx, int64_t nb, int64_t v0, int64_t v1,
                         acc_t* t) {
  const int64_t K = p.K, V = p.V;
  for (int64_t r = 0; r < nb; ++r) {
    const int64_t row = idx[r];
    acc_t* out = t + r * V;
    const acc_t tail = V > K ? p.teacher_log_tail[row] - static_cast<acc_t>(std::log(static_cast<double>(V - K)))
                             : neg_inf<acc_t>();
    std::fill(out, out + (v1 - v0), tail);
    const int64_t* ids = p.teacher_index + row * K;
    for (int64_t i = 0; i < K; ++i) {
      if (ids[i] >= v0 && ids[i] < v1) out[ids[i] - v0] = p.teacher_logp[row * K + i];
    }
  }
}

// The block loop over the rows idx[0..count) (see cpu_kernel.h); returns their loss.
template <typename acc_t>
double dense_blocks(const Problem<acc_t>& p, const Plan& plan, const int64_t* rows, int64_t count,
                    GemmFn<acc_t> gemm, const ParallelFor& par) {
  const int64_t V = p.V, Ds = p.Ds, Dt = p.Dt;
  const std::vector<int64_t> active(rows, rows + count);
  const RowKernels<acc_t>& rk = row_kernels<acc_t>();
  const VocabParts vocab{V, std::max<int64_t>(1, std::min(plan.parts, V))};
  const int64_t P = vocab.count, R = std::max<int64_t>(1, plan.rows);
  const acc_t T = p.temperature, inv_t = acc_t(1) / T;
  const Divergence kind = p.kind;
  // Without a counted divergence (a cross-entropy alone) the teacher's logits are not computed.
  const bool any_kd = std::any_of(active.begin(), active.end(), [&](int64_t r) { return p.kd_weight[r] != 0; });
  const bool mix = any_kd && needs_mix(kind);
  const bool own_ce = separate_ce(p);

  Buffer<acc_t> sbuf(R * V), tbuf(any_kd ? R * V : 0), cbuf(own_ce ? R * V : 0);
  // A sparse teacher (teacher_index set) stands in for the teacher's GEMM: spread_teacher_rows.
  const bool sparse = p.teacher_index != nullptr;
  Buffer<acc_t> hs(R * Ds), ht(any_kd && !sparse ? R * Dt : 0), gh(P * R * Ds);
  std::vector<PartRow<acc_t>> stats(static_cast<size_t>(P * R));
  std::vector<RowState<acc_t>> state(static_cast<size_t>(R));
  auto stat = [&](int64_t part, int64_t r) -> PartRow<acc_t>& { return stats[part * R + r]; };
  double loss = 0.0;

  for (int64_t start = 0; start < static_cast<int64_t>(active.size()); start += R) {
    const int64_t nb = std::min<int64_t>(R, static_cast<int64_t>(active.size()) - start);
    const int64_t* idx = active.data() + start;
    gather_rows(p.student_hidden, Ds, idx, nb, hs.get());
    if (any_kd && !sparse) gather_rows(p.teacher_hidden, Dt, idx, nb, ht.get());
    // Sweep 1: both models' logits for this part, their exponentials and the part statistics.
    par(P, [&](int64_t part) {
      int64_t v0, v1;
      vocab.range(part, &v0, &v1);
      const int64_t nv = v1 - v0;
      for (int64_t r = 0; r < nb; ++r) {
        stat(part, r) = PartRow<acc_t>{neg_inf<acc_t>(), 0, neg_inf<acc_t>(), 0, 0, neg_inf<acc_t>(), 0, 0, 0, 0};
      }
      if (nv <= 0) return;
      // Row-major S[nb, V] is column-major S^T[V, nb]: S^T[v0:v1] = W[v0:v1] h^T.
      gemm(true, false, nv, nb, Ds, acc_t(1), p.student_weight + v0 * Ds, Ds, hs.get(), Ds, acc_t(0),
           sbuf.get() + v0, V);
      if (any_kd && sparse) {
        spread_teacher_rows(p, idx, nb, v0, v1, tbuf.get() + v0);
      } else if (any_kd) {
        gemm(true, false, nv, nb, Dt, acc_t(1), p.teacher_weight + v0 * Dt, Dt, ht.get(), Dt, acc_t(0),
             tbuf.get() + v0, V);
      }
      for (int64_t r = 0; r < nb; ++r) {
        PartRow<acc_t>& st = stat(part, r);
        acc_t* s = sbuf.get() + r * V + v0;
        const int64_t label = p.ce_weight != nullptr ? p.labels[idx[r]] : -1;
        if (label >= v0 && label < v1) st.label_logit = s[label - v0];
        if (own_ce && ce_coef(p, idx[r]) != 0) rk.ce_row(s, cbuf.get() + r * V + v0, nv, &st);
        if (any_kd) {
          rk.exp_row(kind, s, tbuf.get() + r * V + v0, nv, inv_t, &st);
        } else {
          rk.exp_row_student(s, nv, inv_t, &st);
        }
      }
    });
    for (int64_t r = 0; r < nb; ++r) {
      RowState<acc_t>& row = state[r];
      const PartRow<acc_t>* first = &stat(0, r);
      row.lse_s = merge_lse(first, P, R, &PartRow<acc_t>::max_s, &PartRow<acc_t>::sum_s);
      row.lse_t = any_kd ? merge_lse(first, P, R, &PartRow<acc_t>::max_t, &PartRow<acc_t>::sum_t) : acc_t(0);
      row.lse_c = own_ce ? merge_lse(first, P, R, &PartRow<acc_t>::max_c, &PartRow<acc_t>::sum_c) : row.lse_s;
      if (any_kd && (kind == Divergence::kForwardKL || kind == Divergence::kReverseKL)) {
        // forward: KL = sum p (z_t - z_s) - lse_t + lse_s; reverse: sum q (z_s - z_t) - lse_s + lse_t.
        const bool forward = kind == Divergence::kForwardKL;
        const acc_t own = forward ? row.lse_t : row.lse_s, other = forward ? row.lse_s : row.lse_t;
        acc_t cross = 0;
        for (int64_t part = 0; part < P; ++part) {
          const PartRow<acc_t>& st = stat(part, r);
          cross += st.cross * part_factor(forward ? st.max_t : st.max_s, own);
        }
        row.d = cross - own + other;
      }
    }
    // Sweep 2 (divergences whose gradient needs the row's sum(q * g)): the divergence and that sum.
    if (mix) {
      par(P, [&](int64_t part) {
        int64_t v0, v1;
        vocab.range(part, &v0, &v1);
        if (v1 <= v0) return;
        for (int64_t r = 0; r < nb; ++r) {
          PartRow<acc_t>& st = stat(part, r);
          rk.mix_row(kind, sbuf.get() + r * V + v0, tbuf.get() + r * V + v0, v1 - v0,
                     part_factor(st.max_s, state[r].lse_s), part_factor(st.max_t, state[r].lse_t), p.beta,
                     p.alpha, &st);
        }
      });
      for (int64_t r = 0; r < nb; ++r) {
        acc_t d = 0, sqg = 0;
        for (int64_t part = 0; part < P; ++part) {
          d += stat(part, r).value;
          sqg += stat(part, r).sqg;
        }
        state[r].d = d;
        state[r].sqg = sqg;
      }
    }
    // Sweep 3: the logit gradient in place of s, then the two gradient GEMMs of this part.
    par(P, [&](int64_t part) {
      int64_t v0, v1;
      vocab.range(part, &v0, &v1);
      const int64_t nv = v1 - v0;
      if (nv <= 0) return;
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t row = idx[r];
        const PartRow<acc_t>& st = stat(part, r);
        const RowState<acc_t>& rs = state[r];
        const acc_t c_kd = p.kd_weight[row] * T;  // d(T^2 w D)/ds = T w dD/dz
        const acc_t c_ce = ce_coef(p, row);
        const acc_t fs = part_factor(st.max_s, rs.lse_s);
        const acc_t b = own_ce ? acc_t(0) : c_ce * fs;  // the cross-entropy's softmax is q at T = 1
        acc_t* s = sbuf.get() + r * V + v0;
        if (!any_kd) {
          rk.scale_row(s, nv, b);
        } else {
          GradCoef<acc_t> coef;
          coef.fs = fs;
          coef.ft = part_factor(st.max_t, rs.lse_t);
          if (kind == Divergence::kForwardKL) {
            coef.a = c_kd * fs + b;
            coef.b = c_kd * coef.ft;
          } else {
            coef.a = c_kd * fs;
            coef.b = b;
            coef.k = kind == Divergence::kReverseKL ? rs.lse_s - rs.lse_t + rs.d : rs.sqg;
          }
          rk.grad_row(kind, s, tbuf.get() + r * V + v0, nv, coef);
        }
        if (own_ce && c_ce != 0) {
          rk.axpy_row(s, cbuf.get() + r * V + v0, nv, c_ce * part_factor(st.max_c, rs.lse_c));
        }
        const int64_t label = p.ce_weight != nullptr ? p.labels[row] : -1;
        if (c_ce != 0 && label >= v0 && label < v1) s[label - v0] -= c_ce;
      }
      fold_gradient(p, gemm, hs.get(), sbuf.get() + v0, nb, v0, nv, gh.get() + part * R * Ds, start == 0);
    });
    // The block's loss terms and its rows of grad_h.
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t row = idx[r];
      if (p.kd_weight[row] != 0) loss += static_cast<double>(T * T * p.kd_weight[row] * state[r].d);
      const acc_t c_ce = ce_coef(p, row);
      if (c_ce != 0) {
        acc_t label_logit = 0;
        for (int64_t part = 0; part < P; ++part) label_logit += stat(part, r).label_logit;
        loss += static_cast<double>(c_ce * (state[r].lse_c - label_logit));
      }
    }
    add_hidden_gradient(p, vocab, gh.get(), R, idx, nb);
  }
  return loss;
}

}  // namespace

template <typename acc_t>
double run(const Problem<acc_t>& p, const Plan& plan, GemmFn<acc_t> gemm, const ParallelFor& par) {
  return run_active_rows(p, plan, par,
                         [&](const Problem<acc_t>& view, const int64_t* rows, int64_t count, const ParallelFor& each) {
                           return dense_blocks(view, plan, rows, count, gemm, each);
                         });
}

template int64_t block_buffers<float>(const Problem<float>&, bool);
template int64_t block_buffers<double>(const Problem<double>&, bool);
template double run<float>(const Problem<float>&, const Plan&, GemmFn<float>, const ParallelFor&);
template double run<double>(const Problem<double>&, const Plan&, GemmFn<double>, const ParallelFor&);

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
