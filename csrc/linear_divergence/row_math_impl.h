// The row functions of row_math.h, in the namespace DISTILLKIT_FLD_ISA. cpu_row_math.cpp includes this file
// once per instruction set (so it has no include guard); every loop is an `omp simd` loop without calls, so
// that each copy vectorises for its instruction set.
//
// Zero probabilities: a term weighted by p (or q) is 0 where p (q) is 0, selected lane by lane, so that
// log(0) = -inf or 0 / 0 in a lane never reaches a sum or a stored gradient factor.

namespace distillkit {
namespace cpu {
namespace fld {
namespace DISTILLKIT_FLD_ISA {

using fast_exp::vexp;
using fast_exp::vlog;

template <typename acc_t>
constexpr acc_t minus_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename acc_t>
void exp_row(Divergence kind, acc_t* s, acc_t* t, int64_t n, acc_t inv_t, PartRow<acc_t>* st) {
  acc_t ms = minus_inf<acc_t>(), mt = minus_inf<acc_t>();
#pragma omp simd reduction(max : ms, mt)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t zs = s[j] * inv_t, zt = t[j] * inv_t;
    ms = zs > ms ? zs : ms;
    mt = zt > mt ? zt : mt;
  }
  // A part whose logits are all -inf has exponentials 0 (shifted by 0, not by -inf).
  const acc_t shift_s = ms == minus_inf<acc_t>() ? acc_t(0) : ms;
  const acc_t shift_t = mt == minus_inf<acc_t>() ? acc_t(0) : mt;
  acc_t sum_s = 0, sum_t = 0, cross = 0;
  if (kind == Divergence::kForwardKL) {
#pragma omp simd reduction(+ : sum_s, sum_t, cross)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t zs = s[j] * inv_t, zt = t[j] * inv_t;
      const acc_t es = vexp(zs - shift_s), et = vexp(zt - shift_t);
      sum_s += es;
      sum_t += et;
      cross += et > 0 ? et * (zt - zs) : acc_t(0);
      s[j] = es;
      t[j] = et;
    }
  } else if (kind == Divergence::kReverseKL) {  // p itself is not needed again: keep z_s - z_t instead
#pragma omp simd reduction(+ : sum_s, sum_t, cross)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t zs = s[j] * inv_t, zt = t[j] * inv_t;
      const acc_t es = vexp(zs - shift_s), et = vexp(zt - shift_t);
      sum_s += es;
      sum_t += et;
      cross += es > 0 ? es * (zs - zt) : acc_t(0);
      s[j] = es;
      t[j] = zs - zt;
    }
  } else {
#pragma omp simd reduction(+ : sum_s, sum_t)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t es = vexp(s[j] * inv_t - shift_s), et = vexp(t[j] * inv_t - shift_t);
      sum_s += es;
      sum_t += et;
      s[j] = es;
      t[j] = et;
    }
  }
  st->max_s = ms;
  st->sum_s = sum_s;
  st->max_t = mt;
  st->sum_t = sum_t;
  st->cross = cross;
}

template <typename acc_t>
void exp_row_student(acc_t* s, int64_t n, acc_t inv_t, PartRow<acc_t>* st) {
  acc_t ms = minus_inf<acc_t>();
#pragma omp simd reduction(max : ms)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t zs = s[j] * inv_t;
    ms = zs > ms ? zs : ms;
  }
  const acc_t shift = ms == minus_inf<acc_t>() ? acc_t(0) : ms;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t es = vexp(s[j] * inv_t - shift);
    sum += es;
    s[j] = es;
  }
  st->max_s = ms;
  st->sum_s = sum;
}

template <typename acc_t>
void ce_row(const acc_t* s, acc_t* c, int64_t n, PartRow<acc_t>* st) {
  acc_t m = minus_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  const acc_t shift = m == minus_inf<acc_t>() ? acc_t(0) : m;
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const acc_t e = vexp(s[j] - shift);
    sum += e;
    c[j] = e;
  }
  st->max_c = m;
  st->sum_c = sum;
}

template <typename acc_t>
void mix_row(Divergence kind, const acc_t* s, acc_t* t, int64_t n, acc_t fs, acc_t ft, acc_t beta, acc_t alpha,
             PartRow<acc_t>* st) {
  acc_t value = 0, sqg = 0;
  if (kind == Divergence::kTVD) {  // D = sum |p - q| / 2, g = sign(q - p) / 2
#pragma omp simd reduction(+ : value, sqg)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t q = fs * s[j], d = q - ft * t[j];
      value += d > 0 ? d : -d;
      sqg += d > 0 ? q : (d < 0 ? -q : acc_t(0));
    }
    value *= acc_t(0.5);
    sqg *= acc_t(0.5);
  } else if (kind == Divergence::kJSD) {  // D = beta sum p log(p/m) + sum q g, g = (1 - beta) log(q/m)
    const acc_t rest = 1 - beta;
    acc_t teacher_part = 0;
#pragma omp simd reduction(+ : teacher_part, sqg)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t q = fs * s[j], p = ft * t[j];
      const acc_t inv_m = acc_t(1) / (beta * p + rest * q);
      const acc_t log_pm = vlog(p * inv_m), log_qm = vlog(q * inv_m);
      const acc_t g = q > 0 ? rest * log_qm : acc_t(0);
      teacher_part += p > 0 ? p * log_pm : acc_t(0);
      sqg += q * g;
      t[j] = g;
    }
    value = beta * teacher_part + sqg;
  } else if (kind == Divergence::kSkewForwardKL) {  // KL(p || m), m = alpha p + (1 - alpha) q; g = -(1-alpha) p/m
    const acc_t rest = 1 - alpha;
#pragma omp simd reduction(+ : value, sqg)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t q = fs * s[j], p = ft * t[j];
      const acc_t pm = p / (alpha * p + rest * q);
      const acc_t g = p > 0 ? -rest * pm : acc_t(0);
      value += p > 0 ? p * vlog(pm) : acc_t(0);
      sqg += q * g;
      t[j] = g;
    }
  } else {  // skew reverse: KL(q || m), m = alpha q + (1 - alpha) p; g = log(q/m) - alpha q/m
    const acc_t rest = 1 - alpha;
#pragma omp simd reduction(+ : value, sqg)
    for (int64_t j = 0; j < n; ++j) {
      const acc_t q = fs * s[j], p = ft * t[j];
      const acc_t qm = q / (alpha * q + rest * p);
      const acc_t log_qm = vlog(qm);
      const acc_t g = q > 0 ? log_qm - alpha * qm : acc_t(0);
      value += q > 0 ? q * log_qm : acc_t(0);
      sqg += q * g;
      t[j] = g;
    }
  }
  st->value = value;
  st->sqg = sqg;
}

template <typename acc_t>
void grad_row(Divergence kind, acc_t* s, const acc_t* t, int64_t n, const GradCoef<acc_t>& c) {
  const acc_t a = c.a, b = c.b, k = c.k;
  if (kind == Divergence::kForwardKL) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = a * s[j] - b * t[j];
  } else if (kind == Divergence::kTVD) {
    const acc_t fs = c.fs, ft = c.ft, half = acc_t(0.5);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t q = fs * s[j], p = ft * t[j];
      const acc_t sign = q > p ? half : (q < p ? -half : acc_t(0));
      s[j] = s[j] * (a * (sign - k) + b);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) s[j] = s[j] * (a * (t[j] - k) + b);
  }
}

template <typename acc_t>
void axpy_row(acc_t* s, const acc_t* c, int64_t n, acc_t a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] += a * c[j];
}

template <typename acc_t>
void scale_row(acc_t* s, int64_t n, acc_t a) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) s[j] *= a;
}

template <typename acc_t>
RowKernels<acc_t> table(const char* isa) {
  return {&exp_row<acc_t>,  &exp_row_student<acc_t>, &ce_row<acc_t>,    &mix_row<acc_t>,
          &grad_row<acc_t>, &axpy_row<acc_t>,        &scale_row<acc_t>, isa};
}

}  // namespace DISTILLKIT_FLD_ISA
}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
