#include "tensor_checks.h"

#include <c10/util/Exception.h>

namespace ddim_fast {

ScalarKind scalar_kind_of(const at::Tensor& t, const char* op, const char* name) {
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

at::MemOverlapStatus overlap_status(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.storage().is_alias_of(b.storage())) {
    return at::MemOverlapStatus::No;
  }
  if (a.is_meta() || b.is_meta()) {
    // No data pointers: the same rules on storage offsets (elements of one dtype within one storage).
    if (a.storage_offset() == b.storage_offset() && a.sizes() == b.sizes() && a.strides() == b.strides()) {
      return at::MemOverlapStatus::Full;
    }
    if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return at::MemOverlapStatus::TooHard;
    const int64_t a_begin = a.storage_offset() * static_cast<int64_t>(a.element_size());
    const int64_t b_begin = b.storage_offset() * static_cast<int64_t>(b.element_size());
    const int64_t a_end = a_begin + a.numel() * static_cast<int64_t>(a.element_size());
    const int64_t b_end = b_begin + b.numel() * static_cast<int64_t>(b.element_size());
    if (a_begin < b_end && b_begin < a_end) {
      return a_begin == b_begin && a_end == b_end && a.strides() == b.strides() ? at::MemOverlapStatus::Full
                                                                                : at::MemOverlapStatus::Partial;
    }
    return at::MemOverlapStatus::No;
  }
  if (a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides()) {
    return at::MemOverlapStatus::Full;
  }
  return at::get_overlap_status(a, b);
}

}  // namespace ddim_fast
