// RoIAlign arithmetic shared by roi_align_cpu.cpp and roi_align_cuda.cu (HTC_HD functions).
//
// Semantics (torchvision's roi_align, which mmcv and detectron2 share): for RoI (b, x1, y1, x2, y2)
// in image pixels, start = x1 * scale - (aligned ? 0.5 : 0); bin = roi_size / pooled_size (roi size
// clamped to >= 1 unless aligned); grid = sampling_ratio > 0 ? sampling_ratio : ceil(bin); samples at
// start + p * bin + (i + 0.5) * bin / grid, bilinear with torchvision's border rules, averaged over
// max(grid_h * grid_w, 1). Bilinear interpolation factors into a y part and an x part (AxisTap);
// the products of the two parts are formed in the same order as torchvision, so weights agree bit
// for bit. Two additions of ours keep every input safe:
//   * a RoI with a non-finite coordinate (or an empty feature map) contributes nothing (zeros);
//   * only the samples whose coordinate can lie in [-1, size] are visited (SampleRange), so a huge
//     finite RoI costs O(map size), not O(grid^2), and cannot hang. Skipped samples would add 0.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hd_math.h"
#include "common/host_device.h"

namespace htc_fast {
namespace roi_align {

// Feature maps a kernel may read: one for plain RoIAlign, up to kMaxLevels for the FPN extractor.
constexpr int kMaxLevels = 8;

// `data_t` is `const scalar_t` for the forward (read features) and `acc_t` for the backward
// (accumulate gradients).
template <typename data_t, typename acc_t>
struct Level {
  data_t* data;
  int64_t height, width;
  int64_t stride_n, stride_c, stride_h, stride_w;
  acc_t scale;  // 1 / stride of this level
};

template <typename data_t, typename acc_t>
struct Levels {
  Level<data_t, acc_t> level[kMaxLevels];
  int count;
  bool map_levels;    // true: FPN extractor (roi_level picks the map); false: always level 0
  acc_t finest_scale;
  int64_t batch_size;
};

// The sampling grid of one RoI on one feature map, in map coordinates.
template <typename T>
struct RoiGrid {
  T start_h, start_w, bin_h, bin_w;
  int64_t grid_h, grid_w;  // samples per bin side (0: the RoI contributes nothing)
  T count;                 // max(grid_h * grid_w, 1): the divisor of every bin
};

template <typename T>
HTC_HD int64_t clamp_grid(T g) {
  // ceil(bin) can be NaN or astronomically large; converting those to int is undefined.
  if (!(g > T(0))) return 0;
  return g > T(1 << 30) ? int64_t(1) << 30 : static_cast<int64_t>(g);
}

// box = {x1, y1, x2, y2} in image pixels.
template <typename T>
HTC_HD RoiGrid<T> make_roi_grid(const T* box, T scale, int64_t pooled_h, int64_t pooled_w,
                                int64_t sampling_ratio, bool aligned) {
  RoiGrid<T> g;
  const T off = aligned ? T(0.5) : T(0);
  // mul_rn: nvcc would fuse `x * scale - off` into an FMA, the CPU does not; rounding the product
  // alone makes both compute the same start and bin, hence the same ceil(bin) and samples.
  g.start_w = hd::mul_rn(box[0], scale) - off;
  g.start_h = hd::mul_rn(box[1], scale) - off;
  T roi_w = hd::mul_rn(box[2], scale) - off - g.start_w;
  T roi_h = hd::mul_rn(box[3], scale) - off - g.start_h;
  if (!aligned) {
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  g.bin_h = roi_h / static_cast<T>(pooled_h);
  g.bin_w = roi_w / static_cast<T>(pooled_w);
  const bool finite = hd::isfinite(box[0]) && hd::isfinite(box[1]) && hd::isfinite(box[2]) &&
                      hd::isfinite(box[3]);
  if (!finite) {
    g.grid_h = g.grid_w = 0;
  } else if (sampling_ratio > 0) {
    g.grid_h = g.grid_w = sampling_ratio;
  } else {
    g.grid_h = clamp_grid(hd::ceil(roi_h / static_cast<T>(pooled_h)));
    g.grid_w = clamp_grid(hd::ceil(roi_w / static_cast<T>(pooled_w)));
  }
  const int64_t n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Coordinate of sample i of bin p along one axis (torchvision's operation order; products never
// fused into the additions, so CPU and GPU agree bit for bit).
template <typename T>
HTC_HD T sample_coord(T start, T bin, int64_t p, int64_t i, int64_t grid) {
  return start + hd::mul_rn(static_cast<T>(p), bin) +
         hd::mul_rn(static_cast<T>(i) + T(0.5), bin) / static_cast<T>(grid);
}

// Sample indices [begin, end) of bin p that can land in [-1, size]: a conservative superset (the
// exact test is AxisTap::valid), so skipping the rest changes nothing but the cost.
struct SampleRange {
  int64_t begin, end;
};

template <typename T>
HTC_HD SampleRange sample_range(T start, T bin, int64_t p, int64_t grid, int64_t size) {
  SampleRange r{0, grid};
  const T step = bin / static_cast<T>(grid);
  if (!(step > T(0))) return r;  // zero/negative bins: grid is the user's sampling_ratio, small
  const T base = start + hd::mul_rn(static_cast<T>(p), bin);
  T lo = hd::floor((T(-1) - base) / step - T(0.5)) - T(1);
  T hi = hd::floor((static_cast<T>(size) - base) / step - T(0.5)) + T(2);
  const T g = static_cast<T>(grid);
  lo = lo > T(0) ? (lo < g ? lo : g) : T(0);  // NaN-free: base and step are finite here
  hi = hi > T(0) ? (hi < g ? hi : g) : T(0);
  r.begin = static_cast<int64_t>(lo);
  r.end = static_cast<int64_t>(hi);
  return r;
}

// The bilinear taps of one coordinate along one axis of length `size`.
template <typename T>
struct AxisTap {
  int64_t lo, hi;  // neighbouring indices (equal at the last row/column)
  T w_lo, w_hi;    // their weights: 1 - frac, frac
  bool valid;      // false: the sample lies more than one pixel outside (or is NaN) -> 0
};

template <typename T>
HTC_HD AxisTap<T> axis_tap(T v, int64_t size) {
  AxisTap<T> t;
  t.valid = size > 0 && v >= T(-1) && v <= static_cast<T>(size);
  if (!t.valid) {
    t.lo = t.hi = 0;
    t.w_lo = t.w_hi = T(0);
    return t;
  }
  if (v <= T(0)) v = T(0);
  t.lo = static_cast<int64_t>(v);
  if (t.lo >= size - 1) {
    t.lo = t.hi = size - 1;
    v = static_cast<T>(t.lo);
  } else {
    t.hi = t.lo + 1;
  }
  const T frac = v - static_cast<T>(t.lo);
  t.w_lo = T(1) - frac;
  t.w_hi = frac;
  return t;
}

// mmdetection's FPN level of a RoI: clamp(floor(log2(sqrt(w*h) / finest_scale + 1e-6)), 0, L-1).
// Returns -1 when the value is NaN (negative area, non-finite box): such a RoI matches no level
// in mmdetection either, and gets zeros.
template <typename T>
HTC_HD int roi_level(const T* box, T finest_scale, int num_levels) {
  const T size = hd::sqrt(hd::mul_rn(box[2] - box[0], box[3] - box[1]));
  const T lvl = hd::floor(hd::log2(size / finest_scale + T(1e-6)));
  if (!(lvl == lvl)) return -1;
  if (lvl < T(0)) return 0;
  return lvl > static_cast<T>(num_levels - 1) ? num_levels - 1 : static_cast<int>(lvl);
}

// Batch index of a RoI: truncated toward zero like torchvision's `int(rois[k][0])`, or -1 when
// that is not in [0, batch_size) (or the value is NaN), so no kernel reads outside the features.
template <typename T>
HTC_HD int64_t roi_batch(T b, int64_t batch_size) {
  if (!(b > T(-1) && b < static_cast<T>(batch_size))) return -1;
  return static_cast<int64_t>(b);
}

// Everything a kernel needs to know about RoI k before it touches features.
template <typename acc_t>
struct RoiPlan {
  int level;         // index into Levels::level
  int64_t batch;     // image index
  RoiGrid<acc_t> grid;
  bool active;       // false: the RoI's output is zeros (and its gradient is nothing)
};

// roi = {batch_index, x1, y1, x2, y2}.
template <typename data_t, typename acc_t>
HTC_HD RoiPlan<acc_t> plan_roi(const acc_t* roi, const Levels<data_t, acc_t>& levels,
                               int64_t pooled_h, int64_t pooled_w, int64_t sampling_ratio,
                               bool aligned) {
  RoiPlan<acc_t> plan;
  plan.level = levels.map_levels ? roi_level(roi + 1, levels.finest_scale, levels.count) : 0;
  plan.batch = roi_batch(roi[0], levels.batch_size);
  const int lvl = plan.level < 0 ? 0 : plan.level;
  plan.grid = make_roi_grid(roi + 1, levels.level[lvl].scale, pooled_h, pooled_w, sampling_ratio,
                            aligned);
  plan.active = plan.level >= 0 && plan.batch >= 0 && plan.grid.grid_h > 0 &&
                plan.grid.grid_w > 0 && levels.level[lvl].height > 0 && levels.level[lvl].width > 0;
  return plan;
}

}  // namespace roi_align
}  // namespace htc_fast
