// The plain-C++ description of one ddim_step launch. The torch bindings (CPU and CUDA) fill it from
// tensors; the kernels read only this, so the CUDA kernel compiles without any torch header.
#pragma once

#include <cstdint>

#include "ddim_fast/step_math.h"

namespace ddim_fast {

constexpr int kMaxDims = 8;

enum class ScalarKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A tensor argument: base pointer (storage offset applied) and element strides over the shared sizes.
struct StridedArg {
  const void* data = nullptr;
  int64_t strides[kMaxDims] = {};
};

struct DdimStepParams {
  // Logical shape of x (and of every per-element argument), row-major order defines element index i.
  int ndim = 0;
  int64_t sizes[kMaxDims] = {};
  int64_t numel = 0;
  int64_t sample_numel = 0;  // numel / sizes[0]: elements per batch item (dynamic thresholding)

  ScalarKind dtype = ScalarKind::kFloat32;  // storage dtype of x, model_output, noise, outputs

  StridedArg x;
  StridedArg model_uncond;  // model_output[:B] with guidance, else the whole model_output
  StridedArg model_cond;    // model_output[B:]; data == nullptr without guidance
  StridedArg noise;         // data == nullptr when no noise tensor
  StridedArg out;           // written
  StridedArg pred_x0;       // written; data == nullptr when nobody asked for pred_x0

  // The memory-order ("flat") path: true when every present argument holds the element at flat position k
  // (0 <= k < numel) at data + k, for one and the same element across the arguments, and k tells the kernel
  // all it needs about the element's logical position. Set by the binding when
  //   * every argument is row-major contiguous (k is the logical index i), or
  //   * every argument is dense (non-overlapping, no gaps) with x's strides (channels_last and other
  //     permutations), no Philox noise is drawn (its mapping needs the logical index, which k is not), and,
  //     with dynamic thresholding, the batch dim is outermost in memory (the sample is k / sample_numel).
  // Otherwise the kernels walk logical indices through sizes/strides (the strided paths).
  bool flat = false;

  const float* table = nullptr;  // [num_rows, kTableColumns], contiguous
  int64_t num_rows = 0;
  const int64_t* table_row = nullptr;  // one element: the index of the table row to use (the op's `row`)

  // Seeded noise (used when noise.data == nullptr and rng != nullptr), see philox.h for the mapping:
  // rng_state [2]: rng[0] = seed, rng[1] = offset, one stream over the tensor (rng_per_row false);
  // rng_state [B, 2]: rng[2b] = seed_b, rng[2b + 1] = offset_b, one stream per batch row (rng_per_row true).
  const int64_t* rng = nullptr;
  bool rng_per_row = false;

  const float* x0_threshold = nullptr;  // [sizes[0]] fp32, with X0Clamp::kDynamic

  bool guided = false;
  float guidance_scale = 1.0f;
  Prediction prediction = Prediction::kEpsilon;
  X0Clamp clamp = X0Clamp::kNone;
  float clip_range = 1.0f;
  bool use_clipped_model_output = false;
  float temperature = 1.0f;
};

}  // namespace ddim_fast
