// CUDA kernel of distillkit::membank_infonce_fwd (schema in csrc/registration.cpp; built into
// distillkit._C_cuda).
//
// It adapts tensors to the torch-free launcher in cuda_kernels.cuh: device checks, the shared checks, layouts
// and output allocation of binding.h (inputs and outputs are described there), workspace allocation on the
// current device and stream, error checks.
//
// negative_index is range-checked on the device, inside the kernel that reads it: a value outside the bank
// is never read, and the kernel counts such values in two words of the call's workspace. A call that passes
// negative_index then reads those words (a 16-byte copy that waits for its kernels on the current stream)
// and raises IndexError naming a bad value, so the error comes from the call that passed it. During CUDA
// graph capture nothing may wait: there the rows holding a bad value get NaN outputs and nothing is raised.
//
// Environment (read per call, for tests and benchmarks):
//   DISTILLKIT_CUDA_PATH = auto | generic | tensorcore   (default auto)
// fp32 inputs use tf32 tensor cores only when torch.backends.cuda.matmul.allow_tf32 is set.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <tuple>

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

// Raises IndexError when the call whose kernels just ran on `stream` met negative_index values outside
// [0, rows) (see the file comment); returns at once while `stream` is being captured into a CUDA graph.
void raise_on_bad_index(const cuda::MembankInfoncePlan& plan, const at::Tensor& workspace, cudaStream_t stream,
                        int64_t rows) {
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capture), "querying stream capture");
  if (capture != cudaStreamCaptureStatusNone) return;
  cuda::MembankIndexError bad;
  check_cuda(cuda::membank_infonce_index_error(plan, workspace.data_ptr(), stream, &bad),
             "reading the index check");
  TORCH_CHECK_INDEX(bad.count == 0, "membank_infonce: negative_index holds ", bad.value, ", outside [0, ", rows,
                    ") for the bank's ", rows, " rows (", bad.count, " such value(s))");
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
  const MembankInfonceCall call =
      membank_infonce_call(query, positive, bank, temperature, query_labels, bank_labels, negative_index);
  if (call.empty()) return {call.loss, call.lse, call.wsum};

  cuda::MembankInfonceParams p;
  static_cast<MembankInfonceArgs&>(p) = call.args;
  p.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  p.path = path_from_env();

  cuda::MembankInfoncePlan plan;
  check_cuda(cuda::membank_infonce_plan(p, device.index(), &plan), "planning");
  // Scratch for the per-range partials, num_splits * L * B * (D + 2) accumulators (never B * K), and the
  // index-error words.
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, query.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  check_cuda(cuda::membank_infonce_forward(p, plan, workspace.data_ptr(), stream), "kernel launch");
  if (negative_index.has_value()) raise_on_bad_index(plan, workspace, stream, call.args.N);
  return {call.loss, call.lse, call.wsum};
}

}  // namespace

TORCH_LIBRARY_IMPL(distillkit, CUDA, m) { m.impl("membank_infonce_fwd", &membank_infonce_fwd_cuda); }

}  // namespace distillkit
