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
  if (a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides()) {
    return at::MemOverlapStatus::Full;
  }
  return at::get_overlap_status(a, b);
}

}  // namespace ddim_fast
