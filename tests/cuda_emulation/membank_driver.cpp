// Runs the memory-bank InfoNCE CUDA kernels (csrc/membank_infonce/cuda_kernels.cu, rewritten by rewrite.py)
// on the CPU under cpusim.h and compares every output with a float64 reference written here.
//
// Build (test_membank_emulation.py does this in a temp dir):
//   python rewrite.py csrc/membank_infonce/cuda_kernels.cu > kernels.sim.cpp
//   g++ -std=c++17 -O1 -fsanitize=address,undefined -DCPUSIM_IMPLEMENT -include cpusim.h \
//       -DDISTILLKIT_CUDA_MAX_LAYERS_PER_LAUNCH=2 -I<cuda>/include -Icsrc -I<build dir> membank_driver.cpp
// Run: ./membank_driver [group ...]   groups: generic tc index nan bad-index loss devices, and the quick sets
// tcq (tensor-core kernel) and genq (generic kernel, with merges of several ranges) for extra schedule seeds
// and the barrier mutation check (default: all but the quick sets). CPUSIM_SEED=n picks the thread schedule.
// Prints one line per case and "N failed"; exit 1 on any failure.
#include "kernels.sim.cpp"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace distillkit::cuda;

namespace {

template <typename T>
T from_double(double x);
template <>
float from_double<float>(double x) {
  return static_cast<float>(x);
}
template <>
double from_double<double>(double x) {
  return x;
}
template <>
__half from_double<__half>(double x) {
  return __float2half_rn(static_cast<float>(x));
}
template <>
__nv_bfloat16 from_double<__nv_bfloat16>(double x) {
  return __float2bfloat16_rn(static_cast<float>(x));
}
template <typename T>
double to_double(T x) {
  return nvcuda::wmma::as_f(x);
}
template <>
double to_double<double>(double x) {
  return x;
}

template <typename T>
constexpr MembankDType dtype_of() {
  if constexpr (std::is_same_v<T, float>) return MembankDType::kFloat32;
  if constexpr (std::is_same_v<T, double>) return MembankDType::kFloat64;
  if constexpr (std::is_same_v<T, __half>) return MembankDType::kFloat16;
  return MembankDType::kBFloat16;
}

enum class Labels { kNone, kRandom, kAllMaskedEvenRows, kTailOnly };
enum class Data { kUnit, kPositiveDominates };

struct Case {
  int64_t L, B, K, D;
  bool shared = false;
  Labels labels = Labels::kNone;
  int64_t N = -1;            // >= 0: negative_index into N bank rows (N = 0: every index is out of range)
  int misalign = 0;          // query and bank start this many elements past a 16-byte boundary
  int nonfinite_masked = 0;  // bank rows most queries mask hold NaN / Inf (needs labels)
  bool nan_valid_key = false;  // one bank row that is a negative of some rows holds a NaN
  int bad_index = 0;         // this many negative_index values are out of range
  Data data = Data::kUnit;
  int device = 0;
  double tau = 0.1;
};

struct Tol {
  double loss, wsum;
  double loss_rel = 0;  // > 0: also |loss - ref| <= loss_rel * ref on every row
  double lse = -1;      // lse tolerance; < 0: the loss tolerance
};

int g_failed = 0;

std::string describe(const Case& c) {
  char buf[200];
  std::snprintf(buf, sizeof(buf), "L%lld B%lld K%lld D%lld", static_cast<long long>(c.L),
                static_cast<long long>(c.B), static_cast<long long>(c.K), static_cast<long long>(c.D));
  std::string s = buf;
  if (c.shared) s += " shared";
  if (c.labels != Labels::kNone) s += " labels" + std::to_string(static_cast<int>(c.labels));
  if (c.N >= 0) s += " index N" + std::to_string(c.N);
  if (c.misalign) s += " misaligned";
  if (c.nonfinite_masked) s += " nonfinite-masked";
  if (c.nan_valid_key) s += " nan-valid-key";
  if (c.bad_index) s += " bad-index";
  if (c.data == Data::kPositiveDominates) s += " small-loss";
  if (c.device) s += " device" + std::to_string(c.device);
  return s;
}

// One case on one path: inputs, kernel run, float64 reference, comparison. Returns the plan it used.
template <typename T>
MembankInfoncePlan run(const Case& c, MembankPath path, bool tf32, const char* name, Tol tol) {
  using A = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const auto start = std::chrono::steady_clock::now();
  std::mt19937_64 rng(42);
  std::normal_distribution<double> normal;
  const int64_t rows = c.N >= 0 ? c.N : c.K;
  const int64_t bank_layers = c.shared ? 1 : c.L;
  auto unit_rows = [&](int64_t n, int off) {
    std::vector<T> v(n * c.D + off);
    for (int64_t i = 0; i < n; ++i) {
      std::vector<double> x(c.D);
      double ss = 0;
      for (auto& e : x) {
        e = normal(rng);
        ss += e * e;
      }
      for (int64_t d = 0; d < c.D; ++d) v[off + i * c.D + d] = from_double<T>(x[d] / std::sqrt(ss));
    }
    return v;
  };
  // Exact-size vectors: AddressSanitizer reports any read past (or before) them.
  std::vector<T> q = unit_rows(c.L * c.B, c.misalign);
  std::vector<T> pos = unit_rows(c.L * c.B, 0);
  std::vector<T> bank = unit_rows(bank_layers * rows, c.misalign);
  if (c.data == Data::kPositiveDominates) pos.assign(q.begin() + c.misalign, q.end());  // s_pos = |q|^2
  const bool labelled = c.labels != Labels::kNone;
  std::vector<int64_t> ql, bl, idx;
  if (labelled) {
    ql.resize(c.B);
    bl.resize(rows);
    for (auto& e : ql) e = static_cast<int64_t>(rng() % 5);
    for (auto& e : bl) e = static_cast<int64_t>(rng() % 5);
    if (c.labels == Labels::kRandom) {
      ql[0] = 99;  // no bank row shares it
      if (c.B > 1) ql[1] = 7;
      bl[rows - 1] = 7;  // one masked row at the very end of the bank
    } else if (c.labels == Labels::kAllMaskedEvenRows) {
      for (int64_t b = 0; b < c.B; ++b) ql[b] = b % 2;
      for (auto& e : bl) e = 0;
    } else if (c.labels == Labels::kTailOnly) {
      for (auto& e : ql) e = 0;
      for (int64_t j = 0; j < rows; ++j) bl[j] = j >= rows - rows / 8 ? 1 : 0;
    }
  }
  // Bank rows with label 123 hold NaN / +-Inf. Queries labelled 123 (all but every fifth) mask them and must
  // be unaffected; for the others they are valid negatives and the rows are NaN.
  if (c.nonfinite_masked) {
    for (int64_t b = 0; b < c.B; ++b) ql[b] = b % 5 == 4 ? ql[b] % 5 : 123;
  }
  for (int i = 0; i < c.nonfinite_masked; ++i) {
    const int64_t r = (3 + 37 * i) % rows;
    bl[r] = 123;
    for (int64_t l = 0; l < bank_layers; ++l) {
      for (int64_t d = 0; d < c.D; ++d) {
        const double v = d % 3 == 0 ? NAN : (d % 3 == 1 ? INFINITY : -INFINITY);
        bank[c.misalign + (l * rows + r) * c.D + d] = from_double<T>(v);
      }
    }
  }
  const int64_t nan_row = rows / 2;
  if (c.nan_valid_key) bank[c.misalign + nan_row * c.D] = from_double<T>(NAN);
  if (c.N >= 0) {
    idx.resize(c.L * c.B * c.K);
    for (size_t i = 0; i < idx.size(); ++i) {  // with N = 0: -1, 0, 1, all outside the empty bank
      idx[i] = c.N > 0 ? static_cast<int64_t>(rng() % c.N) : static_cast<int64_t>(i % 3) - 1;
    }
    for (int i = 0; i < c.bad_index; ++i) {  // spread over rows; both ends of the range
      idx[(i * 7919) % idx.size()] = i % 2 ? c.N + i : -1 - i;
    }
  }
  std::vector<A> loss(c.L * c.B, A(-7)), lse(c.L * c.B, A(-7)), wsum(c.L * c.B * c.D, A(-7));

  MembankInfonceParams p;
  p.dtype = dtype_of<T>();
  p.L = c.L;
  p.B = c.B;
  p.K = c.K;
  p.D = c.D;
  p.N = rows;
  p.query = q.data() + c.misalign;
  p.query_stride_l = c.B * c.D;
  p.query_stride_b = c.D;
  p.positive = pos.data();
  p.positive_stride_l = c.B * c.D;
  p.positive_stride_b = c.D;
  p.bank = bank.data() + c.misalign;
  p.bank_stride_l = c.shared ? 0 : rows * c.D;
  p.bank_stride_n = c.D;
  if (labelled) {
    p.query_labels = ql.data();
    p.bank_labels = bl.data();
  }
  if (c.N >= 0) {
    p.negative_index = idx.data();
    p.index_stride_l = c.B * c.K;
    p.index_stride_b = c.K;
  }
  p.temperature = c.tau;
  p.allow_tf32 = tf32;
  p.path = path;
  p.loss = loss.data();
  p.lse = lse.data();
  p.wsum = wsum.data();
  MembankInfoncePlan plan;
  cudaError_t err = cudaSetDevice(c.device);
  if (err == cudaSuccess) err = membank_infonce_plan(p, c.device, &plan);
  std::vector<unsigned char> ws(plan.workspace_bytes + 256);
  void* wsp = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws.data()) + 255) & ~uintptr_t(255));
  std::memset(wsp, 0xff, plan.workspace_bytes);  // poison: every partial (and the index words) must be written
  if (err == cudaSuccess) err = membank_infonce_forward(p, plan, wsp, nullptr);
  // What the binding does right after the launch: this call's out-of-range index values, if any.
  MembankIndexError index_error;
  if (err == cudaSuccess && c.N >= 0) err = membank_infonce_index_error(plan, wsp, nullptr, &index_error);

  // float64 reference on the rounded inputs. A key counts for a row iff its index is in range and its
  // label differs from the row's; keys that do not count are never read. A bad index makes the row NaN.
  // With tf32 the operands of the two products (query and keys; not the positive) are rounded to tf32 as
  // the tensor cores read them, so the comparison is as tight as the self-check's.
  auto operand = [tf32](T x) {
    if constexpr (std::is_same_v<T, float>) {
      if (tf32) return static_cast<double>(nvcuda::wmma::__float_to_tf32(x));
    }
    return to_double(x);
  };
  double err_loss = 0, err_lse = 0, err_wsum = 0, err_rel = 0;
  bool as_expected = true;
  int64_t bad_seen = 0;
  const double tau = c.tau;
  for (int64_t l = 0; l < c.L; ++l) {
    for (int64_t b = 0; b < c.B; ++b) {
      const int64_t row = l * c.B + b;
      const T* qr = q.data() + c.misalign + row * c.D;
      const T* bank_l = bank.data() + c.misalign + (c.shared ? 0 : l * rows * c.D);
      double s_pos = 0;
      for (int64_t d = 0; d < c.D; ++d) s_pos += to_double(qr[d]) * to_double(pos[row * c.D + d]);
      std::vector<double> z;
      std::vector<int64_t> key_rows;
      bool row_bad = false;
      for (int64_t j = 0; j < c.K; ++j) {
        const int64_t r = c.N >= 0 ? idx[row * c.K + j] : j;
        if (r < 0 || r >= rows) {
          row_bad = true;
          ++bad_seen;
          continue;
        }
        if (labelled && bl[r] == ql[b]) continue;
        double s = 0;
        for (int64_t d = 0; d < c.D; ++d) s += operand(qr[d]) * operand(bank_l[r * c.D + d]);
        z.push_back((s - s_pos) / tau);
        key_rows.push_back(r);
      }
      bool row_nan = row_bad;
      for (double v : z) row_nan |= std::isnan(v);
      const double got_loss = loss[row], got_lse = lse[row];
      if (row_nan) {  // every output of the row is NaN
        bool all_nan = std::isnan(got_loss) && std::isnan(got_lse);
        for (int64_t d = 0; d < c.D; ++d) all_nan &= std::isnan(static_cast<double>(wsum[row * c.D + d]));
        as_expected &= all_nan;
        continue;
      }
      double zmax = 0;  // the positive's logit relative to itself
      for (double v : z) zmax = std::max(zmax, v);
      double total = std::exp(-zmax);
      for (double v : z) total += std::exp(v - zmax);
      double neg = 0;
      for (double v : z) neg += std::exp(v);
      const double ref_loss = zmax > 0 ? zmax + std::log(total) : std::log1p(neg);
      const double ref_lse = s_pos / tau + ref_loss;
      as_expected &= std::isfinite(got_loss) && std::isfinite(got_lse);
      if (z.empty()) as_expected &= got_loss == 0.0;  // no valid negative: exactly 0
      err_loss = std::max(err_loss, std::fabs(got_loss - ref_loss));
      err_lse = std::max(err_lse, std::fabs(got_lse - ref_lse));
      if (tol.loss_rel > 0) err_rel = std::max(err_rel, std::fabs(got_loss - ref_loss) / ref_loss);
      for (int64_t d = 0; d < c.D; ++d) {
        double w = 0;
        for (size_t k = 0; k < z.size(); ++k) {
          w += std::exp(z[k] - ref_loss) * operand(bank_l[key_rows[k] * c.D + d]);
        }
        const double g = wsum[row * c.D + d];
        as_expected &= std::isfinite(g);
        err_wsum = std::max(err_wsum, std::fabs(g - w));
      }
    }
  }
  if (c.N >= 0) {  // the call's report counts every bad value and holds one of them
    as_expected &= index_error.count == static_cast<unsigned long long>(bad_seen);
    if (bad_seen) as_expected &= index_error.value < 0 || index_error.value >= rows;
  }
  const bool ok = err == cudaSuccess && as_expected && err_loss <= tol.loss && err_lse <= (tol.lse < 0 ? tol.loss : tol.lse) &&
                  err_wsum <= tol.wsum && (tol.loss_rel == 0 || err_rel <= tol.loss_rel);
  g_failed += !ok;
  std::printf(
      "%-4s %-9s %s | plan: path=%d splits=%d keys/split=%lld o_smem=%d smem=%zu | cuda=%d loss %.2e lse %.2e "
      "wsum %.2e rel %.2e expected=%d | %.1f s%s\n",
      ok ? "ok" : "FAIL", name, describe(c).c_str(), static_cast<int>(plan.path), plan.num_splits,
      static_cast<long long>(plan.keys_per_split), static_cast<int>(plan.o_in_smem), plan.smem_bytes,
      static_cast<int>(err), err_loss, err_lse, err_wsum, err_rel, static_cast<int>(as_expected),
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), ok ? "" : "  <<<");
  std::fflush(stdout);
  return plan;
}

constexpr MembankPath kG = MembankPath::kGeneric;
constexpr MembankPath kTC = MembankPath::kTensorCore;
// Tolerances of tests/ops/test_cuda_op.py (absolute, against the float64 reference on rounded inputs).
constexpr Tol kF32{2e-4, 2e-5}, kF64{1e-9, 1e-9}, kBF16{2e-3, 6e-3}, kF16{2e-3, 2e-3};
// tf32 against a reference on tf32-rounded operands: the self-check's tf32 tolerance (selfcheck.TOLERANCE,
// with its 1e-5 relative part at |lse| <= 20).
constexpr Tol kTF32{2e-4, 2e-3, 0, 4e-4};

void all_generic(const Case& c) {
  run<float>(c, kG, false, "gen-f32", kF32);
  run<double>(c, kG, false, "gen-f64", kF64);
  run<__nv_bfloat16>(c, kG, false, "gen-bf16", kBF16);
  run<__half>(c, kG, false, "gen-f16", kF16);
}

void all_tensor_core(const Case& c) {
  run<__nv_bfloat16>(c, kTC, false, "tc-bf16", kBF16);
  run<__half>(c, kTC, false, "tc-f16", kF16);
  run<float>(c, kTC, true, "tc-tf32", kTF32);
}

bool check(bool cond, const char* what) {
  std::printf("%-4s %s\n", cond ? "ok" : "FAIL", what);
  g_failed += !cond;
  return cond;
}

const std::vector<Case>& dense_cases() {
  static const std::vector<Case> cases = {
      {1, 1, 1, 1},
      {1, 1, 37, 5},
      {2, 3, 100, 17},
      {3, 65, 130, 64},  // one query tile + 1 row, bank tail of 2; 3 layers = 2 launches of <= 2 layers
      {2, 17, 257, 33, true},
      {1, 64, 200, 300},  // D > 256: O in the workspace
      {1, 70, 1000, 96},
      {2, 40, 1029, 8, true},
      {2, 70, 333, 40, false, Labels::kRandom},
      {2, 70, 333, 40, true, Labels::kRandom},
      {1, 20, 300, 24, false, Labels::kAllMaskedEvenRows},
      {1, 48, 4096, 64, false, Labels::kTailOnly},  // whole tiles and splits fully masked
      {1, 65, 150, 64, false, Labels::kNone, -1, 1},  // misaligned: scalar staging
      {1, 3, 0, 8},                                    // an empty bank: no negatives, loss exactly 0
  };
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  std::set<std::string> groups(argv + 1, argv + argc);
  const bool all = groups.empty();
  auto want = [&](const char* g) { return all ? std::string(g) != "tcq" : groups.count(g) > 0; };
  const auto& dense = dense_cases();

  if (want("generic")) {
    for (const Case& c : dense) all_generic(c);
  }
  if (want("tc")) {
    for (const Case& c : dense) all_tensor_core(c);
  }
  if (want("tcq")) {  // quick tensor-core set for extra schedule seeds and the barrier mutation check
    for (int i : {3, 8}) {
      run<__nv_bfloat16>(dense[i], kTC, false, "tc-bf16", kBF16);
      run<float>(dense[i], kTC, true, "tc-tf32", kTF32);
    }
  }
  if (want("genq")) {  // quick generic set (several chunks and ranges, gather, bad values, masks): likewise
    run<float>(dense[7], kG, false, "gen-f32", kF32);
    run<__nv_bfloat16>(dense[9], kG, false, "gen-bf16", kBF16);
    Case bad{2, 9, 70, 24, true, Labels::kRandom, 50};
    bad.bad_index = 5;
    run<float>(bad, kG, false, "gen-f32", kF32);
  }
  if (want("index")) {
    for (bool shared : {false, true}) {
      for (Labels labels : {Labels::kNone, Labels::kRandom}) {
        all_generic(Case{2, 33, 129, 37, shared, labels, 500});
      }
    }
  }
  if (want("bad-index")) {  // out-of-range negative_index: never read, row NaN, reported by the same call
    for (bool shared : {false, true}) {
      Case c{2, 9, 70, 24, shared, Labels::kRandom, 50};
      c.bad_index = 5;
      all_generic(c);
      Case empty{2, 9, 70, 24, shared, Labels::kNone, 0};  // a bank of N = 0 rows: every index is bad
      all_generic(empty);
    }
  }
  if (want("nan")) {
    // NaN / Inf in bank rows: no effect on the rows that mask them, NaN rows where they count; every path.
    for (int misalign : {0, 1}) {
      Case c{1, 40, 150, 64, false, Labels::kRandom, -1, misalign, 3};
      all_generic(c);
      all_tensor_core(c);
    }
    Case idx{2, 33, 129, 37, false, Labels::kRandom, 500, 0, 2};
    all_generic(idx);
    // A NaN in a key that is a negative of some rows: those rows are NaN, the others are not.
    Case valid{1, 40, 150, 64, false, Labels::kRandom};
    valid.nan_valid_key = true;
    all_generic(valid);
    all_tensor_core(valid);
  }
  if (want("loss")) {
    // Rows without a valid negative have loss exactly 0 (labels mask everything for even rows).
    Case masked{2, 20, 300, 24, false, Labels::kAllMaskedEvenRows};
    masked.tau = 0.05;
    all_generic(masked);
    all_tensor_core(masked);
    // The positive dominates (s_pos = 1, tau = 0.02): losses ~1e-10 must keep their relative accuracy.
    Case small{1, 70, 200, 64};
    small.data = Data::kPositiveDominates;
    small.tau = 0.02;
    run<float>(small, kG, false, "gen-f32", Tol{1e-6, 1e-6, 1e-4, 2e-5});
    run<double>(small, kG, false, "gen-f64", Tol{1e-9, 1e-9, 1e-9});
    run<__nv_bfloat16>(small, kG, false, "gen-bf16", Tol{1e-6, 1e-6, 1e-4, 2e-5});
    run<__nv_bfloat16>(small, kTC, false, "tc-bf16", Tol{1e-6, 1e-6, 1e-4, 2e-5});
    run<__half>(small, kTC, false, "tc-f16", Tol{1e-6, 1e-6, 1e-4, 2e-5});
  }
  if (want("devices")) {
    // Plans and results on the emulated devices; O stays on chip only where 2 blocks per SM still fit.
    const long queries_before = cpusim::attribute_queries();
    const long sets_before = cpusim::func_attribute_sets();
    int o_smem[4][2] = {};
    int paths[4] = {};
    for (int dev = 0; dev < cpusim::kNumDevices; ++dev) {
      for (int k = 0; k < 2; ++k) {
        Case c{1, 16, 65, k == 0 ? 40 : 256};
        c.device = dev;
        for (int repeat = 0; repeat < 2 - k; ++repeat) {
          const MembankInfoncePlan plan = run<__nv_bfloat16>(c, MembankPath::kAuto, false, "auto-bf16", kBF16);
          o_smem[dev][k] = plan.o_in_smem;
          paths[dev] = static_cast<int>(plan.path);
        }
      }
    }
    check(o_smem[0][1] == 1 && o_smem[1][1] == 0 && o_smem[2][1] == 0 && o_smem[0][0] == 1,
          "D=256 bf16 keeps O on chip on the sm_90 model only; D=40 keeps it on chip");
    check(paths[3] == static_cast<int>(MembankPath::kGeneric), "sm_75 model takes the generic path");
    // Attributes are cached: 3 queries per device first seen here, one smem opt-in per device and dtype.
    const long queries = cpusim::attribute_queries() - queries_before;
    const long sets = cpusim::func_attribute_sets() - sets_before;
    std::printf("     attribute queries %ld, function attribute sets %ld\n", queries, sets);
    check(queries <= 3 * cpusim::kNumDevices, "device attributes queried once per device");
    check(sets <= cpusim::kNumDevices - 1, "shared-memory opt-in set once per device and dtype");
  }
  std::printf("%d failed\n", g_failed);
  return g_failed != 0;
}
