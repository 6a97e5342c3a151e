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
  // batched_nms with static output shapes (no host sync on CUDA): keep (max_output,) int64 holds
  // batched_nms(...)[:max_output] padded with -1; num_kept is a 0-d int64 count of the valid
  // entries. max_group_size (> 0) bounds the boxes of one idxs value and sizes the CUDA bit mask
  // without reading anything back; a larger group takes part with only its max_group_size
  // best-scored boxes (ties by index), on every device -- the result is then batched_nms of those.
  m.def("batched_nms_padded(Tensor boxes, Tensor scores, Tensor idxs, float iou_threshold, "
        "int max_output, int max_group_size) -> (Tensor keep, Tensor num_kept)");

  // Max-IoU assignment (csrc/assign/), mmdetection's MaxIoUAssigner for a batch of images and A
  // threshold sets at once. boxes: (B or 1, N, 4) xyxy (float32/float64); gt_boxes: (B, G, 4) in
  // the same dtype; gt_labels: (B, G) int64 or None (zeros); valid: (B, N) bool or None (candidate
  // boxes; others are ignored); gt_valid: (B, G) bool or None (the real rows of padded ground
  // truth); thresholds: A groups of [pos_iou_thr, neg_iou_lo, neg_iou_hi, min_pos_iou].
  // Returns gt_inds (A, B, N) int64 (-1 ignored, 0 negative, k + 1 ground truth k), max_overlaps
  // (B, N) and labels (A, B, N) int64 (-1 unless positive). Spec: htc_fast/ops/reference/assign.py.
  m.def("max_iou_assign(Tensor boxes, Tensor gt_boxes, Tensor? gt_labels, Tensor? valid, Tensor? gt_valid, "
        "float[] thresholds, bool match_low_quality, bool gt_max_assign_all) "
        "-> (Tensor gt_inds, Tensor max_overlaps, Tensor labels)");

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
  // Mask paste (csrc/mask_paste/). mask_probs: (N, Mh, Mw) probabilities; boxes: (N, 4) float32
  // xyxy in image pixels. paste_masks -> (N, height, width) bool, pixel set where the
  // grid_sample value is >= threshold.
  m.def("paste_masks(Tensor mask_probs, Tensor boxes, int height, int width, float threshold) -> Tensor");
  // (N, 4) int64 [x0, y0, x1, y1]: the pixels each box may set (all zero when it sets none).
  m.def("paste_mask_windows(Tensor boxes, int mask_height, int mask_width, int height, int width) "
        "-> Tensor");
  // The masks cropped to `windows` (inside the (height, width) image), each column-major at
  // offsets[n] of a flat (total,) bool tensor.
  m.def("paste_mask_crops(Tensor mask_probs, Tensor boxes, Tensor windows, Tensor offsets, "
        "int total, int height, int width, float threshold) -> Tensor");
  // COCO RLE of such crops in a (height, width) image: (chars uint8, char_offsets (N + 1,) int64);
  // mask n's compressed counts string is chars[char_offsets[n]:char_offsets[n + 1]]. CPU only.
  m.def("mask_rle_encode(Tensor crops, Tensor windows, Tensor offsets, int height, int width) "
        "-> (Tensor, Tensor)");
}

#ifndef HTC_FAST_WITH_CUDA
std::string htc_fast::compiled_cuda_archs() { return ""; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "htc_fast compiled kernels; the operators live in torch.ops.htc_fast";
  m.def("cuda_archs", &htc_fast::compiled_cuda_archs,
        "CUDA archs the kernels were compiled for, ';'-separated (e.g. '80;90'); '' without CUDA");
}
