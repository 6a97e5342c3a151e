// Deformable convolution (DCNv1, Dai et al. 2017; modulated DCNv2, Zhu et al. 2019): the
// arithmetic shared by the CPU and CUDA kernels, compiled for both (HTC_HD), so the CPU tests
// exercise the code the GPU runs.
//
// Semantics (torchvision.ops.deform_conv2d / mmcv): output position (ho, wo), kernel tap
// k = i * kw + j, offset group g. The tap samples the input at
//   y = ho * stride_h - pad_h + i * dilation_h + offset[n, (g * K + k) * 2,     ho, wo]
//   x = wo * stride_w - pad_w + j * dilation_w + offset[n, (g * K + k) * 2 + 1, ho, wo]
// by bilinear interpolation in which every corner outside the map reads 0, times
// mask[n, g * K + k, ho, wo] for v2. The samples of all (channel, tap) pairs form the column
// matrix that a grouped GEMM with the weights turns into the output.
//
// A sample outside (-1, H) x (-1, W) has four zero corners: it is skipped (and so is a non-finite
// one, which a plain floor() would turn into an undefined integer).
#pragma once

#include <cstdint>

#include "common/hd_math.h"
#include "common/host_device.h"

namespace htc_fast {
namespace deform_conv {

// Geometry of one convolution; everything a kernel needs besides the tensors.
struct ConvShape {
  int64_t batch, channels, height, width;   // input
  int64_t out_channels, out_h, out_w;       // output
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, offset_groups;

  HTC_HD int64_t taps() const { return kernel_h * kernel_w; }
  HTC_HD int64_t positions() const { return out_h * out_w; }
  HTC_HD int64_t channels_per_group() const { return channels / groups; }
  HTC_HD int64_t channels_per_offset_group() const { return channels / offset_groups; }
  HTC_HD int64_t out_channels_per_group() const { return out_channels / groups; }
};

// The bilinear sample of one tap at one output position. Corner c (0..3) is
// (y0 + c / 2, x0 + c % 2); its weight is wy[c / 2] * wx[c % 2] when it lies inside the map.
template <typename T>
struct Tap {
  int64_t y0, x0;
  T ly, lx;      // fractional parts: weights (1 - ly, ly) along y and (1 - lx, lx) along x
  bool inside;   // false: all four corners are outside the map (or the position is not finite)
};

template <typename T>
HTC_HD Tap<T> make_tap(T y, T x, int64_t height, int64_t width) {
  Tap<T> t;
  // Written so that NaN fails the test: only a finite sample within (-1, H) x (-1, W) proceeds.
  t.inside = y > T(-1) && y < T(height) && x > T(-1) && x < T(width);
  if (!t.inside) {
    t.y0 = t.x0 = 0;
    t.ly = t.lx = T(0);
    return t;
  }
  const T fy = hd::floor(y), fx = hd::floor(x);
  t.y0 = static_cast<int64_t>(fy);
  t.x0 = static_cast<int64_t>(fx);
  t.ly = y - fy;
  t.lx = x - fx;
  return t;
}

// The sampling position of tap (i, j) at output (ho, wo), given the tap's (dy, dx) offset.
template <typename T>
HTC_HD T sample_y(const ConvShape& s, int64_t ho, int64_t i, T dy) {
  return static_cast<T>(ho * s.stride_h - s.pad_h + i * s.dil_h) + dy;
}
template <typename T>
HTC_HD T sample_x(const ConvShape& s, int64_t wo, int64_t j, T dx) {
  return static_cast<T>(wo * s.stride_w - s.pad_w + j * s.dil_w) + dx;
}

// The tap k of offset group g at output position p (p = ho * Wo + wo) of one image, whose
// offsets `offset_n` are laid out (2 * dg * K, Ho * Wo) as in the op's offset tensor.
template <typename T>
HTC_HD Tap<T> tap_at(const ConvShape& s, const T* offset_n, int64_t g, int64_t k, int64_t p) {
  const int64_t plane = s.positions();
  const int64_t channel = (g * s.taps() + k) * 2;
  const T dy = offset_n[channel * plane + p];
  const T dx = offset_n[(channel + 1) * plane + p];
  const T y = sample_y(s, p / s.out_w, k / s.kernel_w, dy);
  const T x = sample_x(s, p % s.out_w, k % s.kernel_w, dx);
  return make_tap(y, x, s.height, s.width);
}

// The bilinear weight of corner c (0..3) of the tap; corners are (y0, x0), (y0, x1), (y1, x0),
// (y1, x1) -- torchvision's order, which fixes the rounding of the sum.
template <typename T>
HTC_HD T corner_weight(const Tap<T>& t, int c) {
  const T wy = c < 2 ? T(1) - t.ly : t.ly;
  const T wx = (c & 1) ? t.lx : T(1) - t.lx;
  return wy * wx;
}

template <typename T>
HTC_HD bool corner_inside(const Tap<T>& t, int c, int64_t height, int64_t width) {
  const int64_t y = t.y0 + c / 2, x = t.x0 + c % 2;
  return t.inside && y >= 0 && y < height && x >= 0 && x < width;
}

template <typename T>
HTC_HD int64_t corner_index(const Tap<T>& t, int c, int64_t width) {
  return (t.y0 + c / 2) * width + t.x0 + c % 2;
}

// The four corner values of `plane` (H * W values of one channel) at the tap; 0 outside the map.
template <typename T, typename scalar_t>
HTC_HD void load_corners(const scalar_t* plane, const Tap<T>& t, int64_t height, int64_t width, T v[4]) {
#if defined(__CUDACC__)  // g++ would warn on the unknown pragma
#pragma unroll
#endif
  for (int c = 0; c < 4; ++c)
    v[c] = corner_inside(t, c, height, width) ? static_cast<T>(plane[corner_index(t, c, width)]) : T(0);
}

// The interpolated value from the corner values: w0 v0 + w1 v1 + w2 v2 + w3 v3, in that order.
template <typename T>
HTC_HD T interpolate(const Tap<T>& t, const T v[4]) {
  T r = corner_weight(t, 0) * v[0];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int c = 1; c < 4; ++c) r += corner_weight(t, c) * v[c];
  return r;
}

// d(interpolated value)/dy and d/dx: the derivative of the interpolation with corners outside the
// map reading 0. Callers skip taps outside (-1, H) x (-1, W), so a sample exactly on y = -1 or
// x = -1 gets 0, as in mmcv; torchvision returns the one-sided derivative there.
template <typename T>
HTC_HD void interpolate_gradient(const Tap<T>& t, const T v[4], T& d_dy, T& d_dx) {
  d_dy = (T(1) - t.lx) * (v[2] - v[0]) + t.lx * (v[3] - v[1]);
  d_dx = (T(1) - t.ly) * (v[1] - v[0]) + t.ly * (v[3] - v[2]);
}

template <typename T, typename scalar_t>
HTC_HD T tap_value(const scalar_t* plane, const Tap<T>& t, int64_t height, int64_t width) {
  if (!t.inside) return T(0);
  T v[4];
  load_corners(plane, t, height, width, v);
  return interpolate(t, v);
}

}  // namespace deform_conv
}  // namespace htc_fast
