// CUDA kernels of ddim_fast::scaled_masked_softmax: softmax(scores * scale (+ mask)) over the last dim
// in one launch, replacing ldm's `sim * scale` -> `masked_fill_` -> `softmax` chain (three passes over
// a [b*h, Lq, Lk] tensor) with one read and one write.
//
// Two shapes of kernel:
//  * short rows (Lk <= 1024; cross-attention has 77 keys): one warp per row, the row held in registers
//    (kPerLane values per lane, element j on lane j % 32), max and sum by butterfly shuffles. No shared
//    memory, no __syncthreads, one global read and one write per element.
//  * long rows (self-attention, Lk = 4096+): one block per row. Each thread keeps an online-softmax
//    state (running max and sum) over its strided elements in one read pass, the block merges the
//    states (warp shuffles, then shared memory), and a second pass re-reads the row (from L2: a 4096-key
//    fp16 row is 8 KiB) and writes exp(x - max) / sum.
// All math is fp32 whatever the storage dtype. Offsets are int64 (tensors may exceed 2^31 elements).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "softmax_launcher.h"

namespace ddim_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;   // warp kernel: 128 threads, four rows in flight per block
constexpr int kRowBlockThreads = 512;  // block kernel: 16 warps stream one long row

__device__ __forceinline__ float load_f32(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(__ldg(p)); }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }
__device__ __forceinline__ void store_f32(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_f32(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// In-place launches alias `in` and `out`; __ldg (the read-only data cache) is only valid when nothing
// writes the data during the kernel, so the in-place path reads through plain loads.
__device__ __forceinline__ float load_f32_plain(const float* p) { return *p; }
__device__ __forceinline__ float load_f32_plain(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_f32_plain(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename T>
__device__ __forceinline__ float load_score(const T* p, bool aliased) {
  return aliased ? load_f32_plain(p) : load_f32(p);
}

// The logit of element `col` of a row: scaled and masked exactly as the reference orders it.
template <typename T, MaskKind kMask>
__device__ __forceinline__ float row_logit(float score, const void* mask, int64_t mask_row, int64_t mask_col_stride,
                                           int64_t col, float scale) {
  if (kMask == MaskKind::kBool) {
    const bool keep = static_cast<const uint8_t*>(mask)[mask_row + col * mask_col_stride] != 0;
    return masked_logit_bool(score, scale, keep);
  } else if (kMask == MaskKind::kAdditive) {
    return masked_logit_additive(score, scale, load_f32(static_cast<const T*>(mask) + mask_row + col * mask_col_stride));
  }
  return score * scale;
}

__device__ __forceinline__ OnlineSoftmax shfl_xor_state(OnlineSoftmax st, int lane_mask) {
  OnlineSoftmax other;
  other.m = __shfl_xor_sync(0xffffffffu, st.m, lane_mask);
  other.s = __shfl_xor_sync(0xffffffffu, st.s, lane_mask);
  return other;
}

// One warp per row; element j of the row is register (j / 32) of lane (j % 32): coalesced accesses.
template <typename T, MaskKind kMask, int kPerLane>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerBlock)
    softmax_warp_per_row_kernel(const SoftmaxParams p, bool aliased) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t cols = p.sizes[3];
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);

  // rows <= kMaxSoftmaxRows, so one warp per row always fits in the grid: no grid-stride loop.
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (row < p.rows) {  // whole warps leave together: the shuffles below see all 32 lanes
    const int64_t in_row = softmax_row_offset(row, p.sizes, p.in_strides);
    const int64_t mask_row = kMask == MaskKind::kNone ? 0 : softmax_row_offset(row, p.sizes, p.mask_strides);

    float logits[kPerLane];
    float row_max = -__builtin_huge_valf();
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t col = lane + static_cast<int64_t>(i) * kWarpSize;
      // Columns past the row end get -inf: they add exp(-inf) = 0 to the sum and never win the max.
      logits[i] = -__builtin_huge_valf();
      if (col < cols) {
        const T* src = in + in_row + col * p.in_strides[3];
        const float score = load_score(src, aliased);
        logits[i] = row_logit<T, kMask>(score, p.mask, mask_row, p.mask_strides[3], col, p.scale);
      }
      row_max = fmax_f(row_max, logits[i]);
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      row_max = fmax_f(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
    }
    const float shift = softmax_shift(row_max);
    float row_sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      logits[i] = expf(logits[i] - shift);
      row_sum += logits[i];
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      row_sum += __shfl_xor_sync(0xffffffffu, row_sum, offset);
    }
    const float inv_sum = 1.0f / row_sum;
    const int64_t out_row = softmax_row_offset(row, p.sizes, p.out_strides);
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t col = lane + static_cast<int64_t>(i) * kWarpSize;
      if (col < cols) store_f32(out + out_row + col * p.out_strides[3], logits[i] * inv_sum);
    }
  }
}

// One block per row for long rows: online (max, sum) in one read pass, block merge, then a write pass.
template <typename T, MaskKind kMask>
__global__ void __launch_bounds__(kRowBlockThreads) softmax_block_per_row_kernel(const SoftmaxParams p, bool aliased) {
  __shared__ OnlineSoftmax warp_states[kRowBlockThreads / kWarpSize];
  __shared__ OnlineSoftmax row_state;
  const int64_t cols = p.sizes[3];
  const T* in = static_cast<const T*>(p.in);
  T* out = static_cast<T*>(p.out);
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t in_row = softmax_row_offset(row, p.sizes, p.in_strides);
    const int64_t mask_row = kMask == MaskKind::kNone ? 0 : softmax_row_offset(row, p.sizes, p.mask_strides);
    const int64_t out_row = softmax_row_offset(row, p.sizes, p.out_strides);

    OnlineSoftmax st = online_softmax_init();
    for (int64_t col = threadIdx.x; col < cols; col += kRowBlockThreads) {
      const T* src = in + in_row + col * p.in_strides[3];
      const float score = load_score(src, aliased);
      online_softmax_add(st, row_logit<T, kMask>(score, p.mask, mask_row, p.mask_strides[3], col, p.scale));
    }
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) st = online_softmax_merge(st, shfl_xor_state(st, offset));
    if (lane == 0) warp_states[warp] = st;
    __syncthreads();
    if (warp == 0) {
      st = lane < kRowBlockThreads / kWarpSize ? warp_states[lane] : online_softmax_init();
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) st = online_softmax_merge(st, shfl_xor_state(st, offset));
      if (lane == 0) row_state = st;
    }
    __syncthreads();
    const float shift = softmax_shift(row_state.m);
    const float inv_sum = 1.0f / row_state.s;

    // Same element -> same thread in both passes, so an in-place launch reads before it overwrites.
    for (int64_t col = threadIdx.x; col < cols; col += kRowBlockThreads) {
      const T* src = in + in_row + col * p.in_strides[3];
      const float score = load_score(src, aliased);
      const float logit = row_logit<T, kMask>(score, p.mask, mask_row, p.mask_strides[3], col, p.scale);
      store_f32(out + out_row + col * p.out_strides[3], expf(logit - shift) * inv_sum);
    }
    // row_state and warp_states are rewritten by the next row: wait until every thread read them.
    __syncthreads();
  }
}

constexpr int64_t kMaxGridX = 2147483647;

template <typename T, MaskKind kMask, int kPerLane>
cudaError_t launch_warp(const SoftmaxParams& p, bool aliased, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  softmax_warp_per_row_kernel<T, kMask, kPerLane><<<grid, kWarpSize * kWarpsPerBlock, 0, stream>>>(p, aliased);
  return cudaGetLastError();
}

template <typename T, MaskKind kMask>
cudaError_t launch_for_mask(const SoftmaxParams& p, cudaStream_t stream) {
  const bool aliased = p.in == p.out;
  const int64_t cols = p.sizes[3];
  if (cols <= 32) return launch_warp<T, kMask, 1>(p, aliased, stream);
  if (cols <= 64) return launch_warp<T, kMask, 2>(p, aliased, stream);
  if (cols <= 128) return launch_warp<T, kMask, 4>(p, aliased, stream);  // 77 keys: 3 of 4 registers live
  if (cols <= 256) return launch_warp<T, kMask, 8>(p, aliased, stream);
  if (cols <= 512) return launch_warp<T, kMask, 16>(p, aliased, stream);
  if (cols <= kWarpSoftmaxMaxCols) return launch_warp<T, kMask, 32>(p, aliased, stream);
  const dim3 grid(static_cast<unsigned>(p.rows < kMaxGridX ? p.rows : kMaxGridX));
  softmax_block_per_row_kernel<T, kMask><<<grid, kRowBlockThreads, 0, stream>>>(p, aliased);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_for_dtype(const SoftmaxParams& p, cudaStream_t stream) {
  switch (p.mask_kind) {
    case MaskKind::kBool:
      return launch_for_mask<T, MaskKind::kBool>(p, stream);
    case MaskKind::kAdditive:
      return launch_for_mask<T, MaskKind::kAdditive>(p, stream);
    default:
      return launch_for_mask<T, MaskKind::kNone>(p, stream);
  }
}

}  // namespace

cudaError_t launch_scaled_masked_softmax(const SoftmaxParams& params, cudaStream_t stream) {
  if (params.rows == 0 || params.sizes[3] == 0) return cudaSuccess;
  switch (params.dtype) {
    case ScalarKind::kFloat16:
      return launch_for_dtype<__half>(params, stream);
    case ScalarKind::kBFloat16:
      return launch_for_dtype<__nv_bfloat16>(params, stream);
    default:
      return launch_for_dtype<float>(params, stream);
  }
}

}  // namespace ddim_fast
