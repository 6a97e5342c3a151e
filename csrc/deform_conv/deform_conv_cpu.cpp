// Deformable convolution on CPU: forward and backward, one template each (fp32/fp64/fp16/bf16,
// accumulation in at::opmath_type; offsets and masks are opmath-typed geometry).
//
// Forward, per image and per tile of output positions (the column matrix of a tile is bounded,
// deform_conv_host.h): (1) the bilinear corners of every (offset group, tap, position) are
// computed once -- they do not depend on the channel -- keeping only the corners inside the map;
// (2) the (C * K, tile) column matrix is filled, parallel over channels, by gathering with those
// corners; (3) one batched GEMM over the groups, (G, Co/G, C/G * K) x (G, C/G * K, tile), writes
// the output tile. Nothing is ever materialised for the whole batch.
//
// Backward, per image and tile: grad_columns = W^T grad_out (batched GEMM); grad_weight +=
// grad_out columns^T (columns recomputed); grad_input by scattering grad_columns back through the
// bilinear corners, parallel over channels, so each thread owns whole gradient planes (no atomics,
// deterministic); grad_offset / grad_mask parallel over (offset group, tap), each summing over the
// group's channels the column gradient times the derivative of the interpolation (or its value).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "deform_conv/deform_conv_host.h"

namespace htc_fast {
namespace deform_conv {
namespace {

// Column values per tile (CPU): 32 MB of fp32. The HTC c4/c5 layers fit one tile per image and
// c3 two: few tiles means few parallel regions, which matters on a shared, oversubscribed CPU
// (each region ends in a barrier), while the GEMM streams the columns either way.
constexpr int64_t kColumnBudget = int64_t(1) << 23;

// One tap at one position, reduced to its corners inside the map (so the channel loops neither
// branch nor read outside the plane) and its modulation.
template <typename T>
struct Sample {
  int count;
  int64_t index[4];
  T weight[4];
  T mask;
};

// samples[(g * K + k) * t + i] for positions p0 .. p0 + t of one image.
template <typename T>
void build_samples(const ConvShape& s, const T* offset_n, const T* mask_n, int64_t p0, int64_t t,
                   std::vector<Sample<T>>& samples) {
  const int64_t K = s.taps(), P = s.positions();
  samples.resize(s.offset_groups * K * t);
  at::parallel_for(0, s.offset_groups * K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t gk = begin; gk < end; ++gk) {
      for (int64_t i = 0; i < t; ++i) {
        const Tap<T> tap = tap_at(s, offset_n, gk / K, gk % K, p0 + i);
        Sample<T>& out = samples[gk * t + i];
        out.count = 0;
        for (int c = 0; c < 4; ++c) {
          if (!corner_inside(tap, c, s.height, s.width)) continue;
          out.index[out.count] = corner_index(tap, c, s.width);
          out.weight[out.count++] = corner_weight(tap, c);
        }
        out.mask = mask_n != nullptr ? mask_n[gk * P + p0 + i] : T(1);
      }
    }
  });
}

// columns[(c * K + k) * ld + i] = mask * bilinear(input[c]) for the tile (the sum skips only
// corners outside the map, which `interpolate` would add as zeros: the same rounding).
template <typename scalar_t, typename T>
void fill_columns(const ConvShape& s, const scalar_t* input_n, const std::vector<Sample<T>>& samples,
                  int64_t t, T* columns, int64_t ld) {
  const int64_t K = s.taps(), plane = s.height * s.width, per_group = s.channels_per_offset_group();
  at::parallel_for(0, s.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const scalar_t* x = input_n + c * plane;
      for (int64_t k = 0; k < K; ++k) {
        const Sample<T>* smp = samples.data() + ((c / per_group) * K + k) * t;
        T* row = columns + (c * K + k) * ld;
        for (int64_t i = 0; i < t; ++i) {
          T v = T(0);
          for (int q = 0; q < smp[i].count; ++q) v += smp[i].weight[q] * static_cast<T>(x[smp[i].index[q]]);
          row[i] = smp[i].mask * v;
        }
      }
    }
  });
}

template <typename scalar_t>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                        const ConvShape& s) {
  using T = at::opmath_type<scalar_t>;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t G = s.groups, K = s.taps(), P = s.positions();
  const int64_t rows_g = s.channels_per_group() * K, cout_g = s.out_channels_per_group();
  const at::Tensor x = input.contiguous(), off = offset.contiguous();
  const at::Tensor msk = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor w = weight.to(acc).reshape({G, cout_g, rows_g});
  at::Tensor out = at::empty({s.batch, s.out_channels, P}, acc);
  const int64_t tile = tile_positions(s, kColumnBudget);
  at::Tensor columns = at::empty({s.channels * K, tile}, acc);
  std::vector<Sample<T>> samples;
  for (int64_t n = 0; n < s.batch; ++n) {
    const T* off_n = off.data_ptr<T>() + n * off.stride(0);
    const T* mask_n = msk.defined() ? msk.data_ptr<T>() + n * msk.stride(0) : nullptr;
    at::Tensor out_n = out[n].view({G, cout_g, P});
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t t = std::min(tile, P - p0);
      build_samples(s, off_n, mask_n, p0, t, samples);
      fill_columns(s, x.data_ptr<scalar_t>() + n * x.stride(0), samples, t, columns.data_ptr<T>(), tile);
      const at::Tensor cols = columns.view({G, rows_g, tile}).narrow(2, 0, t);
      if (t == P) {
        at::bmm_out(out_n, w, cols);
      } else {
        out_n.narrow(2, p0, t).copy_(at::bmm(w, cols));
      }
    }
  }
  if (bias.has_value()) out.add_(bias->to(acc).view({1, s.out_channels, 1}));
  return out.view({s.batch, s.out_channels, s.out_h, s.out_w}).to(input.scalar_type());
}

// grad_input[n, c] += grad_columns scattered through the corners; parallel over channels.
template <typename T>
void scatter_input(const ConvShape& s, const T* grad_columns, const std::vector<Sample<T>>& samples,
                   int64_t t, T* grad_input_n) {
  const int64_t K = s.taps(), plane = s.height * s.width, per_group = s.channels_per_offset_group();
  at::parallel_for(0, s.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      T* gx = grad_input_n + c * plane;
      for (int64_t k = 0; k < K; ++k) {
        const Sample<T>* smp = samples.data() + ((c / per_group) * K + k) * t;
        const T* row = grad_columns + (c * K + k) * t;
        for (int64_t i = 0; i < t; ++i) {
          const T g = smp[i].mask * row[i];
          for (int q = 0; q < smp[i].count; ++q) gx[smp[i].index[q]] += smp[i].weight[q] * g;
        }
      }
    }
  });
}

// grad_offset (and grad_mask) of one image's tile, parallel over (offset group, tap).
template <typename scalar_t, typename T>
void offset_mask_gradients(const ConvShape& s, const scalar_t* input_n, const T* offset_n, const T* mask_n,
                           const T* grad_columns, int64_t p0, int64_t t, T* grad_offset_n, T* grad_mask_n) {
  const int64_t K = s.taps(), P = s.positions(), plane = s.height * s.width;
  const int64_t per_group = s.channels_per_offset_group();
  at::parallel_for(0, s.offset_groups * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<Tap<T>> taps(t);
    std::vector<T> d_dy(t), d_dx(t), d_mask(t);
    for (int64_t gk = begin; gk < end; ++gk) {
      const int64_t g = gk / K, k = gk % K;
      for (int64_t i = 0; i < t; ++i) taps[i] = tap_at(s, offset_n, g, k, p0 + i);
      std::fill(d_dy.begin(), d_dy.end(), T(0));
      std::fill(d_dx.begin(), d_dx.end(), T(0));
      std::fill(d_mask.begin(), d_mask.end(), T(0));
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        const scalar_t* x = input_n + c * plane;
        const T* row = grad_columns + (c * K + k) * t;
        for (int64_t i = 0; i < t; ++i) {
          if (!taps[i].inside) continue;
          T v[4], gy, gx;
          load_corners(x, taps[i], s.height, s.width, v);
          interpolate_gradient(taps[i], v, gy, gx);
          d_dy[i] += row[i] * gy;
          d_dx[i] += row[i] * gx;
          if (grad_mask_n != nullptr) d_mask[i] += row[i] * interpolate(taps[i], v);
        }
      }
      for (int64_t i = 0; i < t; ++i) {
        const T m = mask_n != nullptr ? mask_n[gk * P + p0 + i] : T(1);
        grad_offset_n[(2 * gk) * P + p0 + i] = m * d_dy[i];
        grad_offset_n[(2 * gk + 1) * P + p0 + i] = m * d_dx[i];
        if (grad_mask_n != nullptr) grad_mask_n[gk * P + p0 + i] = d_mask[i];
      }
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const ConvShape& s) {
  using T = at::opmath_type<scalar_t>;
  const auto acc = input.options().dtype(c10::CppTypeToScalarType<T>::value);
  const int64_t G = s.groups, K = s.taps(), P = s.positions(), rows_g = s.channels_per_group() * K;
  const BackwardState b = backward_state(grad, input, weight, offset, mask, s, c10::CppTypeToScalarType<T>::value);
  const at::Tensor &x = b.x, &off = b.off, &msk = b.msk, &go = b.go, &w_t = b.w_t;
  at::Tensor grad_input = b.grad_input, grad_weight = b.grad_weight, grad_offset = b.grad_offset,
             grad_mask = b.grad_mask;
  const int64_t tile = tile_positions(s, kColumnBudget);
  at::Tensor columns = at::empty({s.channels * K, tile}, acc);
  std::vector<Sample<T>> samples;
  for (int64_t n = 0; n < s.batch; ++n) {
    const scalar_t* x_n = x.data_ptr<scalar_t>() + n * x.stride(0);
    const T* off_n = off.data_ptr<T>() + n * off.stride(0);
    const T* mask_n = msk.defined() ? msk.data_ptr<T>() + n * msk.stride(0) : nullptr;
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t t = std::min(tile, P - p0);
      const at::Tensor go_t = go[n].narrow(2, p0, t).to(acc);            // (G, Co/G, t)
      const at::Tensor grad_columns = at::bmm(w_t, go_t).contiguous();  // (G, C/G * K, t)
      build_samples(s, off_n, mask_n, p0, t, samples);
      fill_columns(s, x_n, samples, t, columns.data_ptr<T>(), tile);
      grad_weight.baddbmm_(go_t, columns.view({G, rows_g, tile}).narrow(2, 0, t).transpose(1, 2));
      scatter_input(s, grad_columns.data_ptr<T>(), samples, t, grad_input.data_ptr<T>() + n * grad_input.stride(0));
      offset_mask_gradients(s, x_n, off_n, mask_n, grad_columns.data_ptr<T>(), p0, t,
                            grad_offset.data_ptr<T>() + n * grad_offset.stride(0),
                            msk.defined() ? grad_mask.data_ptr<T>() + n * grad_mask.stride(0) : nullptr);
    }
  }
  return {grad_input.to(input.scalar_type()),
          grad_weight.view(weight.sizes()).to(weight.scalar_type()), grad_offset, grad_mask};
}

at::Tensor deform_conv2d_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                                     const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                                     const std::optional<at::Tensor>& bias, int64_t stride_h,
                                     int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                     int64_t dil_w, int64_t groups, int64_t offset_groups) {
  const ConvShape s = check_args(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                                 dil_w, groups, offset_groups, "htc_fast::deform_conv2d");
  if (s.batch == 0) return at::empty({0, s.out_channels, s.out_h, s.out_w}, input.options());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d", [&] {
    out = forward_impl<scalar_t>(input, weight, offset, mask, bias, s);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dil_h, int64_t dil_w, int64_t groups, int64_t offset_groups) {
  const char* op = "htc_fast::deform_conv2d_backward";
  const ConvShape s = check_args(input, weight, offset, mask, std::nullopt, stride_h, stride_w, pad_h, pad_w,
                                 dil_h, dil_w, groups, offset_groups, op);
  check_grad(grad, input, s, op);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  if (s.batch == 0) {
    return empty_batch_grads(input, weight, offset, mask);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward", [&] {
    out = backward_impl<scalar_t>(grad, input, weight, offset, mask, s);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CPU, m) {
  m.impl("deform_conv2d", &deform_conv2d_forward_cpu);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cpu);
}

}  // namespace deform_conv
}  // namespace htc_fast
