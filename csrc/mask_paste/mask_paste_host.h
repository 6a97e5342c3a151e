// Host-side glue shared by mask_paste_cpu.cpp and mask_paste_cuda.cu: argument checks.
#pragma once

#include <torch/types.h>

#include "common/checks.h"

namespace htc_fast {
namespace mask_paste {

inline void check_paste_args(const char* op, const at::Tensor& mask_probs, const at::Tensor& boxes,
                             int64_t height, int64_t width, double threshold) {
  check_float_tensor(mask_probs, op, "mask_probs", 3);
  check_float_tensor(boxes, op, "boxes", 2);
  TORCH_CHECK(boxes.size(1) == 4, op, ": boxes must have shape (N, 4) [x0, y0, x1, y1], got ",
              boxes.sizes());
  TORCH_CHECK(boxes.scalar_type() == at::kFloat, op, ": boxes must be float32, got ",
              boxes.scalar_type());
  TORCH_CHECK(mask_probs.size(0) == boxes.size(0), op, ": mask_probs has ", mask_probs.size(0),
              " masks for ", boxes.size(0), " boxes");
  TORCH_CHECK(mask_probs.size(1) > 0 && mask_probs.size(2) > 0, op,
              ": mask_probs must have a non-empty (M_h, M_w), got ", mask_probs.sizes());
  TORCH_CHECK(mask_probs.size(1) < (int64_t(1) << 20) && mask_probs.size(2) < (int64_t(1) << 20), op,
              ": mask size ", mask_probs.sizes(), " is too large");
  TORCH_CHECK(height > 0 && width > 0, op, ": image size must be positive, got (", height, ", ",
              width, ")");
  TORCH_CHECK(std::isfinite(threshold) && threshold > 0, op,
              ": threshold must be positive and finite, got ", threshold);
  check_same_device(mask_probs, boxes, op, "mask_probs", "boxes");
}

// Crops: windows (N, 4) int64 [x0, y0, x1, y1], offsets (N + 1,) int64 into a flat buffer of
// `total` elements; crop n is its window, column-major, at offsets[n].
inline void check_crop_args(const char* op, const at::Tensor& boxes, const at::Tensor& windows,
                            const at::Tensor& offsets, int64_t total) {
  const int64_t n = boxes.size(0);
  TORCH_CHECK(windows.dim() == 2 && windows.size(0) == n && windows.size(1) == 4 &&
                  windows.scalar_type() == at::kLong,
              op, ": windows must be int64 of shape (", n, ", 4), got ", windows.scalar_type(), " ",
              windows.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == n + 1 && offsets.scalar_type() == at::kLong,
              op, ": offsets must be int64 of shape (", n + 1, "), got ", offsets.scalar_type(), " ",
              offsets.sizes());
  TORCH_CHECK(total >= 0, op, ": total must be non-negative, got ", total);
  check_same_device(boxes, windows, op, "boxes", "windows");
  check_same_device(boxes, offsets, op, "boxes", "offsets");
}

}  // namespace mask_paste
}  // namespace htc_fast
