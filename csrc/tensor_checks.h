// Torch-side checks shared by every binding (CPU and CUDA, step and attention): the storage dtype the
// kernels understand, and memory overlap between a written tensor and the others.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include "ddim_fast/step_params.h"

namespace ddim_fast {

// float32 / float16 / bfloat16 -> ScalarKind; anything else raises TypeError naming `op` and `name`.
ScalarKind scalar_kind_of(const at::Tensor& t, const char* op, const char* name);

// at::get_overlap_status, made usable for non-dense tensors: ATen answers TooHard for any non-dense
// tensor (an expanded mask, a sliced view) even on another storage. Tensors on different storages (or
// empty ones) cannot overlap; the very same view (an in-place update of a non-dense x) is a full overlap.
at::MemOverlapStatus overlap_status(const at::Tensor& a, const at::Tensor& b);

}  // namespace ddim_fast
