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
  const Reduced e = reduce(std::min(std::max(x, -87.33f), 88.37f));
  const float y = e.poly * (e.r * e.r) + e.r + 1.0f;
  return x < -87.33f ? 0.0f : y * pow2(e.n);
}

inline double vexp(double x) { return std::exp(x); }

}  // namespace fast_exp
}  // namespace distillkit
