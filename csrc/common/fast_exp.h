// Vectorisable exp for the CPU kernels: plain C++ (no torch headers), branch-free so `omp simd` loops
// vectorise.
//
// float: Cephes expf, relative error ~2 ulp. exp(x) = 2^n * exp(r) with n = round(x / ln2) and
// r = x - n * ln2 (ln2 in two parts), exp(r) ~= 1 + r + r^2 * poly(r). The two entry points share the
// reduction and the polynomial and differ in their range and in the order of the last products (each
// kernel's results depend on its own):
//   exp_nonpos(x)  x <= 0 (a score minus a running max): 0 below -87, (poly * r) * r
//   vexp(x)        any x, clamped to [-87.33, 88.37]: 0 below -87.33 and for -inf, poly * (r * r)
// Both return NaN for NaN. double: std::exp.
//
// vlog(x): Cephes logf, ~1 ulp, for positive normal x (finite garbage for 0, denormals, inf and NaN: callers
// select those lanes away). double: std::log.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace distillkit {
namespace fast_exp {

inline float bits_to_float(int32_t bits) {
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline int32_t float_to_bits(float x) {
  int32_t out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}

// x = n * ln2 + r, and poly(r) with exp(r) ~= 1 + r + r^2 * poly(r).
struct Reduced {
  float n;
  float r;
  float poly;
};

inline Reduced reduce(float x) {
  Reduced e;
  e.n = std::floor(x * 1.44269504088896341f + 0.5f);
  e.r = x - e.n * 0.693359375f;
  e.r = e.r + e.n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * e.r + 1.3981999507e-3f;
  y = y * e.r + 8.3334519073e-3f;
  y = y * e.r + 4.1665795894e-2f;
  y = y * e.r + 1.6666665459e-1f;
  y = y * e.r + 5.0000001201e-1f;
  e.poly = y;
  return e;
}

// 2^n for an integral n in the normal range.
inline float pow2(float n) { return bits_to_float((static_cast<int32_t>(n) + 127) << 23); }

// exp(x) for x <= 0; exp(-inf) = 0.
inline float exp_nonpos(float x) {
  const float lo = -87.0f;
  const Reduced e = reduce(x < lo ? lo : x);
  const float y = e.poly * e.r * e.r + e.r + 1.0f;
  return x < lo ? 0.0f : y * pow2(e.n);
}

// exp(x) for any x; exactly 0 below -87.33 and for -inf.
inline float vexp(float x) {
  // std::min(std::max(x, -87.33f), 88.37f), NaN kept, written out so that it inlines into loops compiled with
  // other optimisation attributes (linear_divergence/cpu_row_math.cpp).
  const float above = x < -87.33f ? -87.33f : x;
  const Reduced e = reduce(88.37f < above ? 88.37f : above);
  const float y = e.poly * (e.r * e.r) + e.r + 1.0f;
  return x < -87.33f ? 0.0f : y * pow2(e.n);
}

inline double vexp(double x) { return std::exp(x); }

// log(x) for positive normal x, branch-free: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), log(1 + (m - 1)) by
// a polynomial.
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

}  // namespace fast_exp
}  // namespace distillkit
