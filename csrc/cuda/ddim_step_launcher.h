// Plain C++ interface of the CUDA ddim_step kernel (no torch headers): the torch binding
// (ddim_step_cuda.cpp) fills DdimStepParams with make_ddim_step_params and calls launch_ddim_step on the
// current stream. Compiled by nvcc (ddim_step_kernel.cu) and by the host compiler (the binding).
#pragma once

#include <cuda_runtime_api.h>

#include "ddim_fast/step_params.h"

namespace ddim_fast {

// Enqueues one fused DDIM step on `stream` and returns the launch status (cudaSuccess, or the error
// cudaGetLastError reports right after the launch). It never synchronizes and allocates nothing, so it
// may be captured in a CUDA graph. Nothing is launched when params.numel == 0.
//
// Everything step-dependent is read by the kernel from device memory: the row index (*params.table_row),
// that table row, the Philox seed/offset and the dynamic-threshold scales. A row index outside
// [0, params.num_rows) is not an error the host can see without a sync: the kernel then reads no table
// row and writes NaN to every element of out (and of pred_x0 when requested).
//
// Pointers in params must be device pointers on the current device; strides are in elements.
cudaError_t launch_ddim_step(const DdimStepParams& params, cudaStream_t stream);

}  // namespace ddim_fast
