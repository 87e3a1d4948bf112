// Fused memory-bank InfoNCE forward on the CPU; see cpu_kernel.h for the algorithm.
#include "membank_infonce/cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/fast_exp.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace distillkit {
namespace cpu {
namespace {

// ---------------------------------------------------------------- conversions

inline float half_to_float_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Converts n values to the accumulation type.
template <typename acc_t>
inline void convert(const acc_t* src, acc_t* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(acc_t));
}

inline void convert(const bf16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

inline void convert(const fp16_t* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) dst[i] = half_to_float_soft(s[i]);
}

// Returns a pointer to n values of `src` in the accumulation type: `src` itself when no conversion is
// needed, else `buf` after converting into it.
template <typename in_t, typename acc_t>
inline const acc_t* as_acc(const in_t* src, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    (void)buf;
    (void)n;
    return src;
  } else {
    convert(src, buf, n);
    return buf;
  }
}

// ---------------------------------------------------------------- vector math

template <typename acc_t>
inline acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename acc_t>
inline void scale(acc_t* x, acc_t alpha, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

template <typename acc_t>
inline void axpy(acc_t* y, acc_t alpha, const acc_t* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// max(a, b) that returns NaN when either is NaN (std::max and fmax drop a NaN), so that a NaN score is never
// mistaken for "no valid negative" and always reaches the row's loss.
template <typename acc_t>
inline acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || b != b) ? std::numeric_limits<acc_t>::quiet_NaN() : (a < b ? b : a);
}

// Row maximum; NaN if any element is NaN.
template <typename acc_t>
inline acc_t max_of(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int nan_seen = 0;
#pragma omp simd reduction(max : m) reduction(| : nan_seen)
  for (int64_t i = 0; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan_seen |= x[i] != x[i];
  }
  return nan_seen ? std::numeric_limits<acc_t>::quiet_NaN() : m;
}

// x[i] = exp(x[i] - shift), returns the sum.
inline float exp_shift_sum(float* x, float shift, int64_t n) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = fast_exp::exp_nonpos(x[i] - shift);
    x[i] = e;
    sum += e;
  }
  return sum;
}

inline double exp_shift_sum(double* x, double shift, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double e = std::exp(x[i] - shift);
    x[i] = e;
    sum += e;
  }
  return sum;
}

template <typename acc_t>
inline acc_t exp_scalar(acc_t x) {
  return std::exp(x);
}

// True when no element is Inf or NaN (x - x is NaN exactly for those).
template <typename acc_t>
inline bool all_finite(const acc_t* x, int64_t n) {
  int bad = 0;
#pragma omp simd reduction(| : bad)
  for (int64_t i = 0; i < n; ++i) bad |= !(x[i] - x[i] == acc_t(0));
  return bad == 0;
}

// Copies n values to dst with every Inf / NaN replaced by 0.
template <typename acc_t>
inline void copy_finite(const acc_t* src, acc_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i] - src[i] == acc_t(0) ? src[i] : acc_t(0);
}

// The row's loss log(sum_j exp(s_j - s_pos)) from the running max m, the negatives' sum `neg` (scaled by
// exp(-m)) and the total `sum` = exp(s_pos - m) + neg, without subtracting two large numbers: log1p(neg)
// when the positive holds the max (exactly 0 without valid negatives), else two non-negative terms.
template <typename acc_t>
inline acc_t loss_from(acc_t s_pos, acc_t m, acc_t neg, acc_t sum) {
  return m == s_pos ? std::log1p(neg) : (m - s_pos) + std::log(sum);
}

// Masks out (sets to -inf) scores of bank rows whose label equals the query's.
template <typename acc_t>
inline void mask_labels(acc_t* s, const int64_t* bank_labels, int64_t label, int64_t n) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) s[i] = bank_labels[i] == label ? neg_inf : s[i];
}

}  // namespace

// ---------------------------------------------------------------- dense path

DensePlan plan_dense(int64_t L, int64_t B, int64_t D, int64_t K, int64_t num_threads, int64_t tile_override) {
  DensePlan plan;
  plan.L = L;
  // Tile: the scores (B x tile) plus the tile itself (tile x D) should sit in the per-core L2. Measured on
  // a 2-core AMD EPYC (Zen 3): 64..512 rows are within a few percent of each other; 128 was best.
  int64_t tile = tile_override > 0 ? tile_override : 128;
  if (tile_override <= 0) {
    const int64_t budget = 384 * 1024 / 4;  // floats
    while (tile > 64 && tile * (B + D) > budget) tile /= 2;
  }
  plan.tile = std::max<int64_t>(1, std::min(tile, K));
  // Chunks per layer: enough items to give every thread the same number of them.
  int64_t chunks = 1;
  if (num_threads > 1) {
    int64_t a = L, b = num_threads;
    while (b != 0) {
      const int64_t t = a % b;
      a = b;
      b = t;
    }
    chunks = num_threads / a;  // L * chunks is a multiple of num_threads
  }
  const int64_t max_chunks = std::max<int64_t>(1, (K + plan.tile - 1) / plan.tile);
  chunks = std::min(chunks, max_chunks);
  plan.chunks = chunks;
  plan.chunk_rows = (K + chunks - 1) / chunks;
  return plan;
}

template <typename in_t, typename acc_t>
int64_t dense_scratch_size(const Problem<in_t, acc_t>& p, const DensePlan& plan) {
  return p.B * plan.tile + plan.tile * p.D;  // scores, and a converted (or Inf/NaN-free) tile
}

template <typename in_t, typename acc_t>
void dense_item(const Problem<in_t, acc_t>& p, const DensePlan& plan, int64_t item, acc_t* part_max,
                acc_t* part_sum, acc_t* part_w, acc_t* scratch, GemmFn<acc_t> gemm) {
  const int64_t B = p.B, D = p.D;
  const int64_t l = item / plan.chunks;
  const int64_t c = item % plan.chunks;
  const int64_t row0 = c * plan.chunk_rows;
  const int64_t row1 = std::min(p.bank_rows, row0 + plan.chunk_rows);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t* q = p.query + l * B * D;
  const in_t* bank = p.bank + l * p.bank_layer_stride;
  acc_t* scores = scratch;                   // [B, tile]
  acc_t* tile_buf = scratch + B * plan.tile;  // [tile, D]: converted keys, or their Inf/NaN-free copy
  std::fill(part_max, part_max + B, neg_inf);
  std::fill(part_sum, part_sum + B, acc_t(0));
  std::fill(part_w, part_w + B * D, acc_t(0));

  for (int64_t j0 = row0; j0 < row1; j0 += plan.tile) {
    const int64_t T = std::min(plan.tile, row1 - j0);
    const acc_t* keys = as_acc<in_t, acc_t>(bank + j0 * D, tile_buf, T * D);
    // scores[B, T] (row-major) = inv_tau * Q[B, D] * keys[T, D]^T
    gemm(true, false, T, B, D, p.inv_tau, keys, D, q, D, acc_t(0), scores, T);
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      acc_t* s = scores + b * T;
      if (p.query_labels != nullptr) mask_labels(s, p.bank_labels + j0, p.query_labels[b], T);
      const acc_t m_old = part_max[b];
      const acc_t m_new = nan_max(m_old, max_of(s, T));
      if (m_new == neg_inf) {  // no valid negative so far: contributes nothing
        std::fill(s, s + T, acc_t(0));
        continue;
      }
      any = true;
      const acc_t alpha = m_old == neg_inf ? acc_t(0) : exp_scalar(m_old - m_new);
      part_sum[b] = part_sum[b] * alpha + exp_shift_sum(s, m_new, T);
      if (alpha != acc_t(1)) scale(part_w + b * D, alpha, D);
      part_max[b] = m_new;
    }
    if (!any) continue;
    // A key that is not a negative of a row has P = 0 there, but 0 * NaN = NaN: Inf / NaN values of the
    // tile enter W as 0 (a valid key holding one has a NaN or +Inf score, which already makes its row NaN).
    const acc_t* values = keys;
    if (!all_finite(keys, T * D)) {
      copy_finite(keys, tile_buf, T * D);  // in place when keys already live in tile_buf
      values = tile_buf;
    }
    // W[B, D] += P[B, T] * values[T, D]
    gemm(false, false, D, B, T, acc_t(1), values, D, scores, T, acc_t(1), part_w, D);
  }
}

template <typename in_t, typename acc_t>
void dense_merge(const Problem<in_t, acc_t>& p, const DensePlan& plan, int64_t row_begin, int64_t row_end,
                 const acc_t* part_max, const acc_t* part_sum, const acc_t* part_w) {
  const int64_t B = p.B, D = p.D, C = plan.chunks;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t l = row / B, b = row % B;
    const acc_t s_pos = dot(p.query + row * D, p.positive + row * D, D) * p.inv_tau;
    acc_t m = s_pos;
    for (int64_t c = 0; c < C; ++c) m = nan_max(m, part_max[(l * C + c) * B + b]);
    acc_t neg = 0;
    acc_t* w = p.wsum + row * D;
    std::fill(w, w + D, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      const int64_t item = l * C + c;
      const acc_t mc = part_max[item * B + b];
      if (mc == neg_inf) continue;
      const acc_t f = exp_scalar(mc - m);
      neg += part_sum[item * B + b] * f;
      axpy(w, f, part_w + (item * B + b) * D, D);
    }
    const acc_t sum = exp_scalar(s_pos - m) + neg;
    scale(w, acc_t(1) / sum, D);
    p.lse[row] = m + std::log(sum);
    p.loss[row] = loss_from(s_pos, m, neg, sum);
  }
}

// ---------------------------------------------------------------- indexed path

namespace {
constexpr int64_t kIndexChunk = 64;
}

template <typename in_t, typename acc_t>
int64_t indexed_scratch_size(const Problem<in_t, acc_t>& p) {
  const int64_t keys = std::is_same_v<in_t, acc_t> ? 0 : kIndexChunk * p.D;
  return kIndexChunk + keys;
}

template <typename in_t, typename acc_t>
bool indexed_rows(const Problem<in_t, acc_t>& p, int64_t row_begin, int64_t row_end, acc_t* scratch,
                  int64_t* bad_index) {
  const int64_t B = p.B, D = p.D, K = p.num_neg, N = p.bank_rows;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t* s = scratch;                     // [chunk]
  acc_t* key_buf = scratch + kIndexChunk;  // [chunk, D] when converting
  const acc_t* keys[kIndexChunk];
  bool ok = true;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t l = row / B, b = row % B;
    const acc_t* q = p.query + row * D;
    const in_t* bank = p.bank + l * p.bank_layer_stride;
    const int64_t* idx = p.negative_index + row * K;
    const bool labelled = p.query_labels != nullptr;
    const int64_t label = labelled ? p.query_labels[b] : 0;
    const acc_t s_pos = dot(q, p.positive + row * D, D) * p.inv_tau;
    acc_t m = s_pos, neg = 0;  // neg: sum of exp(s_j - m) over the valid negatives so far
    acc_t* w = p.wsum + row * D;
    std::fill(w, w + D, acc_t(0));
    bool row_ok = true;
    for (int64_t j0 = 0; j0 < K && row_ok; j0 += kIndexChunk) {
      const int64_t T = std::min(kIndexChunk, K - j0);
      acc_t cmax = neg_inf;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = idx[j0 + t];
        if (r < 0 || r >= N) {
          *bad_index = r;
          row_ok = false;
          break;
        }
        keys[t] = as_acc<in_t, acc_t>(bank + r * D, key_buf + t * D, D);
        s[t] = (labelled && p.bank_labels[r] == label) ? neg_inf : dot(q, keys[t], D) * p.inv_tau;
        cmax = nan_max(cmax, s[t]);
      }
      if (!row_ok || cmax == neg_inf) continue;
      if (cmax > m) {
        const acc_t alpha = exp_scalar(m - cmax);
        neg *= alpha;
        scale(w, alpha, D);
        m = cmax;
      }
      neg += exp_shift_sum(s, m, T);
      for (int64_t t = 0; t < T; ++t) {
        if (s[t] != acc_t(0)) axpy(w, s[t], keys[t], D);
      }
    }
    if (!row_ok) {
      ok = false;
      continue;
    }
    const acc_t sum = exp_scalar(s_pos - m) + neg;
    scale(w, acc_t(1) / sum, D);
    p.lse[row] = m + std::log(sum);
    p.loss[row] = loss_from(s_pos, m, neg, sum);
  }
  return ok;
}

// ---------------------------------------------------------------- instantiations

#define DISTILLKIT_INSTANTIATE(IN, ACC)                                                                    \
  template int64_t dense_scratch_size<IN, ACC>(const Problem<IN, ACC>&, const DensePlan&);              \
  template void dense_item<IN, ACC>(const Problem<IN, ACC>&, const DensePlan&, int64_t, ACC*, ACC*, ACC*, \
                                    ACC*, GemmFn<ACC>);                                                  \
  template void dense_merge<IN, ACC>(const Problem<IN, ACC>&, const DensePlan&, int64_t, int64_t,         \
                                     const ACC*, const ACC*, const ACC*);                                \
  template int64_t indexed_scratch_size<IN, ACC>(const Problem<IN, ACC>&);                               \
  template bool indexed_rows<IN, ACC>(const Problem<IN, ACC>&, int64_t, int64_t, ACC*, int64_t*);

DISTILLKIT_INSTANTIATE(float, float)
DISTILLKIT_INSTANTIATE(double, double)
DISTILLKIT_INSTANTIATE(bf16_t, float)
DISTILLKIT_INSTANTIATE(fp16_t, float)

#undef DISTILLKIT_INSTANTIATE

}  // namespace cpu
}  // namespace distillkit
