// C++ CPU kernel of ddim_fast::ddim_step: one pass over memory, one at::parallel_for region whose threads
// take fixed-size element chunks from a shared counter, fp32 math for every storage dtype. Work is done in
// blocks of kBlock elements: a load stage gives fp32 pointers (straight into the tensors for fp32 in memory
// order, else gathered/converted into stack buffers), a branch-free compute loop the compiler vectorizes,
// and a store stage.
// Memory order (DdimStepParams::flat) covers row-major contiguous tensors and dense tensors that share one
// layout (channels_last latents): ranges are then ranges of memory, walked like a contiguous tensor.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../ddim_step_args.h"
#include "ddim_fast/philox.h"
#include "ddim_fast/step_math.h"
#include "ddim_fast/step_params.h"

namespace ddim_fast {
namespace {

constexpr int64_t kBlock = 256;
// Elements per thread of the parallel region: large enough that thread start-up is amortized (a 4x64x64
// latent runs on the calling thread alone).
constexpr int64_t kGrain = 1 << 15;
// Elements per chunk handed out inside the region (a multiple of kBlock, so blocks start at the same
// positions however the work is split: the results are bit-identical for any thread count).
constexpr int64_t kChunk = 1 << 14;

// Walks row-major logical indices and keeps each argument's element offset in step with them.
struct OffsetWalker {
  static constexpr int kArgs = 6;  // x, uncond, cond, noise, out, pred_x0
  int ndim;
  const int64_t* sizes;
  const int64_t* strides[kArgs];
  int64_t index[kMaxDims];
  int64_t offset[kArgs];

  OffsetWalker(const DdimStepParams& p, int64_t start) : ndim(p.ndim), sizes(p.sizes) {
    const StridedArg* args[kArgs] = {&p.x, &p.model_uncond, &p.model_cond, &p.noise, &p.out, &p.pred_x0};
    for (int a = 0; a < kArgs; ++a) {
      strides[a] = args[a]->strides;
      offset[a] = 0;
    }
    int64_t rest = start;
    for (int d = ndim - 1; d >= 0; --d) {
      index[d] = rest % sizes[d];
      rest /= sizes[d];
      for (int a = 0; a < kArgs; ++a) offset[a] += index[d] * strides[a][d];
    }
  }

  void advance() {
    for (int d = ndim - 1; d >= 0; --d) {
      if (++index[d] < sizes[d]) {
        for (int a = 0; a < kArgs; ++a) offset[a] += strides[a][d];
        return;
      }
      index[d] = 0;
      for (int a = 0; a < kArgs; ++a) offset[a] -= strides[a][d] * (sizes[d] - 1);
    }
  }
};

template <typename T>
inline float to_float(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T from_float(float v) {
  return static_cast<T>(v);
}

// Block conversions of the memory-order path: storage dtype <-> fp32 over n consecutive elements. The
// generic loops vectorize for bf16 (bit shifts) but not for fp16, whose portable c10::Half conversion is a
// branchy bit manipulation (measured: fp16 7x slower than fp32 at 16x4x128x128). x86 CPUs with F16C convert 8
// halves per instruction; those functions are compiled for F16C alone (target attribute) and picked at run
// time, so the build still runs on any x86-64. Both conversions give the same bits: fp16 -> fp32 is exact,
// fp32 -> fp16 rounds to nearest even in both (NaN payloads aside).
template <typename T>
void load_block(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}
template <typename T>
void store_block(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i].x);
}

__attribute__((target("avx,f16c"))) void float_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i].x = _cvtss_sh(src[i], _MM_FROUND_TO_NEAREST_INT);
}

const bool kHasF16C = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");

template <>
void load_block<c10::Half>(const c10::Half* src, float* dst, int64_t n) {
  if (kHasF16C) {
    half_to_float_f16c(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
  }
}
template <>
void store_block<c10::Half>(const float* src, c10::Half* dst, int64_t n) {
  if (kHasF16C) {
    float_to_half_f16c(src, dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = from_float<c10::Half>(src[i]);
  }
}
#endif

// The fp32 compute loop over one block. Loop-invariant options are template parameters or hoisted
// so the body is straight-line code.
template <Prediction P, bool kGuided, X0Clamp kClamp>
void compute_block(const DdimStepParams& p, const StepCoefs& coefs, int64_t n, const float* x, const float* mu,
                   const float* mc, const float* z, const float* thr, float* x_prev, float* x0_out) {
  // A local copy: through the reference, stores to x_prev could alias the coefficients, which stops the
  // compiler from vectorizing (measured: 3.4x slower at 16x4x128x128).
  const StepCoefs k = coefs;
  const float scale = p.guidance_scale;
  const float clip = p.clip_range;
  const bool reuse_clipped = kClamp != X0Clamp::kNone && p.use_clipped_model_output;
  // Inputs never alias outputs except out == x element for element (checked by the bindings), which a
  // vectorized read-then-write of the same index keeps correct.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float m = kGuided ? guidance_combine(mu[i], mc[i], scale) : mu[i];
    float x0, eps;
    predict_x0_eps<P>(x[i], m, k, &x0, &eps);
    if (kClamp != X0Clamp::kNone) {
      x0 = clamp_x0(x0, kClamp, clip, kClamp == X0Clamp::kDynamic ? thr[i] : 0.0f);
      if (reuse_clipped) eps = eps_from_x0(x[i], x0, k);
    }
    x_prev[i] = ddim_update(x0, eps, z[i], k);
    x0_out[i] = x0;
  }
}

using ComputeFn = void (*)(const DdimStepParams&, const StepCoefs&, int64_t, const float*, const float*,
                           const float*, const float*, const float*, float*, float*);

template <Prediction P, bool kGuided>
ComputeFn pick_clamp(X0Clamp c) {
  switch (c) {
    case X0Clamp::kStatic:
      return &compute_block<P, kGuided, X0Clamp::kStatic>;
    case X0Clamp::kDynamic:
      return &compute_block<P, kGuided, X0Clamp::kDynamic>;
    default:
      return &compute_block<P, kGuided, X0Clamp::kNone>;
  }
}

template <Prediction P>
ComputeFn pick_guided(const DdimStepParams& p) {
  return p.guided ? pick_clamp<P, true>(p.clamp) : pick_clamp<P, false>(p.clamp);
}

ComputeFn pick_compute(const DdimStepParams& p) {
  switch (p.prediction) {
    case Prediction::kVPrediction:
      return pick_guided<Prediction::kVPrediction>(p);
    case Prediction::kSample:
      return pick_guided<Prediction::kSample>(p);
    default:
      return pick_guided<Prediction::kEpsilon>(p);
  }
}

// Seeded normals for logical (row-major) elements [start, start + n), with the stream mapping of philox.h:
// one stream over the tensor (rng_state [2]) or one per batch row (rng_state [B, 2]; the group index then
// restarts at 0 in every row, so a row's noise does not depend on where the row sits in the batch).
// One Philox call serves the (up to) 4 consecutive elements of a group.
void fill_philox_normals(const DdimStepParams& p, uint64_t table_row, int64_t start, int64_t n, float* z) {
  int64_t row = 0;
  int64_t j = start;  // index within the current stream
  if (p.rng_per_row) {
    row = start / p.sample_numel;
    j = start - row * p.sample_numel;
  }
  uint64_t seed, offset;
  philox_stream(p.rng, row, table_row, &seed, &offset);
  float group_normals[4];
  int64_t cached_group = -1;
  for (int64_t i = 0; i < n; ++i, ++j) {
    if (p.rng_per_row && j == p.sample_numel) {  // the next row: its own stream, from group 0
      j = 0;
      ++row;
      philox_stream(p.rng, row, table_row, &seed, &offset);
      cached_group = -1;
    }
    const int64_t group = j >> 2;
    if (group != cached_group) {
      philox_normal4(seed, offset, static_cast<uint64_t>(group), group_normals);
      cached_group = group;
    }
    z[i] = group_normals[j & 3];
  }
}

template <typename scalar_t>
void run_range(const DdimStepParams& p, const StepCoefs& k, ComputeFn compute, uint64_t table_row, int64_t begin,
               int64_t end) {
  constexpr bool kDirectFloat = std::is_same<scalar_t, float>::value;
  // Memory order: positions start .. start + n of every argument (row-major contiguous, or dense with one
  // shared layout such as channels_last; see DdimStepParams::flat). Else the strided gather/scatter walk.
  const bool contiguous = p.flat;
  const bool has_noise_tensor = p.noise.data != nullptr;
  const bool has_rng = !has_noise_tensor && p.rng != nullptr;
  const bool want_x0 = p.pred_x0.data != nullptr;

  const auto* x_ptr = static_cast<const scalar_t*>(p.x.data);
  const auto* mu_ptr = static_cast<const scalar_t*>(p.model_uncond.data);
  const auto* mc_ptr = static_cast<const scalar_t*>(p.model_cond.data);
  const auto* noise_ptr = static_cast<const scalar_t*>(p.noise.data);
  auto* out_ptr = static_cast<scalar_t*>(const_cast<void*>(p.out.data));
  auto* x0_ptr = static_cast<scalar_t*>(const_cast<void*>(p.pred_x0.data));

  alignas(64) float xb[kBlock], mub[kBlock], mcb[kBlock], zb[kBlock], thrb[kBlock], outb[kBlock], x0b[kBlock];
  std::fill(zb, zb + kBlock, 0.0f);  // stays zero when there is no noise at all

  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t n = std::min(kBlock, end - start);
    const float *xs, *mus, *mcs = mcb, *zs = zb;
    float* outs = outb;
    float* x0s = x0b;

    if (contiguous) {
      if constexpr (kDirectFloat) {
        // fp32 contiguous: compute straight from and into the tensors, no staging copies.
        xs = x_ptr + start;
        mus = mu_ptr + start;
        if (p.guided) mcs = mc_ptr + start;
        if (has_noise_tensor) zs = noise_ptr + start;
        outs = out_ptr + start;
        if (want_x0) x0s = x0_ptr + start;
      } else {
        load_block(x_ptr + start, xb, n);
        load_block(mu_ptr + start, mub, n);
        if (p.guided) load_block(mc_ptr + start, mcb, n);
        if (has_noise_tensor) load_block(noise_ptr + start, zb, n);
        xs = xb;
        mus = mub;
      }
    } else {
      OffsetWalker w(p, start);
      for (int64_t i = 0; i < n; ++i, w.advance()) {
        xb[i] = to_float(x_ptr[w.offset[0]]);
        mub[i] = to_float(mu_ptr[w.offset[1]]);
        if (p.guided) mcb[i] = to_float(mc_ptr[w.offset[2]]);
        if (has_noise_tensor) zb[i] = to_float(noise_ptr[w.offset[3]]);
      }
      xs = xb;
      mus = mub;
    }
    if (has_rng) {
      // Only reached with logical positions: the flat path draws Philox noise only when row-major.
      fill_philox_normals(p, table_row, start, n, zb);
      zs = zb;
    }
    if (p.clamp == X0Clamp::kDynamic) {
      // The sample of position start + i: logical, or in memory order with the batch dim outermost.
      int64_t sample = start / p.sample_numel;
      int64_t next_sample_at = (sample + 1) * p.sample_numel;
      for (int64_t i = 0; i < n; ++i) {
        if (start + i == next_sample_at) {
          ++sample;
          next_sample_at += p.sample_numel;
        }
        thrb[i] = p.x0_threshold[sample];
      }
    }

    compute(p, k, n, xs, mus, mcs, zs, thrb, outs, x0s);

    if (contiguous) {
      if constexpr (!kDirectFloat) {
        store_block(outb, out_ptr + start, n);
        if (want_x0) store_block(x0b, x0_ptr + start, n);
      }
    } else {
      OffsetWalker w(p, start);
      for (int64_t i = 0; i < n; ++i, w.advance()) {
        out_ptr[w.offset[4]] = from_float<scalar_t>(outb[i]);
        if (want_x0) x0_ptr[w.offset[5]] = from_float<scalar_t>(x0b[i]);
      }
    }
  }
}

void run_ddim_step_cpu(const DdimStepParams& p) {
  if (p.numel == 0) return;
  const int64_t table_row = *p.table_row;
  TORCH_CHECK_INDEX(table_row >= 0 && table_row < p.num_rows, "ddim_step: row index ", table_row,
                    " is outside the coefficient table's ", p.num_rows, " rows");
  const StepCoefs k = load_step_coefs(p.table + table_row * kTableColumns, p.temperature);
  // The Philox counter's high half is offset + row (philox_stream), so each row draws fresh noise.
  const ComputeFn compute = pick_compute(p);
  const auto run = [&](int64_t begin, int64_t end) {
    switch (p.dtype) {
      case ScalarKind::kFloat16:
        run_range<c10::Half>(p, k, compute, static_cast<uint64_t>(table_row), begin, end);
        break;
      case ScalarKind::kBFloat16:
        run_range<c10::BFloat16>(p, k, compute, static_cast<uint64_t>(table_row), begin, end);
        break;
      default:
        run_range<float>(p, k, compute, static_cast<uint64_t>(table_row), begin, end);
    }
  };
  // One parallel region on torch's own OpenMP pool (the extension's GOMP symbols bind to the libgomp torch
  // loaded), with as many threads as at::parallel_for(0, numel, kGrain) would use, the work handed out in
  // kChunk pieces rather than one fixed range per thread. The region ends when its last thread does: with
  // more runnable threads than cores (a busy neighbour process, libgomp's workers spinning between
  // regions), one of them is often off the CPU for a scheduler tick while the other waits at the closing
  // barrier. With fixed ranges the late thread still has its whole range to do when it returns; with
  // chunks the running thread has taken what the late one had not started. That shortens such stalls; it
  // cannot remove them (the barrier still waits for the late thread). Measured: docs/design.md, "CPU threads".
  const int64_t chunks = (p.numel + kChunk - 1) / kChunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (p.numel + kGrain - 1) / kGrain);
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // Every thread (or the caller alone, when at::parallel_for runs inline) takes chunks until none is left.
    for (int64_t c = next_chunk.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next_chunk.fetch_add(1, std::memory_order_relaxed)) {
      run(c * kChunk, std::min(p.numel, (c + 1) * kChunk));
    }
  });
}

void ddim_step_out_cpu(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& table,
                       const at::Tensor& row, std::optional<double> guidance_scale,
                       c10::string_view prediction_type, std::optional<double> clip_range,
                       const std::optional<at::Tensor>& x0_threshold, bool use_clipped_model_output,
                       const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& rng_state,
                       double temperature, const at::Tensor& out, const std::optional<at::Tensor>& pred_x0_out) {
  const StepOptions o = make_step_options(guidance_scale, prediction_type, clip_range, x0_threshold,
                                          use_clipped_model_output, noise, rng_state, temperature);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "ddim_step (CPU kernel): x must be a CPU tensor, got ", x.device());
  run_ddim_step_cpu(make_ddim_step_params(x, model_output, table, row, o, out, pred_x0_out));
}

std::tuple<at::Tensor, at::Tensor> ddim_step_cpu(const at::Tensor& x, const at::Tensor& model_output,
                                                 const at::Tensor& table, const at::Tensor& row,
                                                 std::optional<double> guidance_scale,
                                                 c10::string_view prediction_type, std::optional<double> clip_range,
                                                 const std::optional<at::Tensor>& x0_threshold,
                                                 bool use_clipped_model_output,
                                                 const std::optional<at::Tensor>& noise,
                                                 const std::optional<at::Tensor>& rng_state, double temperature,
                                                 bool return_pred_x0) {
  auto [out, pred_x0] = allocate_ddim_step_outputs(x, return_pred_x0);
  ddim_step_out_cpu(x, model_output, table, row, guidance_scale, prediction_type, clip_range, x0_threshold,
                    use_clipped_model_output, noise, rng_state, temperature, out,
                    return_pred_x0 ? std::optional<at::Tensor>(pred_x0) : std::nullopt);
  return {out, pred_x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(ddim_fast, CPU, m) {
  m.impl("ddim_step", &ddim_step_cpu);
  m.impl("ddim_step_out", &ddim_step_out_cpu);
}

}  // namespace ddim_fast
