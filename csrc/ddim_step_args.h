// Torch-side checks for ddim_step shared by the CPU and CUDA bindings: every bad input is rejected here
// with a message naming the argument and what was expected, and the plain DdimStepParams is filled.
#pragma once

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include "ddim_fast/step_params.h"

namespace ddim_fast {

struct StepOptions {
  std::optional<double> guidance_scale;
  std::string prediction_type;
  std::optional<double> clip_range;
  std::optional<at::Tensor> x0_threshold;
  bool use_clipped_model_output = false;
  std::optional<at::Tensor> noise;
  std::optional<at::Tensor> rng_state;
  double temperature = 1.0;
};

// The schema's option arguments gathered into StepOptions (shared by the CPU and CUDA bindings).
StepOptions make_step_options(std::optional<double> guidance_scale, c10::string_view prediction_type,
                              std::optional<double> clip_range, const std::optional<at::Tensor>& x0_threshold,
                              bool use_clipped_model_output, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& rng_state, double temperature);

// Validates every argument against x (device, dtype, shape, overlap) and returns the launch params: THE
// rules of the step op, for every backend (the C++ CPU and CUDA kernels call this; the Triton launcher and
// the reference path call it through the ddim_step_check op). `out` and `pred_x0_out` must already have x's
// shape and dtype (checked). `float64_allowed`: accept float64 tensors (the reference path computes them in
// PyTorch; params.dtype is then meaningless and no kernel may be launched with the result). `outputs_fresh`: the
// outputs are about to be allocated like x (empty_like), so nothing about them can fail: `out` is then only a
// stand-in with x's layout for the memory-order decision and its overlap checks are skipped.
DdimStepParams make_ddim_step_params(const at::Tensor& x, const at::Tensor& model_output,
                                     const at::Tensor& table, const at::Tensor& row,
                                     const StepOptions& options, const at::Tensor& out,
                                     const std::optional<at::Tensor>& pred_x0_out, bool float64_allowed = false,
                                     bool outputs_fresh = false);

// Allocates the functional op's outputs like element-wise PyTorch: empty_like(x) (x's strides when x is
// non-overlapping and dense, e.g. channels_last; else its suggested memory format), x's dtype; pred_x0 is
// [0] unless asked for. The fake kernel and the Triton op (ddim_fast/_checks.py) allocate alike.
std::pair<at::Tensor, at::Tensor> allocate_ddim_step_outputs(const at::Tensor& x, bool return_pred_x0);

}  // namespace ddim_fast
