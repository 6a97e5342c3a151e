// Deformable convolution on CUDA: forward and backward, one template each (fp32/fp64/fp16/bf16).
//
// Tiled design: per image and per tile of output positions (the column matrix of a tile holds at
// most kColumnBudget values, deform_conv_host.h -- never the whole batch), an im2col kernel writes
// the (C * K, tile) column matrix, one thread per (channel, position) walking the K taps with the
// sampling math of deform_conv_common.h (the code the CPU tests run), and one batched GEMM over
// the conv groups, (G, Co/G, C/G * K) x (G, C/G * K, tile), produces the output tile on cuBLAS.
// fp16/bf16: the samples are computed in fp32 and rounded once into columns of the input dtype,
// so the GEMM runs on tensor cores with fp32 accumulation.
//
// Backward (fp32 -- fp64 for fp64 -- throughout): grad_columns = W^T grad_out (batched GEMM);
// grad_weight += grad_out columns^T (columns recomputed); grad_input by a col2im kernel that
// scatters grad_columns through the bilinear corners with atomicAdd (not deterministic -- the CPU
// backward is -- so it raises under torch.use_deterministic_algorithms(True)); grad_offset / grad_mask by one thread per (offset group, tap, position) summing
// over the group's channels (deterministic).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/cuda_helpers.cuh"
#include "deform_conv/deform_conv_host.h"

namespace htc_fast {
namespace deform_conv {
namespace {

// Column values per tile on the GPU: 32 Mi values (64 MB in bf16); the HTC c3-c5 layers fit in
// one tile per image.
constexpr int64_t kColumnBudget = int64_t(1) << 25;

// columns[(c * K + k) * ld + i] = mask * bilinear(input[c]) at tap k, position p0 + i.
template <typename scalar_t, typename col_t, typename T>
__global__ void im2col_kernel(ConvShape s, const scalar_t* __restrict__ input_n, const T* __restrict__ offset_n,
                              const T* __restrict__ mask_n, int64_t p0, int64_t t, col_t* __restrict__ columns,
                              int64_t ld) {
  const int64_t K = s.taps(), P = s.positions(), plane = s.height * s.width;
  const int64_t per_group = s.channels_per_offset_group();
  HTC_CUDA_KERNEL_LOOP(index, s.channels * t) {
    const int64_t i = index % t, c = index / t, g = c / per_group;
    const scalar_t* x = input_n + c * plane;
    for (int64_t k = 0; k < K; ++k) {
      const Tap<T> tap = tap_at(s, offset_n, g, k, p0 + i);
      const T m = mask_n != nullptr ? mask_n[(g * K + k) * P + p0 + i] : T(1);
      columns[(c * K + k) * ld + i] = static_cast<col_t>(m * tap_value(x, tap, s.height, s.width));
    }
  }
}

// grad_input[c] += grad_columns scattered through the corners of every tap (atomics).
template <typename T>
__global__ void col2im_kernel(ConvShape s, const T* __restrict__ grad_columns, const T* __restrict__ offset_n,
                              const T* __restrict__ mask_n, int64_t p0, int64_t t, T* grad_input_n) {
  const int64_t K = s.taps(), P = s.positions(), plane = s.height * s.width;
  const int64_t per_group = s.channels_per_offset_group();
  HTC_CUDA_KERNEL_LOOP(index, s.channels * K * t) {
    const int64_t i = index % t, ck = index / t, c = ck / K, k = ck % K, g = c / per_group;
    const Tap<T> tap = tap_at(s, offset_n, g, k, p0 + i);
    if (!tap.inside) continue;
    const T m = mask_n != nullptr ? mask_n[(g * K + k) * P + p0 + i] : T(1);
    const T value = m * grad_columns[ck * t + i];
    T* gx = grad_input_n + c * plane;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (corner_inside(tap, q, s.height, s.width))
        gpuAtomicAdd(gx + corner_index(tap, q, s.width), corner_weight(tap, q) * value);
    }
  }
}

// grad_offset (and grad_mask) at (offset group, tap, position): sums over the group's channels.
template <typename scalar_t, typename T>
__global__ void offset_mask_grad_kernel(ConvShape s, const scalar_t* __restrict__ input_n,
                                        const T* __restrict__ offset_n, const T* __restrict__ mask_n,
                                        const T* __restrict__ grad_columns, int64_t p0, int64_t t,
                                        T* __restrict__ grad_offset_n, T* __restrict__ grad_mask_n) {
  const int64_t K = s.taps(), P = s.positions(), plane = s.height * s.width;
  const int64_t per_group = s.channels_per_offset_group();
  HTC_CUDA_KERNEL_LOOP(index, s.offset_groups * K * t) {
    const int64_t i = index % t, gk = index / t, g = gk / K, k = gk % K;
    const Tap<T> tap = tap_at(s, offset_n, g, k, p0 + i);
    T d_dy = T(0), d_dx = T(0), d_mask = T(0);
    if (tap.inside) {
      for (int64_t c = g * per_group; c < (g + 1) * per_group; ++c) {
        T v[4], gy, gx;
        load_corners(input_n + c * plane, tap, s.height, s.width, v);
        interpolate_gradient(tap, v, gy, gx);
        const T gc = grad_columns[(c * K + k) * t + i];
        d_dy += gc * gy;
        d_dx += gc * gx;
        if (grad_mask_n != nullptr) d_mask += gc * interpolate(tap, v);
      }
    }
    const T m = mask_n != nullptr ? mask_n[gk * P + p0 + i] : T(1);
    grad_offset_n[(2 * gk) * P + p0 + i] = m * d_dy;
    grad_offset_n[(2 * gk + 1) * P + p0 + i] = m * d_dx;
    if (grad_mask_n != nullptr) grad_mask_n[gk * P + p0 + i] = d_mask;
  }
}

template <typename T>
const T* image_ptr(const at::Tensor& t, int64_t n) {
  return t.defined() ? t.data_ptr<T>() + n * t.stride(0) : nullptr;
}

template <typename scalar_t>
at::Tensor forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                        const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                        const ConvShape& s) {
  using T = at::opmath_type<scalar_t>;
  const int64_t G = s.groups, K = s.taps(), P = s.positions();
  const int64_t rows_g = s.channels_per_group() * K, cout_g = s.out_channels_per_group();
  const at::Tensor x = input.contiguous(), off = offset.contiguous();
  const at::Tensor msk = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor w = weight.contiguous().view({G, cout_g, rows_g});
  at::Tensor out = at::empty({s.batch, s.out_channels, P}, input.options());
  const int64_t tile = tile_positions(s, kColumnBudget);
  at::Tensor columns = at::empty({s.channels * K, tile}, input.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t n = 0; n < s.batch; ++n) {
    at::Tensor out_n = out[n].view({G, cout_g, P});
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t t = std::min(tile, P - p0);
      // htc:max-regs im2col_kernel 48 fp64=64: 256-thread blocks, 5 per SM (62.5 % occupancy;
      // 4 for fp64): a gather loop over the taps that needs many loads in flight.
      im2col_kernel<scalar_t, scalar_t, T><<<blocks_for(s.channels * t), kThreadsPerBlock, 0, stream>>>(
          s, image_ptr<scalar_t>(x, n), image_ptr<T>(off, n), image_ptr<T>(msk, n), p0, t,
          columns.data_ptr<scalar_t>(), tile);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor cols = columns.view({G, rows_g, tile}).narrow(2, 0, t);
      if (t == P) {
        at::bmm_out(out_n, w, cols);
      } else {
        out_n.narrow(2, p0, t).copy_(at::bmm(w, cols));
      }
    }
  }
  if (bias.has_value()) out.add_(bias->view({1, s.out_channels, 1}));
  return out.view({s.batch, s.out_channels, s.out_h, s.out_w});
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
  const int64_t tile = tile_positions(s, kColumnBudget / 2);  // fp32 columns and grad_columns
  at::Tensor columns = at::empty({s.channels * K, tile}, acc);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t n = 0; n < s.batch; ++n) {
    for (int64_t p0 = 0; p0 < P; p0 += tile) {
      const int64_t t = std::min(tile, P - p0);
      const at::Tensor go_t = go[n].narrow(2, p0, t).to(acc);            // (G, Co/G, t)
      const at::Tensor grad_columns = at::bmm(w_t, go_t).contiguous();  // (G, C/G * K, t)
      im2col_kernel<scalar_t, T, T><<<blocks_for(s.channels * t), kThreadsPerBlock, 0, stream>>>(
          s, image_ptr<scalar_t>(x, n), image_ptr<T>(off, n), image_ptr<T>(msk, n), p0, t,
          columns.data_ptr<T>(), tile);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_weight.baddbmm_(go_t, columns.view({G, rows_g, tile}).narrow(2, 0, t).transpose(1, 2));
      // htc:max-regs col2im_kernel 48 fp64=56: 5 blocks of 256 per SM (4 for fp64), atomics-bound.
      col2im_kernel<T><<<blocks_for(s.channels * K * t), kThreadsPerBlock, 0, stream>>>(
          s, grad_columns.data_ptr<T>(), image_ptr<T>(off, n), image_ptr<T>(msk, n), p0, t,
          grad_input.data_ptr<T>() + n * grad_input.stride(0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // htc:max-regs offset_mask_grad_kernel 56 fp64=72: 4 blocks of 256 per SM (50 %; 3 for fp64);
      // a channel loop with four corner loads per step.
      offset_mask_grad_kernel<scalar_t, T><<<blocks_for(s.offset_groups * K * t), kThreadsPerBlock, 0, stream>>>(
          s, image_ptr<scalar_t>(x, n), image_ptr<T>(off, n), image_ptr<T>(msk, n), grad_columns.data_ptr<T>(),
          p0, t, grad_offset.data_ptr<T>() + n * grad_offset.stride(0),
          msk.defined() ? grad_mask.data_ptr<T>() + n * grad_mask.stride(0) : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return {grad_input.to(input.scalar_type()), grad_weight.view(weight.sizes()).to(weight.scalar_type()),
          grad_offset, grad_mask};
}

at::Tensor deform_conv2d_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                                      const std::optional<at::Tensor>& bias, int64_t stride_h,
                                      int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                                      int64_t dil_w, int64_t groups, int64_t offset_groups) {
  const ConvShape s = check_args(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                                 dil_w, groups, offset_groups, "htc_fast::deform_conv2d");
  if (s.batch == 0) return at::empty({0, s.out_channels, s.out_h, s.out_w}, input.options());
  const c10::cuda::CUDAGuard guard(input.device());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d", [&] {
    out = forward_impl<scalar_t>(input, weight, offset, mask, bias, s);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dil_h, int64_t dil_w, int64_t groups, int64_t offset_groups) {
  const char* op = "htc_fast::deform_conv2d_backward";
  const ConvShape s = check_args(input, weight, offset, mask, std::nullopt, stride_h, stride_w, pad_h, pad_w,
                                 dil_h, dil_w, groups, offset_groups, op);
  check_grad(grad, input, s, op);
  // grad_input is accumulated with atomics (col2im_kernel): summation order varies run to run.
  at::globalContext().alertNotDeterministic(op);
  if (s.batch == 0) {
    return empty_batch_grads(input, weight, offset, mask);
  }
  const c10::cuda::CUDAGuard guard(input.device());
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "deform_conv2d_backward", [&] {
    out = backward_impl<scalar_t>(grad, input, weight, offset, mask, s);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(htc_fast, CUDA, m) {
  m.impl("deform_conv2d", &deform_conv2d_forward_cuda);
  m.impl("deform_conv2d_backward", &deform_conv2d_backward_cuda);
}

}  // namespace deform_conv
}  // namespace htc_fast
