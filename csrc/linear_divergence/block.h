// What the two block drivers (cpu_kernel.cpp: dense teacher, cpu_topk_kernel.cpp: sparse teacher) share: the
// vocabulary parts, the active rows, uninitialised buffers, merging part statistics, the gradient GEMMs.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "linear_divergence/cpu_kernel.h"
#include "linear_divergence/row_math.h"

namespace distillkit {
namespace cpu {
namespace fld {

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// The vocabulary [0, V) cut into `count` contiguous parts of equal size (the last may be shorter or empty).
struct VocabParts {
  int64_t V;
  int64_t count;

  void range(int64_t part, int64_t* v0, int64_t* v1) const {
    const int64_t per = (V + count - 1) / count;
    *v0 = std::min(V, part * per);
    *v1 = std::min(V, *v0 + per);
  }
};

// An uninitialised array (every element is written before it is read, so nothing is zero-filled).
template <typename acc_t>
class Buffer {
 public:
  explicit Buffer(int64_t n) : data_(n > 0 ? new acc_t[static_cast<size_t>(n)] : nullptr) {}
  acc_t* get() const { return data_.get(); }

 private:
  std::unique_ptr<acc_t[]> data_;
};

// The rows whose divergence or cross-entropy counts, in order.
template <typename acc_t>
std::vector<int64_t> active_rows(const Problem<acc_t>& p) {
  std::vector<int64_t> active;
  for (int64_t r = 0; r < p.N; ++r) {
    const bool ce = p.ce_weight != nullptr && p.ce_weight[r] != 0 && p.labels[r] >= 0;
    if (p.kd_weight[r] != 0 || ce) active.push_back(r);
  }
  return active;
}

// Row `row`'s cross-entropy weight: 0 when the call has none or the row's label is ignored.
template <typename acc_t>
acc_t ce_coef(const Problem<acc_t>& p, int64_t row) {
  return p.ce_weight != nullptr && p.labels[row] >= 0 ? p.ce_weight[row] : acc_t(0);
}

// Whether the call's cross-entropy needs a softmax of its own (at T = 1 it is the student's q).
template <typename acc_t>
bool separate_ce(const Problem<acc_t>& p) {
  return p.ce_weight != nullptr && p.temperature != acc_t(1);
}

// The row's log-normaliser from its parts' (max, sum) fields; -inf when every part is empty.
template <typename acc_t>
acc_t merge_lse(const PartRow<acc_t>* first, int64_t parts, int64_t stride, acc_t PartRow<acc_t>::*max,
                acc_t PartRow<acc_t>::*sum) {
  acc_t m = neg_inf<acc_t>();
  for (int64_t i = 0; i < parts; ++i) m = std::max(m, first[i * stride].*max);
  if (m == neg_inf<acc_t>()) return m;
  acc_t total = 0;
  for (int64_t i = 0; i < parts; ++i) {
    const PartRow<acc_t>& st = first[i * stride];
    if (st.*max != neg_inf<acc_t>()) total += st.*sum * std::exp(st.*max - m);
  }
  return m + std::log(total);
}

// exp(max - lse): turns a part's exponentials exp(z - max) into probabilities; 0 for an empty part.
template <typename acc_t>
acc_t part_factor(acc_t max, acc_t lse) {
  return max == neg_inf<acc_t>() ? acc_t(0) : std::exp(max - lse);
}

// Copies rows idx[0..nb) of x [N, D] into dst [nb, D].
template <typename acc_t>
void gather_rows(const acc_t* x, int64_t D, const int64_t* idx, int64_t nb, acc_t* dst) {
  for (int64_t r = 0; r < nb; ++r) std::memcpy(dst + r * D, x + idx[r] * D, sizeof(acc_t) * D);
}

// The gradient GEMMs of one part: grad_W[v0:v1] += G^T h (= on the first block, so that grad_W needs no
// zero fill) and gh = G W_s[v0:v1] (G: [nb, nv] at g, stride V).
template <typename acc_t>
void fold_gradient(const Problem<acc_t>& p, GemmFn<acc_t> gemm, const acc_t* h, const acc_t* g, int64_t nb,
                   int64_t v0, int64_t nv, acc_t* gh, bool first_block) {
  const int64_t Ds = p.Ds, V = p.V;
  // grad_W[v0:v1] (column-major [Ds, nv]) += h^T (col-major [Ds, nb]) * G (col-major [nv, nb])^T
  gemm(false, true, Ds, nv, nb, acc_t(1), h, Ds, g, V, first_block ? acc_t(0) : acc_t(1),
       p.grad_weight + v0 * Ds, Ds);
  // gh (column-major [Ds, nb]) = W[v0:v1]^T (col-major [Ds, nv]) * G^T (col-major [nv, nb])
  gemm(false, false, Ds, nb, nv, acc_t(1), p.student_weight + v0 * Ds, Ds, g, V, acc_t(0), gh, Ds);
}

// Adds the parts' [nb, Ds] partials (gh[part], stride R * Ds) to the block's rows of grad_hidden.
template <typename acc_t>
void add_hidden_gradient(const Problem<acc_t>& p, const VocabParts& vocab, const acc_t* gh, int64_t R,
                         const int64_t* idx, int64_t nb) {
  const int64_t Ds = p.Ds;
  for (int64_t r = 0; r < nb; ++r) {
    acc_t* out = p.grad_hidden + idx[r] * Ds;
    for (int64_t part = 0; part < vocab.count; ++part) {
      int64_t v0, v1;
      vocab.range(part, &v0, &v1);
      if (v1 <= v0) continue;
      const acc_t* src = gh + (part * R + r) * Ds;
#pragma omp simd
      for (int64_t k = 0; k < Ds; ++k) out[k] += src[k];
    }
  }
}

// Groups of rows to run concurrently: 1 when the vocabulary gives every worker at least two parts; else up to
// one group per worker, each of at least kMinGroupRows rows, their extra weight gradients within
// kMaxGroupGradientBytes.
constexpr int64_t kMinGroupRows = 32;
constexpr int64_t kMaxGroupGradientBytes = int64_t(256) << 20;

inline int64_t row_groups(const Plan& plan, int64_t active, int64_t V, int64_t Ds, int64_t elem_bytes) {
  if (plan.threads <= 1 || plan.parts >= 2 * plan.threads) return 1;
  int64_t groups = std::min(plan.threads, active / kMinGroupRows);
  const int64_t gradient = std::max<int64_t>(1, V * Ds * elem_bytes);
  groups = std::min(groups, 1 + kMaxGroupGradientBytes / gradient);
  return std::max<int64_t>(1, groups);
}

// Zeroes p.grad_hidden and runs `blocks(view, idx, count, par)` (the kernel's block loop over rows
// idx[0..count), returning their loss; it overwrites view.grad_weight and adds to view.grad_hidden) on all
// active rows: in one call with the workers on the parts, or, per row_groups, on concurrent groups of rows
// each with one worker and its own weight gradient, summed into p.grad_weight after. No active row: zero
// gradients and loss.
template <typename acc_t, typename Blocks>
double run_active_rows(const Problem<acc_t>& p, const Plan& plan, const ParallelFor& par, Blocks blocks) {
  std::fill(p.grad_hidden, p.grad_hidden + p.N * p.Ds, acc_t(0));
  const std::vector<int64_t> active = active_rows(p);
  if (active.empty() || p.V == 0) {
    std::fill(p.grad_weight, p.grad_weight + p.V * p.Ds, acc_t(0));
    return 0.0;
  }
  const int64_t count = static_cast<int64_t>(active.size());
  const int64_t groups = row_groups(plan, count, p.V, p.Ds, sizeof(acc_t));
  if (groups <= 1) return blocks(p, active.data(), count, par);
  const int64_t size = p.V * p.Ds;
  Buffer<acc_t> extra((groups - 1) * size);
  std::vector<double> losses(static_cast<size_t>(groups), 0.0);
  const ParallelFor serial = [](int64_t n, const std::function<void(int64_t)>& body) {
    for (int64_t item = 0; item < n; ++item) body(item);
  };
  par(groups, [&](int64_t g) {
    Problem<acc_t> view = p;
    if (g > 0) view.grad_weight = extra.get() + (g - 1) * size;
    const int64_t begin = count * g / groups, end = count * (g + 1) / groups;
    losses[g] = blocks(view, active.data() + begin, end - begin, serial);
  });
  par(groups, [&](int64_t g) {  // sum the extra gradients into grad_weight, one slice of rows per item
    const int64_t begin = size * g / groups, end = size * (g + 1) / groups;
    for (int64_t e = 0; e < groups - 1; ++e) {
      const acc_t* src = extra.get() + e * size;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) p.grad_weight[i] += src[i];
    }
  });
  double loss = 0.0;
  for (double part : losses) loss += part;
  return loss;
}

}  // namespace fld
}  // namespace cpu
}  // namespace distillkit
