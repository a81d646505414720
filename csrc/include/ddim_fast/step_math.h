// The DDIM update for one element, in fp32, shared by the CPU and CUDA kernels (the Triton kernel
// mirrors it). The tests hold it to an independent float64 formula (tests/oracles.py).
//
// Coefficient table layout: one fp32 row per step the table describes, chosen by the op's `row` argument
// (the ldm sampler's tables have one row per sampling step, in the order the steps run; the diffusers
// schedulers' have one row per training timestep t, the step that starts at t). Built by
// ddim_fast/schedule.py, which mirrors these column numbers:
#pragma once

#include <cstdint>
#include <cmath>

#include "ddim_fast/macros.h"

namespace ddim_fast {

enum TableColumn : int {
  kColTimestep = 0,          // the model timestep t of this row (exact for t < 2^24)
  kColSqrtAlpha = 1,         // sqrt(a_t)
  kColSqrtOneMinusAlpha = 2, // sqrt(1 - a_t)
  kColSqrtAlphaPrev = 3,     // sqrt(a_prev)             (a_next for inversion)
  kColDirCoef = 4,           // sqrt(1 - a_prev - sigma^2)
  kColSigma = 5,             // sigma_t                  (0 for inversion)
  kColAlpha = 6,             // a_t        (for callers; unused by the step)
  kColAlphaPrev = 7,         // a_prev     (for callers; unused by the step)
  kTableColumns = 8,
};

enum class Prediction : int { kEpsilon = 0, kVPrediction = 1, kSample = 2 };

// What happens to x0_hat after it is predicted.
enum class X0Clamp : int {
  kNone = 0,
  kStatic = 1,   // clamp to [-clip_range, clip_range] (diffusers clip_sample)
  kDynamic = 2,  // clamp to [-s, s] then divide by s, s per sample (dynamic thresholding)
};

// The per-step scalars, read from one table row (and the temperature) once per thread.
struct StepCoefs {
  float sqrt_alpha;
  float sqrt_one_minus_alpha;
  float sqrt_alpha_prev;
  float dir_coef;
  float noise_coef;  // sigma_t * temperature
};

DDIM_HD StepCoefs load_step_coefs(const float* row, float temperature) {
  StepCoefs k;
  k.sqrt_alpha = row[kColSqrtAlpha];
  k.sqrt_one_minus_alpha = row[kColSqrtOneMinusAlpha];
  k.sqrt_alpha_prev = row[kColSqrtAlphaPrev];
  k.dir_coef = row[kColDirCoef];
  k.noise_coef = row[kColSigma] * temperature;
  return k;
}

// Classifier-free guidance, unconditional half first (as ldm and diffusers order the batch).
DDIM_HD float guidance_combine(float m_uncond, float m_cond, float scale) {
  return m_uncond + scale * (m_cond - m_uncond);
}

// model output m -> (x0_hat, eps_hat). Same operation order as ldm/diffusers so fp32 results track them.
template <Prediction P>
DDIM_HD void predict_x0_eps(float x, float m, const StepCoefs& k, float* x0, float* eps) {
  if (P == Prediction::kEpsilon) {
    *eps = m;
    *x0 = (x - k.sqrt_one_minus_alpha * m) / k.sqrt_alpha;
  } else if (P == Prediction::kVPrediction) {
    *x0 = k.sqrt_alpha * x - k.sqrt_one_minus_alpha * m;
    *eps = k.sqrt_alpha * m + k.sqrt_one_minus_alpha * x;
  } else {
    *x0 = m;
    *eps = (x - k.sqrt_alpha * m) / k.sqrt_one_minus_alpha;
  }
}

// Clamp x0_hat; `threshold` is the per-sample s of dynamic thresholding (ignored otherwise).
// Comparisons rather than fminf/fmaxf: a NaN x0 stays NaN (as torch.clamp keeps it; fmaxf would turn it
// into -clip), and the CPU loop still vectorizes (it does not with fminf/fmaxf).
DDIM_HD float clamp_symmetric(float v, float c) { return v < -c ? -c : (v > c ? c : v); }

DDIM_HD float clamp_x0(float x0, X0Clamp mode, float clip_range, float threshold) {
  if (mode == X0Clamp::kStatic) {
    return clamp_symmetric(x0, clip_range);
  }
  if (mode == X0Clamp::kDynamic) {
    return clamp_symmetric(x0, threshold) / threshold;
  }
  return x0;
}

// eps re-derived from a clamped x0_hat (diffusers' use_clipped_model_output).
DDIM_HD float eps_from_x0(float x, float x0, const StepCoefs& k) {
  return (x - k.sqrt_alpha * x0) / k.sqrt_one_minus_alpha;
}

// x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma T z
DDIM_HD float ddim_update(float x0, float eps, float z, const StepCoefs& k) {
  return k.sqrt_alpha_prev * x0 + k.dir_coef * eps + k.noise_coef * z;
}

}  // namespace ddim_fast
