// Mask paste arithmetic shared by mask_paste_cpu.cpp and mask_paste_cuda.cu (HTC_HD functions).
//
// Semantics (mmdetection's `_do_paste_mask` + `mask_thr_binary`): box (x0, y0, x1, y1) in image
// pixels, w = x1 - x0, h = y1 - y0 (float32). Pixel (x, y) samples the (Mh, Mw) mask with
// grid_sample(align_corners=False, padding zeros) at
//     gx = (x + 0.5 - x0) / w * 2 - 1,   u = (gx + 1) * Mw / 2 - 0.5     (same for y, v)
// i.e. the closed form u = (x + 0.5 - x0) / w * Mw - 0.5, evaluated in grid_sample's operation
// order: gx exactly as the reference builds its float32 grid, then u rounded once from
// (gx + 1) * (Mw / 2) - 0.5 (an FMA), which is how grid_sample's AVX2 and CUDA kernels compute it,
// so the coordinates agree with the reference bit for bit there (within an ulp elsewhere).
// Bilinear on the mask padded with one cell of zeros (`bilinear` below: along x, then along y);
// the pixel is set when value >= threshold (float32).
//
// Support: the value is exactly 0 unless -1 < u < Mw and -1 < v < Mh, i.e. unless the pixel
// centre lies in the box grown by half a mask cell (w / 2Mw, h / 2Mh). `paste_window` returns that
// region plus one pixel each side (which absorbs the float32 rounding of u), clamped to the image;
// kernels visit only those pixels. Boxes with a non-finite coordinate, or whose float32 width or
// height is not finite and positive (zero-width boxes included), paste nothing: an empty window.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/hd_math.h"
#include "common/host_device.h"

namespace htc_fast {
namespace mask_paste {

// a * b + c rounded once (see the header comment for why the coordinate needs it).
HTC_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// The paste geometry of one box, in float32 like the reference's grid.
struct BoxGeom {
  float x0, y0, w, h;
  bool valid;  // false: the box pastes nothing
};

HTC_HD BoxGeom box_geom(const float* box) {
  BoxGeom g;
  g.x0 = box[0];
  g.y0 = box[1];
  g.w = box[2] - box[0];
  g.h = box[3] - box[1];
  g.valid = hd::isfinite(box[0]) && hd::isfinite(box[1]) && hd::isfinite(box[2]) &&
            hd::isfinite(box[3]) && hd::isfinite(g.w) && hd::isfinite(g.h) && g.w > 0.0f &&
            g.h > 0.0f;
  return g;
}

// Pixels [begin, end) of one axis whose value can be non-zero: centres in (lo - size / 2M,
// hi + size / 2M), widened by one pixel each side, clamped to [0, limit]. In double: the bounds
// of a huge box must not round, and the result must not overflow int64.
struct Range {
  int64_t begin, end;
};

HTC_HD Range axis_window(float lo, float hi, float size, int64_t cells, int64_t limit) {
  const double half = static_cast<double>(size) / (2.0 * static_cast<double>(cells));
  const double lim = static_cast<double>(limit);
  // Centre x + 0.5 > lo - half  <=>  x > lo - half - 0.5; the floor keeps one pixel of margin.
  double b = hd::floor(static_cast<double>(lo) - half - 0.5);
  double e = hd::ceil(static_cast<double>(hi) + half - 0.5) + 1.0;
  b = b < 0.0 ? 0.0 : (b > lim ? lim : b);
  e = e < b ? b : (e > lim ? lim : e);
  return Range{static_cast<int64_t>(b), static_cast<int64_t>(e)};
}

// [x_begin, y_begin, x_end, y_end] of the pixels a box may set; all zero for a box that pastes
// nothing or lies outside the image.
struct Window {
  int64_t x0, y0, x1, y1;
  HTC_HD int64_t width() const { return x1 - x0; }
  HTC_HD int64_t height() const { return y1 - y0; }
};

HTC_HD Window paste_window(const float* box, int64_t mask_h, int64_t mask_w, int64_t height,
                           int64_t width) {
  const BoxGeom g = box_geom(box);
  Window win{0, 0, 0, 0};
  if (!g.valid) return win;
  const Range rx = axis_window(box[0], box[2], g.w, mask_w, width);
  const Range ry = axis_window(box[1], box[3], g.h, mask_h, height);
  if (rx.end <= rx.begin || ry.end <= ry.begin) return win;
  return Window{rx.begin, ry.begin, rx.end, ry.end};
}

// The bilinear tap of pixel `p` along one axis: indices i, i + 1 into the zero-padded mask
// (padded index = mask index + 1) and their weights. Outside the support (or NaN) both weights
// are 0 and i = 0 (a padding cell), so the pixel's value is exactly 0.
struct Tap {
  int32_t i;
  float w_lo, w_hi;
};

HTC_HD Tap axis_tap(int64_t p, float lo, float size, int64_t cells) {
  const float g = (static_cast<float>(p) + 0.5f - lo) / size * 2.0f - 1.0f;
  const float u = fma_rn(g + 1.0f, static_cast<float>(cells) * 0.5f, -0.5f);
  Tap t{0, 0.0f, 0.0f};
  if (!(u > -1.0f && u < static_cast<float>(cells))) return t;
  const float f = hd::floor(u);
  t.i = static_cast<int32_t>(f) + 1;
  t.w_hi = u - f;
  t.w_lo = 1.0f - t.w_hi;
  return t;
}

// Linear interpolation between two neighbouring cells: lo * w_lo + hi * w_hi. Products are never
// contracted into FMAs (hd::mul_rn), so the CPU and CUDA kernels round identically.
HTC_HD float lerp(float lo, float hi, const Tap& t) {
  return hd::mul_rn(lo, t.w_lo) + hd::mul_rn(hi, t.w_hi);
}

// The value at a pixel from its row tap (ty) and column tap (tx): interpolate along x within the
// two mask rows, then along y. (grid_sample sums four corner products instead; the two orders
// differ by a few float32 ulps of the value, far inside the 1e-6 the tests allow at the threshold,
// and this one lets the CPU interpolate each mask row along x once per window column.)
// `at(i, j)` reads cell (i, j) of the mask padded with one cell of zeros (mask cell (i-1, j-1)).
template <typename At>
HTC_HD float bilinear(const At& at, const Tap& ty, const Tap& tx) {
  return lerp(lerp(at(ty.i, tx.i), at(ty.i, tx.i + 1), tx),
              lerp(at(ty.i + 1, tx.i), at(ty.i + 1, tx.i + 1), tx), ty);
}

}  // namespace mask_paste
}  // namespace htc_fast
