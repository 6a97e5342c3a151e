// Precondition checks shared by the kernels' entry points. Every message names the op and the
// argument, so a user who passes the wrong thing sees which thing it was.
#pragma once

#include <torch/types.h>

namespace htc_fast {

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* arg, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", arg, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", arg,
              " must be a floating-point tensor, got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* arg_a, const char* arg_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", arg_a, " is on ", a.device(), " but ", arg_b,
              " is on ", b.device());
}

// Geometry (rois, boxes) is float32, or float64 next to float64 features; the Python layer
// converts, so a mismatch here means the op was called directly with the wrong dtype.
inline void check_geometry(const at::Tensor& rois, const at::Tensor& features, const char* op) {
  check_float_tensor(rois, op, "rois", 2);
  TORCH_CHECK(rois.size(1) == 5, op, ": rois must have shape (K, 5) [batch_index, x1, y1, x2, y2], got ",
              rois.sizes());
  const auto want = features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rois.scalar_type() == want, op, ": rois must be ", want, " for ", features.scalar_type(),
              " features (boxes stay fp32 under AMP), got ", rois.scalar_type());
  check_same_device(rois, features, op, "rois", "features");
}

}  // namespace htc_fast
