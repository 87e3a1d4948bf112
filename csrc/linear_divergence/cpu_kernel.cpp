// Fused linear-divergence on the CPU; see cpu_kernel.h for the algorithm.
#include "linear_divergence/cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/fast_exp.h"

namespace distillkit {
namespace cpu {
namespace fld {
namespace {

// ---------------------------------------------------------------- vectorisable exp / log

using fast_exp::bits_to_float;
using fast_exp::float_to_bits;
using fast_exp::vexp;

// log(x) for positive normal x (Cephes polynomial, ~1 ulp), branch-free.
inline float vlog(float x) {
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>(((bits >> 23) & 0xff) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

inline double vlog(double x) { return std::log(x); }

// ---------------------------------------------------------------- per-row helpers

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// sum_i exp(scale * x[i] - shift); shift is scale * max, so every argument is <= 0.
template <typename acc_t>
inline acc_t row_sum_exp(const acc_t* x, int64_t n, acc_t scale, acc_t shift) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += vexp(scale * x[i] - shift);
  return s;
}

// Forward KL without cross-entropy, first sweep of one row: replaces s and t by exp(s/T - ms) and
// exp(t/T - mt) (ms, mt: the row maxima over these columns, already scaled by 1/T), adds their sums to
// *sum_s and *sum_t, and returns sum(exp(t/T - mt) * (t - s) / T). The row's divergence follows from the
// merged normalisers, and the gradient q - p from the stored exponentials, with no further exp.
template <typename acc_t>
inline acc_t exp_rows_forward_kl(acc_t* s, acc_t* t, int64_t n, acc_t inv_t, acc_t ms, acc_t mt, acc_t* sum_s,
                                 acc_t* sum_t) {
  acc_t ss = 0, st = 0, cross = 0;
#pragma omp simd reduction(+ : ss, st, cross)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t zs = s[i] * inv_t, zt = t[i] * inv_t;
    const acc_t es = vexp(zs - ms), et = vexp(zt - mt);
    ss += es;
    st += et;
    cross += et > 0 ? et * (zt - zs) : acc_t(0);
    s[i] = es;
    t[i] = et;
  }
  *sum_s += ss;
  *sum_t += st;
  return cross;
}

// Merges partial (max, sum) pairs into a log-normaliser; -inf when every logit is -inf.
template <typename acc_t>
inline acc_t merge_lse(const acc_t* maxes, const acc_t* sums, int64_t count, int64_t stride) {
  acc_t m = neg_inf<acc_t>();
  for (int64_t i = 0; i < count; ++i) m = std::max(m, maxes[i * stride]);
  if (m == neg_inf<acc_t>()) return m;
  acc_t l = 0;
  for (int64_t i = 0; i < count; ++i) {
    const acc_t mi = maxes[i * stride];
    if (mi != neg_inf<acc_t>()) l += sums[i * stride] * std::exp(mi - m);
  }
  return m + std::log(l);
}

// Per-row statistics kept per (part, row).
enum Stat : int64_t { kMaxS = 0, kSumS, kMaxT, kSumT, kMaxC, kSumC, kValue, kSumQG, kLabelLogit, kNumStats };

template <typename acc_t>
struct RowState {
  acc_t lse_s;  // log-normaliser of s / T
  acc_t lse_t;  // of t / T
  acc_t lse_c;  // of s (cross-entropy, temperature 1)
  acc_t d;      // the row's divergence (after the value sweep)
  acc_t sqg;    // sum(q * g)
};

// One sweep over columns [0, n) of one row: returns the partial divergence and (via *sqg) sum(q * g).
// When `g_out` is not null, writes the logit gradient c_kd * dD/dz + c_ce * (softmax(s) - onehot) there
// (onehot handled by the caller); then `sqg_full` must hold the row's complete sum(q * g).
template <Divergence kind, bool write, typename acc_t>
acc_t sweep_kind(const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t, const RowState<acc_t>& st, acc_t beta,
                 acc_t alpha, acc_t* sqg, acc_t* g_out, acc_t c_kd, acc_t c_ce, acc_t sqg_full) {
  const acc_t tiny = std::numeric_limits<acc_t>::min();
  const acc_t lse_s = st.lse_s, lse_t = st.lse_t, lse_c = st.lse_c;
  acc_t value = 0, acc_qg = 0;
#pragma omp simd reduction(+ : value, acc_qg)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t lq = s[j] * inv_t - lse_s;
    const acc_t lp = t[j] * inv_t - lse_t;
    const acc_t q = vexp(lq);
    const acc_t p = vexp(lp);
    acc_t term = 0, g = 0;
    if constexpr (kind == Divergence::kForwardKL) {
      term = p > 0 ? p * (lp - lq) : acc_t(0);
    } else if constexpr (kind == Divergence::kReverseKL) {
      g = q > 0 ? lq - lp : acc_t(0);
      term = q * g;
    } else if constexpr (kind == Divergence::kJSD) {
      const acc_t lm = vlog(std::max(beta * p + (1 - beta) * q, tiny));
      const acc_t lqm = q > 0 ? lq - lm : acc_t(0);
      term = beta * (p > 0 ? p * (lp - lm) : acc_t(0)) + (1 - beta) * q * lqm;
      g = (1 - beta) * lqm;
    } else if constexpr (kind == Divergence::kTVD) {
      term = acc_t(0.5) * std::abs(p - q);
      g = q > p ? acc_t(0.5) : (q < p ? acc_t(-0.5) : acc_t(0));
    } else if constexpr (kind == Divergence::kSkewForwardKL) {
      const acc_t m = std::max(alpha * p + (1 - alpha) * q, tiny);
      term = p > 0 ? p * (lp - vlog(m)) : acc_t(0);
      g = -(1 - alpha) * p / m;
    } else {
      const acc_t m = std::max(alpha * q + (1 - alpha) * p, tiny);
      const acc_t lqm = q > 0 ? lq - vlog(m) : acc_t(0);
      term = q * lqm;
      g = q > 0 ? lqm - alpha * q / m : acc_t(0);
    }
    value += term;
    acc_qg += q * g;
    if constexpr (write) {
      const acc_t dz = kind == Divergence::kForwardKL ? q - p : q * (g - sqg_full);
      const acc_t ce_term = c_ce != 0 ? c_ce * vexp(s[j] - lse_c) : acc_t(0);
      g_out[j] = c_kd * dz + ce_term;
    }
  }
  if (sqg != nullptr) *sqg = acc_qg;
  return value;
}

// Dispatches sweep_kind on the divergence and on whether the gradient is written (g_out != null).
template <typename acc_t>
acc_t sweep(Divergence kind, const acc_t* s, const acc_t* t, int64_t n, acc_t inv_t, const RowState<acc_t>& st,
            acc_t beta, acc_t alpha, acc_t* sqg, acc_t* g_out, acc_t c_kd, acc_t c_ce, acc_t sqg_full) {
#define DISTILLKIT_FLD_CASE(K)                                                                        \
  case K:                                                                                             \
    return g_out != nullptr                                                                           \
               ? sweep_kind<K, true>(s, t, n, inv_t, st, beta, alpha, sqg, g_out, c_kd, c_ce, sqg_full) \
               : sweep_kind<K, false>(s, t, n, inv_t, st, beta, alpha, sqg, g_out, c_kd, c_ce, sqg_full);
  switch (kind) {
    DISTILLKIT_FLD_CASE(Divergence::kForwardKL)
    DISTILLKIT_FLD_CASE(Divergence::kReverseKL)
    DISTILLKIT_FLD_CASE(Divergence::kJSD)
    DISTILLKIT_FLD_CASE(Divergence::kTVD)
    DISTILLKIT_FLD_CASE(Divergence::kSkewForwardKL)
    DISTILLKIT_FLD_CASE(Divergence::kSkewReverseKL)
  }
#undef DISTILLKIT_FLD_CASE
  return 0;
}

}  // namespace

int64_t plan_rows(int64_t N, int64_t V, int64_t elem_bytes, int64_t buffer_bytes, int64_t override_rows) {
  if (override_rows > 0) return std::max<int64_t>(1, std::min(override_rows, std::max<int64_t>(N, 1)));
  int64_t rows = buffer_bytes / std::max<int64_t>(1, 2 * V * elem_bytes);
  rows = std::max<int64_t>(8, std::min<int64_t>(rows, 256));
  if (rows >= 16) rows -= rows % 16;
  return std::max<int64_t>(1, std::min(rows, std::max<int64_t>(N, 1)));
}

template <typename acc_t>
double run(const Problem<acc_t>& p, int64_t rows, int64_t parts, GemmFn<acc_t> gemm, const ParallelFor& par) {
  const int64_t N = p.N, V = p.V, Ds = p.Ds, Dt = p.Dt;
  std::fill(p.grad_hidden, p.grad_hidden + N * Ds, acc_t(0));
  std::fill(p.grad_weight, p.grad_weight + V * Ds, acc_t(0));
  std::vector<int64_t> active;
  for (int64_t r = 0; r < N; ++r) {
    const bool ce = p.ce_weight != nullptr && p.ce_weight[r] != 0 && p.labels[r] >= 0;
    if (p.kd_weight[r] != 0 || ce) active.push_back(r);
  }
  if (active.empty() || V == 0) return 0.0;
  parts = std::max<int64_t>(1, std::min(parts, V));
  const int64_t R = std::max<int64_t>(1, rows);
  const acc_t inv_t = acc_t(1) / p.temperature;
  // Every divergence but forward KL needs the row's sum(q * g) before its gradient can be formed.
  const bool needs_sqg = p.kind != Divergence::kForwardKL;
  const bool has_ce = p.ce_weight != nullptr;
  // Forward KL without cross-entropy keeps exponentials instead of logits: two exp per logit in all.
  const bool fast_kl = p.kind == Divergence::kForwardKL && !has_ce;

  std::vector<acc_t> sbuf(static_cast<size_t>(R * V)), tbuf(static_cast<size_t>(R * V));
  std::vector<acc_t> hs(static_cast<size_t>(R * Ds)), ht(static_cast<size_t>(R * Dt));
  std::vector<acc_t> stats(static_cast<size_t>(parts * R * kNumStats));
  std::vector<acc_t> gh(static_cast<size_t>(parts * R * Ds));
  std::vector<RowState<acc_t>> state(static_cast<size_t>(R));
  auto range = [&](int64_t part, int64_t* v0, int64_t* v1) {
    const int64_t per = (V + parts - 1) / parts;
    *v0 = std::min(V, part * per);
    *v1 = std::min(V, *v0 + per);
  };
  auto stat = [&](int64_t part, int64_t r, Stat k) -> acc_t& { return stats[(part * R + r) * kNumStats + k]; };
  double loss = 0.0;

  for (int64_t start = 0; start < static_cast<int64_t>(active.size()); start += R) {
    const int64_t nb = std::min<int64_t>(R, static_cast<int64_t>(active.size()) - start);
    const int64_t* idx = active.data() + start;
    for (int64_t r = 0; r < nb; ++r) {
      std::memcpy(hs.data() + r * Ds, p.student_hidden + idx[r] * Ds, sizeof(acc_t) * Ds);
      std::memcpy(ht.data() + r * Dt, p.teacher_hidden + idx[r] * Dt, sizeof(acc_t) * Dt);
    }
    // Sweep 1: logits of both models for this worker's columns, and partial normalisers.
    par(parts, [&](int64_t part) {
      int64_t v0, v1;
      range(part, &v0, &v1);
      const int64_t nv = v1 - v0;
      for (int64_t r = 0; r < nb; ++r) {
        stat(part, r, kMaxS) = stat(part, r, kMaxT) = stat(part, r, kMaxC) = neg_inf<acc_t>();
        stat(part, r, kSumS) = stat(part, r, kSumT) = stat(part, r, kSumC) = 0;
        stat(part, r, kLabelLogit) = 0;
      }
      if (nv <= 0) return;
      // Row-major S[nb, V] is column-major S^T[V, nb]: S^T[v0:v1] = W[v0:v1] h^T.
      gemm(true, false, nv, nb, Ds, acc_t(1), p.student_weight + v0 * Ds, Ds, hs.data(), Ds, acc_t(0),
           sbuf.data() + v0, V);
      gemm(true, false, nv, nb, Dt, acc_t(1), p.teacher_weight + v0 * Dt, Dt, ht.data(), Dt, acc_t(0),
           tbuf.data() + v0, V);
      for (int64_t r = 0; r < nb; ++r) {
        const acc_t* s = sbuf.data() + r * V + v0;
        const acc_t* t = tbuf.data() + r * V + v0;
        const acc_t ms = row_max(s, nv), mt = row_max(t, nv);
        if (fast_kl) {
          stat(part, r, kMaxS) = ms * inv_t;
          stat(part, r, kMaxT) = mt * inv_t;
          stat(part, r, kValue) = exp_rows_forward_kl(sbuf.data() + r * V + v0, tbuf.data() + r * V + v0, nv,
                                                      inv_t, ms * inv_t, mt * inv_t, &stat(part, r, kSumS),
                                                      &stat(part, r, kSumT));
          continue;
        }
        if (ms != neg_inf<acc_t>()) {
          stat(part, r, kMaxS) = ms * inv_t;
          stat(part, r, kSumS) = row_sum_exp(s, nv, inv_t, ms * inv_t);
          if (has_ce && p.ce_weight[idx[r]] != 0) {
            stat(part, r, kMaxC) = ms;
            stat(part, r, kSumC) = row_sum_exp(s, nv, acc_t(1), ms);
          }
        }
        if (mt != neg_inf<acc_t>()) {
          stat(part, r, kMaxT) = mt * inv_t;
          stat(part, r, kSumT) = row_sum_exp(t, nv, inv_t, mt * inv_t);
        }
        if (has_ce) {
          const int64_t label = p.labels[idx[r]];
          if (label >= v0 && label < v1) stat(part, r, kLabelLogit) = s[label - v0];
        }
      }
    });
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t stride = R * kNumStats;
      const acc_t* base = stats.data() + r * kNumStats;
      state[r].lse_s = merge_lse(base + kMaxS, base + kSumS, parts, stride);
      state[r].lse_t = merge_lse(base + kMaxT, base + kSumT, parts, stride);
      state[r].lse_c = has_ce ? merge_lse(base + kMaxC, base + kSumC, parts, stride) : acc_t(0);
      if (fast_kl) {  // KL(p || q) = sum p (t - s) / T - lse_t + lse_s
        acc_t cross = 0;
        for (int64_t part = 0; part < parts; ++part) {
          const acc_t mt = stat(part, r, kMaxT);
          if (mt != neg_inf<acc_t>()) cross += stat(part, r, kValue) * std::exp(mt - state[r].lse_t);
        }
        state[r].d = cross - state[r].lse_t + state[r].lse_s;
      }
    }
    // Sweep 2 (when the gradient needs sum(q * g) over the whole row): the divergence and that sum.
    if (needs_sqg) {
      par(parts, [&](int64_t part) {
        int64_t v0, v1;
        range(part, &v0, &v1);
        for (int64_t r = 0; r < nb; ++r) {
          acc_t sqg = 0;
          stat(part, r, kValue) = v1 > v0 ? sweep<acc_t>(p.kind, sbuf.data() + r * V + v0, tbuf.data() + r * V + v0,
                                                         v1 - v0, inv_t, state[r], p.beta, p.alpha, &sqg, nullptr,
                                                         0, 0, 0)
                                          : acc_t(0);
          stat(part, r, kSumQG) = sqg;
        }
      });
      for (int64_t r = 0; r < nb; ++r) {
        acc_t d = 0, sqg = 0;
        for (int64_t part = 0; part < parts; ++part) {
          d += stat(part, r, kValue);
          sqg += stat(part, r, kSumQG);
        }
        state[r].d = d;
        state[r].sqg = sqg;
      }
    }
    // Sweep 3: the logit gradient in place of s, then the two gradient GEMMs on this worker's columns.
    par(parts, [&](int64_t part) {
      int64_t v0, v1;
      range(part, &v0, &v1);
      const int64_t nv = v1 - v0;
      if (nv <= 0) return;
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t row = idx[r];
        const acc_t c_kd = p.kd_weight[row] * p.temperature;  // d(T^2 w D)/ds = T w dD/dz
        const acc_t c_ce = has_ce ? p.ce_weight[row] : acc_t(0);
        acc_t* s = sbuf.data() + r * V + v0;
        if (fast_kl) {  // G = c * (q - p) from the stored exponentials
          const acc_t fs = c_kd * std::exp(stat(part, r, kMaxS) - state[r].lse_s);
          const acc_t ft = c_kd * std::exp(stat(part, r, kMaxT) - state[r].lse_t);
          const acc_t* t = tbuf.data() + r * V + v0;
#pragma omp simd
          for (int64_t j = 0; j < nv; ++j) s[j] = fs * s[j] - ft * t[j];
          continue;
        }
        const acc_t value = sweep<acc_t>(p.kind, s, tbuf.data() + r * V + v0, nv, inv_t, state[r], p.beta,
                                         p.alpha, nullptr, s, c_kd, c_ce, needs_sqg ? state[r].sqg : acc_t(0));
        if (!needs_sqg) stat(part, r, kValue) = value;
        if (c_ce != 0) {
          const int64_t label = p.labels[row];
          if (label >= v0 && label < v1) s[label - v0] -= c_ce;
        }
      }
      // grad_W[v0:v1] (column-major [Ds, nv]) += h^T (col-major [Ds, nb]) * G (col-major [nv, nb])^T
      gemm(false, true, Ds, nv, nb, acc_t(1), hs.data(), Ds, sbuf.data() + v0, V, acc_t(1),
           p.grad_weight + v0 * Ds, Ds);
      // grad_h partial (column-major [Ds, nb]) = W[v0:v1]^T (col-major [Ds, nv]) * G^T (col-major [nv, nb])
      gemm(false, false, Ds, nb, nv, acc_t(1), p.student_weight + v0 * Ds, Ds, sbuf.data() + v0, V, acc_t(0),
           gh.data() + part * R * Ds, Ds);
    });
    // The block's loss terms and its rows of grad_h.
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t row = idx[r];
      acc_t d = state[r].d;
      if (!needs_sqg && !fast_kl) {
        d = 0;
        for (int64_t part = 0; part < parts; ++part) d += stat(part, r, kValue);
      }
      if (p.kd_weight[row] != 0) loss += static_cast<double>(p.temperature * p.temperature * p.kd_weight[row] * d);
      if (has_ce && p.ce_weight[row] != 0 && p.labels[row] >= 0) {
        acc_t label_logit = 0;
        for (int64_t part = 0; part < parts; ++part) label_logit += stat(part, r, kLabelLogit);
        loss += static_cast<double>(p.ce_weight[row] * (state[r].lse_c - label_logit));
      }
      acc_t* out = p.grad_hidden + row * Ds;
      for (int64_t part = 0; part < parts; ++part) {
        const acc_t* src = gh.data() + (part * R + r) * Ds;
        int64_t v0, v1;
        range(part, &v0, &v1);
        if (v1 <= v0) continue;
#pragma omp simd
        for (int64_t k = 0; k < Ds; ++k) out[k] += src[k];
      }
    }
  }
  return loss;
}

template double run<float>(const Problem<float>&, int64_t, int64_t, GemmFn<float>, const ParallelFor&);
template double run<double>(const Problem<double>&, int64_t, int64_t, GemmFn<double>, const ParallelFor&);

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
