// Fused memory-bank InfoNCE forward: CUDA kernels over raw pointers. No torch headers here, so this file
// compiles with plain nvcc (see .ci/compile_cuda.sh). The algorithm, launch geometry and roofline are
// described in cuda_kernels.cuh.

#include "membank_infonce/cuda_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

// The tensor-core kernel needs sm_80 (bf16 and tf32 WMMA). Device code for older archs leaves out every WMMA
// declaration and compiles that kernel to a trap (the plan never selects it there), so this file builds for
// every arch the generic kernel runs on. Host code and the CPU emulation see everything.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define DISTILLKIT_TC_DEVICE_CODE 1
#else
#define DISTILLKIT_TC_DEVICE_CODE 0
#pragma nv_diag_suppress 177  // "declared but never referenced": the tensor-core helpers, unused here
#endif

namespace distillkit {
namespace cuda {
namespace {

#if DISTILLKIT_TC_DEVICE_CODE
namespace wmma = nvcuda::wmma;
#endif

constexpr unsigned kFullMask = 0xffffffffu;
constexpr double kLog2eD = 1.4426950408889634;
constexpr double kLn2D = 0.6931471805599453;

// ------------------------------------------------------------------------------------------------------
// Scalar helpers
// ------------------------------------------------------------------------------------------------------

/// Accumulator type: fp64 for fp64 inputs, fp32 otherwise.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float exp2_acc(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_acc(double x) { return exp2(x); }
__device__ __forceinline__ float log2_acc(float x) { return log2f(x); }
__device__ __forceinline__ double log2_acc(double x) { return log2(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }
__device__ __forceinline__ float log1p_acc(float x) { return log1pf(x); }
__device__ __forceinline__ double log1p_acc(double x) { return log1p(x); }

template <typename A>
__device__ __forceinline__ A neg_inf() {
  return static_cast<A>(-INFINITY);
}

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

/// max(a, b) that is NaN when either is NaN (fmaxf drops a NaN), so a NaN score always reaches the row's
/// loss instead of being mistaken for "no valid negative".
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (isnan(a) || isnan(b)) ? a + b : (a < b ? b : a);
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(kFullMask, v, o));
  return v;
}

/// Workspace views: the partials, all [num_splits, L, B] (x D for o), split-major, then the call's two
/// index-error words.
template <typename A>
struct Partials {
  A* o;  ///< [S, L, B, D]  sum_j 2^(z_j - m) k_j
  A* m;  ///< [S, L, B]     running max of z = s * log2(e) / tau over valid keys (-inf when none)
  A* l;  ///< [S, L, B]     sum_j 2^(z_j - m)
  /// [count of out-of-range negative_index values, one of them]; zeroed by the launcher, updated atomically.
  unsigned long long* index_error;
};

/// Records an out-of-range negative_index value in the call's words (many threads may do so at once).
template <typename A>
__device__ __forceinline__ void report_bad_index(const Partials<A>& parts, int64_t value) {
  atomicAdd(parts.index_error, 1ull);
  atomicExch(parts.index_error + 1, static_cast<unsigned long long>(value));
}

inline size_t align256(size_t n) { return (n + 255) & ~static_cast<size_t>(255); }

constexpr size_t kIndexErrorBytes = 2 * sizeof(unsigned long long);

// Byte offset of the index-error words in a workspace of `slots` partial rows of D accumulators.
size_t index_error_offset(int64_t slots, int64_t D, size_t acc_bytes) {
  return align256(static_cast<size_t>(slots * D) * acc_bytes) +
         2 * align256(static_cast<size_t>(slots) * acc_bytes);
}

size_t workspace_bytes_for(int64_t slots, int64_t D, size_t acc_bytes) {
  return index_error_offset(slots, D, acc_bytes) + align256(kIndexErrorBytes);
}

template <typename A>
Partials<A> carve_workspace(void* ws, int64_t slots, int64_t D) {
  auto* base = static_cast<unsigned char*>(ws);
  const size_t o_bytes = align256(static_cast<size_t>(slots * D) * sizeof(A));
  const size_t s_bytes = align256(static_cast<size_t>(slots) * sizeof(A));
  Partials<A> parts;
  parts.o = reinterpret_cast<A*>(base);
  parts.m = reinterpret_cast<A*>(base + o_bytes);
  parts.l = reinterpret_cast<A*>(base + o_bytes + s_bytes);
  parts.index_error =
      reinterpret_cast<unsigned long long*>(base + index_error_offset(slots, D, sizeof(A)));
  return parts;
}

// ------------------------------------------------------------------------------------------------------
// Generic partial kernel: one warp per (layer, query row, bank range). Any dtype, dense or gathered bank.
// ------------------------------------------------------------------------------------------------------

constexpr int kGenericWarps = 4;
constexpr int kGenericThreads = kGenericWarps * 32;
constexpr int kChunk = 32;  // keys per online-softmax step (one per lane)

template <typename T>
__global__ void __launch_bounds__(kGenericThreads, 4)  // the plan targets 4 blocks per SM
    generic_partial_kernel(const MembankInfonceParams p, int64_t keys_per_split,
                           Partials<typename AccOf<T>::type> parts) {
  using A = typename AccOf<T>::type;
  // Weights and bank rows of a chunk's keys, double-buffered: consecutive chunks use alternate buffers, so
  // the __syncwarp after a chunk's writes also orders them after the reads of the buffer two chunks back.
  __shared__ A p_s[2][kGenericWarps][kChunk];
  __shared__ int64_t row_s[2][kGenericWarps][kChunk];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kGenericWarps + warp;  // flattened (l, b)
  if (row >= p.L * p.B) return;  // whole warp leaves; the kernel has no block-wide barrier
  const int64_t l = row / p.B;
  const int64_t b = row - l * p.B;
  const int64_t D = p.D;

  const T* __restrict__ q = static_cast<const T*>(p.query) + l * p.query_stride_l + b * p.query_stride_b;
  const T* __restrict__ bank = static_cast<const T*>(p.bank) + l * p.bank_stride_l;
  const int64_t* __restrict__ nidx =
      p.negative_index ? p.negative_index + l * p.index_stride_l + b * p.index_stride_b : nullptr;
  const bool use_labels = p.query_labels != nullptr && p.bank_labels != nullptr;
  const int64_t qlab = use_labels ? p.query_labels[b] : 0;
  const A scale = static_cast<A>(kLog2eD / p.temperature);

  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * keys_per_split;
  const int64_t k_end = min(p.K, k_begin + keys_per_split);
  const int64_t slot = static_cast<int64_t>(blockIdx.y) * p.L * p.B + row;
  A* __restrict__ o = parts.o + slot * D;

  // Each lane owns the features d == lane (mod 32) of o for the whole kernel: no intra-warp races.
  for (int64_t d = lane; d < D; d += 32) o[d] = A(0);
  A m = neg_inf<A>();
  A lsum = A(0);
  int buf = 0;  // the p_s / row_s buffer of the next chunk that writes them

  for (int64_t c0 = k_begin; c0 < k_end; c0 += kChunk) {
    const int n = static_cast<int>(min(static_cast<int64_t>(kChunk), k_end - c0));
    // Lane j resolves key j of the chunk: bank row and validity (range end, label mask).
    // An index outside [0, N) is never dereferenced, whatever N is (0 included): its key is left out of
    // `read_mask`, the only thing that lets a bank row be read, and it scores NaN, which makes the whole row
    // NaN (as a NaN score does); the call's error words record the value.
    const int64_t j = c0 + lane;
    bool valid = lane < n;
    bool bad = false;
    int64_t key_row = 0;
    if (valid) {
      key_row = nidx ? nidx[j] : j;
      if (key_row < 0 || key_row >= p.N) {
        report_bad_index(parts, key_row);
        bad = true;
        key_row = 0;
      } else if (use_labels && p.bank_labels[key_row] == qlab) {
        valid = false;
      }
    }
    const unsigned read_mask = __ballot_sync(kFullMask, valid && !bad);  // keys in the bank, not masked

    // Scores: one warp-reduced dot product per valid key; lane j keeps z_j.
    A my_z = neg_inf<A>();
    for (int jj = 0; jj < n; ++jj) {
      const int64_t rj = __shfl_sync(kFullMask, key_row, jj);
      if (!((read_mask >> jj) & 1u)) continue;  // warp-uniform
      const T* __restrict__ kp = bank + rj * p.bank_stride_n;
      A acc = A(0);
      for (int64_t d = lane; d < D; d += 32) acc += to_acc(q[d]) * to_acc(kp[d]);
      acc = warp_sum(acc);
      if (lane == jj) my_z = acc * scale;
    }
    if (bad) my_z = static_cast<A>(NAN);  // still `valid`: its NaN reaches the row like a NaN score

    // Online softmax: one rescale per chunk.
    const A m_new = nan_max(m, warp_max(my_z));
    if (m_new == neg_inf<A>()) continue;  // no valid key so far (warp-uniform)
    const A alpha = exp2_acc(m - m_new);  // m == -inf -> 0 (o and lsum are 0 then)
    const A pj = valid ? exp2_acc(my_z - m_new) : A(0);
    lsum = lsum * alpha + warp_sum(pj);
    m = m_new;

    // o = alpha * o + sum_j p_j k_j, lanes over features (coalesced key reads). Only keys of read_mask are
    // read: a NaN weight (bad index, NaN score) would pass a `w != 0` test. A bad key's NaN reaches o through
    // alpha, as m_new is NaN.
    p_s[buf][warp][lane] = pj;
    row_s[buf][warp][lane] = key_row;
    __syncwarp();
    for (int64_t d = lane; d < D; d += 32) {
      A acc = o[d] * alpha;
      for (int jj = 0; jj < n; ++jj) {
        const A w = p_s[buf][warp][jj];
        if (((read_mask >> jj) & 1u) && w != A(0)) {
          acc += w * to_acc(bank[row_s[buf][warp][jj] * p.bank_stride_n + d]);
        }
      }
      o[d] = acc;
    }
    buf ^= 1;
  }
  if (lane == 0) {
    parts.m[slot] = m;
    parts.l[slot] = lsum;
  }
}

// ------------------------------------------------------------------------------------------------------
// Tensor-core partial kernel (sm_80+): bf16/fp16 WMMA 16x16x16, fp32 via tf32 WMMA 16x16x8.
// ------------------------------------------------------------------------------------------------------

constexpr int kQT = 64;  // query rows per block (4 warps x 16)
constexpr int kKT = 64;  // bank rows per tile
constexpr int kDK = 32;  // feature chunk of the S = Q K^T stage
constexpr int kDV = 64;  // feature chunk of the O += P V stage
constexpr int kTcWarps = 4;
constexpr int kTcThreads = kTcWarps * 32;
constexpr int kLdS = kKT + 4;  // fp32 score/scratch tile leading dim
static_assert(kDV == kKT, "the score tile doubles as the P V scratch tile");
static_assert(kQT == 16 * kTcWarps, "one 16-row slab per warp");

template <typename T>
struct TcTraits;
template <>
struct TcTraits<__half> {
  using Frag = __half;
  static constexpr int kK = 16;   // WMMA k
  static constexpr int kPad = 8;  // smem row padding (elements): keeps ldm a multiple of 16 bytes
};
template <>
struct TcTraits<__nv_bfloat16> {
  using Frag = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr int kPad = 8;
};
template <>
struct TcTraits<float> {
#if DISTILLKIT_TC_DEVICE_CODE
  using Frag = wmma::precision::tf32;
#else
  using Frag = float;  // no tf32 WMMA below sm_80; the kernel body is compiled out there
#endif
  static constexpr int kK = 8;
  static constexpr int kPad = 4;
};

constexpr size_t round128(size_t n) { return (n + 127) & ~static_cast<size_t>(127); }

/// Dynamic shared-memory layout of the tensor-core kernel (byte offsets, each 128-byte aligned).
/// bf16/fp16: 47104 bytes; fp32 (tf32): 71680 bytes; then the optional on-chip O.
template <typename T>
struct TcLayout {
  static constexpr int kLdQ = kDK + TcTraits<T>::kPad;  // Qs, Ks
  static constexpr int kLdP = kKT + TcTraits<T>::kPad;  // Ps
  static constexpr int kLdV = kDV + TcTraits<T>::kPad;  // Vs
  static constexpr size_t kQ = 0;                                           // [kQT][kLdQ] T
  static constexpr size_t kK = kQ + round128(sizeof(T) * kQT * kLdQ);       // [kKT][kLdQ] T
  static constexpr size_t kV = kK + round128(sizeof(T) * kKT * kLdQ);       // [kKT][kLdV] T
  static constexpr size_t kP = kV + round128(sizeof(T) * kKT * kLdV);       // [kQT][kLdP] T
  static constexpr size_t kS = kP + round128(sizeof(T) * kQT * kLdP);       // [kQT][kLdS] fp32
  static constexpr size_t kQLab = kS + round128(sizeof(float) * kQT * kLdS);// [kQT] int64
  static constexpr size_t kBLab = kQLab + round128(sizeof(int64_t) * kQT);  // [kKT] int64
  static constexpr size_t kO = kBLab + round128(sizeof(int64_t) * kKT);     // [kQT][D] fp32 (optional)
};
static_assert(TcLayout<__half>::kO == 47104 && TcLayout<float>::kO == 71680, "see the layout comment");

/// Replaces every Inf / NaN packed in the 32-bit word `w` (two 16-bit or one 32-bit value of type T) by +0.
template <typename T>
__device__ __forceinline__ uint32_t zero_nonfinite(uint32_t w) {
  if constexpr (sizeof(T) == 4) {
    return (w & 0x7f800000u) == 0x7f800000u ? 0u : w;
  } else {
    constexpr uint32_t kExp = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;  // exponent bits, all ones
    if ((w & kExp) == kExp) w &= 0xffff0000u;
    if ((w & (kExp << 16)) == (kExp << 16)) w &= 0x0000ffffu;
    return w;
  }
}

/// Copies rows [0, rows_valid) x features [col0, col0 + COLS) of a row-major global matrix (row stride
/// `stride` elements) into a [ROWS][LD] smem tile, writing zeros outside the valid rows / past D.
/// `vec` requires 16-byte aligned rows, stride and D multiples of 16 / sizeof(T). With kFiniteOnly, Inf and
/// NaN values are staged as 0 (the V operand of P V, where a masked key has P = 0 and 0 * NaN must not
/// happen).
template <typename T, int ROWS, int COLS, int LD, bool kFiniteOnly = false>
__device__ __forceinline__ void stage_tile(T* __restrict__ dst, const T* __restrict__ src, int64_t stride,
                                           int rows_valid, int64_t col0, int64_t D, bool vec) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static_assert(COLS % kVec == 0 && (LD * sizeof(T)) % 16 == 0, "16-byte smem rows");
  if (vec) {
    constexpr int kPerRow = COLS / kVec;
    for (int v = threadIdx.x; v < ROWS * kPerRow; v += kTcThreads) {
      const int r = v / kPerRow;
      const int c = (v - r * kPerRow) * kVec;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows_valid && col0 + c < D) val = *reinterpret_cast<const uint4*>(src + r * stride + col0 + c);
      if constexpr (kFiniteOnly) {
        val = make_uint4(zero_nonfinite<T>(val.x), zero_nonfinite<T>(val.y), zero_nonfinite<T>(val.z),
                         zero_nonfinite<T>(val.w));
      }
      *reinterpret_cast<uint4*>(dst + r * LD + c) = val;
    }
  } else {
    for (int e = threadIdx.x; e < ROWS * COLS; e += kTcThreads) {
      const int r = e / COLS;
      const int c = e - r * COLS;
      T val = from_float<T>(0.f);
      if (r < rows_valid && col0 + c < D) val = src[r * stride + col0 + c];
      if constexpr (kFiniteOnly) {
        if (!isfinite(to_acc(val))) val = from_float<T>(0.f);
      }
      dst[r * LD + c] = val;
    }
  }
}

#if DISTILLKIT_TC_DEVICE_CODE
template <typename T, typename Frag>
__device__ __forceinline__ void maybe_tf32(Frag& f) {
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < f.num_elements; ++i) f.x[i] = wmma::__float_to_tf32(f.x[i]);
  }
}
#endif

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    tc_partial_kernel(const MembankInfonceParams p, int64_t keys_per_split, bool o_in_smem, bool vec,
                      int64_t layer0, Partials<float> parts) {
#if !DISTILLKIT_TC_DEVICE_CODE
  __trap();  // never selected below sm_80 (see membank_infonce_plan)
#else
  using Tr = TcTraits<T>;
  using FragT = typename Tr::Frag;
  using Lay = TcLayout<T>;
  constexpr int WK = Tr::kK;
  constexpr int kLdQ = Lay::kLdQ, kLdP = Lay::kLdP, kLdV = Lay::kLdV;

  extern __shared__ __align__(128) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem + Lay::kQ);
  T* Ks = reinterpret_cast<T*>(smem + Lay::kK);
  T* Vs = reinterpret_cast<T*>(smem + Lay::kV);
  T* Ps = reinterpret_cast<T*>(smem + Lay::kP);
  float* Ss = reinterpret_cast<float*>(smem + Lay::kS);
  int64_t* qlab_s = reinterpret_cast<int64_t*>(smem + Lay::kQLab);
  int64_t* blab_s = reinterpret_cast<int64_t*>(smem + Lay::kBLab);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r0 = warp * 16;  // this warp's query rows within the tile: [r0, r0 + 16)
  const int64_t D = p.D;
  const int64_t l = layer0 + blockIdx.z;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * kQT;
  const int q_rows = static_cast<int>(min(static_cast<int64_t>(kQT), p.B - b0));
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * keys_per_split;
  const int64_t k_end = min(p.K, k_begin + keys_per_split);
  const T* __restrict__ qbase = static_cast<const T*>(p.query) + l * p.query_stride_l + b0 * p.query_stride_b;
  const T* __restrict__ bank = static_cast<const T*>(p.bank) + l * p.bank_stride_l;
  const bool use_labels = p.query_labels != nullptr && p.bank_labels != nullptr;
  const float scale = static_cast<float>(kLog2eD / p.temperature);

  // Workspace row of query b0 in this split; O is either on chip or that workspace block.
  const int64_t slot0 = (static_cast<int64_t>(blockIdx.y) * p.L + l) * p.B + b0;
  float* O = o_in_smem ? reinterpret_cast<float*>(smem + Lay::kO) : parts.o + slot0 * D;

  // Rows [r0, r0 + 16) of O, Ss, Ps, qlab_s and the row statistics are private to warp `warp`.
  for (int r = 0; r < 16; ++r) {
    if (r0 + r >= q_rows) break;
    for (int64_t d = lane; d < D; d += 32) O[(r0 + r) * D + d] = 0.f;
  }
  if (use_labels && lane < 16) qlab_s[r0 + lane] = (r0 + lane < q_rows) ? p.query_labels[b0 + r0 + lane] : 0;
  // Lane r (< 16) holds running max / sum / last rescale factor of row r0 + r.
  float m_mine = -INFINITY, l_mine = 0.f, a_mine = 1.f;
  __syncwarp();

  for (int64_t kt0 = k_begin; kt0 < k_end; kt0 += kKT) {
    const int k_rows = static_cast<int>(min(static_cast<int64_t>(kKT), k_end - kt0));
    const T* __restrict__ kbase = bank + kt0 * p.bank_stride_n;

    // ---- S = Q K^T for the warp's 16 rows x 64 keys, fp32 accumulation over D.
    wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc[kKT / 16];
#pragma unroll
    for (int n = 0; n < kKT / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
    for (int64_t d0 = 0; d0 < D; d0 += kDK) {
      __syncthreads();  // previous readers of Qs / Ks (and of blab_s, via the P V barriers) are done
      stage_tile<T, kQT, kDK, kLdQ>(Qs, qbase, p.query_stride_b, q_rows, d0, D, vec);
      stage_tile<T, kKT, kDK, kLdQ>(Ks, kbase, p.bank_stride_n, k_rows, d0, D, vec);
      if (use_labels && d0 == 0) {
        for (int j = threadIdx.x; j < kKT; j += kTcThreads) {
          blab_s[j] = j < k_rows ? p.bank_labels[kt0 + j] : 0;
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kDK; kk += WK) {
        wmma::fragment<wmma::matrix_a, 16, 16, WK, FragT, wmma::row_major> a;
        wmma::load_matrix_sync(a, Qs + r0 * kLdQ + kk, kLdQ);
        maybe_tf32<T>(a);
#pragma unroll
        for (int n = 0; n < kKT / 16; ++n) {
          // K^T as a col-major [kDK x kKT] operand is Ks row-major [kKT x kLdQ].
          wmma::fragment<wmma::matrix_b, 16, 16, WK, FragT, wmma::col_major> bk;
          wmma::load_matrix_sync(bk, Ks + n * 16 * kLdQ + kk, kLdQ);
          maybe_tf32<T>(bk);
          wmma::mma_sync(acc[n], a, bk, acc[n]);
        }
      }
    }
#pragma unroll
    for (int n = 0; n < kKT / 16; ++n) {
      wmma::store_matrix_sync(Ss + r0 * kLdS + n * 16, acc[n], kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // ---- Online softmax over the warp's rows: mask, rescale, P to smem.
    for (int r = 0; r < 16; ++r) {
      const int qr = r0 + r;
      float z0 = Ss[qr * kLdS + lane] * scale;
      float z1 = Ss[qr * kLdS + lane + 32] * scale;
      const bool ok0 = lane < k_rows && !(use_labels && blab_s[lane] == qlab_s[qr]);
      const bool ok1 = lane + 32 < k_rows && !(use_labels && blab_s[lane + 32] == qlab_s[qr]);
      z0 = ok0 ? z0 : -INFINITY;
      z1 = ok1 ? z1 : -INFINITY;
      const float m_old = __shfl_sync(kFullMask, m_mine, r);
      const float m_new = nan_max(m_old, warp_max(nan_max(z0, z1)));
      float alpha = 1.f, p0 = 0.f, p1 = 0.f;
      if (m_new != -INFINITY) {  // warp-uniform; all masked so far -> keep zeros, avoid -inf - -inf
        alpha = exp2f(m_old - m_new);  // m_old == -inf -> 0
        p0 = exp2f(z0 - m_new);        // masked -> exp2(-inf) = 0
        p1 = exp2f(z1 - m_new);
      }
      const float psum = warp_sum(p0 + p1);
      if (lane == r) {
        m_mine = m_new;
        l_mine = l_mine * alpha + psum;
        a_mine = alpha;
      }
      Ps[qr * kLdP + lane] = from_float<T>(p0);
      Ps[qr * kLdP + lane + 32] = from_float<T>(p1);
    }
    __syncwarp();

    // P fragments of the warp's rows stay in registers for all feature chunks of this tile.
    wmma::fragment<wmma::matrix_a, 16, 16, WK, FragT, wmma::row_major> pa[kKT / WK];
#pragma unroll
    for (int kk = 0; kk < kKT / WK; ++kk) {
      wmma::load_matrix_sync(pa[kk], Ps + r0 * kLdP + kk * WK, kLdP);
      maybe_tf32<T>(pa[kk]);
    }

    // ---- O = alpha * O + P V over feature chunks, V = the same bank tile.
    for (int64_t dv0 = 0; dv0 < D; dv0 += kDV) {
      __syncthreads();  // previous readers of Vs are done
      stage_tile<T, kKT, kDV, kLdV, true>(Vs, kbase, p.bank_stride_n, k_rows, dv0, D, vec);
      __syncthreads();
#pragma unroll
      for (int n = 0; n < kDV / 16; ++n) {
        wmma::fragment<wmma::accumulator, 16, 16, WK, float> pv;
        wmma::fill_fragment(pv, 0.f);
#pragma unroll
        for (int kk = 0; kk < kKT / WK; ++kk) {
          wmma::fragment<wmma::matrix_b, 16, 16, WK, FragT, wmma::row_major> bv;
          wmma::load_matrix_sync(bv, Vs + kk * WK * kLdV + n * 16, kLdV);
          maybe_tf32<T>(bv);
          wmma::mma_sync(pv, pa[kk], bv, pv);
        }
        wmma::store_matrix_sync(Ss + r0 * kLdS + n * 16, pv, kLdS, wmma::mem_row_major);
      }
      __syncwarp();
#pragma unroll
      for (int r = 0; r < 16; ++r) {
        const float alpha = __shfl_sync(kFullMask, a_mine, r);
        if (r0 + r < q_rows) {
#pragma unroll
          for (int c = lane; c < kDV; c += 32) {
            const int64_t d = dv0 + c;
            if (d < D) {
              float* op = O + (r0 + r) * D + d;
              *op = *op * alpha + Ss[(r0 + r) * kLdS + c];
            }
          }
        }
      }
      __syncwarp();  // Ss is rewritten by the next chunk
    }
  }

  // ---- Partials of the warp's rows.
  for (int r = 0; r < 16; ++r) {
    const float m_r = __shfl_sync(kFullMask, m_mine, r);
    const float l_r = __shfl_sync(kFullMask, l_mine, r);
    if (r0 + r >= q_rows) continue;
    if (lane == 0) {
      parts.m[slot0 + r0 + r] = m_r;
      parts.l[slot0 + r0 + r] = l_r;
    }
    if (o_in_smem) {
      for (int64_t d = lane; d < D; d += 32) parts.o[(slot0 + r0 + r) * D + d] = O[(r0 + r) * D + d];
    }
  }
#endif
}

// ------------------------------------------------------------------------------------------------------
// Merge: s_pos, lse, loss and wsum from the per-range partials. One block per (layer, query row).
// ------------------------------------------------------------------------------------------------------

constexpr int kMergeThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(const MembankInfonceParams p, int num_splits, Partials<typename AccOf<T>::type> parts) {
  using A = typename AccOf<T>::type;
  __shared__ A red[kMergeThreads / 32];
  __shared__ A coef[kMaxSplits];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t row = blockIdx.x;  // flattened (l, b)
  const int64_t l = row / p.B;
  const int64_t b = row - l * p.B;
  const int64_t D = p.D;
  const int64_t LB = p.L * p.B;
  const T* __restrict__ q = static_cast<const T*>(p.query) + l * p.query_stride_l + b * p.query_stride_b;
  const T* __restrict__ pos =
      static_cast<const T*>(p.positive) + l * p.positive_stride_l + b * p.positive_stride_b;

  A acc = A(0);
  for (int64_t d = threadIdx.x; d < D; d += kMergeThreads) acc += to_acc(q[d]) * to_acc(pos[d]);
  acc = warp_sum(acc);
  if (lane == 0) red[warp] = acc;
  __syncthreads();

  if (warp == 0) {
    const A s_pos = warp_sum(lane < kMergeThreads / 32 ? red[lane] : A(0));
    const A z_pos = s_pos * static_cast<A>(kLog2eD / p.temperature);
    A mx = z_pos;  // finite, so the merged max is finite even when every range is empty
    for (int i = lane; i < num_splits; i += 32) {
      const A mi = parts.m[i * LB + row];
      mx = nan_max(mx, mi);
    }
    mx = warp_max(mx);
    A total = A(0);
    for (int i = lane; i < num_splits; i += 32) {
      const A mi = parts.m[i * LB + row];
      const A c = (mi == neg_inf<A>()) ? A(0) : exp2_acc(mi - mx);
      coef[i] = c;
      total += c * parts.l[i * LB + row];
    }
    const A neg = warp_sum(total);  // sum over the valid negatives of 2^(z_j - mx)
    total = neg + exp2_acc(z_pos - mx);  // >= the largest term, which is 1
    const A inv = A(1) / total;
    for (int i = lane; i < num_splits; i += 32) coef[i] *= inv;
    if (lane == 0) {
      static_cast<A*>(p.lse)[row] = (mx + log2_acc(total)) * static_cast<A>(kLn2D);
      // loss = ln(sum_j 2^(z_j - z_pos)) without subtracting two large numbers: log1p of the negatives' sum
      // when the positive holds the max (exactly 0 without valid negatives), else two non-negative terms.
      static_cast<A*>(p.loss)[row] = mx == z_pos ? log1p_acc(neg)
                                                 : (mx - z_pos) * static_cast<A>(kLn2D) + log_acc(total);
    }
  }
  __syncthreads();

  A* __restrict__ wsum = static_cast<A*>(p.wsum) + row * D;
  for (int64_t d = threadIdx.x; d < D; d += kMergeThreads) {
    A w = A(0);
    for (int i = 0; i < num_splits; ++i) {
      const A c = coef[i];
      if (c != A(0)) w += c * parts.o[(i * LB + row) * D + d];
    }
    wsum[d] = w;
  }
}

// ------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------

size_t tc_base_smem(MembankDType t) {
  switch (t) {
    case MembankDType::kFloat16:
      return TcLayout<__half>::kO;
    case MembankDType::kBFloat16:
      return TcLayout<__nv_bfloat16>::kO;
    default:
      return TcLayout<float>::kO;
  }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// ---- Per-device cache: attributes, the tensor-core kernels' smem opt-in, occupancy answers.

constexpr int kMaxDevices = 64;
constexpr int kTcKinds = 3;  // tensor-core kernels: fp16, bf16, fp32 (tf32)

int tc_kind(MembankDType t) { return t == MembankDType::kFloat16 ? 0 : t == MembankDType::kBFloat16 ? 1 : 2; }

const void* tc_kernel_ptr(int kind) {
  switch (kind) {
    case 0:
      return reinterpret_cast<const void*>(&tc_partial_kernel<__half>);
    case 1:
      return reinterpret_cast<const void*>(&tc_partial_kernel<__nv_bfloat16>);
    default:
      return reinterpret_cast<const void*>(&tc_partial_kernel<float>);
  }
}

struct DeviceCache {
  std::once_flag attrs_once;
  cudaError_t attrs_status = cudaSuccess;
  int sms = 0, major = 0, optin = 0;
  std::once_flag smem_once[kTcKinds];
  cudaError_t smem_status[kTcKinds] = {};
  std::mutex occupancy_mutex;
  std::vector<std::pair<uint64_t, int>> occupancy;  // (kind << 32 | smem bytes) -> blocks per SM
};

DeviceCache* device_cache(int device) {
  static DeviceCache caches[kMaxDevices];
  return device >= 0 && device < kMaxDevices ? &caches[device] : nullptr;
}

// SM count, compute capability and shared-memory opt-in of `device`, queried once.
cudaError_t device_attributes(int device, DeviceCache** out) {
  DeviceCache* c = device_cache(device);
  if (c == nullptr) return cudaErrorInvalidDevice;
  std::call_once(c->attrs_once, [&] {
    cudaError_t err = cudaDeviceGetAttribute(&c->sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&c->major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&c->optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    c->attrs_status = err;
  });
  *out = c;
  return c->attrs_status;
}

// Opts the tensor-core kernel of `kind` in to the device's largest dynamic shared memory, once per device
// (the current one) and kind, so that no launch ever changes a function attribute another thread relies on.
cudaError_t tc_smem_optin(DeviceCache* c, int kind) {
  std::call_once(c->smem_once[kind], [&] {
    c->smem_status[kind] =
        cudaFuncSetAttribute(tc_kernel_ptr(kind), cudaFuncAttributeMaxDynamicSharedMemorySize, c->optin);
  });
  return c->smem_status[kind];
}

// Resident blocks per SM of the tensor-core kernel of `kind` with `smem` bytes of dynamic shared memory.
cudaError_t tc_blocks_per_sm(DeviceCache* c, int kind, size_t smem, int* blocks) {
  const uint64_t key = (static_cast<uint64_t>(kind) << 32) | static_cast<uint64_t>(smem);
  const std::lock_guard<std::mutex> lock(c->occupancy_mutex);
  for (const auto& entry : c->occupancy) {
    if (entry.first == key) {
      *blocks = entry.second;
      return cudaSuccess;
    }
  }
  const cudaError_t err =
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, tc_kernel_ptr(kind), kTcThreads, smem);
  if (err == cudaSuccess && c->occupancy.size() < 256) c->occupancy.emplace_back(key, *blocks);
  return err;
}

template <typename T>
cudaError_t launch_typed(const MembankInfonceParams& p, const MembankInfoncePlan& plan, void* workspace,
                         cudaStream_t stream) {
  using A = typename AccOf<T>::type;
  const int64_t slots = static_cast<int64_t>(plan.num_splits) * p.L * p.B;
  const Partials<A> parts = carve_workspace<A>(workspace, slots, p.D);
  if (p.negative_index != nullptr) {  // this call's index-error words start at zero
    const cudaError_t err = cudaMemsetAsync(parts.index_error, 0, kIndexErrorBytes, stream);
    if (err != cudaSuccess) return err;
  }

  if constexpr (std::is_same_v<T, double>) {
    if (plan.path == MembankPath::kTensorCore) return cudaErrorInvalidValue;
  } else {
    if (plan.path == MembankPath::kTensorCore) {
      const int64_t vec_elems = 16 / static_cast<int64_t>(sizeof(T));
      const bool vec = p.D % vec_elems == 0 && p.query_stride_b % vec_elems == 0 &&
                       p.query_stride_l % vec_elems == 0 && p.bank_stride_n % vec_elems == 0 &&
                       p.bank_stride_l % vec_elems == 0 && aligned16(p.query) && aligned16(p.bank);
      const int64_t q_tiles = (p.B + kQT - 1) / kQT;
      if (q_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
      int device = 0;
      DeviceCache* cache = nullptr;
      cudaError_t err = cudaGetDevice(&device);
      if (err == cudaSuccess) err = device_attributes(device, &cache);
      if (err == cudaSuccess) err = tc_smem_optin(cache, tc_kind(p.dtype));
      if (err != cudaSuccess) return err;
      for (int64_t l0 = 0; l0 < p.L; l0 += kMaxLayersPerLaunch) {  // grid z holds at most 65535 layers
        const int64_t layers = std::min<int64_t>(kMaxLayersPerLaunch, p.L - l0);
        const dim3 grid(static_cast<unsigned>(q_tiles), static_cast<unsigned>(plan.num_splits),
                        static_cast<unsigned>(layers));
        tc_partial_kernel<T><<<grid, kTcThreads, plan.smem_bytes, stream>>>(p, plan.keys_per_split,
                                                                            plan.o_in_smem, vec, l0, parts);
        err = cudaGetLastError();
        if (err != cudaSuccess) return err;
      }
    }
  }
  if (plan.path == MembankPath::kGeneric) {
    const int64_t blocks = (p.L * p.B + kGenericWarps - 1) / kGenericWarps;
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(plan.num_splits), 1);
    generic_partial_kernel<T><<<grid, kGenericThreads, 0, stream>>>(p, plan.keys_per_split, parts);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.L * p.B > 0x7fffffff) return cudaErrorInvalidConfiguration;
  merge_kernel<T><<<static_cast<unsigned>(p.L * p.B), kMergeThreads, 0, stream>>>(p, plan.num_splits, parts);
  return cudaGetLastError();
}

}  // namespace

cudaError_t membank_infonce_plan(const MembankInfonceParams& p, int device, MembankInfoncePlan* plan) {
  if (plan == nullptr || p.L < 0 || p.B < 0 || p.K < 0 || p.D < 0 || !(p.temperature > 0.0)) {
    return cudaErrorInvalidValue;
  }
  int current = -1;
  cudaError_t err = cudaGetDevice(&current);
  if (err != cudaSuccess) return err;
  if (current != device) return cudaErrorInvalidDevice;  // function attributes apply to the current device
  DeviceCache* cache = nullptr;
  err = device_attributes(device, &cache);
  if (err != cudaSuccess) return err;

  const bool half_in = p.dtype == MembankDType::kFloat16 || p.dtype == MembankDType::kBFloat16;
  const bool tc_ok = (half_in || (p.dtype == MembankDType::kFloat32 && p.allow_tf32)) &&
                     p.negative_index == nullptr && cache->major >= 8 && p.D > 0;
  MembankInfoncePlan out;
  switch (p.path) {
    case MembankPath::kGeneric:
      out.path = MembankPath::kGeneric;
      break;
    case MembankPath::kTensorCore:
      out.path = tc_ok ? MembankPath::kTensorCore : MembankPath::kGeneric;
      break;
    default:  // a 64-row query tile is mostly padding for tiny batches; the warp-per-row path wins there
      out.path = (tc_ok && p.B >= 16) ? MembankPath::kTensorCore : MembankPath::kGeneric;
  }

  int64_t tile, min_tiles_per_split, base_blocks, target_blocks = 0;
  if (out.path == MembankPath::kTensorCore) {
    const int kind = tc_kind(p.dtype);
    err = tc_smem_optin(cache, kind);
    if (err != cudaSuccess) return err;
    const size_t base = tc_base_smem(p.dtype);
    const size_t o_bytes = sizeof(float) * kQT * static_cast<size_t>(p.D);
    int blocks_ws = 0, blocks_on_chip = 0;
    err = tc_blocks_per_sm(cache, kind, base, &blocks_ws);
    if (err == cudaSuccess && base + o_bytes <= static_cast<size_t>(cache->optin)) {
      err = tc_blocks_per_sm(cache, kind, base + o_bytes, &blocks_on_chip);
    }
    if (err != cudaSuccess) return err;
    // O stays on chip while that keeps 2 resident blocks per SM (or costs no occupancy at all).
    out.o_in_smem = blocks_on_chip >= std::min(2, blocks_ws) && blocks_on_chip > 0;
    const int blocks_per_sm = out.o_in_smem ? blocks_on_chip : blocks_ws;
    if (blocks_per_sm < 1) {
      out.path = MembankPath::kGeneric;  // the tile does not fit this device at all
      out.o_in_smem = false;
    } else {
      out.smem_bytes = base + (out.o_in_smem ? o_bytes : 0);
      target_blocks = static_cast<int64_t>(blocks_per_sm) * cache->sms;
    }
  }
  if (out.path == MembankPath::kTensorCore) {
    tile = kKT;
    min_tiles_per_split = 2;
    base_blocks = p.L * ((p.B + kQT - 1) / kQT);
  } else {
    tile = kChunk;
    min_tiles_per_split = 4;
    base_blocks = (p.L * p.B + kGenericWarps - 1) / kGenericWarps;
    target_blocks = 4 * static_cast<int64_t>(cache->sms);
  }
  const size_t acc_bytes = p.dtype == MembankDType::kFloat64 ? 8 : 4;
  const int64_t n_tiles = std::max<int64_t>(1, (p.K + tile - 1) / tile);
  int64_t splits = base_blocks > 0 ? (target_blocks + base_blocks - 1) / base_blocks : 1;
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, n_tiles / min_tiles_per_split));
  splits = std::min<int64_t>(splits, kMaxSplits);
  const int64_t row_bytes = std::max<int64_t>(1, p.L * p.B * (p.D + 2) * static_cast<int64_t>(acc_bytes));
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, (int64_t{256} << 20) / row_bytes));
  splits = std::max<int64_t>(splits, 1);
  const int64_t tiles_per_split = (n_tiles + splits - 1) / splits;
  out.num_splits = static_cast<int>((n_tiles + tiles_per_split - 1) / tiles_per_split);  // no empty range
  out.keys_per_split = tiles_per_split * tile;
  const int64_t slots = static_cast<int64_t>(out.num_splits) * p.L * p.B;
  out.workspace_bytes = workspace_bytes_for(slots, p.D, acc_bytes);
  out.index_error_offset = index_error_offset(slots, p.D, acc_bytes);
  *plan = out;
  return cudaSuccess;
}

cudaError_t membank_infonce_forward(const MembankInfonceParams& p, const MembankInfoncePlan& plan,
                                    void* workspace, cudaStream_t stream) {
  if (p.L == 0 || p.B == 0) return cudaSuccess;
  if (plan.num_splits < 1 || plan.num_splits > kMaxSplits || plan.keys_per_split <= 0 ||
      workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (p.dtype) {
    case MembankDType::kFloat32:
      return launch_typed<float>(p, plan, workspace, stream);
    case MembankDType::kFloat16:
      return launch_typed<__half>(p, plan, workspace, stream);
    case MembankDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, plan, workspace, stream);
    case MembankDType::kFloat64:
      return launch_typed<double>(p, plan, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t membank_infonce_index_error(const MembankInfoncePlan& plan, const void* workspace,
                                        cudaStream_t stream, MembankIndexError* report) {
  if (workspace == nullptr || report == nullptr) return cudaErrorInvalidValue;
  unsigned long long words[2] = {0, 0};
  const void* src = static_cast<const unsigned char*>(workspace) + plan.index_error_offset;
  cudaError_t err = cudaMemcpyAsync(words, src, kIndexErrorBytes, cudaMemcpyDeviceToHost, stream);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) return err;
  report->count = words[0];
  report->value = static_cast<int64_t>(words[1]);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace distillkit
