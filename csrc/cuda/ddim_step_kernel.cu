// CUDA kernel of ddim_fast::ddim_step (plain CUDA, no torch headers; see ddim_step_launcher.h).
//
// One pass over memory: each element of x, model_output (one or both CFG halves) and noise is read
// once, out (and pred_x0 when asked) written once. The step is memory bound, so the design goals are
// full-width memory transactions and no wasted bytes, not arithmetic:
//   * vector path: 16-byte loads/stores (4 fp32 or 8 fp16/bf16) when every argument is in memory order
//     (DdimStepParams::flat: row-major contiguous, or dense with one shared layout such as channels_last)
//     and 16-byte aligned; a short scalar tail covers numel % vector width;
//   * scalar paths: memory order but misaligned (offset = position) and strided (offsets from
//     sizes/strides); both walk groups of 4 consecutive elements of one noise stream so one Philox call
//     serves 4 elements;
//   * grid-stride loops with int64 indices (tensors over 2^31 elements), grid sized from the SM count;
//   * all math in fp32 through the header shared with the CPU kernel (ddim_fast/step_math.h), so both
//     backends evaluate the same expression in the same order.
// Options (prediction type, guidance, clamp, noise source) are runtime values in the kernel
// parameters of the general kernels (uniform branches; 3 dtypes x 3 paths). A sampler's ordinary step (no
// clamp, no Philox, no pred_x0, memory order) takes a lean kernel specialized on the prediction type,
// guidance and noise tensor instead (3 x 2 x 2 per dtype), small enough to start fast inside a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>

#include "ddim_fast/philox.h"
#include "ddim_fast/step_math.h"
#include "ddim_fast/step_params.h"
#include "ddim_step_launcher.h"

namespace ddim_fast {
namespace {

constexpr int kThreads = 256;
// 8 resident blocks of 256 threads fill an SM's 2048 thread slots on sm_80 and sm_90; more blocks than
// that only add scheduling overhead to a grid-stride loop.
constexpr int kBlocksPerSm = 8;
// Elements per Philox call (philox_normal4): the unit every path aligns its work to.
constexpr int kGroup = 4;

// ------------------------------------------------------------------------------------------------
// Storage dtype <-> fp32
// ------------------------------------------------------------------------------------------------

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};

template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  // Round to nearest even, as c10::Half does on the CPU.
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

template <typename T>
__device__ __forceinline__ float load_scalar(const void* base, int64_t offset) {
  return Convert<T>::to_float(static_cast<const T*>(base)[offset]);
}

template <typename T>
__device__ __forceinline__ void store_scalar(const void* base, int64_t offset, float v) {
  static_cast<T*>(const_cast<void*>(base))[offset] = Convert<T>::from_float(v);
}

// 16 bytes = one vector of kVec elements. Plain (coherent) loads on purpose: out may alias x for an
// in-place update, which rules out the read-only (non-coherent) cache path.
template <typename T>
__device__ __forceinline__ void load_vector(const void* base, int64_t vec_index, float* dst) {
  constexpr int kVec = 16 / sizeof(T);
  const uint4 raw = static_cast<const uint4*>(base)[vec_index];
  T elems[kVec];
  memcpy(elems, &raw, 16);
#pragma unroll
  for (int j = 0; j < kVec; ++j) dst[j] = Convert<T>::to_float(elems[j]);
}

template <typename T>
__device__ __forceinline__ void store_vector(const void* base, int64_t vec_index, const float* src) {
  constexpr int kVec = 16 / sizeof(T);
  T elems[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) elems[j] = Convert<T>::from_float(src[j]);
  uint4 raw;
  memcpy(&raw, elems, 16);
  static_cast<uint4*>(const_cast<void*>(base))[vec_index] = raw;
}

// ------------------------------------------------------------------------------------------------
// Per-launch state and the per-element formula
// ------------------------------------------------------------------------------------------------

// What every thread reads once from device memory before its loop: the table row and the RNG state.
// Reading them on the device (not on the host) is what lets one CUDA graph replay every step.
struct StepState {
  StepCoefs coefs;
  bool valid_row;   // false: row index outside the table; every output element becomes NaN
  bool philox;      // seeded noise drawn in-kernel
  bool per_row;     // one noise stream per batch row (rng_state [B, 2]); else one over the tensor
  uint64_t table_row;
  uint64_t seed;        // stream 0 (the only one unless per_row)
  uint64_t rng_offset;  // stream 0's offset + table_row: each row draws fresh noise
};

__device__ __forceinline__ StepState load_step_state(const DdimStepParams& p) {
  StepState s;
  const int64_t table_row = *p.table_row;
  s.valid_row = table_row >= 0 && table_row < p.num_rows;
  if (s.valid_row) {
    s.coefs = load_step_coefs(p.table + table_row * kTableColumns, p.temperature);
  } else {
    // No table read out of bounds; NaN coefficients, and the outputs are forced to NaN below anyway.
    const float nan = __int_as_float(0x7fc00000);
    s.coefs = StepCoefs{nan, nan, nan, nan, nan};
  }
  s.philox = p.noise.data == nullptr && p.rng != nullptr;
  s.per_row = s.philox && p.rng_per_row;
  s.table_row = static_cast<uint64_t>(table_row);
  s.seed = 0;
  s.rng_offset = 0;
  if (s.philox && !s.per_row) philox_stream(p.rng, 0, s.table_row, &s.seed, &s.rng_offset);
  return s;
}

// The stream holding logical element i and i's index j in it (philox.h): stream 0 and j = i for one
// stream; row i / sample_numel and the index inside the row for per-row streams (reads that row's seed).
__device__ __forceinline__ void philox_locate(const DdimStepParams& p, const StepState& s, int64_t i,
                                              uint64_t* seed, uint64_t* offset, int64_t* j) {
  if (s.per_row) {
    const int64_t row = i / p.sample_numel;
    *j = i - row * p.sample_numel;
    philox_stream(p.rng, row, s.table_row, seed, offset);
  } else {
    *j = i;
    *seed = s.seed;
    *offset = s.rng_offset;
  }
}

// The seeded normal of one logical element (a whole Philox call: only for the vector path's short tail).
__device__ __forceinline__ float philox_normal_at(const DdimStepParams& p, const StepState& s, int64_t i) {
  uint64_t seed, offset;
  int64_t j;
  philox_locate(p, s, i, &seed, &offset, &j);
  float group[kGroup];
  philox_normal4(seed, offset, static_cast<uint64_t>(j >> 2), group);
  return group[j & 3];
}

// Walks the batch index of consecutive logical elements without a division per element
// (dynamic thresholding needs the per-sample scale of every element).
struct BatchCursor {
  int64_t batch;
  int64_t within;  // index inside the sample
  int64_t sample_numel;

  __device__ __forceinline__ BatchCursor(int64_t index, int64_t sample_numel_)
      : batch(index / sample_numel_), within(index % sample_numel_), sample_numel(sample_numel_) {}

  __device__ __forceinline__ void next() {
    if (++within == sample_numel) {
      within = 0;
      ++batch;
    }
  }
};

// x_prev (and x0_hat) of one element, fp32. `threshold` is the dynamic-threshold scale of the element's
// sample (ignored unless clamp == kDynamic).
__device__ __forceinline__ void step_element(const DdimStepParams& p, const StepState& s, float x, float m_uncond,
                                             float m_cond, float z, float threshold, float* out, float* x0_out) {
  const float m = p.guided ? guidance_combine(m_uncond, m_cond, p.guidance_scale) : m_uncond;
  float x0, eps;
  switch (p.prediction) {
    case Prediction::kVPrediction:
      predict_x0_eps<Prediction::kVPrediction>(x, m, s.coefs, &x0, &eps);
      break;
    case Prediction::kSample:
      predict_x0_eps<Prediction::kSample>(x, m, s.coefs, &x0, &eps);
      break;
    default:
      predict_x0_eps<Prediction::kEpsilon>(x, m, s.coefs, &x0, &eps);
  }
  if (p.clamp != X0Clamp::kNone) {
    x0 = clamp_x0(x0, p.clamp, p.clip_range, threshold);
    if (p.use_clipped_model_output) eps = eps_from_x0(x, x0, s.coefs);
  }
  float x_prev = ddim_update(x0, eps, z, s.coefs);
  if (!s.valid_row) {
    // Clamping would turn a NaN x0 into +-clip_range: force the documented NaN explicitly.
    x_prev = __int_as_float(0x7fc00000);
    x0 = x_prev;
  }
  *out = x_prev;
  *x0_out = x0;
}

// ------------------------------------------------------------------------------------------------
// Vector path: every argument contiguous and 16-byte aligned
// ------------------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) ddim_step_vector_kernel(const DdimStepParams p) {
  constexpr int kVec = 16 / sizeof(T);  // 4 (fp32) or 8 (fp16/bf16): a whole number of Philox groups
  static_assert(kVec % kGroup == 0, "a vector must cover whole Philox groups");
  const StepState s = load_step_state(p);
  const bool want_x0 = p.pred_x0.data != nullptr;
  const bool dynamic = p.clamp == X0Clamp::kDynamic;
  const int64_t num_vec = p.numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  for (int64_t v = first; v < num_vec; v += stride) {
    const int64_t i0 = v * kVec;
    float x[kVec], mu[kVec], mc[kVec], z[kVec], thr[kVec], out[kVec], x0[kVec];
    load_vector<T>(p.x.data, v, x);
    load_vector<T>(p.model_uncond.data, v, mu);
    if (p.guided) {
      load_vector<T>(p.model_cond.data, v, mc);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) mc[j] = 0.0f;
    }
    if (p.noise.data != nullptr) {
      load_vector<T>(p.noise.data, v, z);
    } else if (s.philox) {
      // i0 is a multiple of kVec, hence of 4, and so is its index j0 in its stream (per-row streams take
      // this path only when sample_numel % kVec == 0: a vector never straddles two rows). The vector holds
      // groups (j0 >> 2) .. (j0 >> 2) + kVec/4 - 1 of one stream.
      uint64_t seed, offset;
      int64_t j0;
      philox_locate(p, s, i0, &seed, &offset, &j0);
#pragma unroll
      for (int g = 0; g < kVec / kGroup; ++g) {
        philox_normal4(seed, offset, static_cast<uint64_t>((j0 >> 2) + g), z + g * kGroup);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) z[j] = 0.0f;
    }
    if (dynamic) {
      BatchCursor cursor(i0, p.sample_numel);
#pragma unroll
      for (int j = 0; j < kVec; ++j, cursor.next()) thr[j] = p.x0_threshold[cursor.batch];
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) thr[j] = 1.0f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) step_element(p, s, x[j], mu[j], mc[j], z[j], thr[j], &out[j], &x0[j]);
    store_vector<T>(p.out.data, v, out);
    if (want_x0) store_vector<T>(p.pred_x0.data, v, x0);
  }

  // Scalar tail: the last numel % kVec elements (fewer than 8), one per thread of the first threads.
  const int64_t tail = num_vec * kVec + first;
  if (tail < p.numel) {
    const int64_t i = tail;
    float z = 0.0f;
    if (p.noise.data != nullptr) {
      z = load_scalar<T>(p.noise.data, i);
    } else if (s.philox) {
      z = philox_normal_at(p, s, i);
    }
    const float thr = dynamic ? p.x0_threshold[i / p.sample_numel] : 1.0f;
    float out, x0;
    step_element(p, s, load_scalar<T>(p.x.data, i), load_scalar<T>(p.model_uncond.data, i),
                 p.guided ? load_scalar<T>(p.model_cond.data, i) : 0.0f, z, thr, &out, &x0);
    store_scalar<T>(p.out.data, i, out);
    if (want_x0) store_scalar<T>(p.pred_x0.data, i, x0);
  }
}

// ------------------------------------------------------------------------------------------------
// Lean path: a sampler's common step, specialized
// ------------------------------------------------------------------------------------------------

// What a sampler's ordinary step needs and nothing else: the element pointers, the table and the row, the
// guidance scale and temperature (80 bytes of kernel parameters instead of DdimStepParams' ~600).
struct LeanStepParams {
  const void* x;
  const void* model_uncond;
  const void* model_cond;  // with kGuided
  const void* noise;       // with kNoise
  void* out;
  const float* table;
  const int64_t* table_row;
  int64_t num_rows;
  int64_t numel;
  float guidance_scale;
  float temperature;
};

// The vector kernel with what an ordinary step (no x0 clamp, no Philox, no pred_x0, every argument in memory
// order and 16-byte aligned) does not use compiled out, and the prediction type, guidance and noise tensor as
// template parameters: straight-line code of a few hundred instructions. The general vector kernel keeps every
// option as a uniform runtime branch (about 3,300 SASS instructions, 52 KB, for fp16 on sm_90); inside a CUDA
// graph a step takes a couple of microseconds, and the first H200 run measured it at 0.61x of Inductor's
// specialized kernel for the same math (issue 19), so the common case gets the small kernel and its small
// parameter block. Same step_math.h expressions in the same order as step_element: bit-identical results.
template <typename T, Prediction P, bool kGuided, bool kNoise>
__global__ void __launch_bounds__(kThreads) ddim_step_lean_kernel(const LeanStepParams p) {
  constexpr int kVec = 16 / sizeof(T);
  // As in load_step_state: an out-of-range row index reads row 0 (no out-of-bounds read) and writes NaN.
  const int64_t table_row = *p.table_row;
  const bool valid_row = table_row >= 0 && table_row < p.num_rows;
  const StepCoefs k = load_step_coefs(p.table + (valid_row ? table_row : 0) * kTableColumns, p.temperature);
  const float nan = __int_as_float(0x7fc00000);
  const int64_t num_vec = p.numel / kVec;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;

  auto element = [&](float x, float m_uncond, float m_cond, float z) {
    const float m = kGuided ? guidance_combine(m_uncond, m_cond, p.guidance_scale) : m_uncond;
    float x0, eps;
    predict_x0_eps<P>(x, m, k, &x0, &eps);
    const float x_prev = ddim_update(x0, eps, z, k);
    return valid_row ? x_prev : nan;
  };

  for (int64_t v = first; v < num_vec; v += stride) {
    float x[kVec], mu[kVec], mc[kVec], z[kVec], out[kVec];
    load_vector<T>(p.x, v, x);
    load_vector<T>(p.model_uncond, v, mu);
    if (kGuided) load_vector<T>(p.model_cond, v, mc);
    if (kNoise) load_vector<T>(p.noise, v, z);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      out[j] = element(x[j], mu[j], kGuided ? mc[j] : 0.0f, kNoise ? z[j] : 0.0f);
    }
    store_vector<T>(p.out, v, out);
  }
  // The last numel % kVec elements, one per thread of the first threads.
  const int64_t i = num_vec * kVec + first;
  if (i < p.numel) {
    const float out = element(load_scalar<T>(p.x, i), load_scalar<T>(p.model_uncond, i),
                              kGuided ? load_scalar<T>(p.model_cond, i) : 0.0f,
                              kNoise ? load_scalar<T>(p.noise, i) : 0.0f);
    store_scalar<T>(p.out, i, out);
  }
}

// ------------------------------------------------------------------------------------------------
// Scalar paths: contiguous but misaligned (kStrided = false), or arbitrary strides (kStrided = true)
// ------------------------------------------------------------------------------------------------

// Element offsets of every argument for one logical index, kept in step while walking a group.
struct Offsets {
  int64_t x, mu, mc, noise, out, x0;
};

// Row-major coordinates of a logical index; loops are unrolled over kMaxDims so the sizes/strides
// arrays are indexed with constants (they stay in the kernel parameter space, no local-memory copy).
struct Coords {
  int64_t c[kMaxDims];

  __device__ __forceinline__ Coords(const DdimStepParams& p, int64_t index) {
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      c[d] = 0;
      if (d < p.ndim) {
        c[d] = index % p.sizes[d];
        index /= p.sizes[d];
      }
    }
  }

  __device__ __forceinline__ void next(const DdimStepParams& p) {
#pragma unroll
    for (int d = kMaxDims - 1; d >= 0; --d) {
      if (d < p.ndim) {
        if (++c[d] < p.sizes[d]) return;
        c[d] = 0;
      }
    }
  }

  __device__ __forceinline__ int64_t offset(const StridedArg& a, int ndim) const {
    int64_t off = 0;
#pragma unroll
    for (int d = 0; d < kMaxDims; ++d) {
      if (d < ndim) off += c[d] * a.strides[d];
    }
    return off;
  }
};

// Work items of the scalar kernels: groups of 4 consecutive logical elements of one noise stream (one
// Philox call each). One stream over the tensor: group g is elements 4g .. 4g+3 (a group may straddle two
// samples). Per-row streams (rng_state [B, 2]): each row has ceil(sample_numel / 4) groups of its own, the
// last one partial when sample_numel % 4 != 0, so no group straddles two rows.
struct GroupSpace {
  int64_t stream_len;         // elements per stream: numel, or sample_numel per row
  int64_t groups_per_stream;  // ceil(stream_len / 4)
  int64_t num_groups;         // streams * groups_per_stream
};

__host__ __device__ __forceinline__ GroupSpace group_space(const DdimStepParams& p) {
  const bool per_row = p.noise.data == nullptr && p.rng != nullptr && p.rng_per_row;
  GroupSpace g;
  g.stream_len = per_row ? p.sample_numel : p.numel;
  g.groups_per_stream = (g.stream_len + kGroup - 1) / kGroup;
  g.num_groups = (per_row ? p.sizes[0] : 1) * g.groups_per_stream;
  return g;
}

template <typename T, bool kStrided>
__global__ void __launch_bounds__(kThreads) ddim_step_scalar_kernel(const DdimStepParams p) {
  const StepState s = load_step_state(p);
  const bool want_x0 = p.pred_x0.data != nullptr;
  const bool has_noise = p.noise.data != nullptr;
  const bool dynamic = p.clamp == X0Clamp::kDynamic;
  const GroupSpace space = group_space(p);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;

  for (int64_t gid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; gid < space.num_groups;
       gid += stride) {
    // Stream `row` (0 unless per-row) and group g inside it; i0 is the group's first logical index.
    int64_t row = 0;
    int64_t g = gid;
    if (s.per_row) {
      row = gid / space.groups_per_stream;
      g = gid - row * space.groups_per_stream;
    }
    const int64_t j0 = g * kGroup;
    const int64_t i0 = row * space.stream_len + j0;
    float z[kGroup] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (s.philox) {
      uint64_t seed = s.seed, offset = s.rng_offset;
      if (s.per_row) philox_stream(p.rng, row, s.table_row, &seed, &offset);
      philox_normal4(seed, offset, static_cast<uint64_t>(g), z);
    }
    const int n = static_cast<int>(space.stream_len - j0 < kGroup ? space.stream_len - j0 : kGroup);

    Coords coords(p, kStrided ? i0 : 0);
    BatchCursor cursor(i0, dynamic ? p.sample_numel : 1);
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (j < n) {
        Offsets o;
        if (kStrided) {
          o.x = coords.offset(p.x, p.ndim);
          o.mu = coords.offset(p.model_uncond, p.ndim);
          o.mc = coords.offset(p.model_cond, p.ndim);
          o.noise = coords.offset(p.noise, p.ndim);
          o.out = coords.offset(p.out, p.ndim);
          o.x0 = coords.offset(p.pred_x0, p.ndim);
        } else {
          o = Offsets{i0 + j, i0 + j, i0 + j, i0 + j, i0 + j, i0 + j};
        }
        const float zj = has_noise ? load_scalar<T>(p.noise.data, o.noise) : z[j];
        const float thr = dynamic ? p.x0_threshold[cursor.batch] : 1.0f;
        float out, x0;
        step_element(p, s, load_scalar<T>(p.x.data, o.x), load_scalar<T>(p.model_uncond.data, o.mu),
                     p.guided ? load_scalar<T>(p.model_cond.data, o.mc) : 0.0f, zj, thr, &out, &x0);
        store_scalar<T>(p.out.data, o.out, out);
        if (want_x0) store_scalar<T>(p.pred_x0.data, o.x0, x0);
        if (kStrided) coords.next(p);
        if (dynamic) cursor.next();
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------------

// The SM count, read once per device (cudaDeviceGetAttribute is cheap but not free, and this runs
// every step).
cudaError_t sm_count(int* count) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *count = cached;
      return cudaSuccess;
    }
  }
  int value = 0;
  err = cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (value < 1) value = 1;
  if (device >= 0 && device < kMaxDevices) cache[device].store(value, std::memory_order_relaxed);
  *count = value;
  return cudaSuccess;
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// The 16-byte path: memory order, every pointer 16-byte aligned, and with per-row Philox streams rows that
// are whole vectors (else a vector would straddle two streams' groups).
template <typename T>
bool vector_path_ok(const DdimStepParams& p) {
  constexpr int64_t kVec = 16 / sizeof(T);
  const bool per_row = p.noise.data == nullptr && p.rng != nullptr && p.rng_per_row;
  return p.flat && (!per_row || p.sample_numel % kVec == 0) && aligned16(p.x.data) &&
         aligned16(p.model_uncond.data) && aligned16(p.model_cond.data) && aligned16(p.noise.data) &&
         aligned16(p.out.data) && aligned16(p.pred_x0.data);
}

// The lean kernel applies: the vector path with no clamp, no Philox noise and no pred_x0 output.
template <typename T>
bool lean_path_ok(const DdimStepParams& p) {
  return vector_path_ok<T>(p) && p.clamp == X0Clamp::kNone && p.rng == nullptr && p.pred_x0.data == nullptr;
}

template <typename T, Prediction P, bool kGuided>
void launch_lean_noise(const DdimStepParams& p, const LeanStepParams& lean, unsigned int blocks,
                       cudaStream_t stream) {
  if (p.noise.data != nullptr) {
    ddim_step_lean_kernel<T, P, kGuided, true><<<blocks, kThreads, 0, stream>>>(lean);
  } else {
    ddim_step_lean_kernel<T, P, kGuided, false><<<blocks, kThreads, 0, stream>>>(lean);
  }
}

template <typename T, Prediction P>
void launch_lean_guided(const DdimStepParams& p, const LeanStepParams& lean, unsigned int blocks,
                        cudaStream_t stream) {
  if (p.guided) {
    launch_lean_noise<T, P, true>(p, lean, blocks, stream);
  } else {
    launch_lean_noise<T, P, false>(p, lean, blocks, stream);
  }
}

template <typename T>
void launch_lean(const DdimStepParams& p, unsigned int blocks, cudaStream_t stream) {
  LeanStepParams lean;
  lean.x = p.x.data;
  lean.model_uncond = p.model_uncond.data;
  lean.model_cond = p.model_cond.data;
  lean.noise = p.noise.data;
  lean.out = const_cast<void*>(p.out.data);
  lean.table = p.table;
  lean.table_row = p.table_row;
  lean.num_rows = p.num_rows;
  lean.numel = p.numel;
  lean.guidance_scale = p.guidance_scale;
  lean.temperature = p.temperature;
  switch (p.prediction) {
    case Prediction::kVPrediction:
      launch_lean_guided<T, Prediction::kVPrediction>(p, lean, blocks, stream);
      break;
    case Prediction::kSample:
      launch_lean_guided<T, Prediction::kSample>(p, lean, blocks, stream);
      break;
    default:
      launch_lean_guided<T, Prediction::kEpsilon>(p, lean, blocks, stream);
  }
}

template <typename T>
cudaError_t launch_typed(const DdimStepParams& p, cudaStream_t stream) {
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t max_blocks = static_cast<int64_t>(sms) * kBlocksPerSm;
  auto blocks_for = [&](int64_t work_items) {
    int64_t blocks = (work_items + kThreads - 1) / kThreads;
    if (blocks > max_blocks) blocks = max_blocks;
    return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
  };

  if (vector_path_ok<T>(p)) {
    constexpr int64_t kVec = 16 / sizeof(T);
    // Each thread also takes at most one tail element, so at least numel % kVec threads are needed.
    int64_t work = p.numel / kVec;
    if (work < p.numel % kVec) work = p.numel % kVec;
    if (lean_path_ok<T>(p)) {
      launch_lean<T>(p, blocks_for(work), stream);
    } else {
      ddim_step_vector_kernel<T><<<blocks_for(work), kThreads, 0, stream>>>(p);
    }
  } else if (p.flat) {
    ddim_step_scalar_kernel<T, false><<<blocks_for(group_space(p).num_groups), kThreads, 0, stream>>>(p);
  } else {
    ddim_step_scalar_kernel<T, true><<<blocks_for(group_space(p).num_groups), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_ddim_step(const DdimStepParams& params, cudaStream_t stream) {
  if (params.numel == 0) return cudaSuccess;
  switch (params.dtype) {
    case ScalarKind::kFloat16:
      return launch_typed<__half>(params, stream);
    case ScalarKind::kBFloat16:
      return launch_typed<__nv_bfloat16>(params, stream);
    case ScalarKind::kFloat32:
      return launch_typed<float>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace ddim_fast
