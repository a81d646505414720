// Plain C++ interface of the CUDA scaled_masked_softmax kernel (no torch headers): the torch binding
// (attention_cuda.cpp) fills SoftmaxParams and calls launch_scaled_masked_softmax on the current stream.
// Compiled by nvcc (softmax_kernel.cu) and by the host compiler (the binding).
#pragma once

#include <cuda_runtime_api.h>

#include "ddim_fast/softmax_math.h"

namespace ddim_fast {

// Rows of at most this many columns take the warp-per-row kernel (the row lives in registers).
constexpr int64_t kWarpSoftmaxMaxCols = 1024;

// Enqueues out = softmax(in * scale (+ mask)) over the last dim on `stream` and returns the launch
// status (cudaSuccess, or what cudaGetLastError reports right after the launch). Never synchronizes
// and allocates nothing (CUDA-graph safe). Nothing is launched when rows == 0 or sizes[3] == 0.
// Pointers must be device pointers on the current device; params.out may equal params.in.
cudaError_t launch_scaled_masked_softmax(const SoftmaxParams& params, cudaStream_t stream);

}  // namespace ddim_fast
