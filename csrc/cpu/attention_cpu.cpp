// C++ CPU kernels of ddim_fast::scaled_masked_softmax(_) and ddim_fast::attention, plus the tensor ->
// SoftmaxParams translation (shape/mask checks) that the CUDA binding (csrc/cuda/attention_cuda.cpp)
// shares.
//
// Mask rule (both ops; documented in ddim_fast/attention.py): the mask has as many dims as the scores
// [..., Lq, Lk] (2 to 4 dims), its last dim is Lk, and every other dim is either the scores' size or 1
// (broadcast by a zero stride, no copy). Boolean masks keep True; float masks are added and must have
// the scores' dtype. Anything else is rejected.
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "ddim_fast/softmax_math.h"
#include "../tensor_checks.h"

namespace ddim_fast {

namespace {

// Sizes of `t` padded on the left with 1s to 4 dims, and its strides (0 for the padded dims).
void pad_to_4d(const at::Tensor& t, int64_t* sizes, int64_t* strides) {
  const int64_t pad = 4 - t.dim();
  for (int64_t d = 0; d < 4; ++d) {
    sizes[d] = d < pad ? 1 : t.size(d - pad);
    strides[d] = d < pad ? 0 : t.stride(d - pad);
  }
}

}  // namespace

// The kernels multiply every score by float(scale): NaN, +-inf or a double beyond float's range would make
// every output NaN without a word. Same rule and message as ddim_fast._checks.check_softmax_scale.
static float checked_softmax_scale(const char* op, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && std::abs(scale) <= static_cast<double>(FLT_MAX), op,
                    ": scale must be finite (in float32's range), got ", scale);
  return static_cast<float>(scale);
}

// Checks `mask` against scores of shape `score_sizes` (ndim dims, 2..4) and fills params.mask*.
// Exported (not static): attention_cuda.cpp declares and reuses it.
void fill_softmax_mask(const char* op, const std::optional<at::Tensor>& mask, at::IntArrayRef score_sizes,
                       at::ScalarType score_dtype, const at::Device& device, SoftmaxParams& p) {
  p.mask = nullptr;
  p.mask_kind = MaskKind::kNone;
  for (int d = 0; d < 4; ++d) p.mask_strides[d] = 0;
  if (!mask.has_value()) return;
  const at::Tensor& m = *mask;
  const int64_t ndim = static_cast<int64_t>(score_sizes.size());
  TORCH_CHECK_VALUE(m.device() == device, op, ": mask must be on device ", device, ", got ", m.device());
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == score_dtype, op,
                   ": mask must be bool (True = keep) or have the scores' dtype ", score_dtype, " (additive), got ",
                   m.scalar_type());
  TORCH_CHECK_VALUE(m.dim() == ndim, op, ": mask must have ", ndim, " dims like the scores ", score_sizes,
                    " (each dim equal or 1, last dim = Lk), got shape ", m.sizes());
  for (int64_t d = 0; d < ndim; ++d) {
    const bool last = d == ndim - 1;
    TORCH_CHECK_VALUE(m.size(d) == score_sizes[d] || (!last && m.size(d) == 1), op, ": mask shape ", m.sizes(),
                      " does not fit scores ", score_sizes, ": dim ", d, " must be ", score_sizes[d],
                      last ? "" : " or 1", " (only size-1 dims are broadcast)");
  }
  int64_t sizes[4];
  pad_to_4d(m, sizes, p.mask_strides);
  const int64_t pad = 4 - ndim;
  for (int64_t d = pad; d < 4; ++d) {
    // A broadcast dim reads the same element for every index.
    if (sizes[d] == 1 && score_sizes[d - pad] != 1) p.mask_strides[d] = 0;
  }
  p.mask = m.data_ptr();
  p.mask_kind = m.scalar_type() == at::kBool ? MaskKind::kBool : MaskKind::kAdditive;
}

// Validates scores/mask/out and describes the launch. `out` has the scores' shape and dtype; it may be
// `scores` itself (the in-place op).
SoftmaxParams make_softmax_params(const char* op, const at::Tensor& scores, const std::optional<at::Tensor>& mask,
                                  double scale, const at::Tensor& out) {
  SoftmaxParams p;
  p.dtype = scalar_kind_of(scores, op, "scores");
  p.scale = checked_softmax_scale(op, scale);
  TORCH_CHECK_VALUE(scores.dim() >= 2 && scores.dim() <= 4, op,
                    ": scores must have 2 to 4 dims [..., Lq, Lk], got shape ", scores.sizes());
  TORCH_CHECK_VALUE(out.sizes() == scores.sizes() && out.scalar_type() == scores.scalar_type(), op,
                    ": out must match scores");
  TORCH_CHECK_VALUE(at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
                    ": the written tensor has internal overlap (an expanded view); pass a dense tensor");
  fill_softmax_mask(op, mask, scores.sizes(), scores.scalar_type(), scores.device(), p);
  pad_to_4d(scores, p.sizes, p.in_strides);
  int64_t out_sizes[4];
  pad_to_4d(out, out_sizes, p.out_strides);
  p.rows = p.sizes[0] * p.sizes[1] * p.sizes[2];
  TORCH_CHECK_VALUE(p.rows <= kMaxSoftmaxRows, op, ": at most ", kMaxSoftmaxRows, " rows are supported, got ",
                    p.rows);
  p.in = scores.data_ptr();
  p.out = out.data_ptr();
  return p;
}

namespace {

template <typename T>
inline float to_f32(T v) {
  return static_cast<float>(v);
}

template <typename T, MaskKind kMask>
inline float logit_at(const SoftmaxParams& p, const T* in_row, const void* mask_row, int64_t col) {
  const float score = to_f32(in_row[col * p.in_strides[3]]);
  if (kMask == MaskKind::kBool) {
    return masked_logit_bool(score, p.scale, static_cast<const bool*>(mask_row)[col * p.mask_strides[3]]);
  } else if (kMask == MaskKind::kAdditive) {
    return masked_logit_additive(score, p.scale, to_f32(static_cast<const T*>(mask_row)[col * p.mask_strides[3]]));
  }
  return score * p.scale;
}

template <typename T, MaskKind kMask>
void softmax_rows_cpu(const SoftmaxParams& p) {
  const int64_t cols = p.sizes[3];
  // ~32K elements per task so small problems do not pay thread start-up per row.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, p.rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> logits(static_cast<size_t>(cols));
    for (int64_t row = begin; row < end; ++row) {
      const T* in_row = static_cast<const T*>(p.in) + softmax_row_offset(row, p.sizes, p.in_strides);
      const void* mask_row = nullptr;
      if (kMask != MaskKind::kNone) {
        const int64_t elem = kMask == MaskKind::kBool ? sizeof(bool) : sizeof(T);
        mask_row = static_cast<const char*>(p.mask) + softmax_row_offset(row, p.sizes, p.mask_strides) * elem;
      }
      // The whole row is read into `logits` before anything is written: in-place calls are safe.
      float row_max = -__builtin_huge_valf();
      for (int64_t c = 0; c < cols; ++c) {
        logits[c] = logit_at<T, kMask>(p, in_row, mask_row, c);
        row_max = std::max(row_max, logits[c]);
      }
      const float shift = softmax_shift(row_max);
      float row_sum = 0.0f;
      for (int64_t c = 0; c < cols; ++c) {
        logits[c] = fast_expf(logits[c] - shift);
        row_sum += logits[c];
      }
      const float inv_sum = 1.0f / row_sum;
      T* out_row = static_cast<T*>(p.out) + softmax_row_offset(row, p.sizes, p.out_strides);
      for (int64_t c = 0; c < cols; ++c) out_row[c * p.out_strides[3]] = static_cast<T>(logits[c] * inv_sum);
    }
  });
}

template <typename T>
void softmax_cpu_for_dtype(const SoftmaxParams& p) {
  switch (p.mask_kind) {
    case MaskKind::kBool:
      return softmax_rows_cpu<T, MaskKind::kBool>(p);
    case MaskKind::kAdditive:
      return softmax_rows_cpu<T, MaskKind::kAdditive>(p);
    default:
      return softmax_rows_cpu<T, MaskKind::kNone>(p);
  }
}

void run_softmax_cpu(const SoftmaxParams& p) {
  if (p.rows == 0 || p.sizes[3] == 0) return;
  switch (p.dtype) {
    case ScalarKind::kFloat16:
      return softmax_cpu_for_dtype<c10::Half>(p);
    case ScalarKind::kBFloat16:
      return softmax_cpu_for_dtype<c10::BFloat16>(p);
    default:
      return softmax_cpu_for_dtype<float>(p);
  }
}

at::Tensor scaled_masked_softmax_cpu(const at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK_VALUE(scores.device().is_cpu(), "scaled_masked_softmax: scores must be a CPU tensor here");
  at::Tensor out = at::empty(scores.sizes(), scores.options());
  run_softmax_cpu(make_softmax_params("scaled_masked_softmax", scores, mask, scale, out));
  return out;
}

void scaled_masked_softmax_inplace_cpu(at::Tensor& scores, const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK_VALUE(scores.device().is_cpu(), "scaled_masked_softmax_: scores must be a CPU tensor here");
  if (mask.has_value()) {
    TORCH_CHECK_VALUE(overlap_status(scores, *mask) == at::MemOverlapStatus::No,
                      "scaled_masked_softmax_: mask overlaps scores, which are overwritten");
  }
  run_softmax_cpu(make_softmax_params("scaled_masked_softmax_", scores, mask, scale, scores));
}

// ------------------------------------------------------------------------------------------------
// attention: softmax(q k^T * scale (+ mask)) v
//
// Work split: a task is (batch*head, a chunk of query rows). It converts K and V of its head to fp32
// once (skipped for fp32 inputs with unit last-dim stride: the GEMMs read them in place), then walks
// its chunk in query blocks: S = Q K^T by an fp32 GEMM into a per-thread buffer, an exact two-pass
// softmax over each full row of S (scale, mask, max; then exp and sum, both vectorized), O = P V by a
// second GEMM, and each output row is multiplied by 1/sum while it is stored in the input dtype.
// The GEMMs run single-threaded inside at::parallel_for (nested ATen parallelism runs inline and MKL
// drops to one thread inside an OpenMP region), so the two levels never oversubscribe the cores.
// ------------------------------------------------------------------------------------------------

// The hot loops below are written with GCC/Clang vector extensions (16 floats) and compiled three
// times on x86 (AVX-512, AVX2+FMA, baseline SSE2), picked at load time by an ifunc: the extension is
// built without -march, and ATen's at::vec types only vectorize inside ATen's own dispatched kernels.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define DDIM_FAST_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DDIM_FAST_SIMD_CLONES
#endif
// Helpers must be inlined into each clone (an out-of-line copy would be built for the baseline ISA and
// take its 64-byte vector arguments by a different ABI).
#define DDIM_FAST_VEC_INLINE inline __attribute__((always_inline))

#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors in always-inlined helpers never cross an ABI

constexpr int64_t kLanes = 16;
typedef float VecF __attribute__((vector_size(64)));
typedef int32_t VecI __attribute__((vector_size(64)));
typedef uint32_t VecU __attribute__((vector_size(64)));
typedef uint16_t VecU16 __attribute__((vector_size(32)));
typedef uint8_t VecU8 __attribute__((vector_size(16)));

template <typename V, typename E>
DDIM_FAST_VEC_INLINE V vload(const E* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename E>
DDIM_FAST_VEC_INLINE void vstore(E* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}
DDIM_FAST_VEC_INLINE VecF vsplat(float x) { return VecF{} + x; }
// Lane-wise m ? a : b for a comparison result m (all ones / all zeros per lane).
DDIM_FAST_VEC_INLINE VecF vselect(VecI m, VecF a, VecF b) { return (VecF)(((VecI)a & m) | ((VecI)b & ~m)); }
DDIM_FAST_VEC_INLINE VecU vselect_u(VecI m, VecU a, VecU b) { return (a & (VecU)m) | (b & ~(VecU)m); }
DDIM_FAST_VEC_INLINE float hsum(VecF v) {
  float s = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) s += v[l];
  return s;
}
DDIM_FAST_VEC_INLINE float hmax(VecF v) {
  float m = v[0];
  for (int64_t l = 1; l < kLanes; ++l) m = v[l] > m ? v[l] : m;
  return m;
}
DDIM_FAST_VEC_INLINE VecI lanes_below(int64_t n) {
  const VecI iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return iota < static_cast<int32_t>(n);
}

// exp(x) for the softmax arguments x = logit - row max <= 0 (and -inf). x = n ln2 + r with n = round(x
// log2 e) (the 1.5 * 2^23 shift leaves n in the low mantissa bits of t), r from a two-constant Cody-Waite
// reduction, exp(r) by Cephes' degree-6 minimax polynomial (about 1 ulp), 2^n written into the exponent
// field. Below -87.3 the result would be subnormal; it is flushed to 0, which changes a row sum that is
// >= 1 (the max term) by less than 1e-37 relative. NaN propagates through the arithmetic.
DDIM_FAST_VEC_INLINE VecF vexp_nonpositive(VecF x) {
  const VecF t = x * 1.44269504088896341f + 12582912.0f;
  const VecF n = t - 12582912.0f;
  VecF r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  VecF poly = 1.9875691500e-4f * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const VecF exp_r = poly * (r * r) + r + 1.0f;
  const VecI two_n = (((VecI)t - 0x4B400000) + 127) << 23;
  return vselect(x < -87.3f, vsplat(0.0f), exp_r * (VecF)two_n);
}

// IEEE half <-> float, bit-exact with c10::Half (round to nearest even, NaN -> quiet NaN, overflow ->
// inf, subnormals kept), so the vector and scalar paths agree.
DDIM_FAST_VEC_INLINE VecF half_to_float(VecU16 h) {
  const VecU w = __builtin_convertvector(h, VecU);
  const VecU sign = (w & 0x8000u) << 16;
  const VecU magnitude = w & 0x7FFFu;
  VecU normal = (magnitude << 13) + 0x38000000u;  // rebias the exponent by 127 - 15
  normal = vselect_u(magnitude >= 0x7C00u, normal + 0x38000000u, normal);  // inf/NaN: exponent 255
  // Subnormal halves (and zero) are magnitude * 2^-24, exact in fp32.
  const VecF subnormal = __builtin_convertvector((VecI)magnitude, VecF) * 5.9604644775390625e-8f;
  return (VecF)(sign | vselect_u(magnitude < 0x400u, (VecU)subnormal, normal));
}
DDIM_FAST_VEC_INLINE VecU16 float_to_half(VecF f) {
  const VecU u = (VecU)f;
  const VecU sign = (u >> 16) & 0x8000u;
  const VecU a = u & 0x7FFFFFFFu;
  // Normal range: rebias, add 0xFFF plus the kept mantissa's lowest bit (ties to even), drop 13 bits.
  // A carry out of the mantissa correctly bumps the exponent, up to inf.
  const VecU normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
  // Below 2^-14 the fp32 adder rounds for us: |f| + 0.5 has its ulp at 2^-24, the half subnormal step.
  const VecU subnormal = (VecU)((VecF)a + 0.5f) - 0x3F000000u;
  const VecU huge = vselect_u(a > 0x7F800000u, VecU{} + 0x7E00u, VecU{} + 0x7C00u);  // NaN, else inf
  const VecU bits = vselect_u(a >= 0x47800000u, huge, vselect_u(a < 0x38800000u, subnormal, normal));
  return __builtin_convertvector(sign | bits, VecU16);
}
// bfloat16 <-> float, bit-exact with c10::BFloat16 (round to nearest even, NaN -> 0x7FC0).
DDIM_FAST_VEC_INLINE VecF bf16_to_float(VecU16 h) { return (VecF)(__builtin_convertvector(h, VecU) << 16); }
DDIM_FAST_VEC_INLINE VecU16 float_to_bf16(VecF f) {
  const VecU u = (VecU)f;
  const VecU rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return __builtin_convertvector(vselect_u(f != f, VecU{} + 0x7FC0u, rounded), VecU16);
}

// Contiguous conversions into fp32 (loads) and from fp32 times `scale` (stores). The tails go through a
// lane-sized stack buffer so every element takes the same (vector) rounding path.
template <typename Elem, typename Vec, VecF (*ToFloat)(Vec)>
DDIM_FAST_VEC_INLINE void load_to_float(const Elem* src, float* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vstore(dst + j, ToFloat(vload<Vec>(src + j)));
  if (j < n) {
    Elem tail[kLanes] = {};
    float out[kLanes];
    std::memcpy(tail, src + j, (n - j) * sizeof(Elem));
    vstore(out, ToFloat(vload<Vec>(tail)));
    std::memcpy(dst + j, out, (n - j) * sizeof(float));
  }
}
template <typename Elem, typename Vec, Vec (*FromFloat)(VecF)>
DDIM_FAST_VEC_INLINE void store_scaled(const float* src, float scale, Elem* dst, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) vstore(dst + j, FromFloat(vload<VecF>(src + j) * scale));
  if (j < n) {
    float tail[kLanes] = {};
    Elem out[kLanes];
    std::memcpy(tail, src + j, (n - j) * sizeof(float));
    vstore(out, FromFloat(vload<VecF>(tail) * scale));
    std::memcpy(dst + j, out, (n - j) * sizeof(Elem));
  }
}
DDIM_FAST_VEC_INLINE VecF float_identity(VecF f) { return f; }

DDIM_FAST_SIMD_CLONES void half_row_to_float(const uint16_t* src, float* dst, int64_t n) {
  load_to_float<uint16_t, VecU16, half_to_float>(src, dst, n);
}
DDIM_FAST_SIMD_CLONES void bf16_row_to_float(const uint16_t* src, float* dst, int64_t n) {
  load_to_float<uint16_t, VecU16, bf16_to_float>(src, dst, n);
}
DDIM_FAST_SIMD_CLONES void store_row_scaled_float(const float* src, float scale, float* dst, int64_t n) {
  store_scaled<float, VecF, float_identity>(src, scale, dst, n);
}
DDIM_FAST_SIMD_CLONES void store_row_scaled_half(const float* src, float scale, uint16_t* dst, int64_t n) {
  store_scaled<uint16_t, VecU16, float_to_half>(src, scale, dst, n);
}
DDIM_FAST_SIMD_CLONES void store_row_scaled_bf16(const float* src, float scale, uint16_t* dst, int64_t n) {
  store_scaled<uint16_t, VecU16, float_to_bf16>(src, scale, dst, n);
}

// One logit vector in the reference's order: score * scale, then masked_fill(-FLT_MAX) / + mask.
template <MaskKind kMask>
DDIM_FAST_VEC_INLINE VecF logits_of(VecF scores, float scale, const uint8_t* keep, const float* bias) {
  const VecF x = scores * scale;
  if (kMask == MaskKind::kBool) {
    const VecI kept = __builtin_convertvector(vload<VecU8>(keep), VecI) != 0;
    return vselect(kept, x, vsplat(kMaskedLogit));
  } else if (kMask == MaskKind::kAdditive) {
    return x + vload<VecF>(bias);
  }
  return x;
}

// One row of the exact softmax, left unnormalized: s[j] <- exp(logit_j - max); returns the sum. Pass 1
// only finds the max; pass 2 recomputes the logits (cheaper than storing and reloading them) and
// exponentiates. 16 lane partial sums keep the summation chains short even at 4096 keys.
template <MaskKind kMask>
DDIM_FAST_VEC_INLINE float softmax_row_impl(float* s, int64_t n, float scale, const uint8_t* keep, const float* bias) {
  const int64_t full = n - n % kLanes, rest = n - full;
  // The tail goes through lane-sized stack copies (mask lanes past n are "keep"/0; they are dropped).
  float s_tail[kLanes] = {}, bias_tail[kLanes] = {};
  uint8_t keep_tail[kLanes] = {};
  std::memcpy(s_tail, s + full, rest * sizeof(float));
  if (kMask == MaskKind::kBool) std::memcpy(keep_tail, keep + full, rest);
  if (kMask == MaskKind::kAdditive) std::memcpy(bias_tail, bias + full, rest * sizeof(float));
  const VecI tail_lanes = lanes_below(rest);

  VecF row_max = vsplat(-__builtin_huge_valf());
  for (int64_t j = 0; j < full; j += kLanes) {
    const VecF x = logits_of<kMask>(vload<VecF>(s + j), scale, keep + j, bias + j);
    row_max = vselect(x > row_max, x, row_max);
  }
  if (rest > 0) {
    VecF x = logits_of<kMask>(vload<VecF>(s_tail), scale, keep_tail, bias_tail);
    x = vselect(tail_lanes, x, vsplat(-__builtin_huge_valf()));
    row_max = vselect(x > row_max, x, row_max);
  }
  const float shift = softmax_shift(hmax(row_max));

  VecF sum = vsplat(0.0f);
  for (int64_t j = 0; j < full; j += kLanes) {
    const VecF e = vexp_nonpositive(logits_of<kMask>(vload<VecF>(s + j), scale, keep + j, bias + j) - shift);
    vstore(s + j, e);
    sum += e;
  }
  if (rest > 0) {
    VecF e = vexp_nonpositive(logits_of<kMask>(vload<VecF>(s_tail), scale, keep_tail, bias_tail) - shift);
    e = vselect(tail_lanes, e, vsplat(0.0f));
    vstore(s_tail, e);
    std::memcpy(s + full, s_tail, rest * sizeof(float));
    sum += e;
  }
  return hsum(sum);
}

// s[0, n) holds raw scores q.k; `keep` (bool masks, 0/1 bytes) or `bias` (additive masks, fp32) are
// contiguous rows of length n, or null.
DDIM_FAST_SIMD_CLONES float softmax_row_unnormalized(float* s, int64_t n, float scale, const uint8_t* keep,
                                                     const float* bias) {
  if (keep != nullptr) return softmax_row_impl<MaskKind::kBool>(s, n, scale, keep, nullptr);
  if (bias != nullptr) return softmax_row_impl<MaskKind::kAdditive>(s, n, scale, nullptr, bias);
  return softmax_row_impl<MaskKind::kNone>(s, n, scale, nullptr, nullptr);
}

// The clones' ifunc resolvers are emitted at the end of the file, so -Wpsabi stays off from here on
// (no vector type crosses a call boundary: every vector helper is always_inline).

// Row of `len` elements at `src` with element stride `stride` -> contiguous fp32.
template <typename T>
void row_to_float(const T* src, int64_t stride, int64_t len, float* dst) {
  if (stride == 1) {
    if constexpr (std::is_same_v<T, float>) {
      std::memcpy(dst, src, len * sizeof(float));
    } else if constexpr (std::is_same_v<T, c10::Half>) {
      half_row_to_float(reinterpret_cast<const uint16_t*>(src), dst, len);
    } else {
      bf16_row_to_float(reinterpret_cast<const uint16_t*>(src), dst, len);
    }
    return;
  }
  for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<float>(src[c * stride]);
}

// Contiguous fp32 row times `scale` -> contiguous T row (dst may equal src for T = float).
template <typename T>
void store_row_scaled(const float* src, float scale, T* dst, int64_t len) {
  if constexpr (std::is_same_v<T, float>) {
    store_row_scaled_float(src, scale, dst, len);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    store_row_scaled_half(src, scale, reinterpret_cast<uint16_t*>(dst), len);
  } else {
    store_row_scaled_bf16(src, scale, reinterpret_cast<uint16_t*>(dst), len);
  }
}

// MKL's per-thread thread count (declared weak: null when torch's BLAS is not MKL). torch calls
// mkl_set_dynamic(false), so an sgemm issued from an at::parallel_for worker opens its own nested
// OpenMP team and the threads oversubscribe the cores and spin in barriers (measured: 100x slower on
// 2 loaded cores). Each worker pins MKL to one thread while it runs attention tasks.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local != nullptr ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);  // 0 = the global setting
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int previous_;
};

// An fp32 matrix view: `rows` rows of `cols` elements, `ld` elements apart, unit column stride.
struct MatF {
  float* data;
  int64_t rows, cols, ld;
};

at::Tensor wrap(const MatF& m) {
  return at::from_blob(m.data, {m.rows, m.cols}, {m.ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// c = a b^T (b_transposed) or a b, fp32, single-threaded inside a parallel region. ATen's CPU mm routes
// fp32 to the BLAS sgemm (MKL here) with the strides given, without copies.
void gemm_f32(const MatF& a, const MatF& b, bool b_transposed, const MatF& c) {
  at::Tensor bt = wrap(b);
  at::Tensor out = wrap(c);
  at::mm_out(out, wrap(a), b_transposed ? bt.t() : bt);
}

struct AttentionDims {
  int64_t sizes[4];  // [b0, b1, Lq, Lk] of the scores (leading dims padded with 1)
  int64_t head_dim;
  int64_t q_strides[4], k_strides[4], v_strides[4];  // [b0, b1, L, D]
};

void pad_qkv(const at::Tensor& t, int64_t* strides) {
  // t is [..., L, D] with 3 or 4 dims: view as [b0, b1, L, D].
  const int64_t pad = 4 - t.dim();
  for (int64_t d = 0; d < 4; ++d) strides[d] = d < pad ? 0 : t.stride(d - pad);
}

// Whether an fp32 [len, d] operand with these strides can go to the GEMM in place (BLAS needs a unit
// column stride and a row stride of at least d).
bool usable_in_place(bool is_float, int64_t len, int64_t d, int64_t row_stride, int64_t col_stride) {
  return is_float && (col_stride == 1 || d == 1) && (row_stride >= d || len == 1);
}

// Query rows per GEMM block: the fp32 score block (rows x Lk) is kept near 128 KiB so it stays in L2
// between the two softmax passes and the P V GEMM, with at least 16 rows (GEMM efficiency) and at most
// 256 (beyond that the per-call overhead is already negligible).
int64_t query_block_rows(int64_t lk) {
  return std::clamp<int64_t>((int64_t{32} << 10) / std::max<int64_t>(lk, 1), 16, 256);
}

template <typename T, MaskKind kMask>
void attention_cpu_kernel(const AttentionDims& dims, const SoftmaxParams& p, const T* q, const T* k, const T* v,
                          T* out) {
  constexpr bool kFloat = std::is_same_v<T, float>;
  const int64_t heads = dims.sizes[1], lq = dims.sizes[2], lk = dims.sizes[3], d = dims.head_dim;
  const int64_t batch_heads = dims.sizes[0] * heads;
  const int64_t block_rows = std::min(query_block_rows(lk), lq);
  // Chunks of query rows per head: enough tasks to keep every thread busy (4 per thread evens out the
  // tail), but no smaller than a block, since each task converts its head's K and V once.
  const int64_t blocks_per_head = (lq + block_rows - 1) / block_rows;
  const int64_t wanted = (4 * at::get_num_threads() + batch_heads - 1) / batch_heads;
  const int64_t chunks_per_head = std::clamp<int64_t>(wanted, 1, blocks_per_head);
  const int64_t chunk_rows = ((blocks_per_head + chunks_per_head - 1) / chunks_per_head) * block_rows;
  const int64_t tasks = batch_heads * chunks_per_head;

  const bool q_in_place = usable_in_place(kFloat, lq, d, dims.q_strides[2], dims.q_strides[3]);
  const bool k_in_place = usable_in_place(kFloat, lk, d, dims.k_strides[2], dims.k_strides[3]);
  const bool v_in_place = usable_in_place(kFloat, lk, d, dims.v_strides[2], dims.v_strides[3]);
  const int64_t mask_elem = kMask == MaskKind::kBool ? sizeof(bool) : sizeof(T);

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const SingleThreadedBlas single_threaded_blas;
    // Per-thread workspace, allocated once per thread's range of tasks.
    std::vector<float> k_buf(k_in_place ? 0 : lk * d), v_buf(v_in_place ? 0 : lk * d);
    std::vector<float> q_buf(q_in_place ? 0 : block_rows * d), o_buf(kFloat ? 0 : block_rows * d);
    std::vector<float> scores(block_rows * lk), bias_buf(kMask == MaskKind::kAdditive ? lk : 0);
    std::vector<uint8_t> keep_buf(kMask == MaskKind::kBool ? lk : 0);

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks_per_head;
      const int64_t chunk_begin = (task % chunks_per_head) * chunk_rows;
      const int64_t chunk_end = std::min(lq, chunk_begin + chunk_rows);
      if (chunk_begin >= chunk_end) continue;
      const int64_t b0 = bh / heads, b1 = bh % heads;
      const T* q_head = q + b0 * dims.q_strides[0] + b1 * dims.q_strides[1];
      const T* k_head = k + b0 * dims.k_strides[0] + b1 * dims.k_strides[1];
      const T* v_head = v + b0 * dims.v_strides[0] + b1 * dims.v_strides[1];

      // K and V as fp32 [Lk, D] row-major (in place when they already are).
      MatF k_mat{k_in_place ? const_cast<float*>(reinterpret_cast<const float*>(k_head)) : k_buf.data(), lk, d,
                 k_in_place ? std::max(dims.k_strides[2], d) : d};
      MatF v_mat{v_in_place ? const_cast<float*>(reinterpret_cast<const float*>(v_head)) : v_buf.data(), lk, d,
                 v_in_place ? std::max(dims.v_strides[2], d) : d};
      if (!k_in_place)
        for (int64_t j = 0; j < lk; ++j) row_to_float(k_head + j * dims.k_strides[2], dims.k_strides[3], d, k_buf.data() + j * d);
      if (!v_in_place)
        for (int64_t j = 0; j < lk; ++j) row_to_float(v_head + j * dims.v_strides[2], dims.v_strides[3], d, v_buf.data() + j * d);

      const char* cached_mask_row = nullptr;  // broadcast masks (q stride 0) are converted once
      for (int64_t q0 = chunk_begin; q0 < chunk_end; q0 += block_rows) {
        const int64_t rows = std::min(block_rows, chunk_end - q0);
        const T* q_rows = q_head + q0 * dims.q_strides[2];
        MatF q_mat{q_in_place ? const_cast<float*>(reinterpret_cast<const float*>(q_rows)) : q_buf.data(), rows, d,
                   q_in_place ? std::max(dims.q_strides[2], d) : d};
        if (!q_in_place)
          for (int64_t i = 0; i < rows; ++i)
            row_to_float(q_rows + i * dims.q_strides[2], dims.q_strides[3], d, q_buf.data() + i * d);

        // S = Q K^T (unscaled, like the reference's matmul).
        const MatF s_mat{scores.data(), rows, lk, lk};
        gemm_f32(q_mat, k_mat, /*b_transposed=*/true, s_mat);

        // Exact softmax of each full row, left unnormalized: exp(logit - max), sums kept per row.
        const int64_t row0 = bh * lq + q0;
        float inv_sums[256];
        for (int64_t i = 0; i < rows; ++i) {
          const uint8_t* keep = nullptr;
          const float* bias = nullptr;
          if (kMask != MaskKind::kNone) {
            const char* mask_row =
                static_cast<const char*>(p.mask) + softmax_row_offset(row0 + i, p.sizes, p.mask_strides) * mask_elem;
            const int64_t ms = p.mask_strides[3];
            if (kMask == MaskKind::kBool && ms == 1) {
              keep = reinterpret_cast<const uint8_t*>(mask_row);  // torch bools are 0/1 bytes
            } else if (kMask == MaskKind::kAdditive && kFloat && ms == 1) {
              bias = reinterpret_cast<const float*>(mask_row);
            } else {
              if (mask_row != cached_mask_row) {
                for (int64_t j = 0; j < lk; ++j) {
                  if (kMask == MaskKind::kBool) {
                    keep_buf[j] = reinterpret_cast<const bool*>(mask_row)[j * ms] ? 1 : 0;
                  } else {
                    bias_buf[j] = static_cast<float>(reinterpret_cast<const T*>(mask_row)[j * ms]);
                  }
                }
                cached_mask_row = mask_row;
              }
              keep = kMask == MaskKind::kBool ? keep_buf.data() : nullptr;
              bias = kMask == MaskKind::kAdditive ? bias_buf.data() : nullptr;
            }
          }
          // 1/0 = inf for rows of -inf logits (additive -inf masks): 0 * inf = NaN, as in PyTorch.
          inv_sums[i] = 1.0f / softmax_row_unnormalized(scores.data() + i * lk, lk, p.scale, keep, bias);
        }

        // O = P V, then each row times 1/sum, stored in T (fp32: the GEMM writes the output directly).
        T* out_rows = out + row0 * d;
        const MatF o_mat{kFloat ? reinterpret_cast<float*>(out_rows) : o_buf.data(), rows, d, d};
        gemm_f32(s_mat, v_mat, /*b_transposed=*/false, o_mat);
        for (int64_t i = 0; i < rows; ++i) store_row_scaled(o_mat.data + i * d, inv_sums[i], out_rows + i * d, d);
      }
    }
  });
}

template <typename T>
void attention_cpu_for_dtype(const AttentionDims& dims, const SoftmaxParams& p, const at::Tensor& q,
                             const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  const T* qp = static_cast<const T*>(q.data_ptr());
  const T* kp = static_cast<const T*>(k.data_ptr());
  const T* vp = static_cast<const T*>(v.data_ptr());
  T* op = static_cast<T*>(out.data_ptr());
  switch (p.mask_kind) {
    case MaskKind::kBool:
      return attention_cpu_kernel<T, MaskKind::kBool>(dims, p, qp, kp, vp, op);
    case MaskKind::kAdditive:
      return attention_cpu_kernel<T, MaskKind::kAdditive>(dims, p, qp, kp, vp, op);
    default:
      return attention_cpu_kernel<T, MaskKind::kNone>(dims, p, qp, kp, vp, op);
  }
}

}  // namespace

// Shape/dtype/device checks of attention(q, k, v, scale, mask), shared with the Python wrapper's rules.
void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const char* op = "attention";
  scalar_kind_of(q, op, "q");
  TORCH_CHECK_VALUE(q.dim() == 3 || q.dim() == 4, op, ": q must be [B, H, Lq, D] or [B*H, Lq, D], got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == q.dim() && v.dim() == q.dim(), op, ": k and v must have q's ", q.dim(),
                    " dims, got k ", k.sizes(), " and v ", v.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), op,
                    ": q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  for (int64_t d = 0; d < q.dim() - 2; ++d) {
    TORCH_CHECK_VALUE(k.size(d) == q.size(d) && v.size(d) == q.size(d), op,
                      ": k and v must have q's leading (batch/head) dims ", q.sizes().slice(0, q.dim() - 2),
                      " (nothing is broadcast), got k ", k.sizes(), " and v ", v.sizes());
  }
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1) && v.size(-1) == q.size(-1), op,
                    ": q, k and v must have one head dim D, got ", q.size(-1), ", ", k.size(-1), ", ", v.size(-1));
  TORCH_CHECK_VALUE(k.size(-2) == v.size(-2), op, ": k and v must have the same number of keys, got ",
                    k.size(-2), " and ", v.size(-2));
}

namespace {

at::Tensor attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                         const std::optional<at::Tensor>& mask) {
  check_attention_inputs(q, k, v);
  const float checked_scale = checked_softmax_scale("attention", scale);
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention: q must be a CPU tensor here");
  std::vector<int64_t> score_sizes(q.sizes().begin(), q.sizes().end());
  score_sizes.back() = k.size(-2);  // [..., Lq, Lk]
  SoftmaxParams p;
  fill_softmax_mask("attention", mask, score_sizes, q.scalar_type(), q.device(), p);
  p.scale = checked_scale;
  p.dtype = scalar_kind_of(q, "attention", "q");

  AttentionDims dims;
  const int64_t pad = 4 - q.dim();
  for (int64_t d = 0; d < 4; ++d) dims.sizes[d] = d < pad ? 1 : score_sizes[d - pad];
  for (int d = 0; d < 4; ++d) p.sizes[d] = dims.sizes[d];
  dims.head_dim = q.size(-1);
  pad_qkv(q, dims.q_strides);
  pad_qkv(k, dims.k_strides);
  pad_qkv(v, dims.v_strides);

  if (dims.sizes[3] == 0) return at::zeros(q.sizes(), q.options());  // softmax over no keys . empty V
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (out.numel() == 0) return out;
  switch (p.dtype) {
    case ScalarKind::kFloat16:
      attention_cpu_for_dtype<c10::Half>(dims, p, q, k, v, out);
      break;
    case ScalarKind::kBFloat16:
      attention_cpu_for_dtype<c10::BFloat16>(dims, p, q, k, v, out);
      break;
    default:
      attention_cpu_for_dtype<float>(dims, p, q, k, v, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("scaled_masked_softmax", &scaled_masked_softmax_cpu);
  m.impl("scaled_masked_softmax_", &scaled_masked_softmax_inplace_cpu);
  m.impl("attention", &attention_cpu);
}

}  // namespace ddim_fast
