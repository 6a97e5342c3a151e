"""Deformable convolution v1 / modulated v2 as Triton kernels, registered as ``htc_fast::*_triton``.

Owns the implicit-GEMM forward and the ``torch.library.triton_op`` registrations; autograd is
registered by ``htc_fast/ops/deform_conv.py`` when it loads this module (one import direction).
Argument checking and the backend choice live in ``htc_fast/ops/deform_conv.py``; the semantics
(the spec every backend follows) in ``htc_fast/ops/reference/deform_conv.py``; the sampling arithmetic mirrors
``csrc/deform_conv/deform_conv_common.h``.

Math. Rows r = n * P + ho * Wo + wo (P = Ho * Wo) flatten (image, output position), so a tile may
span images. Tap k = i * kw + j of offset group og samples y = ho*stride_h - pad_h + i*dil_h + dy,
x likewise, with dy/dx = offset[n, (og*K + k)*2 (+1), ho, wo]. A sample outside (-1, H) x (-1, W)
(or not finite) reads 0 with zero gradients; otherwise it is the bilinear sum w00 v00 + w01 v01 +
w10 v10 + w11 v11 with corners outside the map reading 0. The column A[r, (c, k)] = mask * sample
(mask = 1 for v1) and out[r, co] = sum_{c in group, k} A[r, (c, k)] W[co, c, k] + bias[co].
Backward: gcol[r, (c, k)] = sum_co grad[r, co] W[co, c, k]; grad_input scatters gcol * mask * w
to the 4 corners; grad_offset = mask * sum_c gcol * d(sample)/d(y, x) with d/dy = (1-lx)(v10-v00)
+ lx(v11-v01), d/dx = (1-ly)(v01-v00) + ly(v11-v10); grad_mask = sum_c gcol * sample;
grad_weight[co, c, k] = sum_r grad[r, co] A[r, (c, k)].

Kernels and grids (nothing column-sized is ever materialised):
- _fwd_kernel, grid (R / BLOCK_P, Cout_g / BLOCK_CO, groups): a BLOCK_P x BLOCK_CO output tile of
  one conv group; loops over taps k and BLOCK_C chunks of the group's input channels, gathers the
  A tile in registers and accumulates tl.dot(A, W_k) in T. A chunk may straddle offset groups:
  _columns loops over the offset groups it overlaps, each contributing its own channels.
- the gradients (_bwd_data_kernel, _bwd_weight_kernel): kernels/deform_conv_backward.py; the
  shared sampling helpers: kernels/deform_conv_common.py.
Tiles and warps: FWD_TILES / DATA_TILES / WEIGHT_TILES, chosen for >= 2 resident CTAs per SM
(registers * threads <= 64K / 2; MAX_REGS, checked for sm_80 and sm_90 in CI by
scripts/check_triton_compile.py).

Memory layout: every tensor is addressed through explicit strides (NCHW or channels-last input both
work without a copy). grad_input accumulates in a channels-last T buffer (the BLOCK_C atomics of a
row are contiguous), converted to a contiguous tensor of the input's dtype at the end.

Accumulation dtype T: the offsets' dtype (float64 for float64 features, else float32); sampling
coordinates and bilinear weights are computed in T. GEMM operands: fp64 tiles go to tl.dot with
input_precision="ieee"; fp32 tiles of the forward and of grad_weight use the tensor cores with
"tf32x3" (each product split into three TF32 products: about fp32's rounding, where plain TF32's
10-bit mantissa would break the fp32 tolerances), those of the grad-input kernel stay "ieee" (its
GEMM is small and tf32x3 costs it ~100 registers); fp16/bf16 operands (the A / gcol tiles rounded
to the input dtype) use the tensor cores with T accumulation, except grad_weight's GEMM, which
takes fp32 operands (a reduction over every output position). The interpreter (TRITON_INTERPRET=1)
truncates fp32 -> bf16 casts and its bf16 tl.dot multiplies raw bits, so there bf16 GEMMs run in
fp32 on operands rounded to bf16 by _round_bf16 (identical products) and bf16 outputs are written
in fp32 and rounded by torch.

Determinism: forward, grad_offset, grad_mask and grad_weight are deterministic; grad_input uses
tl.atomic_add, so its summation order (and last bits) varies from run to run, and the backward
alerts under torch.use_deterministic_algorithms(True).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from htc_fast.kernels._device import on_device
from htc_fast.kernels.deform_conv_backward import deform_conv2d_backward_triton
from htc_fast.kernels.deform_conv_common import (
    _INTERPRETED,
    GEOMETRY_ARGS,
    TWO_CTAS_PER_SM,
    _columns,
    _operand,
    _rows,
    block,
    gemm_config,
    geometry,
    strides,
    tile_class,
)

__all__ = ["deform_conv2d_triton", "deform_conv2d_backward_triton"]


@triton.jit(do_not_specialize=GEOMETRY_ARGS)
def _fwd_kernel(x_ptr, w_ptr, off_ptr, msk_ptr, b_ptr, out_ptr,
                R, P, Wo, H, W, K, KW, Cg, Cog, Cdg,
                sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w, so_n, so_c, so_h, so_w,
                sm_n, sm_c, sm_h, sm_w, sy_n, sy_c, sy_h, sy_w,
                stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
                ROUND_BF16: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_C: tl.constexpr):
    n, ho, wo, rmask = _rows(tl.program_id(0).to(tl.int64), R, P, Wo, BLOCK_P)
    g = tl.program_id(2).to(tl.int64)
    co = tl.program_id(1).to(tl.int64) * BLOCK_CO + tl.arange(0, BLOCK_CO).to(tl.int64)
    comask = co < Cog
    co = g * Cog + co
    acc = tl.zeros([BLOCK_P, BLOCK_CO], off_ptr.dtype.element_ty)
    for k in range(0, K):
        w_k = w_ptr + co[None, :] * sw_o + (k // KW) * sw_h + (k % KW) * sw_w
        for c0 in range(0, Cg, BLOCK_C):
            cw = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            cmask = cw < Cg
            a = _columns(x_ptr, off_ptr, msk_ptr, n, ho, wo, rmask, g * Cg + cw, cmask, g * Cg + c0,
                         g * Cg + tl.minimum(c0 + BLOCK_C, Cg) - 1, k, K, KW, Cdg,
                         sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
                         stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, H, W,
                         HAS_MASK, BLOCK_P, BLOCK_C)
            wt = tl.load(w_k + (cw * sw_c)[:, None], mask=cmask[:, None] & comask[None, :], other=0.0)
            acc = tl.dot(_operand(a, DOT, ROUND_BF16), _operand(wt, DOT, ROUND_BF16), acc,
                         input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=comask, other=0.0).to(acc.dtype)[None, :]
    out = out_ptr + (n * sy_n + ho * sy_h + wo * sy_w)[:, None] + (co * sy_c)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & comask[None, :])


# ------------------------------------------------------------------------------------ launching

# (BLOCK_P, max BLOCK_CO, BLOCK_C, num_warps, num_stages) by tile_class. MAX_REGS: checked by
# scripts/check_triton_compile.py for sm_80 and sm_90.
# 8 warps within 128 registers: 2 CTAs per SM (65536 / (2 * 256)); 64-row tiles needed 236.
FWD_TILES = {"fp32": (32, 64, 16, 8, 3), "fp64": (16, 64, 16, 8, 3)}
MAX_REGS = {"_fwd_kernel": TWO_CTAS_PER_SM}


@triton_op("htc_fast::deform_conv2d_triton", mutates_args=())
def deform_conv2d_triton(input: Tensor, weight: Tensor, offset: Tensor, mask: Optional[Tensor],
                         bias: Optional[Tensor], stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                         dilation_h: int, dilation_w: int, groups: int, offset_groups: int) -> Tensor:
    """Deformable convolution: arguments as ``htc_fast::deform_conv2d`` (checked by
    htc_fast.ops.deform_conv2d) -> (N, Co, Ho, Wo) contiguous, input.dtype."""
    geo = geometry(input, weight, offset, groups, offset_groups)
    shape = (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    # Under the interpreter bf16 is written in fp32 and rounded by torch (see the header).
    out_dtype = torch.float32 if input.dtype == torch.bfloat16 and _INTERPRETED else input.dtype
    out = torch.empty(shape, dtype=out_dtype, device=input.device)
    if geo["R"] == 0 or (_INTERPRETED and is_fake(input)):
        # Tracing runs the op on fake tensors; wrap_triton hands an interpreted kernel back
        # unwrapped and it would read fake data: the shapes are all tracing needs.
        return out.to(input.dtype).zero_() if geo["R"] == 0 else out.to(input.dtype)
    dot, round_bf16, precision = gemm_config(input.dtype, "tf32x3")
    block_p, max_co, block_c, warps, stages = FWD_TILES[tile_class(input.dtype)]
    block_co = block(geo["Cog"], 16, max_co)
    grid = (triton.cdiv(geo["R"], block_p), triton.cdiv(geo["Cog"], block_co), groups)
    m = offset if mask is None else mask  # never read when HAS_MASK is False
    with on_device(input):
        wrap_triton(_fwd_kernel)[grid](
            input, weight, offset, m, weight if bias is None else bias, out, *geo.values(),
            *strides(input, weight, offset, m, out), stride_h, stride_w, pad_h, pad_w, dilation_h,
            dilation_w, HAS_MASK=mask is not None, HAS_BIAS=bias is not None, DOT=dot,
            ROUND_BF16=round_bf16, PRECISION=precision, BLOCK_P=block_p, BLOCK_CO=block_co,
            BLOCK_C=block_c, num_warps=warps, num_stages=stages)
    return out.to(input.dtype)


# ------------------------------------------------------------------------------------- autograd

# Autograd is registered by htc_fast.ops.deform_conv when it loads this module (imports run
# ops -> kernels only).

if _INTERPRETED:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, op, types, args, kwargs):
        # triton_op decomposes into its kernel launches when AOTAutograd traces (torch.compile,
        # opcheck); an interpreted launch cannot be captured (see the fake early return), so keep
        # the op whole.
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op in (deform_conv2d_triton, deform_conv2d_backward_triton):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque)

