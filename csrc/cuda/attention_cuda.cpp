// Torch bindings of the CUDA scaled_masked_softmax kernel (csrc/cuda/softmax_kernel.cu): checks, device
// guard, current stream, launch-error check. Built only when torch has CUDA (see setup.py).
// ddim_fast::attention's CUDA kernel is the Triton implementation, registered from Python
// (ddim_fast/attention.py, torch.library.register_kernel), so nothing for it here.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <optional>

#include "ddim_fast/softmax_math.h"
#include "../tensor_checks.h"
#include "softmax_launcher.h"

namespace ddim_fast {

// Defined in csrc/cpu/attention_cpu.cpp: tensor checks and the launch description, shared by both
// devices so the accepted shapes cannot drift apart.
SoftmaxParams make_softmax_params(const char* op, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                  double scale, const at::Tensor& out);

namespace {

// The caller holds a CUDAGuard for scores' device.
void run_softmax_cuda(const char* op, const at::Tensor& scores, const SoftmaxParams& params) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scores.device().index()).stream();
  const cudaError_t status = launch_scaled_masked_softmax(params, stream);
  TORCH_CHECK(status == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(status));
}

void check_cuda_inputs(const char* op, const at::Tensor& scores, const std::optional<at::Tensor>& mask) {
  TORCH_CHECK_VALUE(scores.is_cuda(), op, ": scores must be a CUDA tensor here, got ", scores.device());
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(mask->device() == scores.device(), op, ": mask must be on scores' device ", scores.device(),
                      ", got ", mask->device());
  }
}

at::Tensor scaled_masked_softmax_cuda(const at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale) {
  const char* op = "scaled_masked_softmax";
  check_cuda_inputs(op, scores, mask);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::empty(scores.sizes(), scores.options());
  const SoftmaxParams params = make_softmax_params(op, scores, mask, scale, out);
  run_softmax_cuda(op, scores, params);
  return out;
}

void scaled_masked_softmax_inplace_cuda(at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale) {
  const char* op = "scaled_masked_softmax_";
  check_cuda_inputs(op, scores, mask);
  const c10::cuda::CUDAGuard guard(scores.device());
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(overlap_status(scores, *mask) == at::MemOverlapStatus::No, op,
                      ": mask overlaps scores, which are overwritten");
  }
  const SoftmaxParams params = make_softmax_params(op, scores, mask, scale, scores);
  run_softmax_cuda(op, scores, params);
}

}  // namespace

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("scaled_masked_softmax", &scaled_masked_softmax_cuda);
  m.impl("scaled_masked_softmax_", &scaled_masked_softmax_inplace_cuda);
}

}  // namespace ddim_fast
