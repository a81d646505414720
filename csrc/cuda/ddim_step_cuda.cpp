// Torch bindings of the CUDA ddim_step kernel: the same argument checks as the CPU kernel
// (make_ddim_step_params / allocate_ddim_step_outputs), then one launch on the current stream of x's
// device. No host synchronisation and no allocation beyond the functional op's outputs (through the
// caching allocator), so both ops can be captured in a CUDA graph and traced by torch.compile.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../ddim_step_args.h"
#include "ddim_step_launcher.h"

namespace ddim_fast {
namespace {

void ddim_step_out_cuda(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& table,
                        const at::Tensor& row, std::optional<double> guidance_scale,
                        c10::string_view prediction_type, std::optional<double> clip_range,
                        const std::optional<at::Tensor>& x0_threshold, bool use_clipped_model_output,
                        const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& rng_state,
                        double temperature, const at::Tensor& out, const std::optional<at::Tensor>& pred_x0_out) {
  TORCH_CHECK_VALUE(x.is_cuda(), "ddim_step (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  // Every other tensor is checked to be on x's device by make_ddim_step_params; the guard makes that
  // device current so the launch (and the SM count the launcher reads) use it.
  const c10::cuda::CUDAGuard device_guard(x.device());
  const StepOptions options = make_step_options(guidance_scale, prediction_type, clip_range, x0_threshold,
                                                use_clipped_model_output, noise, rng_state, temperature);
  const DdimStepParams params = make_ddim_step_params(x, model_output, table, row, options, out, pred_x0_out);
  if (params.numel == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  C10_CUDA_CHECK(launch_ddim_step(params, stream));
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cuda(const at::Tensor& x, const at::Tensor& model_output,
                                                  const at::Tensor& table, const at::Tensor& row,
                                                  std::optional<double> guidance_scale,
                                                  c10::string_view prediction_type, std::optional<double> clip_range,
                                                  const std::optional<at::Tensor>& x0_threshold,
                                                  bool use_clipped_model_output,
                                                  const std::optional<at::Tensor>& noise,
                                                  const std::optional<at::Tensor>& rng_state, double temperature,
                                                  bool return_pred_x0) {
  TORCH_CHECK_VALUE(x.is_cuda(), "ddim_step (CUDA kernel): x must be a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard device_guard(x.device());
  auto [out, pred_x0] = allocate_ddim_step_outputs(x, return_pred_x0);
  ddim_step_out_cuda(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                     use_clipped_model_output, noise, rng_state, temperature, out,
                     return_pred_x0 ? std::optional<at::Tensor>(pred_x0) : std::nullopt);
  return {out, pred_x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddim_fast, CUDA, m) {
  m.impl("ddim_step", &ddim_step_cuda);
  m.impl("ddim_step_out", &ddim_step_out_cuda);
}

}  // namespace ddim_fast
