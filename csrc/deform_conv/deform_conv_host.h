// Host-side glue shared by the CPU and CUDA entry points of deformable convolution: argument
// checks (every message names the argument) and the column-tile size.
#pragma once

#include <torch/types.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/checks.h"
#include "deform_conv/deform_conv_common.h"

namespace htc_fast {
namespace deform_conv {

// Validates the operator's arguments and returns the convolution's geometry. The Python layer
// checks the same things with friendlier messages; these guard direct calls of the operator.
inline ConvShape check_args(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                            int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
                            int64_t dil_h, int64_t dil_w, int64_t groups, int64_t offset_groups,
                            const char* op) {
  check_float_tensor(input, op, "input", 4);
  check_float_tensor(weight, op, "weight", 4);
  check_float_tensor(offset, op, "offset", 4);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight is ", weight.scalar_type(),
              " but input is ", input.scalar_type());
  const auto geometry = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(offset.scalar_type() == geometry, op, ": offset must be ", geometry, " for ",
              input.scalar_type(), " input (offsets stay fp32 under AMP), got ", offset.scalar_type());
  check_same_device(weight, input, op, "weight", "input");
  check_same_device(offset, input, op, "offset", "input");
  TORCH_CHECK(stride_h > 0 && stride_w > 0 && dil_h > 0 && dil_w > 0 && pad_h >= 0 && pad_w >= 0, op,
              ": stride and dilation must be positive and padding non-negative");
  ConvShape s;
  s.batch = input.size(0), s.channels = input.size(1), s.height = input.size(2), s.width = input.size(3);
  s.out_channels = weight.size(0), s.kernel_h = weight.size(2), s.kernel_w = weight.size(3);
  s.stride_h = stride_h, s.stride_w = stride_w, s.pad_h = pad_h, s.pad_w = pad_w;
  s.dil_h = dil_h, s.dil_w = dil_w, s.groups = groups, s.offset_groups = offset_groups;
  TORCH_CHECK(groups > 0 && s.channels % groups == 0 && weight.size(1) * groups == s.channels, op,
              ": groups = ", groups, " does not match input channels ", s.channels,
              " and weight.shape[1] = ", weight.size(1));
  TORCH_CHECK(s.out_channels % groups == 0, op, ": weight has ", s.out_channels,
              " output channels, not divisible by groups = ", groups);
  TORCH_CHECK(offset_groups > 0 && s.channels % offset_groups == 0, op, ": input channels ", s.channels,
              " are not divisible by offset_groups = ", offset_groups);
  s.out_h = (s.height + 2 * pad_h - dil_h * (s.kernel_h - 1) - 1) / stride_h + 1;
  s.out_w = (s.width + 2 * pad_w - dil_w * (s.kernel_w - 1) - 1) / stride_w + 1;
  TORCH_CHECK(s.out_h > 0 && s.out_w > 0 && s.kernel_h > 0 && s.kernel_w > 0, op,
              ": the output would be empty (", s.out_h, " x ", s.out_w, ")");
  TORCH_CHECK(offset.size(0) == s.batch && offset.size(1) == 2 * offset_groups * s.taps() &&
                  offset.size(2) == s.out_h && offset.size(3) == s.out_w,
              op, ": offset must have shape (", s.batch, ", ", 2 * offset_groups * s.taps(), ", ", s.out_h,
              ", ", s.out_w, "), got ", offset.sizes());
  if (mask.has_value()) {
    check_float_tensor(*mask, op, "mask", 4);
    TORCH_CHECK(mask->scalar_type() == geometry, op, ": mask must be ", geometry, ", got ", mask->scalar_type());
    check_same_device(*mask, input, op, "mask", "input");
    TORCH_CHECK(mask->size(0) == s.batch && mask->size(1) == offset_groups * s.taps() &&
                    mask->size(2) == s.out_h && mask->size(3) == s.out_w,
                op, ": mask must have shape (", s.batch, ", ", offset_groups * s.taps(), ", ", s.out_h, ", ",
                s.out_w, "), got ", mask->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.out_channels, op, ": bias must have shape (",
                s.out_channels, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), op, ": bias is ", bias->scalar_type(),
                " but input is ", input.scalar_type());
    check_same_device(*bias, input, op, "bias", "input");
  }
  return s;
}

// The backward's incoming gradient must be the forward output's shape and dtype.
inline void check_grad(const at::Tensor& grad, const at::Tensor& input, const ConvShape& s, const char* op) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == s.batch && grad.size(1) == s.out_channels &&
                  grad.size(2) == s.out_h && grad.size(3) == s.out_w && grad.scalar_type() == input.scalar_type(),
              op, ": grad must be ", input.scalar_type(), " of shape (", s.batch, ", ", s.out_channels, ", ",
              s.out_h, ", ", s.out_w, "), got ", grad.scalar_type(), " ", grad.sizes());
  check_same_device(grad, input, op, "grad", "input");
}

// What a backward pass works on, shared by the CPU and CUDA kernels: the inputs made contiguous,
// grad viewed per group (N, G, Co/G, P), the weights transposed per group (G, C/G * K, Co/G), and
// zeroed gradient buffers in the accumulation type `acc` (grad_mask is (0,) without a mask).
struct BackwardState {
  at::Tensor x, off, msk, go, w_t;
  at::Tensor grad_input, grad_weight, grad_offset, grad_mask;
};

inline BackwardState backward_state(const at::Tensor& grad, const at::Tensor& input, const at::Tensor& weight,
                                    const at::Tensor& offset, const std::optional<at::Tensor>& mask,
                                    const ConvShape& s, at::ScalarType acc) {
  const auto opts = input.options().dtype(acc);
  const int64_t rows_g = s.channels_per_group() * s.taps(), cout_g = s.out_channels_per_group();
  BackwardState b;
  b.x = input.contiguous();
  b.off = offset.contiguous();
  b.msk = mask.has_value() ? mask->contiguous() : at::Tensor();
  b.go = grad.contiguous().view({s.batch, s.groups, cout_g, s.positions()});
  b.w_t = weight.to(acc).reshape({s.groups, cout_g, rows_g}).transpose(1, 2);
  b.grad_input = at::zeros({s.batch, s.channels, s.height, s.width}, opts);
  b.grad_weight = at::zeros({s.groups, cout_g, rows_g}, opts);
  b.grad_offset = at::zeros_like(b.off);
  b.grad_mask = b.msk.defined() ? at::zeros_like(b.msk) : at::empty({0}, b.off.options());
  return b;
}

// The gradients returned for an empty batch.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_batch_grads(
    const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask) {
  return {at::zeros_like(input), at::zeros_like(weight), at::zeros_like(offset),
          mask.has_value() ? at::zeros_like(*mask) : at::empty({0}, offset.options())};
}

// Output positions per column tile: the (C * K, tile) column matrix of one image holds at most
// `budget` values, so memory stays bounded whatever the image size (and the tile stays cache-sized
// on the CPU). At least 32 positions, at most all of them.
inline int64_t tile_positions(const ConvShape& s, int64_t budget) {
  const int64_t rows = s.channels * s.taps();
  return std::min(s.positions(), std::max<int64_t>(32, budget / std::max<int64_t>(rows, 1)));
}

}  // namespace deform_conv
}  // namespace htc_fast
