// cpusim.h: run CUDA C++ kernels on the CPU for functional testing (no GPU).
//
// Used by tests/cuda_emulation (see docs/cuda.md): the project's real .cu file, rewritten by rewrite.py for
// the two CUDA-only syntaxes, is compiled with g++ -include cpusim.h and sanitizers and run on the CPU.
//
// One fiber (hand-rolled x86-64 context switch) per CUDA thread; blocks run one after another on the calling
// OS thread. Barriers (__syncthreads, __syncwarp, shuffles, ballots) are real rendezvous points; between them,
// threads run in a seeded random order (CPUSIM_SEED, every seed 0 included shuffles), so a missing barrier
// shows up as a wrong result or an uninitialised read in some schedules. CPUSIM_SKIP_BARRIER_LINE=n turns the
// __syncthreads() / __syncwarp() statement on line n of the kernel file into a no-op: the mutation check
// deletes one barrier at a time without recompiling. Also checked: launch limits, >48 KB dynamic smem without cudaFuncSetAttribute,
// divergent barriers (deadlock report), shuffles naming exited lanes, WMMA pointer alignment (32 B) and ldm.
// Dynamic smem is malloc'd at its exact size and poisoned (0xFF = NaN) so ASan catches overruns.
// WMMA: every lane holds the whole tile; stores are split across lanes (element i by lane i % 32).
// Use: g++ -std=c++17 -include cpusim.h -x c++ kernel.cu (after rewriting <<<>>> launches, see rewrite.py).
#pragma once

#define __host__
#define __device__
#define __global__
#define __shared__ static
#define __constant__ static
#define __launch_bounds__(...)

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define CPUSIM_ASAN 1
#endif

template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, enum cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
using std::isfinite;
using std::isinf;
using std::isnan;
template <typename T, typename U>
inline auto min(T a, U b) -> std::common_type_t<T, U> { return b < a ? b : a; }
template <typename T, typename U>
inline auto max(T a, U b) -> std::common_type_t<T, U> { return a < b ? b : a; }

// Atomics: fibers of one block run on one OS thread and switch only at barriers, so plain updates are atomic.
inline unsigned long long atomicAdd(unsigned long long* addr, unsigned long long v) {
  const unsigned long long old = *addr;
  *addr = old + v;
  return old;
}
inline unsigned long long atomicExch(unsigned long long* addr, unsigned long long v) {
  const unsigned long long old = *addr;
  *addr = v;
  return old;
}

extern "C" void cpusim_switch(void** save_sp, void* new_sp);
#ifdef CPUSIM_IMPLEMENT
asm(R"(
  .text
  .globl cpusim_switch
  .type cpusim_switch,@function
cpusim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cpusim_switch,.-cpusim_switch
)");
#endif

namespace cpusim {

[[noreturn]] inline void fail(const char* what, int line) {
  std::fprintf(stderr, "cpusim: %s (line %d)\n", what, line);
  std::abort();
}

// Emulated devices (cudaSetDevice selects one): SM count, compute capability, shared memory per block
// (opt-in) and per SM. Occupancy is modelled from shared memory and threads only (no register limit).
struct DeviceModel {
  const char* name;
  int sms, major, minor, optin, smem_per_sm;
};
constexpr DeviceModel kDevices[] = {
    {"H100-like sm_90", 132, 9, 0, 232448, 233472},
    {"A100-like sm_80", 108, 8, 0, 166912, 167936},
    {"RTX-3090-like sm_86", 82, 8, 6, 101376, 102400},
    {"T4-like sm_75", 40, 7, 5, 65536, 65536},
};
constexpr int kNumDevices = sizeof(kDevices) / sizeof(kDevices[0]);
inline int& current_device() {
  static thread_local int d = 0;
  return d;
}
// Counters the tests read: runtime calls the kernel's host code makes.
inline long& attribute_queries() {
  static long n = 0;
  return n;
}
inline long& func_attribute_sets() {
  static long n = 0;
  return n;
}

struct Fiber {
  void* sp = nullptr;
  const unsigned* wait_gen = nullptr;  // blocked until *wait_gen != wait_val
  unsigned wait_val = 0;
  char* stack_base = nullptr;
  uint3 tid;
  int lane = 0, warp = 0;
  bool done = false;
};

struct WarpState {
  unsigned live = 0;      // lanes not exited
  unsigned arrived = 0;   // lanes waiting at the current warp barrier
  unsigned expected = 0;  // mask of the current barrier
  unsigned gen = 0;
  int line = -1;
  uint64_t slot[2][32];  // exchange buffers, alternating by barrier generation
};

struct BlockState {
  dim3 bdim, gdim;
  uint3 bid;
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  int live = 0, arrived = 0, line = -1;
  unsigned gen = 0;
  unsigned char* dyn = nullptr;
  std::function<void()> body;
};

inline thread_local BlockState* g_block = nullptr;
inline thread_local Fiber* g_cur = nullptr;
inline thread_local void* g_sched_sp = nullptr;
inline thread_local uint64_t g_progress = 0;
#ifdef CPUSIM_ASAN
inline thread_local void* g_sched_fake = nullptr;
inline thread_local const void* g_sched_bottom = nullptr;
inline thread_local size_t g_sched_size = 0;
#endif
constexpr size_t kStack = 256 * 1024;

inline void yield(const unsigned* gen, unsigned val) {
  g_cur->wait_gen = gen;
  g_cur->wait_val = val;
#ifdef CPUSIM_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_sched_bottom, g_sched_size);
#endif
  cpusim_switch(&g_cur->sp, g_sched_sp);
#ifdef CPUSIM_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline unsigned char* dyn_smem() { return g_block->dyn; }

inline unsigned mask_or_full(unsigned m = 0xffffffffu) { return m; }
inline uint3 thread_idx() { return g_cur->tid; }
inline uint3 block_idx() { return g_block->bid; }
inline dim3 block_dim() { return g_block->bdim; }
inline dim3 grid_dim() { return g_block->gdim; }

// ---- barriers
inline void syncthreads(int line) {
  BlockState& b = *g_block;
  if (b.arrived == 0) b.line = line;
  else if (b.line != line) fail("__syncthreads reached from two different call sites (divergent barrier)", line);
  const unsigned gen = b.gen;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.gen;
  }
  ++g_progress;
  while (b.gen == gen) yield(&b.gen, gen);
}

inline void warp_barrier(unsigned mask, int line) {
  WarpState& w = g_block->warps[g_cur->warp];
  const unsigned me = 1u << g_cur->lane;
  if (!(mask & me)) fail("warp sync by a lane not named in its mask", line);
  if (mask & ~w.live) fail("warp sync mask names an exited or missing lane", line);
  if (w.arrived == 0) {
    w.expected = mask;
    w.line = line;
  } else if (w.expected != mask || w.line != line) {
    fail("warp-synchronous op reached with different masks / call sites (divergence)", line);
  }
  const unsigned gen = w.gen;
  w.arrived |= me;
  if (w.arrived == w.expected) {
    w.arrived = 0;
    ++w.gen;
  }
  ++g_progress;
  while (w.gen == gen) yield(&w.gen, gen);
}

// One rendezvous per exchange: values go to the buffer of the current barrier generation; a lane can only
// overwrite that buffer two exchanges later, after every lane has passed the next barrier (and so has read).
template <typename T>
inline T exchange(unsigned mask, T v, int src, int line) {
  static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
  WarpState& w = g_block->warps[g_cur->warp];
  uint64_t* slot = w.slot[w.gen & 1u];
  std::memcpy(&slot[g_cur->lane], &v, sizeof(T));
  warp_barrier(mask, line);
  if (!(mask & (1u << src))) fail("shuffle reads a lane outside the mask (undefined value)", line);
  T out;
  std::memcpy(&out, &slot[src], sizeof(T));
  return out;
}

template <typename T>
inline T shfl(unsigned mask, T v, int src, int width, int line) {
  const int lane = g_cur->lane;
  const int base = lane & ~(width - 1);
  return exchange(mask, v, base + (src & (width - 1)), line);
}
template <typename T>
inline T shfl_xor(unsigned mask, T v, int lane_mask, int width, int line) {
  const int lane = g_cur->lane;
  int src = lane ^ lane_mask;
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return exchange(mask, v, src, line);
}
template <typename T>
inline T shfl_down(unsigned mask, T v, unsigned delta, int width, int line) {
  const int lane = g_cur->lane;
  int src = lane + static_cast<int>(delta);
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
  return exchange(mask, v, src, line);
}
inline unsigned ballot(unsigned mask, int pred, int line) {
  WarpState& w = g_block->warps[g_cur->warp];
  uint64_t* slot = w.slot[w.gen & 1u];
  slot[g_cur->lane] = pred ? 1 : 0;
  warp_barrier(mask, line);
  unsigned out = 0;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) out |= static_cast<unsigned>(slot[l] != 0) << l;
  return out;
}

// ---- launch
struct LaunchCfg {
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  LaunchCfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t st = nullptr) : grid(g), block(b), smem(s), stream(st) {}
};

struct FuncAttr {
  int device;
  const void* fn;
  int max_dyn;
};
inline std::vector<FuncAttr>& attrs() {
  static std::vector<FuncAttr> a;
  return a;
}
inline cudaError_t& last_error() {
  static thread_local cudaError_t e = cudaSuccess;
  return e;
}
inline uint64_t seed() {
  static const uint64_t value = [] {
    const char* s = std::getenv("CPUSIM_SEED");
    return s ? std::strtoull(s, nullptr, 10) : uint64_t{0};
  }();
  return value;
}
// The line of the barrier statement the mutation check deletes (CPUSIM_SKIP_BARRIER_LINE), or -1.
inline int skipped_barrier_line() {
  static const int value = [] {
    const char* s = std::getenv("CPUSIM_SKIP_BARRIER_LINE");
    return s ? std::atoi(s) : -1;
  }();
  return value;
}

inline void fiber_entry() {
#ifdef CPUSIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_sched_bottom, &g_sched_size);
#endif
  g_block->body();
  Fiber& f = *g_cur;
  f.done = true;
  BlockState& b = *g_block;
  --b.live;
  WarpState& w = b.warps[f.warp];
  w.live &= ~(1u << f.lane);
  if (b.arrived > 0 && b.arrived == b.live) {  // exited threads count as arrived
    b.arrived = 0;
    ++b.gen;
  }
  ++g_progress;
#ifdef CPUSIM_ASAN
  __sanitizer_start_switch_fiber(nullptr, g_sched_bottom, g_sched_size);
#endif
  cpusim_switch(&f.sp, g_sched_sp);
  ::cpusim::fail("finished fiber resumed", 0);
}

template <typename... P, typename... A>
void launch(void (*kernel)(P...), const LaunchCfg& cfg, A&&... args) {
  const dim3 g = cfg.grid, bd = cfg.block;
  const uint64_t nthreads = uint64_t(bd.x) * bd.y * bd.z;
  if (nthreads == 0 || nthreads > 1024 || bd.z > 64 || g.x == 0 || g.y == 0 || g.z == 0 || g.y > 65535 ||
      g.z > 65535 || g.x > 0x7fffffffu) {
    last_error() = cudaErrorInvalidConfiguration;
    return;
  }
  int max_dyn = 48 * 1024;  // function attributes are per device
  for (auto& a : attrs())
    if (a.device == current_device() && a.fn == reinterpret_cast<const void*>(kernel)) max_dyn = a.max_dyn;
  if (cfg.smem > static_cast<size_t>(max_dyn)) {
    last_error() = cudaErrorInvalidValue;
    return;
  }
  std::mt19937_64 rng(seed());
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // kernel params by value
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        BlockState b;
        b.bdim = bd;
        b.gdim = g;
        b.bid = make_uint3(bx, by, bz);
        b.fibers.resize(nthreads);
        b.warps.resize((nthreads + 31) / 32);
        b.live = static_cast<int>(nthreads);
        struct Free { void operator()(void* p) const { std::free(p); } };
        std::unique_ptr<unsigned char, Free> dyn;
        if (cfg.smem) {  // 1 KB aligned like a real smem window; exact size so ASan sees overruns past it
          void* p = nullptr;  // posix_memalign: any size (aligned_alloc wants a multiple of the alignment)
          if (posix_memalign(&p, 1024, cfg.smem) != 0) fail("cannot allocate dynamic shared memory", __LINE__);
          dyn.reset(static_cast<unsigned char*>(p));
          std::memset(dyn.get(), 0xff, cfg.smem);  // NaN / -1 poison
        }
        b.dyn = dyn.get();
        b.body = [&]() { std::apply(kernel, params); };
        g_block = &b;
        for (uint64_t t = 0; t < nthreads; ++t) {
          Fiber& f = b.fibers[t];
          f.tid = make_uint3(t % bd.x, (t / bd.x) % bd.y, t / (uint64_t(bd.x) * bd.y));
          f.lane = t % 32;
          f.warp = t / 32;
          b.warps[f.warp].live |= 1u << f.lane;
          static thread_local std::vector<std::unique_ptr<char[]>> pool;  // stacks reused across blocks
          if (pool.size() <= t) pool.emplace_back(new char[kStack]);
          f.stack_base = pool[t].get();
          auto top = (reinterpret_cast<uintptr_t>(f.stack_base) + kStack) & ~uintptr_t(15);
          void** sp = reinterpret_cast<void**>(top);
          *--sp = nullptr;                                         // fake return address of fiber_entry
          *--sp = reinterpret_cast<void*>(&fiber_entry);           // popped by cpusim_switch's ret
          for (int r = 0; r < 6; ++r) *--sp = nullptr;             // rbp rbx r12-r15
          f.sp = sp;
        }
        std::vector<int> order(nthreads);
        for (uint64_t t = 0; t < nthreads; ++t) order[t] = static_cast<int>(t);
        int done = 0;
        while (done < static_cast<int>(nthreads)) {
          std::shuffle(order.begin(), order.end(), rng);
          const uint64_t before = g_progress;
          done = 0;
          for (int t : order) {
            Fiber& f = b.fibers[t];
            if (f.done) {
              ++done;
              continue;
            }
            if (f.wait_gen && *f.wait_gen == f.wait_val) continue;  // still blocked
            f.wait_gen = nullptr;
            g_cur = &f;
#ifdef CPUSIM_ASAN
            void* fake = nullptr;
            __sanitizer_start_switch_fiber(&fake, f.stack_base, kStack);
#endif
            cpusim_switch(&g_sched_sp, f.sp);
#ifdef CPUSIM_ASAN
            __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
            if (f.done) ++done;
          }
          if (done < static_cast<int>(nthreads) && g_progress == before) {
            std::fprintf(stderr, "cpusim: deadlock in block (%u,%u,%u): threads wait at a barrier others never reach\n",
                         bx, by, bz);
            std::abort();
          }
        }
        g_block = nullptr;
        g_cur = nullptr;
      }
}

}  // namespace cpusim

#define threadIdx (::cpusim::thread_idx())
#define blockIdx (::cpusim::block_idx())
#define blockDim (::cpusim::block_dim())
#define gridDim (::cpusim::grid_dim())
#define __syncthreads()                                                  \
  do {                                                                   \
    if (__LINE__ != ::cpusim::skipped_barrier_line()) ::cpusim::syncthreads(__LINE__); \
  } while (0)
#define __syncwarp(...)                                                                            \
  do {                                                                                             \
    if (__LINE__ != ::cpusim::skipped_barrier_line())                                              \
      ::cpusim::warp_barrier(::cpusim::mask_or_full(__VA_ARGS__), __LINE__);                       \
  } while (0)
#define __shfl_sync(m, v, s, ...) ::cpusim::shfl((m), (v), (s), 32, __LINE__)
#define __shfl_xor_sync(m, v, s, ...) ::cpusim::shfl_xor((m), (v), (s), 32, __LINE__)
#define __shfl_down_sync(m, v, s, ...) ::cpusim::shfl_down((m), (v), (s), 32, __LINE__)
#define __ballot_sync(m, p) ::cpusim::ballot((m), (p), __LINE__)
#define __trap() ::cpusim::fail("__trap()", __LINE__)
#define warpSize 32

// ---- WMMA
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}
template <typename T>
struct storage {
  using type = T;
};
template <>
struct storage<precision::tf32> {
  using type = float;
};
template <typename Use, int M, int N, int K>
struct dims;
template <int M, int N, int K>
struct dims<matrix_a, M, N, K> {
  static constexpr int R = M, C = K;
};
template <int M, int N, int K>
struct dims<matrix_b, M, N, K> {
  static constexpr int R = K, C = N;
};
template <int M, int N, int K>
struct dims<accumulator, M, N, K> {
  static constexpr int R = M, C = N;
};
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename storage<T>::type;
  using use = Use;
  using precision_type = T;
  using layout = Layout;
  static constexpr int R = dims<Use, M, N, K>::R, C = dims<Use, M, N, K>::C;
  static constexpr int num_elements = R * C;  // the whole tile, row-major, in every lane
  element_type x[R * C];
};

inline float __float_to_tf32(float f) {  // cvt.rna.tf32.f32
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;
  std::memcpy(&f, &u, 4);
  return f;
}
template <typename T>
inline float as_f(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<float>(v);
}
inline float tf32_trunc(float f) {  // tensor cores ignore the low 13 mantissa bits
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u &= ~0x1fffu;
  std::memcpy(&f, &u, 4);
  return f;
}

inline void check_ptr(const void* p, unsigned ldm, size_t esize, int line) {
  if (reinterpret_cast<uintptr_t>(p) % 32) ::cpusim::fail("wmma pointer not 256-bit (32-byte) aligned", line);
  if ((ldm * esize) % 16) ::cpusim::fail("wmma ldm not a multiple of 16 bytes", line);
}

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
inline void load_matrix_sync_(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm, int line) {
  using F = fragment<Use, M, N, K, T, L>;
  static_assert(std::is_same_v<typename F::element_type, P>, "wmma load: pointer type != fragment type");
  check_ptr(p, ldm, sizeof(P), line);
  constexpr bool rm = std::is_same_v<L, row_major>;
  for (int r = 0; r < F::R; ++r)
    for (int c = 0; c < F::C; ++c) f.x[r * F::C + c] = rm ? p[r * ldm + c] : p[c * ldm + r];
}
template <int M, int N, int K, typename T, typename P>
inline void store_matrix_sync_(P* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t lay,
                               int line) {
  using F = fragment<accumulator, M, N, K, T>;
  check_ptr(p, ldm, sizeof(P), line);
  const int lane = ::cpusim::g_cur->lane;
  for (int i = lane; i < F::num_elements; i += 32) {  // each lane writes only "its" elements
    const int r = i / F::C, c = i % F::C;
    p[lay == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[i];
  }
}
template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (auto& e : f.x) e = v;
}
// Each lane computes only the accumulator elements it owns (element e by lane e % 32, as stores split
// them); the others become NaN, so a kernel that reads a fragment element another lane owns sees poison.
// A and B fragments stay whole per lane: a lane that loaded stale shared memory computes wrong elements.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, M, N, K, TC>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, TC>& c) {
  constexpr bool tf = std::is_same_v<TA, precision::tf32>;
  const int lane = ::cpusim::g_cur->lane;
  TC out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      if ((i * N + j) % 32 != lane) {
        out[i * N + j] = static_cast<TC>(NAN);
        continue;
      }
      float acc = static_cast<float>(c.x[i * N + j]);
      for (int k = 0; k < K; ++k) {
        float av = as_f(a.x[i * K + k]), bv = as_f(b.x[k * N + j]);
        if (tf) {
          av = tf32_trunc(av);
          bv = tf32_trunc(bv);
        }
        acc += av * bv;
      }
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}
}  // namespace wmma
}  // namespace nvcuda
#define load_matrix_sync(f, p, ...) load_matrix_sync_((f), (p), __VA_ARGS__, __LINE__)
#define store_matrix_sync(p, f, ...) store_matrix_sync_((p), (f), __VA_ARGS__, __LINE__)

// ---- runtime API stand-ins for the devices of cpusim::kDevices
#ifdef CPUSIM_IMPLEMENT
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = ::cpusim::current_device();
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= ::cpusim::kNumDevices) return cudaErrorInvalidDevice;
  ::cpusim::current_device() = device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = ::cpusim::kNumDevices;
  return cudaSuccess;
}
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* fn, int block_size,
                                                          size_t dyn_smem) {
  const ::cpusim::DeviceModel& d = ::cpusim::kDevices[::cpusim::current_device()];
  int max_dyn = 48 * 1024;
  for (auto& a : ::cpusim::attrs())
    if (a.device == ::cpusim::current_device() && a.fn == fn) max_dyn = a.max_dyn;
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  if (dyn_smem > static_cast<size_t>(max_dyn)) {  // as the runtime: such a launch cannot run at all
    *blocks = 0;
    return cudaSuccess;
  }
  const int by_threads = 2048 / block_size;
  const int by_smem = static_cast<int>(d.smem_per_sm / (dyn_smem + 1024));  // 1 KB reserved per block
  *blocks = std::min(std::min(by_threads, by_smem), 32);
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = ::cpusim::last_error();
  ::cpusim::last_error() = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return ::cpusim::last_error(); }
// Kernels run to completion at launch, so stream operations are immediate and synchronisation is a no-op.
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t count, cudaStream_t) {
  std::memset(ptr, value, count);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t count, enum cudaMemcpyKind, cudaStream_t) {
  std::memcpy(dst, src, count);
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "cpusim error"; }
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= ::cpusim::kNumDevices) return cudaErrorInvalidDevice;
  const ::cpusim::DeviceModel& d = ::cpusim::kDevices[device];
  ++::cpusim::attribute_queries();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = d.sms; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = d.major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = d.minor; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = d.optin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
cudaError_t cudaFuncSetAttribute(const void* fn, enum cudaFuncAttribute attr, int value) {
  ++::cpusim::func_attribute_sets();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  const int device = ::cpusim::current_device();
  if (value > ::cpusim::kDevices[device].optin) return cudaErrorInvalidValue;
  for (auto& a : ::cpusim::attrs())
    if (a.device == device && a.fn == fn) {
      a.max_dyn = value;
      return cudaSuccess;
    }
  ::cpusim::attrs().push_back({device, fn, value});
  return cudaSuccess;
}
}
#endif
