// Max-IoU assignment arithmetic shared by assign_cpu.cpp and assign_cuda.cu (HTC_HD functions).
//
// The spec is htc_fast/ops/reference/assign.py (mmdetection's bbox_overlaps and MaxIoUAssigner).
// The overlap is computed with the reference's operations in its order, in T (float or double),
// so every backend gets the same bits: a box whose overlap equals a ground truth's best overlap
// (the low-quality rule) is decided by ==, and thresholds by >=. Maxima follow torch.max: NaN
// counts as the largest value, ties go to the first index.
#pragma once

#include <cstdint>

#include "common/hd_math.h"
#include "common/host_device.h"

namespace htc_fast {
namespace assign {

// Threshold sets per call (cascade stages sharing one assignment): at most this many.
constexpr int kMaxSets = 8;
constexpr double kEps = 1e-6;  // mmdet's floor on the union

template <typename T>
struct Box {
  T x1, y1, x2, y2;
};

template <typename T>
HTC_HD Box<T> load_box(const T* p) {
  return Box<T>{p[0], p[1], p[2], p[3]};
}

template <typename T>
HTC_HD T box_area(const Box<T>& b) {
  return hd::mul_rn(b.x2 - b.x1, b.y2 - b.y1);
}

// torch.max / torch.min of two values: NaN if either is NaN.
template <typename T>
HTC_HD T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
HTC_HD T nan_min(T a, T b) {
  return (a < b || a != a) ? a : b;
}

// True when v replaces `best` in a running max that keeps the first index: v is larger, or v is
// the first NaN (torch.max's order puts NaN above every number).
template <typename T>
HTC_HD bool beats(T v, T best) {
  return v > best || (v != v && best == best);
}

// The overlap of ground truth g with box b: inter / max(area_g + area_b - inter, eps), the
// reference's bbox_overlaps(gt_boxes, boxes) element (ground truth first: its area is area1).
template <typename T>
HTC_HD T overlap(const Box<T>& g, T area_g, const Box<T>& b, T area_b) {
  const T w = nan_min(g.x2, b.x2) - nan_max(g.x1, b.x1);
  const T h = nan_min(g.y2, b.y2) - nan_max(g.y1, b.y1);
  const T inter = hd::mul_rn(w < T(0) ? T(0) : w, h < T(0) ? T(0) : h);  // clamp(min=0) keeps NaN
  T uni = area_g + area_b - inter;
  const T eps = static_cast<T>(kEps);
  if (uni < eps) uni = eps;  // clamp(min=eps) keeps NaN
  return inter / uni;
}

// One threshold set, converted to T once (a T comparison, as the reference's).
template <typename T>
struct Thresholds {
  T pos, neg_lo, neg_hi, min_pos;
};

// A valid box's label from its max overlap and first argmax row over the ground truth, and the
// low-quality winner (k + 1 of the last ground truth that claims it; 0 = none).
template <typename T>
HTC_HD int64_t decide(T max_overlap, int64_t argmax, int64_t winner, const Thresholds<T>& t) {
  int64_t ind = -1;
  if (max_overlap >= t.neg_lo && max_overlap < t.neg_hi) ind = 0;
  if (max_overlap >= t.pos) ind = argmax + 1;
  if (winner > 0) ind = winner;
  return ind;
}

// Whether ground truth k (best overlap gt_max over the valid boxes, reached first at box
// gt_first) claims box n, whose overlap with it is v, in the low-quality step of set t.
template <typename T>
HTC_HD bool claims(bool gt_real, T gt_max, int64_t gt_first, T v, int64_t n, bool assign_all,
                   const Thresholds<T>& t) {
  if (!gt_real || !(gt_max >= t.min_pos)) return false;
  return assign_all ? v == gt_max : gt_first == n;
}

// The threshold sets of one call, passed to kernels by value.
template <typename T>
struct ThresholdSets {
  Thresholds<T> set[kMaxSets];
  int64_t count;
};

// Merging two partial (max, first index) results of a running max: (v, i) replaces (best, best_i)
// when v beats best, or ties it (NaN ties NaN) at a lower index. Lets a parallel reduction keep
// torch.max's answer whatever order the partials meet in.
template <typename T>
HTC_HD bool replaces(T v, int64_t i, T best, int64_t best_i) {
  const bool tie = v == best || (v != v && best != best);
  return beats(v, best) || (tie && i < best_i);
}

// Pass 2 for one valid box b (index n) of an image that has ground truth: its max overlap over the
// image's num_gts >= 1 ground-truth rows `gt` ((G, 4); gt_real (G,) or nullptr: all real), and in
// inds[s] its label for each threshold set s. gt_max / gt_first (G,): pass 1's best overlap of each
// ground truth over the valid boxes and the first box reaching it (read only with low_quality).
template <typename T>
HTC_HD T assign_box(const T* gt, const bool* gt_real, const T* gt_max, const int64_t* gt_first, int64_t num_gts,
                    const Box<T>& b, int64_t n, const ThresholdSets<T>& th, bool low_quality, bool assign_all,
                    int64_t* inds) {
  const T area_b = box_area(b);
  T best = T(0);
  int64_t argmax = 0;
  int64_t winner[kMaxSets];
  for (int64_t s = 0; s < th.count; ++s) winner[s] = 0;
  for (int64_t k = 0; k < num_gts; ++k) {
    const Box<T> g = load_box(gt + 4 * k);
    const T v = overlap(g, box_area(g), b, area_b);
    if (k == 0 || beats(v, best)) best = v, argmax = k;
    if (low_quality) {
      const bool real = gt_real == nullptr || gt_real[k];
      for (int64_t s = 0; s < th.count; ++s)
        if (claims(real, gt_max[k], gt_first[k], v, n, assign_all, th.set[s])) winner[s] = k + 1;
    }
  }
  for (int64_t s = 0; s < th.count; ++s) inds[s] = decide(best, argmax, winner[s], th.set[s]);
  return best;
}

// Pointers and sizes of one call (contiguous tensors; optional ones nullptr), by value to kernels.
template <typename T>
struct Problem {
  const T* boxes;            // (B or 1, N, 4)
  const T* gt;               // (B, G, 4)
  const int64_t* gt_labels;  // (B, G) or nullptr: zeros
  const bool* valid;         // (B, N) or nullptr: all valid
  const bool* gt_valid;      // (B, G) or nullptr: all real
  const T* gt_max;           // (B, G) pass 1's results (read with low_quality)
  const int64_t* gt_first;   // (B, G)
  int64_t batch, num_boxes, num_gts;
  bool shared_boxes, low_quality, assign_all;
  ThresholdSets<T> th;
  int64_t* out_inds;   // (S, B, N)
  T* out_max;          // (B, N)
  int64_t* out_labels; // (S, B, N)
};

template <typename T>
HTC_HD Box<T> box_of(const Problem<T>& p, int64_t b, int64_t n) {
  return load_box(p.boxes + 4 * ((p.shared_boxes ? 0 : b * p.num_boxes) + n));
}

template <typename T>
HTC_HD bool is_valid(const Problem<T>& p, int64_t b, int64_t n) {
  return p.valid == nullptr || p.valid[b * p.num_boxes + n];
}

// Pass 1's running max for ground truth k of image b over the valid boxes [n0, n1) with stride
// `step`: updates (best, first), which start at (-1, 0) -- what the reference's -1 columns of
// invalid boxes give when no box is valid.
template <typename T>
HTC_HD void gt_best_over(const Problem<T>& p, int64_t b, int64_t k, int64_t n0, int64_t n1, int64_t step,
                         T& best, int64_t& first) {
  const Box<T> g = load_box(p.gt + 4 * (b * p.num_gts + k));
  const T area_g = box_area(g);
  for (int64_t n = n0; n < n1; n += step) {
    if (!is_valid(p, b, n)) continue;
    const Box<T> box = box_of(p, b, n);
    const T v = overlap(g, area_g, box, box_area(box));
    if (replaces(v, n, best, first)) best = v, first = n;
  }
}

// Whether image b has ground truth: a real row (G reads at most; G is small next to N).
template <typename T>
HTC_HD bool has_gt(const Problem<T>& p, int64_t b) {
  if (p.gt_valid == nullptr) return p.num_gts > 0;
  for (int64_t k = 0; k < p.num_gts; ++k)
    if (p.gt_valid[b * p.num_gts + k]) return true;
  return false;
}

// Pass 2 for box n of image b: writes its max overlap and, for every threshold set, its label.
template <typename T>
HTC_HD void assign_and_write(const Problem<T>& p, int64_t b, int64_t n) {
  int64_t inds[kMaxSets];
  const int64_t G = p.num_gts, i = b * p.num_boxes + n;
  const bool any_gt = has_gt(p, b);
  T max_overlap;
  if (!is_valid(p, b, n)) {
    max_overlap = any_gt ? T(-1) : T(0);
    for (int64_t s = 0; s < p.th.count; ++s) inds[s] = -1;
  } else if (!any_gt) {
    max_overlap = T(0);
    for (int64_t s = 0; s < p.th.count; ++s) inds[s] = 0;
  } else {
    max_overlap = assign_box(p.gt + 4 * b * G, p.gt_valid == nullptr ? nullptr : p.gt_valid + b * G,
                             p.gt_max + b * G, p.gt_first + b * G, G, box_of(p, b, n), n, p.th, p.low_quality,
                             p.assign_all, inds);
  }
  p.out_max[i] = max_overlap;
  const int64_t plane = p.batch * p.num_boxes;
  for (int64_t s = 0; s < p.th.count; ++s) {
    p.out_inds[s * plane + i] = inds[s];
    p.out_labels[s * plane + i] = inds[s] <= 0 ? -1 : (p.gt_labels == nullptr ? 0 : p.gt_labels[b * G + inds[s] - 1]);
  }
}

}  // namespace assign
}  // namespace htc_fast
