// Header-only math of ddim_fast::scaled_masked_softmax and ddim_fast::attention shared by the C++ CPU
// kernels and the CUDA kernel: the launch description (plain C++, no torch), the mask rule and the
// online-softmax (running max, running sum) update. Everything is computed in fp32.
#pragma once

#include <cstdint>

#include "ddim_fast/macros.h"
#include "ddim_fast/step_params.h"  // ScalarKind

namespace ddim_fast {

// How a mask enters the logits. Boolean masks follow ldm's masked_fill: masked logits become
// -FLT_MAX (not -inf), so a fully masked row softmaxes to a uniform row instead of NaN. Additive
// (float) masks are added to the scaled scores, diffusers/SDPA style (-inf there gives NaN rows, as
// in PyTorch).
enum class MaskKind : int { kNone = 0, kBool = 1, kAdditive = 2 };

// -FLT_MAX spelled out so the header needs neither <cfloat> on device nor std::numeric_limits.
constexpr float kMaskedLogit = -3.40282346638528859811704183484516925440e+38f;

// Scores, output and mask are viewed as 4-D [b0, b1, Lq, Lk] (leading dims padded with size 1). A
// mask broadcast over a dim has stride 0 there; that is how key-padding masks [b, 1, 1, Lk] reach
// every head and query without a copy. Strides are in elements.
struct SoftmaxParams {
  const void* in = nullptr;
  void* out = nullptr;  // may equal `in` (the in-place op): every kernel reads a row before writing it
  const void* mask = nullptr;
  MaskKind mask_kind = MaskKind::kNone;
  ScalarKind dtype = ScalarKind::kFloat32;  // of in, out and an additive mask
  int64_t sizes[4] = {1, 1, 1, 0};
  int64_t in_strides[4] = {};
  int64_t out_strides[4] = {};
  int64_t mask_strides[4] = {};
  int64_t rows = 0;  // sizes[0] * sizes[1] * sizes[2], at most kMaxSoftmaxRows
  float scale = 1.0f;
};

// Largest number of rows a launch may have: row indices are decomposed with 32-bit division (64-bit
// division is a slow subroutine call on the GPU); element offsets stay 64-bit.
constexpr int64_t kMaxSoftmaxRows = 2147483647;

// Element offset of the start of row `row` (row-major over sizes[0..2]) for the given strides.
DDIM_HD int64_t softmax_row_offset(int64_t row, const int64_t* sizes, const int64_t* strides) {
  const uint32_t r = static_cast<uint32_t>(row);
  const uint32_t lq = static_cast<uint32_t>(sizes[2]);
  const uint32_t heads = static_cast<uint32_t>(sizes[1]);
  const uint32_t q = r % lq;
  const uint32_t rest = r / lq;
  const uint32_t b1 = rest % heads;
  const uint32_t b0 = rest / heads;
  return static_cast<int64_t>(b0) * strides[0] + static_cast<int64_t>(b1) * strides[1] +
         static_cast<int64_t>(q) * strides[2];
}

// The scaled, masked logit of one element, in the order the reference computes it:
// (score * scale), then masked_fill / + mask.
DDIM_HD float masked_logit_bool(float score, float scale, bool keep) {
  return keep ? score * scale : kMaskedLogit;
}
DDIM_HD float masked_logit_additive(float score, float scale, float add) { return score * scale + add; }

// The exponent shift for a row whose running max is `m`: a row that so far holds only -inf (float
// masks) would give exp(-inf - -inf) = NaN; shifting by 0 gives exp(-inf) = 0 instead, so later finite
// logits still produce the right answer.
DDIM_HD float softmax_shift(float m) { return (m == -__builtin_huge_valf()) ? 0.0f : m; }

// Online softmax state of a set of logits: m = max, s = sum(exp(x - m)).
struct OnlineSoftmax {
  float m;
  float s;
};

DDIM_HD OnlineSoftmax online_softmax_init() { return OnlineSoftmax{-__builtin_huge_valf(), 0.0f}; }

DDIM_HD float fast_expf(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);  // full-precision expf: the fp32 contract is 1e-6 relative
#else
  return __builtin_expf(x);
#endif
}

DDIM_HD float fmax_f(float a, float b) { return a > b ? a : b; }

// Adds one logit to the state.
DDIM_HD void online_softmax_add(OnlineSoftmax& st, float x) {
  const float m_new = fmax_f(st.m, x);
  const float shift = softmax_shift(m_new);
  st.s = st.s * fast_expf(st.m - shift) + fast_expf(x - shift);
  st.m = m_new;
}

// Merges two states (for tree reductions: warp shuffles, block reductions, CPU partials).
DDIM_HD OnlineSoftmax online_softmax_merge(OnlineSoftmax a, OnlineSoftmax b) {
  const float m_new = fmax_f(a.m, b.m);
  const float shift = softmax_shift(m_new);
  return OnlineSoftmax{m_new, a.s * fast_expf(a.m - shift) + b.s * fast_expf(b.m - shift)};
}

}  // namespace ddim_fast
