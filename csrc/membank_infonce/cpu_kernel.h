// Fused memory-bank InfoNCE forward on the CPU: plain C++ over pointers and sizes (no torch headers).
//
// For every query row (layer l, row b) the kernel computes, with s = dot(query, key) * inv_tau:
//   lse  = logsumexp([s_pos, s_neg_1 .. s_neg_K])          (masked negatives left out)
//   loss = lse - s_pos = log(1 + sum_j exp(s_neg_j - s_pos)), computed without that subtraction (log1p
//          when the positive holds the max), so a row without valid negatives has loss exactly 0
//   wsum = sum_j softmax_j * key_j over the valid negatives (softmax over the same set as lse)
// so that the backward pass needs no second pass over the bank. A key that is not a negative of a row
// (same label) never affects that row, whatever its values (Inf / NaN included); a NaN score of a valid
// negative makes the row NaN.
//
// Dense path: the bank is split into per-worker chunks and each chunk into cache-sized tiles; a tile's
// scores S = Q * tile^T come from a caller-supplied GEMM, are turned into exp(S - running max) in place
// (online softmax) and folded into W += P * tile by a second GEMM. Workers keep partial (max, sum, W)
// per row, merged at the end, so a small batch still keeps every core busy. The B x K score matrix is
// never stored.
// Indexed path (negative_index): per query row, its K bank rows are visited in small chunks: dots, one
// rescale per chunk, exp, and W += p * key while the rows are still in cache. [B, K, D] is never made.
#pragma once

#include <cstdint>

#include "common/gemm.h"
#include "membank_infonce/args.h"

namespace distillkit {
namespace cpu {

// Storage types with the layout of bfloat16 / IEEE half; the binding reinterprets torch's pointers.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// The typed view of one call's MembankInfonceArgs that the kernel works on (sizes, bank, labels, index and
// outputs from the arguments). Queries and positives are already in the accumulation type.
template <typename in_t, typename acc_t>
struct Problem {
  int64_t L = 0;                  // layers (flattened leading dims)
  int64_t B = 0;                  // queries per layer
  int64_t D = 0;                  // feature size
  int64_t bank_rows = 0;          // K (dense) or N (indexed)
  int64_t bank_layer_stride = 0;  // elements between layers of the bank; 0 for a shared 2-D bank
  int64_t num_neg = 0;            // negatives per query in the indexed path (last dim of negative_index)
  acc_t inv_tau = 1;
  const acc_t* query = nullptr;              // [L, B, D]
  const acc_t* positive = nullptr;           // [L, B, D]
  const in_t* bank = nullptr;                // [L, rows, D] or [rows, D]
  const int64_t* query_labels = nullptr;     // [B] or null
  const int64_t* bank_labels = nullptr;      // [rows] or null
  const int64_t* negative_index = nullptr;   // [L, B, num_neg] or null
  acc_t* loss = nullptr;                     // [L, B]
  acc_t* lse = nullptr;                      // [L, B]
  acc_t* wsum = nullptr;                     // [L, B, D]

  // The view of `args` (whose dtype is in_t's, contiguous) with `query` and `positive` its inputs converted
  // to acc_t ([L, B, D] contiguous).
  static Problem of(const MembankInfonceArgs& args, const acc_t* query, const acc_t* positive) {
    Problem p;
    p.L = args.L;
    p.B = args.B;
    p.D = args.D;
    p.bank_rows = args.N;
    p.bank_layer_stride = args.bank_stride_l;
    p.num_neg = args.K;
    p.inv_tau = static_cast<acc_t>(1.0 / args.temperature);
    p.query = query;
    p.positive = positive;
    p.bank = static_cast<const in_t*>(args.bank);
    p.query_labels = args.query_labels;
    p.bank_labels = args.bank_labels;
    p.negative_index = args.negative_index;
    p.loss = static_cast<acc_t*>(args.loss);
    p.lse = static_cast<acc_t*>(args.lse);
    p.wsum = static_cast<acc_t*>(args.wsum);
    return p;
  }
};

// How the dense path splits the work: items = L * chunks, each item a contiguous range of bank rows.
struct DensePlan {
  int64_t tile = 0;          // bank rows per tile
  int64_t chunks = 1;        // chunks per layer
  int64_t chunk_rows = 0;    // bank rows per chunk (the last one may be shorter)
  int64_t L = 0;             // layers
  int64_t items() const { return L * chunks; }
};

// Chooses tile and chunk sizes for `num_threads` workers. `tile_override` > 0 forces the tile size.
DensePlan plan_dense(int64_t L, int64_t B, int64_t D, int64_t K, int64_t num_threads, int64_t tile_override);

// Scratch elements (acc_t) one dense worker needs.
template <typename in_t, typename acc_t>
int64_t dense_scratch_size(const Problem<in_t, acc_t>& p, const DensePlan& plan);

// Processes one item (layer, chunk) into its partial state: part_max/part_sum [B], part_w [B, D].
template <typename in_t, typename acc_t>
void dense_item(const Problem<in_t, acc_t>& p, const DensePlan& plan, int64_t item, acc_t* part_max,
                acc_t* part_sum, acc_t* part_w, acc_t* scratch, GemmFn<acc_t> gemm);

// Merges the partials of rows [row_begin, row_end) (row = l * B + b) with the positive and writes outputs.
template <typename in_t, typename acc_t>
void dense_merge(const Problem<in_t, acc_t>& p, const DensePlan& plan, int64_t row_begin, int64_t row_end,
                 const acc_t* part_max, const acc_t* part_sum, const acc_t* part_w);

// Scratch elements (acc_t) one indexed worker needs.
template <typename in_t, typename acc_t>
int64_t indexed_scratch_size(const Problem<in_t, acc_t>& p);

// Indexed path for rows [row_begin, row_end). Returns false when an index is outside [0, bank_rows); that
// index is stored in *bad_index and the row holding it is left unwritten.
template <typename in_t, typename acc_t>
bool indexed_rows(const Problem<in_t, acc_t>& p, int64_t row_begin, int64_t row_end, acc_t* scratch,
                  int64_t* bad_index);

}  // namespace cpu
}  // namespace distillkit
