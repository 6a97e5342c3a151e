// Host-side glue shared by nms_cpu.cpp and nms_cuda.cu: argument checks and the sort that turns
// (scores, idxs) into segments. Device-agnostic ATen calls: the sorts run where the tensors live.
#pragma once

#include <torch/types.h>

#include <tuple>

#include "common/checks.h"

namespace htc_fast {
namespace nms {

inline void check_nms_args(const char* op, const at::Tensor& boxes, const at::Tensor& scores,
                           const at::Tensor* idxs) {
  check_float_tensor(boxes, op, "boxes", 2);
  TORCH_CHECK(boxes.size(1) == 4, op, ": boxes must have shape (N, 4) [x1, y1, x2, y2], got ", boxes.sizes());
  check_float_tensor(scores, op, "scores", 1);
  TORCH_CHECK(scores.size(0) == boxes.size(0), op, ": scores has ", scores.size(0), " entries for ",
              boxes.size(0), " boxes");
  check_same_device(boxes, scores, op, "boxes", "scores");
  if (idxs != nullptr) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == boxes.size(0), op, ": idxs must have shape (",
                boxes.size(0), "), got ", idxs->sizes());
    TORCH_CHECK(at::isIntegralType(idxs->scalar_type(), /*includeBool=*/false), op,
                ": idxs must be an integer tensor, got ", idxs->scalar_type());
    check_same_device(boxes, *idxs, op, "boxes", "idxs");
  }
}

// Returns (by_score, by_segment): by_score sorts the boxes by descending score, ties by index
// (a stable sort, as torchvision); by_segment is by_score stably re-sorted by idxs, so each
// segment (one value of idxs) is contiguous and in score order. Without idxs both are by_score.
inline std::tuple<at::Tensor, at::Tensor> segment_order(const at::Tensor& scores, const at::Tensor* idxs) {
  const at::Tensor by_score = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  if (idxs == nullptr) return {by_score, by_score};
  const at::Tensor keys = idxs->index_select(0, by_score);
  const at::Tensor perm = std::get<1>(keys.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  return {by_score, by_score.index_select(0, perm)};
}

// batched_nms_padded's static sizes: max_output >= 0 kept slots, groups of at most max_group_size.
inline void check_padded_args(const char* op, int64_t max_output, int64_t max_group_size) {
  TORCH_CHECK_VALUE(max_output >= 0, op, ": max_output must be >= 0, got ", max_output);
  TORCH_CHECK_VALUE(max_group_size > 0, op, ": max_group_size must be > 0, got ", max_group_size);
}

// Segment values in segment order (int64, ascending) for segment_of; undefined without idxs.
inline at::Tensor sorted_keys(const at::Tensor* idxs, const at::Tensor& by_segment) {
  return idxs == nullptr ? at::Tensor() : idxs->index_select(0, by_segment).to(at::kLong).contiguous();
}

// The kept indices in score order, from a keep mask over the original indices.
inline at::Tensor kept_in_score_order(const at::Tensor& by_score, const at::Tensor& keep) {
  return by_score.masked_select(keep.index_select(0, by_score));
}

}  // namespace nms
}  // namespace htc_fast
