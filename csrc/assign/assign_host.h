// Host-side glue shared by assign_cpu.cpp and assign_cuda.cu: argument checks, the optional
// arguments made dense, the outputs allocated, and the thresholds converted to T.
#pragma once

#include <torch/types.h>

#include <vector>

#include "assign/assign_common.h"
#include "common/checks.h"

namespace htc_fast {
namespace assign {

// The arguments of one call, contiguous, with absent optionals as undefined tensors.
struct Args {
  at::Tensor boxes, gt_boxes, gt_labels, valid, gt_valid;
  int64_t batch, num_boxes, num_gts, sets;
  bool shared_boxes;  // boxes is (1, N, 4): one set of boxes (anchors) for every image
};

struct Outputs {
  at::Tensor gt_inds, max_overlaps, labels;
};

inline at::Tensor optional_arg(const c10::optional<at::Tensor>& t, const char* name, at::ScalarType dtype,
                               at::IntArrayRef shape, const at::Tensor& like) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->scalar_type() == dtype, "htc_fast::max_iou_assign: ", name, " must be ", dtype, ", got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == shape, "htc_fast::max_iou_assign: ", name, " must have shape ", shape, ", got ",
              t->sizes());
  check_same_device(like, *t, "htc_fast::max_iou_assign", "gt_boxes", name);
  return t->contiguous();
}

inline Args check_assign_args(const at::Tensor& boxes, const at::Tensor& gt_boxes,
                              const c10::optional<at::Tensor>& gt_labels, const c10::optional<at::Tensor>& valid,
                              const c10::optional<at::Tensor>& gt_valid, at::ArrayRef<double> thresholds) {
  const char* op = "htc_fast::max_iou_assign";
  check_float_tensor(gt_boxes, op, "gt_boxes", 3);
  check_float_tensor(boxes, op, "boxes", 3);
  TORCH_CHECK(gt_boxes.scalar_type() == at::kFloat || gt_boxes.scalar_type() == at::kDouble, op,
              ": gt_boxes must be float32 or float64, got ", gt_boxes.scalar_type());
  TORCH_CHECK(boxes.scalar_type() == gt_boxes.scalar_type(), op, ": boxes must have gt_boxes' dtype ",
              gt_boxes.scalar_type(), ", got ", boxes.scalar_type());
  TORCH_CHECK(gt_boxes.size(2) == 4, op, ": gt_boxes must have shape (B, G, 4), got ", gt_boxes.sizes());
  const int64_t batch = gt_boxes.size(0);
  TORCH_CHECK(boxes.size(2) == 4 && (boxes.size(0) == batch || boxes.size(0) == 1), op,
              ": boxes must have shape (", batch, ", N, 4) or (1, N, 4), got ", boxes.sizes());
  check_same_device(gt_boxes, boxes, op, "gt_boxes", "boxes");
  TORCH_CHECK(!thresholds.empty() && thresholds.size() % 4 == 0 && thresholds.size() <= 4 * size_t(kMaxSets), op,
              ": thresholds must hold 4 values (pos, neg_lo, neg_hi, min_pos) for each of 1 to ", kMaxSets,
              " threshold sets, got ", thresholds.size(), " values");
  Args a;
  a.batch = batch;
  a.num_boxes = boxes.size(1);
  a.num_gts = gt_boxes.size(1);
  a.sets = static_cast<int64_t>(thresholds.size() / 4);
  a.shared_boxes = boxes.size(0) == 1 && batch != 1;
  a.boxes = boxes.contiguous();
  a.gt_boxes = gt_boxes.contiguous();
  a.gt_labels = optional_arg(gt_labels, "gt_labels", at::kLong, {batch, a.num_gts}, gt_boxes);
  a.valid = optional_arg(valid, "valid", at::kBool, {batch, a.num_boxes}, gt_boxes);
  a.gt_valid = optional_arg(gt_valid, "gt_valid", at::kBool, {batch, a.num_gts}, gt_boxes);
  return a;
}

inline Outputs allocate_outputs(const Args& a) {
  const auto opts = a.gt_boxes.options();
  return Outputs{at::empty({a.sets, a.batch, a.num_boxes}, opts.dtype(at::kLong)),
                 at::empty({a.batch, a.num_boxes}, opts),
                 at::empty({a.sets, a.batch, a.num_boxes}, opts.dtype(at::kLong))};
}

// The threshold sets in T (a T comparison, as the reference's).
template <typename T>
ThresholdSets<T> threshold_sets(at::ArrayRef<double> thresholds) {
  ThresholdSets<T> s{};
  s.count = static_cast<int64_t>(thresholds.size() / 4);
  for (int64_t i = 0; i < s.count; ++i)
    s.set[i] = Thresholds<T>{static_cast<T>(thresholds[4 * i]), static_cast<T>(thresholds[4 * i + 1]),
                             static_cast<T>(thresholds[4 * i + 2]), static_cast<T>(thresholds[4 * i + 3])};
  return s;
}

// The kernels' view of a call; gt_max / gt_first are pass 1's (B, G) scratch tensors.
template <typename T>
Problem<T> make_problem(const Args& a, const Outputs& out, const at::Tensor& gt_max, const at::Tensor& gt_first,
                        at::ArrayRef<double> thresholds, bool match_low_quality, bool gt_max_assign_all) {
  Problem<T> p{};
  p.boxes = a.boxes.data_ptr<T>();
  p.gt = a.gt_boxes.data_ptr<T>();
  p.gt_labels = a.gt_labels.defined() ? a.gt_labels.data_ptr<int64_t>() : nullptr;
  p.valid = a.valid.defined() ? a.valid.data_ptr<bool>() : nullptr;
  p.gt_valid = a.gt_valid.defined() ? a.gt_valid.data_ptr<bool>() : nullptr;
  p.gt_max = gt_max.data_ptr<T>();
  p.gt_first = gt_first.data_ptr<int64_t>();
  p.batch = a.batch;
  p.num_boxes = a.num_boxes;
  p.num_gts = a.num_gts;
  p.shared_boxes = a.shared_boxes;
  p.low_quality = match_low_quality;
  p.assign_all = gt_max_assign_all;
  p.th = threshold_sets<T>(thresholds);
  p.out_inds = out.gt_inds.data_ptr<int64_t>();
  p.out_max = out.max_overlaps.data_ptr<T>();
  p.out_labels = out.labels.data_ptr<int64_t>();
  return p;
}

}  // namespace assign
}  // namespace htc_fast
