// CUDA kernel of distillkit::membank_infonce_fwd, and membank_infonce_take_index_error (schemas in
// csrc/registration.cpp; built into distillkit._C_cuda).
//
// It adapts tensors to the torch-free launcher in cuda_kernels.cuh: device checks, the shared checks, layouts
// and output allocation of binding.h (inputs and outputs are described there), workspace allocation on the
// current device and stream, error checks.
//
// negative_index is range-checked on the device, never with a host synchronisation: a value outside the bank
// is never read, the rows holding one get NaN outputs, and the kernel counts it in two words of mapped pinned
// host memory (one pair per device). The next call on that device raises an IndexError naming the value;
// distillkit::membank_infonce_take_index_error(device) returns [count, value] and clears the words.
//
// Environment (read per call, for tests and benchmarks):
//   DISTILLKIT_CUDA_PATH = auto | generic | tensorcore   (default auto)
// fp32 inputs use tf32 tensor cores only when torch.backends.cuda.matmul.allow_tf32 is set.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "membank_infonce/binding.h"
#include "membank_infonce/cuda_kernels.cuh"

namespace distillkit {
namespace {

using cuda::MembankPath;

MembankPath path_from_env() {
  const char* env = std::getenv("DISTILLKIT_CUDA_PATH");
  if (env == nullptr) return MembankPath::kAuto;
  const std::string v(env);
  if (v == "generic") return MembankPath::kGeneric;
  if (v == "tensorcore") return MembankPath::kTensorCore;
  TORCH_CHECK(v.empty() || v == "auto", "DISTILLKIT_CUDA_PATH must be auto, generic or tensorcore, got '", v,
              "'");
  return MembankPath::kAuto;
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "membank_infonce_fwd (CUDA): ", what, " failed: ", cudaGetErrorString(err));
}

// Two words per device in mapped pinned host memory: [count of out-of-range index values, one of them].
struct IndexErrorWords {
  unsigned long long* host = nullptr;
  unsigned long long* device = nullptr;
};
constexpr int kMaxDevices = 64;
std::mutex g_index_error_mutex;
IndexErrorWords g_index_error[kMaxDevices];

// The words of `device` (the current device), allocated on first use.
IndexErrorWords index_error_words(int device) {
  TORCH_CHECK(device >= 0 && device < kMaxDevices, "membank_infonce_fwd: device index ", device, " too large");
  const std::lock_guard<std::mutex> lock(g_index_error_mutex);
  IndexErrorWords& w = g_index_error[device];
  if (w.host == nullptr) {
    void* host = nullptr;
    void* dev = nullptr;
    check_cuda(cudaHostAlloc(&host, 2 * sizeof(unsigned long long), cudaHostAllocMapped),
               "allocating the index-error words");
    std::memset(host, 0, 2 * sizeof(unsigned long long));
    check_cuda(cudaHostGetDevicePointer(&dev, host, 0), "mapping the index-error words");
    w.host = static_cast<unsigned long long*>(host);
    w.device = static_cast<unsigned long long*>(dev);
  }
  return w;
}

// Returns [count, value] of out-of-range negative_index values seen on `device` since the last call, and
// clears them. Reads host memory only: no device synchronisation (kernels still running report later).
std::vector<int64_t> take_index_error(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const IndexErrorWords w = index_error_words(static_cast<int>(device));
  volatile unsigned long long* words = w.host;
  const unsigned long long count = words[0];
  if (count == 0) return {0, 0};
  const auto value = static_cast<int64_t>(words[1]);
  words[0] = 0;
  return {static_cast<int64_t>(count), value};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> membank_infonce_fwd_cuda(
    const at::Tensor& query, const at::Tensor& positive, const at::Tensor& bank, double temperature,
    const std::optional<at::Tensor>& query_labels, const std::optional<at::Tensor>& bank_labels,
    const std::optional<at::Tensor>& negative_index) {
  const at::Device device = query.device();
  TORCH_CHECK(device.is_cuda() && positive.device() == device && bank.device() == device,
              "membank_infonce_fwd: query, positive and bank must be on the same CUDA device");
  for (const auto* extra : {&query_labels, &bank_labels, &negative_index}) {
    TORCH_CHECK(!extra->has_value() || (*extra)->device() == device,
                "membank_infonce_fwd: labels and negative_index must be on the query's device");
  }

  const c10::cuda::CUDAGuard guard(device);
  if (negative_index.has_value()) {  // report an earlier call's out-of-range values (see the file comment)
    const std::vector<int64_t> bad = take_index_error(device.index());
    TORCH_CHECK_INDEX(bad[0] == 0, "membank_infonce: an earlier call on ", device, " had ", bad[0],
                      " negative_index value(s) outside the bank's rows (e.g. ", bad[1],
                      "); the query rows holding them got NaN loss");
  }
  const MembankInfonceCall call =
      membank_infonce_call(query, positive, bank, temperature, query_labels, bank_labels, negative_index);
  if (call.empty()) return {call.loss, call.lse, call.wsum};

  cuda::MembankInfonceParams p;
  static_cast<MembankInfonceArgs&>(p) = call.args;
  if (negative_index.has_value()) p.index_error = index_error_words(device.index()).device;
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  p.path = path_from_env();

  cuda::MembankInfoncePlan plan;
  check_cuda(cuda::membank_infonce_plan(p, device.index(), &plan), "planning");
  // Scratch for the per-range partials: num_splits * L * B * (D + 2) accumulators (never B * K).
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, query.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_cuda(cuda::membank_infonce_forward(p, plan, workspace.data_ptr(), stream), "kernel launch");
  return {call.loss, call.lse, call.wsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) { m.impl("membank_infonce_fwd", &membank_infonce_fwd_cuda); }

// No tensor arguments, so no device dispatch key: the one kernel serves every call.
TORCH_LIBRARY_IMPL(distillkit, CompositeImplicitAutograd, m) {
  m.impl("membank_infonce_take_index_error", &take_index_error);
}

}  // namespace distillkit
