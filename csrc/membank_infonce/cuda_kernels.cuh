// Fused memory-bank InfoNCE forward on CUDA: the torch-free kernel API.
//
// Math (per layer l and query row b, temperature tau, keys k_j = bank rows):
//   s_pos   = <q_b, p_b>,  s_j = <q_b, k_j>                      (fp32 accumulation; fp64 for fp64 inputs)
//   lse     = logsumexp([s_pos, s_j for valid j] / tau)           [L, B]
//   loss    = lse - s_pos / tau = log(1 + sum_{valid j} exp((s_j - s_pos) / tau))   [L, B]
//   wsum    = sum_{valid j} softmax_j * k_j                       [L, B, D]   (softmax over all logits)
// A bank row is not a valid negative when its label equals the query's label (labels given) or when it lies
// past the end of the bank. A row with no valid negative gets lse = s_pos / tau, loss = 0 exactly and
// wsum = 0. A key that is not a negative of a row never affects that row, whatever its values (a NaN or Inf
// in a masked bank row included); a NaN score of a valid negative makes the row NaN. The loss is computed
// without subtracting lse and s_pos / tau (see the merge), so small losses keep their relative accuracy.
// A negative_index value outside [0, N) is never dereferenced, whatever N is (0 included): the row's
// outputs become NaN and two words of the call's workspace count such values (atomically) and keep one of
// them; membank_infonce_index_error reads them once the call's kernels are done, so the caller reports a bad
// index from the call that passed it. The backward pass is elementwise on (loss, wsum) and lives in Python;
// only the forward is here.
//
// Algorithm: one pass over the bank, never the B x K logit matrix. The bank is cut into `num_splits`
// contiguous ranges (split-K over the bank). Each range produces, per query row, a partial
//   (m, l, o) = (max_j z_j, sum_j 2^(z_j - m), sum_j 2^(z_j - m) k_j),   z_j = s_j * log2(e) / tau,
// with the online-softmax rescaling of flash-attention's forward pass (V = K = the bank tile). A second
// small kernel merges the partials with s_pos (computed there): M = max(z_pos, m_1..m_S),
// N = sum_i l_i 2^(m_i - M), T = 2^(z_pos - M) + N, lse = ln2 (M + log2 T), wsum = sum_i 2^(m_i - M) o_i / T,
// loss = log1p(N) when M = z_pos, else ln2 (M - z_pos) + ln T (two non-negative terms: no cancellation).
// A range with no valid key has m = -inf, l = 0, o = 0 and is skipped by the merge, so fully masked tiles
// and splits never produce NaN; M is finite because z_pos is.
//
// Two partial kernels:
//  * Tensor-core path (bf16/fp16 dense bank; fp32 through tf32 when allowed; sm_80+), WMMA 16x16x16
//    (16x16x8 for tf32). A block of 128 threads (4 warps) owns QT = 64 query rows of one layer and one
//    bank range; warp w owns query rows [16w, 16w + 16). For each KT = 64-row bank tile:
//      S stage:  S[64 x 64] = Q K^T over D in DK = 32 chunks staged in shared memory (zero padded past D,
//                past B and past the range end), fp32 accumulators in registers, then stored to smem.
//      softmax:  each warp rescales its 16 rows (mask, running max, running sum) and writes P (bf16/fp16
//                for half inputs, fp32 rounded to tf32 for fp32 inputs) to smem.
//      PV stage: O[64 x D] = alpha * O + P V with V = the same bank tile, in DV = 64 column chunks staged
//                in smem; O lives in shared memory when QT * D * 4 bytes fit (D <= ~256), otherwise in the
//                fp32 workspace (L2 resident read-modify-write; O rows are private to one warp).
//    Masked keys get P = 0, and non-finite values of the staged V tile are replaced by 0, so 0 * NaN never
//    reaches O (a valid key with a NaN has a NaN score, which already makes its row NaN).
//    Grid (ceil(B / 64), num_splits, L), launched in chunks of at most 65535 layers; x fastest so blocks running together read the same bank range
//    (the bank is read from DRAM about once and served to the query tiles from L2).
//    Shared memory (dynamic, opt-in above 48 KB): bf16/fp16 ~47 KB, tf32 ~72 KB, plus 64 * D * 4 bytes
//    when O is kept on chip.
//  * Generic path (any dtype incl. fp64, negative_index gather, pre-sm_80): one warp per (layer, query
//    row, bank range); keys in chunks of 32 (lane j fetches the index/label of key j), warp-reduced dot
//    products, one online-softmax rescale per chunk, then O[d] = alpha O[d] + sum_j p_j k_j[d] with lanes
//    over d (coalesced key reads; O is the warp's own workspace row). With negative_index each query row
//    gathers its own K rows straight from the bank; the [B, K, D] gathered tensor is never formed.
//
// Workspace: the partials, then the two index-error words (zeroed on the stream by each call that passes
// negative_index, before its kernels).
//
// Split heuristic: enough bank ranges that the grid fills every SM with as many blocks as the occupancy
// calculator says fit (tensor-core path; O stays on chip only while 2 blocks still fit per SM) or >= 4 blocks
// of 4 warps (generic path), at least 2 tiles (128 keys) per range, at most kMaxSplits ranges, and a
// workspace of at most 256 MiB. Workspace = num_splits * L * B * (D + 2) accumulator words: it grows with
// B * D, never with B * K.
//
// Roofline (forward): FLOPs = 4 L B K D (Q K^T and P V), DRAM bytes ~= bank bytes once (L K D elements,
// K D when shared) + O(L B D). On H100 (~990 dense bf16 TFLOP/s, 3.35 TB/s) the arithmetic intensity is
// 2 B FLOP per bank byte for bf16, so B >= ~150 is compute bound in principle; this WMMA kernel (no
// wgmma/TMA, synchronous staging) should be expected at a fraction of peak, and the O read-modify-write
// through L2 for D > 256 is the next bottleneck to remove (cp.async double buffering and O in registers
// for small D are the natural next steps). The generic gather path is bandwidth bound: L B K D bytes.

#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "membank_infonce/args.h"

namespace distillkit {
namespace cuda {

using distillkit::MembankDType;

/// Which partial kernel to use; kAuto picks the tensor-core path when it applies.
enum class MembankPath : int { kAuto = 0, kGeneric = 1, kTensorCore = 2 };

/// Upper bound on the number of bank ranges merged per row.
constexpr int kMaxSplits = 64;

#ifndef DISTILLKIT_CUDA_MAX_LAYERS_PER_LAUNCH
#define DISTILLKIT_CUDA_MAX_LAYERS_PER_LAUNCH 65535  // gridDim.z limit; lowered by the emulation tests
#endif
/// Layers per tensor-core launch (grid z); more layers are covered by several launches.
constexpr int64_t kMaxLayersPerLaunch = DISTILLKIT_CUDA_MAX_LAYERS_PER_LAUNCH;

/// One forward call: the op's arguments (args.h) and the CUDA launch options.
struct MembankInfonceParams : MembankInfonceArgs {
  bool allow_tf32 = false;  ///< fp32 inputs may use tf32 tensor cores
  MembankPath path = MembankPath::kAuto;
};

/// Launch decisions for one call; fill with membank_infonce_plan and pass unchanged to the launcher.
struct MembankInfoncePlan {
  MembankPath path = MembankPath::kGeneric;  ///< resolved path (never kAuto)
  int num_splits = 1;                       ///< bank ranges
  int64_t keys_per_split = 0;               ///< keys per range (multiple of the tile)
  bool o_in_smem = false;                   ///< tensor-core path keeps O in shared memory
  size_t smem_bytes = 0;                    ///< dynamic shared memory of the partial kernel
  size_t workspace_bytes = 0;               ///< device scratch the caller must provide (256-byte aligned)
  size_t index_error_offset = 0;            ///< where the call's two index-error words are in it (bytes)
};

/// The out-of-range negative_index values one call met.
struct MembankIndexError {
  unsigned long long count = 0;  ///< how many values of negative_index lay outside [0, N)
  int64_t value = 0;             ///< one of them (any one; meaningful when count > 0)
};

/// Chooses path, split count and workspace size for `p` on `device`, which must be the current device.
/// Deterministic for a given device. The
/// device's attributes, the kernels' shared-memory opt-in (set once per device and dtype, to the device's
/// maximum) and occupancy answers are cached per device, so planning is host-only after the first call.
cudaError_t membank_infonce_plan(const MembankInfonceParams& p, int device, MembankInfoncePlan* plan);

/// Runs the partial and merge kernels on `stream`. `workspace` holds at least plan.workspace_bytes.
cudaError_t membank_infonce_forward(const MembankInfonceParams& p, const MembankInfoncePlan& plan,
                                    void* workspace, cudaStream_t stream);

/// After membank_infonce_forward of a call with negative_index (and a non-empty L x B), on the same stream
/// and workspace: copies the call's index-error words to the host, waits for `stream` and fills `report`.
/// Not allowed while `stream` is being captured into a CUDA graph.
cudaError_t membank_infonce_index_error(const MembankInfoncePlan& plan, const void* workspace,
                                        cudaStream_t stream, MembankIndexError* report);

}  // namespace cuda
}  // namespace distillkit
