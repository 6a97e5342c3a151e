// NMS arithmetic shared by nms_cpu.cpp and nms_cuda.cu (HTC_HD functions).
//
// Semantics (torchvision's nms, which mmcv and detectron2 share): boxes are xyxy with no +1,
// IoU = inter / (area_a + area_b - inter), and box j is suppressed by a kept box i when
// IoU > threshold (strict). A zero union gives NaN, and NaN > threshold is false: degenerate boxes
// never suppress. Computed in at::opmath_type (fp32 for fp16/bf16/fp32 boxes, fp64 for fp64).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "common/hd_math.h"
#include "common/host_device.h"

namespace htc_fast {
namespace nms {

template <typename T>
struct Box {
  T x1, y1, x2, y2;
};

template <typename T>
HTC_HD T box_area(const Box<T>& b) {
  return hd::mul_rn(b.x2 - b.x1, b.y2 - b.y1);
}

// torchvision compares the IoU, a T, with the threshold as a double: for T = float, iou > 0.3 is
// true for iou = 0.3f (0.3f rounds up). The largest T not above the double threshold makes the
// same decision with a T comparison (x > t  <=>  x > round_down(t) for every T x, NaN included),
// which keeps the kernels' inner loops in T.
template <typename T>
inline T threshold_as(double t) {
  T f = static_cast<T>(t);
  if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<T>::infinity());
  return f;
}

// True when box b (area area_b) overlaps box a (area area_a) by more than `threshold` (from
// threshold_as); the operations and their order are torchvision's, so decisions agree bit for bit.
template <typename T>
HTC_HD bool suppresses(const Box<T>& a, T area_a, const Box<T>& b, T area_b, T threshold) {
  const T xx1 = a.x1 > b.x1 ? a.x1 : b.x1;
  const T yy1 = a.y1 > b.y1 ? a.y1 : b.y1;
  const T xx2 = a.x2 < b.x2 ? a.x2 : b.x2;
  const T yy2 = a.y2 < b.y2 ? a.y2 : b.y2;
  const T w = xx2 - xx1 > T(0) ? xx2 - xx1 : T(0);
  const T h = yy2 - yy1 > T(0) ? yy2 - yy1 : T(0);
  const T inter = hd::mul_rn(w, h);  // never fused into the subtraction below (see hd_math.h)
  return inter / (area_a + area_b - inter) > threshold;
}

// The sorted rows [begin, end) of the segment holding sorted row i. `keys` (the segment value of
// each row, ascending; nullptr: one segment) makes a segment a run of equal keys, found by binary
// search so every row can look up its own segment in parallel. `end` is cut to begin + max_group:
// rows past a segment's max_group best-scored boxes take no part in NMS (batched_nms_padded).
struct Segment {
  int64_t begin, end;
};

HTC_HD Segment segment_of(const int64_t* keys, int64_t n, int64_t i, int64_t max_group) {
  Segment seg{0, n};
  if (keys != nullptr) {
    const int64_t key = keys[i];
    int64_t lo = 0, hi = i;  // the first row with this key: in [0, i]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (keys[mid] < key) lo = mid + 1; else hi = mid;
    }
    seg.begin = lo;
    lo = i + 1, hi = n;  // one past the last row with this key: in [i + 1, n]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (keys[mid] <= key) lo = mid + 1; else hi = mid;
    }
    seg.end = lo;
  }
  if (seg.end - seg.begin > max_group) seg.end = seg.begin + max_group;
  return seg;
}

}  // namespace nms
}  // namespace htc_fast
