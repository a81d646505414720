#include "ddim_step_args.h"

#include "tensor_checks.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace ddim_fast {
namespace {

void check_like_x(const at::Tensor& x, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), "ddim_step: ", name, " must be on x's device ", x.device(),
                    ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), "ddim_step: ", name, " must have x's dtype ",
                   x.scalar_type(), ", got ", t.scalar_type(), " (ddim_fast.ops.ddim_step casts for you)");
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), "ddim_step: ", name, " must have x's shape ", x.sizes(),
                    ", got ", t.sizes(), " (nothing is broadcast)");
}

// A tensor's data pointer, or nullptr for a meta tensor (no data): the checks then run on shapes and strides
// alone, which is what the ddim_step_check op needs for layouts it is asked about without data.
template <typename T = void>
const T* pointer_of(const at::Tensor& t) {
  return t.is_meta() ? nullptr : static_cast<const T*>(t.data_ptr());
}

StridedArg strided_arg(const at::Tensor& t) {
  StridedArg a;
  a.data = pointer_of(t);
  for (int64_t d = 0; d < t.dim(); ++d) a.strides[d] = t.stride(d);
  return a;
}

Prediction parse_prediction(const std::string& name) {
  if (name == "epsilon") return Prediction::kEpsilon;
  if (name == "v_prediction") return Prediction::kVPrediction;
  if (name == "sample") return Prediction::kSample;
  TORCH_CHECK_VALUE(false, "ddim_step: prediction_type must be 'epsilon', 'v_prediction' or 'sample', got '",
                    name, "'");
}

void check_written_arg(const at::Tensor& x, const at::Tensor& written, const char* name,
                       const at::Tensor& model_output, const std::optional<at::Tensor>& noise) {
  check_like_x(x, written, name);
  TORCH_CHECK_VALUE(at::has_internal_overlap(written) != at::MemOverlap::Yes, "ddim_step: ", name,
                    " has internal overlap (several elements share memory); pass a dense tensor");
  // out may be x itself (an in-place update) but must not partly overlap it or overlap a read input.
  const auto with_x = overlap_status(written, x);
  TORCH_CHECK_VALUE(with_x == at::MemOverlapStatus::No ||
                        (with_x == at::MemOverlapStatus::Full && written.strides() == x.strides()),
                    "ddim_step: ", name, " partially overlaps x; it may be x itself or disjoint from it");
  TORCH_CHECK_VALUE(overlap_status(written, model_output) == at::MemOverlapStatus::No,
                    "ddim_step: ", name, " overlaps model_output");
  if (noise.has_value()) {
    TORCH_CHECK_VALUE(overlap_status(written, *noise) == at::MemOverlapStatus::No, "ddim_step: ",
                      name, " overlaps noise");
  }
}

// t holds every element at the offset x holds it at (t has x's sizes, checked): equal strides on every dim
// of size > 1 (a size-1 dim's stride never enters an offset).
bool same_strides_as_x(const at::Tensor& t, const at::Tensor& x) {
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) != 1 && t.stride(d) != x.stride(d)) return false;
  }
  return true;
}

}  // namespace

StepOptions make_step_options(std::optional<double> guidance_scale, c10::string_view prediction_type,
                              std::optional<double> clip_range, const std::optional<at::Tensor>& x0_threshold,
                              bool use_clipped_model_output, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& rng_state, double temperature) {
  StepOptions o;
  o.guidance_scale = guidance_scale;
  o.prediction_type = std::string(prediction_type);
  o.clip_range = clip_range;
  o.x0_threshold = x0_threshold;
  o.use_clipped_model_output = use_clipped_model_output;
  o.noise = noise;
  o.rng_state = rng_state;
  o.temperature = temperature;
  return o;
}

DdimStepParams make_ddim_step_params(const at::Tensor& x, const at::Tensor& model_output,
                                     const at::Tensor& table, const at::Tensor& row,
                                     const StepOptions& options, const at::Tensor& out,
                                     const std::optional<at::Tensor>& pred_x0_out, bool float64_allowed,
                                     bool outputs_fresh) {
  DdimStepParams p;
  TORCH_CHECK_VALUE(x.dim() >= 1, "ddim_step: x must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK_VALUE(x.dim() <= kMaxDims, "ddim_step: x may have at most ", kMaxDims, " dims, got ", x.dim());
  if (!(float64_allowed && x.scalar_type() == at::kDouble)) p.dtype = scalar_kind_of(x, "ddim_step", "x");
  p.ndim = static_cast<int>(x.dim());
  for (int d = 0; d < p.ndim; ++d) p.sizes[d] = x.size(d);
  p.numel = x.numel();
  p.sample_numel = x.size(0) == 0 ? 0 : p.numel / x.size(0);
  p.x = strided_arg(x);

  // model_output: [B, ...] or, with guidance, [2B, ...] = cat([uncond, cond]).
  const int64_t batch = x.size(0);
  TORCH_CHECK_VALUE(model_output.device() == x.device(), "ddim_step: model_output must be on x's device ",
                    x.device(), ", got ", model_output.device());
  TORCH_CHECK_TYPE(model_output.scalar_type() == x.scalar_type(), "ddim_step: model_output must have x's dtype ",
                   x.scalar_type(), ", got ", model_output.scalar_type(),
                   " (ddim_fast.ops.ddim_step casts for you)");
  TORCH_CHECK_VALUE(model_output.dim() == x.dim() && model_output.sizes().slice(1) == x.sizes().slice(1),
                    "ddim_step: model_output must be [B, ...] or [2B, ...] with x's trailing shape ",
                    x.sizes().slice(1), ", got ", model_output.sizes());
  p.guided = options.guidance_scale.has_value();
  if (p.guided) {
    TORCH_CHECK_VALUE(model_output.size(0) == 2 * batch,
                      "ddim_step: with guidance_scale, model_output must stack [uncond, cond] along dim 0: "
                      "expected batch ",
                      2 * batch, ", got ", model_output.size(0));
    // NaN or +-inf would turn every latent into NaN without a word: refused like ddim_fast.ops does.
    TORCH_CHECK_VALUE(std::isfinite(*options.guidance_scale), "ddim_step: guidance_scale must be finite, got ",
                      *options.guidance_scale);
    p.guidance_scale = static_cast<float>(*options.guidance_scale);
    // The two halves as views without building view tensors (this runs every step): same strides, the
    // cond half `batch` rows further on.
    p.model_uncond = strided_arg(model_output);
    p.model_cond = p.model_uncond;
    p.model_cond.data = static_cast<const char*>(p.model_uncond.data) +
                        batch * model_output.stride(0) * static_cast<int64_t>(model_output.element_size());
  } else {
    TORCH_CHECK_VALUE(model_output.size(0) == batch, "ddim_step: model_output batch must equal x's batch ",
                      batch, " (or be ", 2 * batch, " with guidance_scale set), got ", model_output.size(0));
    p.model_uncond = strided_arg(model_output);
  }

  // Coefficient table and the index of the row to use (read on the device by the kernels).
  TORCH_CHECK_VALUE(table.device() == x.device(), "ddim_step: table must be on x's device ", x.device(),
                    ", got ", table.device(), " (build it with ddim_fast.schedule ... .to(device))");
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat, "ddim_step: table must be float32, got ",
                   table.scalar_type());
  TORCH_CHECK_VALUE(table.dim() == 2 && table.size(1) == kTableColumns && table.is_contiguous(),
                    "ddim_step: table must be a contiguous [num_rows, ", kTableColumns, "] tensor, got ",
                    table.sizes());
  TORCH_CHECK_VALUE(table.size(0) > 0, "ddim_step: table has no rows");
  TORCH_CHECK_VALUE(row.device() == x.device(), "ddim_step: row must be on x's device ", x.device(),
                    ", got ", row.device());
  TORCH_CHECK_TYPE(row.scalar_type() == at::kLong, "ddim_step: row must be an int64 tensor, got ",
                   row.scalar_type());
  TORCH_CHECK_VALUE(row.numel() == 1, "ddim_step: row must hold exactly one index, got ", row.numel(),
                    " elements");
  p.table = pointer_of<float>(table);
  p.num_rows = table.size(0);
  p.table_row = pointer_of<int64_t>(row);

  p.prediction = parse_prediction(options.prediction_type);

  // x0 clamping: static clip or per-sample dynamic threshold, not both.
  TORCH_CHECK_VALUE(!(options.clip_range.has_value() && options.x0_threshold.has_value()),
                    "ddim_step: give clip_range or x0_threshold, not both");
  if (options.clip_range.has_value()) {
    // `> 0` is false for NaN, so NaN is refused too; +inf is allowed: it clamps nothing (but, with
    // use_clipped_model_output, still re-derives eps from x0, as diffusers does).
    TORCH_CHECK_VALUE(*options.clip_range > 0, "ddim_step: clip_range must be > 0, got ", *options.clip_range,
                      " (inf clamps nothing)");
    p.clamp = X0Clamp::kStatic;
    p.clip_range = static_cast<float>(*options.clip_range);
  }
  if (options.x0_threshold.has_value()) {
    const at::Tensor& thr = *options.x0_threshold;
    TORCH_CHECK_VALUE(thr.device() == x.device(), "ddim_step: x0_threshold must be on x's device ", x.device(),
                      ", got ", thr.device());
    TORCH_CHECK_TYPE(thr.scalar_type() == at::kFloat, "ddim_step: x0_threshold must be float32, got ",
                     thr.scalar_type());
    TORCH_CHECK_VALUE(thr.dim() == 1 && thr.size(0) == batch && thr.is_contiguous(),
                      "ddim_step: x0_threshold must be a contiguous [B] = [", batch, "] tensor, got ", thr.sizes());
    p.clamp = X0Clamp::kDynamic;
    p.x0_threshold = pointer_of<float>(thr);
  }
  p.use_clipped_model_output = options.use_clipped_model_output;

  // Noise: a tensor, or a seeded Philox draw, or none.
  TORCH_CHECK_VALUE(!(options.noise.has_value() && options.rng_state.has_value()),
                    "ddim_step: give noise or rng_state, not both");
  if (options.noise.has_value()) {
    check_like_x(x, *options.noise, "noise");
    p.noise = strided_arg(*options.noise);
  }
  if (options.rng_state.has_value()) {
    const at::Tensor& rng = *options.rng_state;
    TORCH_CHECK_VALUE(rng.device() == x.device(), "ddim_step: rng_state must be on x's device ", x.device(),
                      ", got ", rng.device());
    TORCH_CHECK_TYPE(rng.scalar_type() == at::kLong,
                     "ddim_step: rng_state must be int64 ([seed, offset] or [B, 2]), got ", rng.scalar_type());
    // [2]: one stream over the tensor; [B, 2]: one (seed, offset) per batch row (see philox.h).
    const bool one_stream = rng.dim() == 1 && rng.size(0) == 2;
    const bool per_row = rng.dim() == 2 && rng.size(0) == batch && rng.size(1) == 2;
    TORCH_CHECK_VALUE((one_stream || per_row) && rng.is_contiguous(),
                      "ddim_step: rng_state must be a contiguous int64 tensor [seed, offset] or [B, 2] = [", batch,
                      ", 2] (one seed and offset per batch row), got shape ", rng.sizes());
    p.rng = pointer_of<int64_t>(rng);
    p.rng_per_row = per_row;
  }
  TORCH_CHECK_VALUE(std::isfinite(options.temperature), "ddim_step: temperature must be finite, got ",
                    options.temperature);
  p.temperature = static_cast<float>(options.temperature);

  if (!outputs_fresh) check_written_arg(x, out, "out", model_output, options.noise);
  p.out = strided_arg(out);
  if (pred_x0_out.has_value()) {
    if (!outputs_fresh) {
      check_written_arg(x, *pred_x0_out, "pred_x0_out", model_output, options.noise);
      TORCH_CHECK_VALUE(overlap_status(*pred_x0_out, out) == at::MemOverlapStatus::No,
                        "ddim_step: pred_x0_out overlaps out");
    }
    p.pred_x0 = strided_arg(*pred_x0_out);
  }

  // Which path the kernels take (DdimStepParams::flat).
  const bool has_noise = options.noise.has_value();
  const bool has_x0 = pred_x0_out.has_value();
  const bool row_major = x.is_contiguous() && model_output.is_contiguous() && out.is_contiguous() &&
                         (!has_noise || options.noise->is_contiguous()) && (!has_x0 || pred_x0_out->is_contiguous());
  p.flat = row_major;
  if (!row_major && x.is_non_overlapping_and_dense()) {
    const bool philox = !has_noise && options.rng_state.has_value();
    const bool batch_outermost = batch <= 1 || x.stride(0) == p.sample_numel;
    // Both CFG halves have model_output's strides (they are slices along dim 0).
    p.flat = !philox && (p.clamp != X0Clamp::kDynamic || batch_outermost) && same_strides_as_x(model_output, x) &&
             same_strides_as_x(out, x) && (!has_noise || same_strides_as_x(*options.noise, x)) &&
             (!has_x0 || same_strides_as_x(*pred_x0_out, x));
  }
  return p;
}

std::pair<at::Tensor, at::Tensor> allocate_ddim_step_outputs(const at::Tensor& x, bool return_pred_x0) {
  // Like element-wise PyTorch: empty_like keeps x's strides when x is non-overlapping and dense (a
  // channels_last latent stays channels_last, so the UNet sees the layout it was given), else it takes
  // x's suggested memory format. The fake kernel and the Triton op call torch.empty_like alike.
  at::Tensor out = at::empty_like(x);
  at::Tensor pred_x0 = return_pred_x0 ? at::empty_like(x) : at::empty({0}, x.options());
  return {out, pred_x0};
}

namespace {

// ddim_fast::ddim_step_check: make_ddim_step_params for the backends that are not C++ (the Triton launcher, the
// PyTorch reference path), so that one set of rules and messages serves every backend. Returns what the
// launchers need to know: [prediction, clamp, noise (0 none, 1 tensor, 2 Philox), rng_per_row, flat]. Without
// `out` the outputs are taken to be fresh empty_like(x) buffers (nothing to check for overlap; laid out like x
// when x is dense, which is when the memory-order path can apply).
std::vector<int64_t> ddim_step_check(const at::Tensor& x, const at::Tensor& model_output, const at::Tensor& table,
                                     const at::Tensor& row, std::optional<double> guidance_scale,
                                     c10::string_view prediction_type, std::optional<double> clip_range,
                                     const std::optional<at::Tensor>& x0_threshold, bool use_clipped_model_output,
                                     const std::optional<at::Tensor>& noise,
                                     const std::optional<at::Tensor>& rng_state, double temperature,
                                     const std::optional<at::Tensor>& out,
                                     const std::optional<at::Tensor>& pred_x0_out, bool float64_allowed) {
  const StepOptions options = make_step_options(guidance_scale, prediction_type, clip_range, x0_threshold,
                                                use_clipped_model_output, noise, rng_state, temperature);
  // Without `out` the outputs are fresh empty_like(x) buffers: x stands in for them (same layout when x is
  // dense) and nothing about them is checked, since nothing can fail.
  const bool outputs_fresh = !out.has_value();
  const DdimStepParams p = make_ddim_step_params(x, model_output, table, row, options, outputs_fresh ? x : *out,
                                                 outputs_fresh ? std::nullopt : pred_x0_out, float64_allowed,
                                                 outputs_fresh);
  const int64_t noise_kind = noise.has_value() ? 1 : (rng_state.has_value() ? 2 : 0);
  return {static_cast<int64_t>(p.prediction), static_cast<int64_t>(p.clamp), noise_kind,
          static_cast<int64_t>(p.rng_per_row), static_cast<int64_t>(p.flat)};
}

}  // namespace

// Device-agnostic (no data is read): one kernel for every backend, meta tensors included (the checks then look at
// shapes, strides and storages only).
TORCH_LIBRARY_IMPL(ddim_fast, CompositeExplicitAutograd, m) { m.impl("ddim_step_check", &ddim_step_check); }

}  // namespace ddim_fast
