// Host/device qualifiers so the same math compiles as plain C++ (CPU kernels) and as CUDA.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DDIM_HD __host__ __device__ __forceinline__
#else
#define DDIM_HD inline
#endif
