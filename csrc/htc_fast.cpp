// Every htc_fast operator schema, in one place. Kernels register against these names per device
// (TORCH_LIBRARY_IMPL in csrc/<op>/); fake kernels, autograd and autocast rules are registered in
// Python (htc_fast/ops/<op>.py). Geometry arguments (rois, boxes) are float32 (float64 beside
// float64 features); features may be fp32, fp64, fp16 or bf16.
#include <torch/extension.h>
#include <torch/library.h>

#include <string>

namespace htc_fast {
std::string compiled_cuda_archs();  // common/cuda_archs.cu, or "" in a CPU-only build
}  // namespace htc_fast

TORCH_LIBRARY_FRAGMENT(htc_fast, m) {
  // RoIAlign (csrc/roi_align/). rois: (K, 5) [batch_index, x1, y1, x2, y2] in image pixels.
  m.def("roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
        "int pooled_width, int sampling_ratio, bool aligned) -> Tensor");
  m.def("roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
        "int pooled_width, int batch_size, int channels, int height, int width, int sampling_ratio, "
        "bool aligned) -> Tensor");
  m.def("multilevel_roi_align(Tensor[] features, Tensor rois, float[] spatial_scales, "
        "int pooled_height, int pooled_width, int sampling_ratio, bool aligned, float finest_scale) "
        "-> Tensor");
  m.def("multilevel_roi_align_backward(Tensor grad, Tensor rois, float[] spatial_scales, "
        "int pooled_height, int pooled_width, int[] heights, int[] widths, int batch_size, "
        "int channels, int sampling_ratio, bool aligned, float finest_scale) -> Tensor[]");

  // NMS (csrc/nms/). boxes: (N, 4) xyxy; returns the kept indices (int64) by descending score.
  m.def("nms(Tensor boxes, Tensor scores, float iou_threshold) -> Tensor");
  // Exactly `nms` run separately for each value of idxs, merged by descending score.
  m.def("batched_nms(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold) -> Tensor");

  // Deformable convolution v1 / modulated v2 (csrc/deform_conv/), torchvision's semantics.
  // offset: (N, 2*dg*kh*kw, Ho, Wo) (dy, dx) per (group, tap); mask: (N, dg*kh*kw, Ho, Wo) or None.
  // Offsets and masks are float32 (float64 beside float64 input); weight and bias share input's dtype.
  m.def("deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor? mask, Tensor? bias, "
        "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, "
        "int offset_groups) -> Tensor");
  // (grad_input, grad_weight, grad_offset, grad_mask); grad_mask is empty (0,) without a mask.
  m.def("deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor? mask, "
        "int stride_h, int stride_w, int pad_h, int pad_w, int dilation_h, int dilation_w, int groups, "
        "int offset_groups) -> (Tensor, Tensor, Tensor, Tensor)");
}

#ifndef HTC_FAST_WITH_CUDA
std::string htc_fast::compiled_cuda_archs() { return ""; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "htc_fast compiled kernels; the operators live in torch.ops.htc_fast";
  m.def("cuda_archs", &htc_fast::compiled_cuda_archs,
        "CUDA archs the kernels were compiled for, ';'-separated (e.g. '80;90'); '' without CUDA");
}
