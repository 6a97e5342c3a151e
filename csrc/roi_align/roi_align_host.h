// Host-side glue shared by roi_align_cpu.cpp and roi_align_cuda.cu: argument checks and the
// translation of ATen tensors into the plain Levels table the kernels read.
#pragma once

#include <torch/types.h>

#include <vector>

#include "common/checks.h"
#include "roi_align/roi_align_common.h"

namespace htc_fast {
namespace roi_align {

inline void check_forward_args(const char* op, at::TensorList features, const at::Tensor& rois,
                               at::ArrayRef<double> scales, int64_t pooled_h, int64_t pooled_w) {
  TORCH_CHECK(!features.empty() && features.size() <= kMaxLevels, op, ": features must hold 1 to ",
              kMaxLevels, " maps, got ", features.size());
  TORCH_CHECK(scales.size() == features.size(), op, ": spatial_scales has ", scales.size(),
              " entries for ", features.size(), " feature maps");
  TORCH_CHECK(pooled_h > 0 && pooled_w > 0, op, ": output size must be positive, got (", pooled_h,
              ", ", pooled_w, ")");
  for (size_t i = 0; i < features.size(); ++i) {
    check_float_tensor(features[i], op, "features", 4);
    TORCH_CHECK(features[i].scalar_type() == features[0].scalar_type() &&
                    features[i].device() == features[0].device() &&
                    features[i].size(0) == features[0].size(0) &&
                    features[i].size(1) == features[0].size(1),
                op, ": every feature map must share dtype, device, N and C; map ", i, " is ",
                features[i].scalar_type(), " ", features[i].sizes(), " on ", features[i].device());
    TORCH_CHECK(std::isfinite(scales[i]) && scales[i] > 0, op, ": spatial_scale must be positive, got ",
                scales[i]);
  }
  check_geometry(rois, features[0], op);
}

inline void check_backward_args(const char* op, const at::Tensor& grad, const at::Tensor& rois,
                                int64_t pooled_h, int64_t pooled_w, int64_t channels) {
  check_float_tensor(grad, op, "grad", 4);
  TORCH_CHECK(grad.size(0) == rois.size(0) && grad.size(1) == channels && grad.size(2) == pooled_h &&
                  grad.size(3) == pooled_w,
              op, ": grad must have shape (K, C, out_h, out_w) = (", rois.size(0), ", ", channels, ", ",
              pooled_h, ", ", pooled_w, "), got ", grad.sizes());
  check_geometry(rois, grad, op);
}

template <typename data_t, typename acc_t>
Levels<data_t, acc_t> make_levels(const std::vector<at::Tensor>& maps, at::ArrayRef<double> scales,
                                  bool map_levels, double finest_scale) {
  Levels<data_t, acc_t> levels{};
  levels.count = static_cast<int>(maps.size());
  levels.map_levels = map_levels;
  levels.finest_scale = static_cast<acc_t>(finest_scale);
  levels.batch_size = maps[0].size(0);
  for (size_t i = 0; i < maps.size(); ++i) {
    const at::Tensor& m = maps[i];
    levels.level[i] = Level<data_t, acc_t>{static_cast<data_t*>(m.data_ptr()), m.size(2), m.size(3),
                                           m.stride(0), m.stride(1), m.stride(2), m.stride(3),
                                           static_cast<acc_t>(scales[i])};
  }
  return levels;
}

// Zero-filled gradient buffers, one per level, in the accumulation dtype (fp32 for half/bf16, so
// many small contributions do not round away).
inline std::vector<at::Tensor> grad_buffers(const at::Tensor& grad, at::IntArrayRef heights,
                                            at::IntArrayRef widths, int64_t batch_size,
                                            int64_t channels) {
  const auto acc = grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < heights.size(); ++i)
    out.push_back(at::zeros({batch_size, channels, heights[i], widths[i]}, grad.options().dtype(acc)));
  return out;
}

inline std::vector<at::Tensor> cast_grads(std::vector<at::Tensor> bufs, at::ScalarType dtype) {
  for (auto& b : bufs) b = b.to(dtype);
  return bufs;
}

}  // namespace roi_align
}  // namespace htc_fast
