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
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "ddim_fast/softmax_math.h"

namespace ddim_fast {

namespace {

ScalarKind attention_scalar_kind(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// Sizes of `t` padded on the left with 1s to 4 dims, and its strides (0 for the padded dims).
void pad_to_4d(const at::Tensor& t, int64_t* sizes, int64_t* strides) {
  const int64_t pad = 4 - t.dim();
  for (int64_t d = 0; d < 4; ++d) {
    sizes[d] = d < pad ? 1 : t.size(d - pad);
    strides[d] = d < pad ? 0 : t.stride(d - pad);
  }
}

}  // namespace

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
  p.dtype = attention_scalar_kind(scores, op, "scores");
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
  p.scale = static_cast<float>(scale);
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
    // get_overlap_status gives up (TooHard) on non-dense masks, e.g. a key-padding mask expanded over
    // heads; a mask on another storage cannot overlap, so ask that first.
    TORCH_CHECK_VALUE(!scores.storage().is_alias_of(mask->storage()) ||
                          at::get_overlap_status(scores, *mask) == at::MemOverlapStatus::No,
                      "scaled_masked_softmax_: mask overlaps scores, which are overwritten");
  }
  run_softmax_cpu(make_softmax_params("scaled_masked_softmax_", scores, mask, scale, scores));
}

// ------------------------------------------------------------------------------------------------
// attention: softmax(q k^T * scale (+ mask)) v
// ------------------------------------------------------------------------------------------------

constexpr int64_t kQueryBlock = 32;  // query rows per task: their scores row block stays in L2
constexpr int64_t kKeyBlock = 64;    // keys converted to fp32 at a time (K^T block is D x 64 floats)

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

template <typename T, MaskKind kMask>
void attention_cpu_kernel(const AttentionDims& dims, const SoftmaxParams& p, const T* q, const T* k, const T* v,
                          T* out) {
  const int64_t lq = dims.sizes[2], lk = dims.sizes[3], d = dims.head_dim;
  const int64_t heads = dims.sizes[1];
  const int64_t q_blocks = (lq + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = dims.sizes[0] * heads * q_blocks;

  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> q_tile(kQueryBlock * d), k_t(d * kKeyBlock), v_tile(kKeyBlock * d);
    std::vector<float> scores(kQueryBlock * lk), acc(kQueryBlock * d), block_acc(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % q_blocks;
      const int64_t bh = task / q_blocks;
      const int64_t b1 = bh % heads, b0 = bh / heads;
      const int64_t q0 = qb * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, lq - q0);
      const T* q_base = q + b0 * dims.q_strides[0] + b1 * dims.q_strides[1];
      const T* k_base = k + b0 * dims.k_strides[0] + b1 * dims.k_strides[1];
      const T* v_base = v + b0 * dims.v_strides[0] + b1 * dims.v_strides[1];

      for (int64_t i = 0; i < rows; ++i)
        for (int64_t c = 0; c < d; ++c)
          q_tile[i * d + c] = to_f32(q_base[(q0 + i) * dims.q_strides[2] + c * dims.q_strides[3]]);

      // S = Q K^T, a key block at a time; K is transposed into k_t so the inner loop runs over keys
      // with unit stride (vectorizes without reassociating a dot-product reduction).
      for (int64_t j0 = 0; j0 < lk; j0 += kKeyBlock) {
        const int64_t keys = std::min(kKeyBlock, lk - j0);
        for (int64_t j = 0; j < keys; ++j)
          for (int64_t c = 0; c < d; ++c)
            k_t[c * kKeyBlock + j] = to_f32(k_base[(j0 + j) * dims.k_strides[2] + c * dims.k_strides[3]]);
        for (int64_t i = 0; i < rows; ++i) {
          float* s_row = scores.data() + i * lk + j0;
          for (int64_t j = 0; j < keys; ++j) s_row[j] = 0.0f;
          for (int64_t c = 0; c < d; ++c) {
            const float qc = q_tile[i * d + c];
            const float* kc = k_t.data() + c * kKeyBlock;
            for (int64_t j = 0; j < keys; ++j) s_row[j] += qc * kc[j];
          }
        }
      }

      // Exact row softmax of the scaled, masked scores (the whole row is in `scores`).
      const int64_t row0 = (b0 * heads + b1) * lq + q0;
      for (int64_t i = 0; i < rows; ++i) {
        float* s_row = scores.data() + i * lk;
        const char* mask_row = nullptr;
        if (kMask != MaskKind::kNone) {
          const int64_t elem = kMask == MaskKind::kBool ? sizeof(bool) : sizeof(T);
          mask_row = static_cast<const char*>(p.mask) + softmax_row_offset(row0 + i, p.sizes, p.mask_strides) * elem;
        }
        float row_max = -__builtin_huge_valf();
        for (int64_t j = 0; j < lk; ++j) {
          float x = s_row[j];
          if (kMask == MaskKind::kBool) {
            x = masked_logit_bool(x, p.scale, reinterpret_cast<const bool*>(mask_row)[j * p.mask_strides[3]]);
          } else if (kMask == MaskKind::kAdditive) {
            x = masked_logit_additive(x, p.scale, to_f32(reinterpret_cast<const T*>(mask_row)[j * p.mask_strides[3]]));
          } else {
            x = x * p.scale;
          }
          s_row[j] = x;
          row_max = std::max(row_max, x);
        }
        const float shift = softmax_shift(row_max);
        float row_sum = 0.0f;  // blocked like the P V sum above
        for (int64_t j0 = 0; j0 < lk; j0 += kKeyBlock) {
          float block_sum = 0.0f;
          for (int64_t j = j0; j < std::min(j0 + kKeyBlock, lk); ++j) {
            s_row[j] = fast_expf(s_row[j] - shift);
            block_sum += s_row[j];
          }
          row_sum += block_sum;
        }
        const float inv_sum = 1.0f / row_sum;
        for (int64_t j = 0; j < lk; ++j) s_row[j] *= inv_sum;
      }

      // O = P V in fp32, a key block at a time; the inner loop runs over the head dim.
      std::fill(acc.begin(), acc.begin() + rows * d, 0.0f);
      for (int64_t j0 = 0; j0 < lk; j0 += kKeyBlock) {
        const int64_t keys = std::min(kKeyBlock, lk - j0);
        for (int64_t j = 0; j < keys; ++j)
          for (int64_t c = 0; c < d; ++c)
            v_tile[j * d + c] = to_f32(v_base[(j0 + j) * dims.v_strides[2] + c * dims.v_strides[3]]);
        // Two-level summation: each key block is summed on its own, then added to the total. With
        // 4096 keys the output is a small average of many terms; one long running sum would lose
        // ~sqrt(4096) more bits than the blocked matmuls of PyTorch.
        for (int64_t i = 0; i < rows; ++i) {
          float* a_row = acc.data() + i * d;
          const float* p_row = scores.data() + i * lk + j0;
          std::fill(block_acc.begin(), block_acc.end(), 0.0f);
          for (int64_t j = 0; j < keys; ++j) {
            const float pj = p_row[j];
            const float* vj = v_tile.data() + j * d;
            for (int64_t c = 0; c < d; ++c) block_acc[c] += pj * vj[c];
          }
          for (int64_t c = 0; c < d; ++c) a_row[c] += block_acc[c];
        }
      }
      // out is contiguous [b0, b1, Lq, D].
      T* out_rows = out + (row0) * d;
      for (int64_t i = 0; i < rows * d; ++i) out_rows[i] = static_cast<T>(acc[i]);
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
  attention_scalar_kind(q, op, "q");
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
  TORCH_CHECK_VALUE(q.device().is_cpu(), "attention: q must be a CPU tensor here");
  std::vector<int64_t> score_sizes(q.sizes().begin(), q.sizes().end());
  score_sizes.back() = k.size(-2);  // [..., Lq, Lk]
  SoftmaxParams p;
  fill_softmax_mask("attention", mask, score_sizes, q.scalar_type(), q.device(), p);
  p.scale = static_cast<float>(scale);
  p.dtype = attention_scalar_kind(q, "attention", "q");

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
