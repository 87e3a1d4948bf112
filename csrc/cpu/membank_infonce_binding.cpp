// Registers distillkit::membank_infonce_fwd (schema + CPU kernel) and the `distillkit._C` Python module.
//
// Canonical inputs (the Python wrapper produces them):
//   query, positive  [L, B, D] contiguous, same dtype (float32, float64, bfloat16, float16)
//   bank             [L, K, D], or [K, D] shared by all L layers (read with layer stride 0, never copied)
//   query_labels     [B] int64 and bank_labels [K] int64, both or neither
//   negative_index   [L, B, K] int64 into the bank's rows (then the bank is [L, N, D] or [N, D])
// Outputs: loss [L, B], lse [L, B], wsum [L, B, D] in float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/membank_infonce_kernel.h"
#include "membank_infonce_checks.h"

namespace distillkit {
namespace {

// The Fortran BLAS that torch links (MKL or OpenBLAS) exports sgemm_/dgemm_ (32-bit integers). They are
// looked up weakly so that a torch without BLAS still loads this module and falls back to at::mm.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

template <typename acc_t>
void fortran_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
                  int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
  const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
  if constexpr (std::is_same_v<acc_t, float>) {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
}

// Column-major gemm through at::mm on tensors viewing the buffers (row-major C^T = op(B)^T op(A)^T).
template <typename acc_t>
void aten_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, acc_t alpha, const acc_t* a,
               int64_t lda, const acc_t* b, int64_t ldb, acc_t beta, acc_t* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // Column-major X (rows x cols, ld) is the row-major tensor [cols, rows] with stride ld.
  auto view = [&](const acc_t* ptr, int64_t rows, int64_t cols, int64_t ld) {
    return at::from_blob(const_cast<acc_t*>(ptr), {cols, rows}, {ld, 1}, opts);
  };
  at::Tensor at_ = trans_a ? view(a, k, m, lda).t() : view(a, m, k, lda);  // op(A)^T [k, m]
  at::Tensor bt = trans_b ? view(b, n, k, ldb).t() : view(b, k, n, ldb);  // op(B)^T [n, k]
  at::Tensor ct = at::from_blob(c, {n, m}, {ldc, 1}, opts);               // C^T [n, m]
  at::Tensor prod = at::mm(bt, at_);
  if (beta == acc_t(0)) {
    ct.copy_(prod.mul_(alpha));
  } else {
    ct.mul_(beta).add_(prod, alpha);
  }
}

// DISTILLKIT_CPU_GEMM=aten forces the at::mm path (for testing it).
bool force_aten_gemm() {
  const char* env = std::getenv("DISTILLKIT_CPU_GEMM");
  return env != nullptr && std::string(env) == "aten";
}

int64_t tile_override() {
  const char* env = std::getenv("DISTILLKIT_CPU_TILE");
  return env != nullptr ? std::atoll(env) : 0;
}

template <typename acc_t>
cpu::GemmFn<acc_t> pick_gemm() {
  const bool have_blas = std::is_same_v<acc_t, float> ? sgemm_ != nullptr : dgemm_ != nullptr;
  return have_blas && !force_aten_gemm() ? &fortran_gemm<acc_t> : &aten_gemm<acc_t>;
}

template <typename in_t, typename acc_t>
void run(cpu::Problem<in_t, acc_t>& p, at::ScalarType acc_dtype) {
  const int64_t rows = p.L * p.B;
  if (p.negative_index != nullptr) {
    int64_t bad = 0;
    bool ok = true;
    std::mutex bad_mutex;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(static_cast<size_t>(cpu::indexed_scratch_size(p)));
      int64_t local_bad = 0;
      if (!cpu::indexed_rows(p, begin, end, scratch.data(), &local_bad)) {
        std::lock_guard<std::mutex> lock(bad_mutex);
        ok = false;
        bad = local_bad;
      }
    });
    TORCH_CHECK_INDEX(ok, "membank_infonce: negative_index holds ", bad, ", outside [0, ", p.bank_rows,
                      ") for the bank's ", p.bank_rows, " rows");
    return;
  }
  const cpu::DensePlan plan =
      cpu::plan_dense(p.L, p.B, p.D, p.bank_rows, at::get_num_threads(), tile_override());
  const int64_t items = plan.items();
  auto opts = at::TensorOptions().dtype(acc_dtype);
  at::Tensor part_max = at::empty({items, p.B}, opts);
  at::Tensor part_sum = at::empty({items, p.B}, opts);
  at::Tensor part_w = at::empty({items, p.B, p.D}, opts);
  acc_t* pm = part_max.data_ptr<acc_t>();
  acc_t* ps = part_sum.data_ptr<acc_t>();
  acc_t* pw = part_w.data_ptr<acc_t>();
  const cpu::GemmFn<acc_t> gemm = pick_gemm<acc_t>();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(static_cast<size_t>(cpu::dense_scratch_size(p, plan)));
    for (int64_t item = begin; item < end; ++item) {
      cpu::dense_item(p, plan, item, pm + item * p.B, ps + item * p.B, pw + item * p.B * p.D, scratch.data(),
                      gemm);
    }
  });
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    cpu::dense_merge(p, plan, begin, end, pm, ps, pw);
  });
}

const int64_t* optional_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<int64_t>() : nullptr;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> membank_infonce_fwd_cpu(
    const at::Tensor& query, const at::Tensor& positive, const at::Tensor& bank, double temperature,
    const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& bank_labels,
    const std::optional<at::Tensor>& negative_index) {
  check_membank_infonce_args(query, positive, bank, temperature, query_labels, bank_labels, negative_index);
  const int64_t L = query.size(0), B = query.size(1), D = query.size(2);
  const bool shared = bank.dim() == 2;
  const int64_t rows = bank.size(-2);
  const at::ScalarType acc_dtype = query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor q = query.to(acc_dtype).contiguous();
  at::Tensor pos = positive.to(acc_dtype).contiguous();
  at::Tensor bk = bank.contiguous();
  std::optional<at::Tensor> ql, bl, ni;
  if (query_labels.has_value()) {
    ql = query_labels->contiguous();
    bl = bank_labels->contiguous();
  }
  if (negative_index.has_value()) ni = negative_index->contiguous();
  auto opts = query.options().dtype(acc_dtype);
  at::Tensor loss = at::empty({L, B}, opts);
  at::Tensor lse = at::empty({L, B}, opts);
  at::Tensor wsum = at::empty({L, B, D}, opts);
  if (L * B == 0) return {loss, lse, wsum};

  auto fill = [&](auto& p, auto* acc_tag) {
    using acc_t = std::remove_pointer_t<decltype(acc_tag)>;
    p.L = L;
    p.B = B;
    p.D = D;
    p.bank_rows = rows;
    p.bank_layer_stride = shared ? 0 : rows * D;
    p.num_neg = ni.has_value() ? ni->size(2) : rows;
    p.inv_tau = static_cast<acc_t>(1.0 / temperature);
    p.query = q.data_ptr<acc_t>();
    p.positive = pos.data_ptr<acc_t>();
    p.query_labels = optional_ptr(ql);
    p.bank_labels = optional_ptr(bl);
    p.negative_index = optional_ptr(ni);
    p.loss = loss.data_ptr<acc_t>();
    p.lse = lse.data_ptr<acc_t>();
    p.wsum = wsum.data_ptr<acc_t>();
  };
  switch (query.scalar_type()) {
    case at::kFloat: {
      cpu::Problem<float, float> p;
      fill(p, static_cast<float*>(nullptr));
      p.bank = bk.data_ptr<float>();
      run(p, acc_dtype);
      break;
    }
    case at::kDouble: {
      cpu::Problem<double, double> p;
      fill(p, static_cast<double*>(nullptr));
      p.bank = bk.data_ptr<double>();
      run(p, acc_dtype);
      break;
    }
    case at::kBFloat16: {
      cpu::Problem<cpu::bf16_t, float> p;
      fill(p, static_cast<float*>(nullptr));
      p.bank = reinterpret_cast<const cpu::bf16_t*>(bk.data_ptr<at::BFloat16>());
      run(p, acc_dtype);
      break;
    }
    case at::kHalf: {
      cpu::Problem<cpu::fp16_t, float> p;
      fill(p, static_cast<float*>(nullptr));
      p.bank = reinterpret_cast<const cpu::fp16_t*>(bk.data_ptr<at::Half>());
      run(p, acc_dtype);
      break;
    }
    default:
      TORCH_CHECK(false, "membank_infonce_fwd: unsupported dtype ", query.scalar_type(),
                  "; use float32, float64, bfloat16 or float16");
  }
  return {loss, lse, wsum};
}

}  // namespace

TORCH_LIBRARY(distillkit, m) {
  m.def(
      "membank_infonce_fwd(Tensor query, Tensor positive, Tensor bank, float temperature, "
      "Tensor? query_labels, Tensor? bank_labels, Tensor? negative_index) -> (Tensor loss, Tensor lse, "
      "Tensor wsum)");
}

TORCH_LIBRARY_IMPL(distillkit, CPU, m) { m.impl("membank_infonce_fwd", &membank_infonce_fwd_cpu); }

}  // namespace distillkit

extern "C" {
// An empty Python module: importing distillkit._C runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
