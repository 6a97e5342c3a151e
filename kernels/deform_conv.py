"""Deformable convolution v1 / modulated v2 as Triton kernels, registered as ``htc_fast::*_triton``.

Owns the implicit-GEMM forward, the three backward kernels and their ``torch.library.triton_op``
registration with autograd. Argument checking and the backend choice live in
``htc_fast/ops/deform_conv.py``; the semantics (the spec every backend follows) in
``htc_fast/ops/reference/deform_conv.py``; the sampling arithmetic mirrors
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
- _bwd_data_kernel, grid (R / BLOCK_P, K, offset_groups): one program owns (rows, tap, offset
  group) and loops over all the offset group's channels: gcol is recomputed on the fly by tl.dot
  of the grad tile with W_k (looping over the conv groups a chunk overlaps), then reduced into
  grad_offset / grad_mask (owned: deterministic) and scattered into grad_input (atomics).
- _bwd_weight_kernel, grid (K * Cg / BLOCK_C, Cout_g / BLOCK_CO, groups * SPLITS): each program
  reduces tl.dot(grad^T, A) over one slice of the rows into a (SPLITS, Co, Cg, K) partial buffer
  (bounded: SPLITS is chosen so that ~1k programs run), summed by torch afterwards.

Memory layout: every tensor is addressed through explicit strides (NCHW or channels-last input both
work without a copy). grad_input accumulates in a channels-last T buffer (the BLOCK_C atomics of a
row are contiguous), converted to a contiguous tensor of the input's dtype at the end.

Accumulation dtype T: the offsets' dtype (float64 for float64 features, else float32); sampling
coordinates and bilinear weights are computed in T. GEMM operands: fp32 and fp64 tiles go to tl.dot
unchanged with input_precision="ieee" (no TF32); fp16/bf16 operands (the A / gcol tiles rounded to
the input dtype) use the tensor cores with T accumulation, except grad_weight's GEMM, which takes
fp32 operands (a reduction over every output position). The interpreter (TRITON_INTERPRET=1)
truncates fp32 -> bf16 casts and its bf16 tl.dot multiplies raw bits, so there bf16 GEMMs run in
fp32 on operands rounded to bf16 by _round_bf16 (identical products) and bf16 outputs are written
in fp32 and rounded by torch.

Determinism: forward, grad_offset, grad_mask and grad_weight are deterministic; grad_input uses
tl.atomic_add, so its summation order (and last bits) varies from run to run.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from htc_fast.ops.deform_conv import register_deform_conv_autograd

__all__ = ["deform_conv2d_triton", "deform_conv2d_backward_triton"]

_GEOMETRY_ARGS = ["H", "W", "Wo", "P", "R", "sx_n", "sx_c", "sx_h", "so_n", "so_c", "so_h",
                  "sm_n", "sm_c", "sm_h", "sg_n", "sg_c", "sg_h", "si_n", "si_c", "si_h", "si_w"]


@triton.jit
def _round_bf16(x):
    """fp32 x rounded to the nearest bfloat16 (ties to even), kept in fp32 (interpreter only)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _operand(x, DOT: tl.constexpr, ROUND_BF16: tl.constexpr):
    """A GEMM operand in the dot dtype DOT (see the header on bf16 under the interpreter)."""
    if ROUND_BF16:
        y = _round_bf16(x.to(tl.float32))
    else:
        y = x.to(DOT)
    return y


@triton.jit
def _rows(pid, R, P, Wo, BLOCK_P: tl.constexpr):
    rows = pid * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p = rows % P
    return rows // P, p // Wo, p % Wo, rows < R


@triton.jit
def _tap(off_ptr, msk_ptr, n, ho, wo, rmask, og, k, K, KW, so_n, so_c, so_h, so_w, sm_n, sm_c,
         sm_h, sm_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, H, W, HAS_MASK: tl.constexpr):
    """Tap k of offset group og at rows (n, ho, wo): the top-left corner (y0, x0) int64, the
    fractions (ly, lx) and the modulation m in T, and `inside` (False: the sample reads 0)."""
    ch = (og * K + k) * 2
    base = off_ptr + n * so_n + ho * so_h + wo * so_w
    dy = tl.load(base + ch * so_c, mask=rmask, other=0.0)
    dx = tl.load(base + (ch + 1) * so_c, mask=rmask, other=0.0)
    y = (ho * stride_h - pad_h + (k // KW) * dil_h).to(dy.dtype) + dy
    x = (wo * stride_w - pad_w + (k % KW) * dil_w).to(dy.dtype) + dx
    # Written so that NaN fails the test; outside samples are parked at 0 to keep floor() finite.
    inside = rmask & (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
    y = tl.where(inside, y, 0.0)
    x = tl.where(inside, x, 0.0)
    fy = tl.floor(y)
    fx = tl.floor(x)
    if HAS_MASK:
        m = tl.load(msk_ptr + n * sm_n + (og * K + k) * sm_c + ho * sm_h + wo * sm_w, mask=rmask,
                    other=0.0)
    else:
        m = tl.full(dy.shape, 1.0, dy.dtype)
    return fy.to(tl.int64), fx.to(tl.int64), y - fy, x - fx, inside, m


@triton.jit
def _corner_masks(y0, x0, inside, H, W):
    """Which of the corners (y0, x0), (y0, x1), (y1, x0), (y1, x1) lie inside the map."""
    yin0 = inside & (y0 >= 0) & (y0 < H)
    yin1 = inside & (y0 + 1 >= 0) & (y0 + 1 < H)
    xin0 = (x0 >= 0) & (x0 < W)
    xin1 = (x0 + 1 >= 0) & (x0 + 1 < W)
    return yin0 & xin0, yin0 & xin1, yin1 & xin0, yin1 & xin1


@triton.jit
def _columns(x_ptr, off_ptr, msk_ptr, n, ho, wo, rmask, cc, cmask, c_first, c_last, k, K, KW, Cdg,
             sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w,
             stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, H, W,
             HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """The column tile A[rows, cc] of tap k in T (0 where ~rmask or ~cmask); the channels
    c_first..c_last (absolute) may span several offset groups, each sampled at its own tap."""
    a = tl.zeros([BLOCK_P, BLOCK_C], off_ptr.dtype.element_ty)
    plane = x_ptr + (n * sx_n)[:, None] + (cc * sx_c)[None, :]
    for og in range(c_first // Cdg, c_last // Cdg + 1):
        y0, x0, ly, lx, inside, m = _tap(off_ptr, msk_ptr, n, ho, wo, rmask, og, k, K, KW, so_n,
                                         so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w, stride_h,
                                         stride_w, pad_h, pad_w, dil_h, dil_w, H, W, HAS_MASK)
        ok00, ok01, ok10, ok11 = _corner_masks(y0, x0, inside, H, W)
        sel = (cmask & (cc // Cdg == og))[None, :]
        p00 = plane + (y0 * sx_h + x0 * sx_w)[:, None]
        v00 = tl.load(p00, mask=ok00[:, None] & sel, other=0.0).to(a.dtype)
        v01 = tl.load(p00 + sx_w, mask=ok01[:, None] & sel, other=0.0).to(a.dtype)
        v10 = tl.load(p00 + sx_h, mask=ok10[:, None] & sel, other=0.0).to(a.dtype)
        v11 = tl.load(p00 + sx_h + sx_w, mask=ok11[:, None] & sel, other=0.0).to(a.dtype)
        hy = (1.0 - ly)[:, None]
        hx = (1.0 - lx)[:, None]
        vy = ly[:, None]
        vx = lx[:, None]
        val = hy * hx * v00 + hy * vx * v01 + vy * hx * v10 + vy * vx * v11
        a += m[:, None] * val
    return a


@triton.jit(do_not_specialize=_GEOMETRY_ARGS)
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


@triton.jit(do_not_specialize=_GEOMETRY_ARGS)
def _bwd_data_kernel(g_ptr, x_ptr, w_ptr, off_ptr, msk_ptr, gi_ptr, goff_ptr, gmsk_ptr,
                     R, P, Wo, H, W, K, KW, Cg, Cog, Cdg,
                     sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sw_o, sw_c, sw_h, sw_w,
                     so_n, so_c, so_h, so_w, sm_n, sm_c, sm_h, sm_w, si_n, si_c, si_h, si_w,
                     stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                     HAS_MASK: tl.constexpr, DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
                     PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """grad_offset, grad_mask (stored, T, laid out like offset / mask) and grad_input (atomic adds
    into the T buffer gi) of tap k = program_id(1), offset group og = program_id(2)."""
    n, ho, wo, rmask = _rows(tl.program_id(0).to(tl.int64), R, P, Wo, BLOCK_P)
    k = tl.program_id(1).to(tl.int64)
    og = tl.program_id(2).to(tl.int64)
    y0, x0, ly, lx, inside, m = _tap(off_ptr, msk_ptr, n, ho, wo, rmask, og, k, K, KW, so_n, so_c,
                                     so_h, so_w, sm_n, sm_c, sm_h, sm_w, stride_h, stride_w, pad_h,
                                     pad_w, dil_h, dil_w, H, W, HAS_MASK)
    ok00, ok01, ok10, ok11 = _corner_masks(y0, x0, inside, H, W)
    hy = (1.0 - ly)[:, None]
    hx = (1.0 - lx)[:, None]
    vy = ly[:, None]
    vx = lx[:, None]
    T = ly.dtype
    g_rows = g_ptr + (n * sg_n + ho * sg_h + wo * sg_w)[:, None]
    x_corner = (n * sx_n + y0 * sx_h + x0 * sx_w)[:, None]
    i_corner = (n * si_n + y0 * si_h + x0 * si_w)[:, None]
    w_k = w_ptr + (k // KW) * sw_h + (k % KW) * sw_w
    grad_y = tl.zeros([BLOCK_P], T)
    grad_x = tl.zeros([BLOCK_P], T)
    grad_m = tl.zeros([BLOCK_P], T)
    c_end = (og + 1) * Cdg
    for c0 in range(og * Cdg, c_end, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = cc < c_end
        gcol = tl.zeros([BLOCK_P, BLOCK_C], T)
        for g in range(c0 // Cg, (tl.minimum(c0 + BLOCK_C, c_end) - 1) // Cg + 1):
            csel = cmask & (cc // Cg == g)
            w_c = w_k + ((cc - g * Cg) * sw_c)[None, :]
            for co0 in range(0, Cog, BLOCK_CO):
                co = co0 + tl.arange(0, BLOCK_CO).to(tl.int64)
                comask = co < Cog
                co = g * Cog + co
                gt = tl.load(g_rows + (co * sg_c)[None, :], mask=rmask[:, None] & comask[None, :],
                             other=0.0)
                wt = tl.load(w_c + (co * sw_o)[:, None], mask=comask[:, None] & csel[None, :],
                             other=0.0)
                gcol = tl.dot(_operand(gt, DOT, ROUND_BF16), _operand(wt, DOT, ROUND_BF16), gcol,
                              input_precision=PRECISION)
        cm = cmask[None, :]
        xp = x_ptr + x_corner + (cc * sx_c)[None, :]
        v00 = tl.load(xp, mask=ok00[:, None] & cm, other=0.0).to(T)
        v01 = tl.load(xp + sx_w, mask=ok01[:, None] & cm, other=0.0).to(T)
        v10 = tl.load(xp + sx_h, mask=ok10[:, None] & cm, other=0.0).to(T)
        v11 = tl.load(xp + sx_h + sx_w, mask=ok11[:, None] & cm, other=0.0).to(T)
        grad_y += tl.sum(gcol * (hx * (v10 - v00) + vx * (v11 - v01)), 1)
        grad_x += tl.sum(gcol * (hy * (v01 - v00) + vy * (v11 - v10)), 1)
        if HAS_MASK:
            grad_m += tl.sum(gcol * (hy * hx * v00 + hy * vx * v01 + vy * hx * v10 + vy * vx * v11), 1)
        gm = gcol * m[:, None]
        ip = gi_ptr + i_corner + (cc * si_c)[None, :]
        tl.atomic_add(ip, gm * (hy * hx), mask=ok00[:, None] & cm, sem="relaxed")
        tl.atomic_add(ip + si_w, gm * (hy * vx), mask=ok01[:, None] & cm, sem="relaxed")
        tl.atomic_add(ip + si_h, gm * (vy * hx), mask=ok10[:, None] & cm, sem="relaxed")
        tl.atomic_add(ip + si_h + si_w, gm * (vy * vx), mask=ok11[:, None] & cm, sem="relaxed")
    ch = (og * K + k) * 2
    o = goff_ptr + n * so_n + ho * so_h + wo * so_w
    tl.store(o + ch * so_c, grad_y * m, mask=rmask)
    tl.store(o + (ch + 1) * so_c, grad_x * m, mask=rmask)
    if HAS_MASK:
        tl.store(gmsk_ptr + n * sm_n + (og * K + k) * sm_c + ho * sm_h + wo * sm_w, grad_m, mask=rmask)


@triton.jit(do_not_specialize=_GEOMETRY_ARGS + ["rows_per_split"])
def _bwd_weight_kernel(g_ptr, x_ptr, off_ptr, msk_ptr, gw_ptr,
                       R, P, Wo, H, W, K, KW, Cg, Cog, Cdg, Co, rows_per_split, splits,
                       sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                       sm_n, sm_c, sm_h, sm_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                       HAS_MASK: tl.constexpr, DOT: tl.constexpr, ROUND_BF16: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Partial grad_weight of rows [s * rows_per_split, (s + 1) * rows_per_split) into the
    contiguous T buffer gw (splits, Co, Cg, K)."""
    n_cb = tl.cdiv(Cg, BLOCK_C)
    pid0 = tl.program_id(0).to(tl.int64)
    k = pid0 // n_cb
    cw = (pid0 % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cw < Cg
    pid2 = tl.program_id(2).to(tl.int64)
    g = pid2 // splits
    s = pid2 % splits
    co = tl.program_id(1).to(tl.int64) * BLOCK_CO + tl.arange(0, BLOCK_CO).to(tl.int64)
    comask = co < Cog
    co = g * Cog + co
    c_first = g * Cg + (pid0 % n_cb) * BLOCK_C
    c_last = g * Cg + tl.minimum((pid0 % n_cb) * BLOCK_C + BLOCK_C, Cg) - 1
    acc = tl.zeros([BLOCK_CO, BLOCK_C], off_ptr.dtype.element_ty)
    r_begin = s * rows_per_split
    for r0 in range(r_begin, tl.minimum(r_begin + rows_per_split, R), BLOCK_P):
        n, ho, wo, rmask = _rows(r0 // BLOCK_P, R, P, Wo, BLOCK_P)
        a = _columns(x_ptr, off_ptr, msk_ptr, n, ho, wo, rmask, g * Cg + cw, cmask, c_first, c_last,
                     k, K, KW, Cdg, sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w,
                     sm_n, sm_c, sm_h, sm_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, H, W,
                     HAS_MASK, BLOCK_P, BLOCK_C)
        gt = tl.load(g_ptr + (co * sg_c)[:, None] + (n * sg_n + ho * sg_h + wo * sg_w)[None, :],
                     mask=comask[:, None] & rmask[None, :], other=0.0)
        acc = tl.dot(_operand(gt, DOT, ROUND_BF16), _operand(a, DOT, ROUND_BF16), acc,
                     input_precision=PRECISION)
    out = gw_ptr + ((s * Co + co) * Cg * K)[:, None] + (cw * K + k)[None, :]
    tl.store(out, acc, mask=comask[:, None] & cmask[None, :])


# ------------------------------------------------------------------------------------ launching

_INTERPRETED = not isinstance(_fwd_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1
_TARGET_PROGRAMS = 1024  # grad_weight splits its row reduction until about this many programs run
# (BLOCK_P, max BLOCK_CO, BLOCK_C) per kernel, all with 8 warps: the largest tiles that ptxas
# (sm_90, fp32 and bf16) compiles without register spills; not yet tuned by timing on a GPU.
_FWD_BLOCKS = (64, 64, 16)
_DATA_BLOCKS = (64, 32, 16)
_WEIGHT_BLOCKS = (32, 64, 32)


def _block(n, lo, hi):
    return min(hi, max(lo, triton.next_power_of_2(n)))


def _gemm_config(dtype):
    """(DOT, ROUND_BF16, PRECISION) for features of `dtype` (see the header)."""
    if dtype == torch.float64:
        return tl.float64, False, "ieee"
    if dtype == torch.float32:
        return tl.float32, False, "ieee"
    if dtype == torch.bfloat16 and _INTERPRETED:
        return tl.float32, True, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), False, "tf32"


def _geometry(input, weight, offset, groups, offset_groups):
    n, c, h, w = input.shape
    co, cg, kh, kw = weight.shape
    ho, wo = offset.shape[2], offset.shape[3]
    return dict(R=n * ho * wo, P=ho * wo, Wo=wo, H=h, W=w, K=kh * kw, KW=kw, Cg=cg,
                Cog=co // groups, Cdg=c // offset_groups)


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


@triton_op("htc_fast::deform_conv2d_triton", mutates_args=())
def deform_conv2d_triton(input: Tensor, weight: Tensor, offset: Tensor, mask: Optional[Tensor],
                         bias: Optional[Tensor], stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                         dilation_h: int, dilation_w: int, groups: int, offset_groups: int) -> Tensor:
    """Deformable convolution: arguments as ``htc_fast::deform_conv2d`` (checked by
    htc_fast.ops.deform_conv2d) -> (N, Co, Ho, Wo) contiguous, input.dtype."""
    geo = _geometry(input, weight, offset, groups, offset_groups)
    shape = (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    # Under the interpreter bf16 is written in fp32 and rounded by torch (see the header).
    out_dtype = torch.float32 if input.dtype == torch.bfloat16 and _INTERPRETED else input.dtype
    out = torch.empty(shape, dtype=out_dtype, device=input.device)
    if geo["R"] == 0 or (_INTERPRETED and is_fake(input)):
        # Tracing runs the op on fake tensors; wrap_triton hands an interpreted kernel back
        # unwrapped and it would read fake data: the shapes are all tracing needs.
        return out.to(input.dtype).zero_() if geo["R"] == 0 else out.to(input.dtype)
    dot, round_bf16, precision = _gemm_config(input.dtype)
    block_p, block_co, block_c = _FWD_BLOCKS[0], _block(geo["Cog"], 16, _FWD_BLOCKS[1]), _FWD_BLOCKS[2]
    grid = (triton.cdiv(geo["R"], block_p), triton.cdiv(geo["Cog"], block_co), groups)
    m = offset if mask is None else mask  # never read when HAS_MASK is False
    wrap_triton(_fwd_kernel)[grid](
        input, weight, offset, m, weight if bias is None else bias, out, *geo.values(),
        *_strides(input, weight, offset, m, out), stride_h, stride_w, pad_h, pad_w, dilation_h,
        dilation_w, HAS_MASK=mask is not None, HAS_BIAS=bias is not None, DOT=dot,
        ROUND_BF16=round_bf16, PRECISION=precision, BLOCK_P=block_p, BLOCK_CO=block_co,
        BLOCK_C=block_c, num_warps=8)
    return out.to(input.dtype)


@triton_op("htc_fast::deform_conv2d_backward_triton", mutates_args=())
def deform_conv2d_backward_triton(grad: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
                                  mask: Optional[Tensor], stride_h: int, stride_w: int, pad_h: int,
                                  pad_w: int, dilation_h: int, dilation_w: int, groups: int,
                                  offset_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients as ``htc_fast::deform_conv2d_backward``: grad (N, Co, Ho, Wo) -> (grad_input,
    grad_weight, grad_offset, grad_mask) in the dtypes of input, weight, offset, mask; grad_mask
    is an empty (0,) tensor when mask is None. grad_input is nondeterministic (atomics)."""
    offset = offset.contiguous()  # grad_offset / grad_mask are written with these strides
    mask = None if mask is None else mask.contiguous()
    geo = _geometry(input, weight, offset, groups, offset_groups)
    t = offset.dtype
    n, c, h, w = input.shape
    co, cg = weight.shape[0], weight.shape[1]
    g_in = torch.zeros((n, h, w, c), dtype=t, device=input.device).permute(0, 3, 1, 2)
    g_off = torch.empty_like(offset)
    g_msk = offset.new_zeros((0,)) if mask is None else torch.empty_like(mask)
    dot, round_bf16, precision = _gemm_config(input.dtype)
    block_p, block_co, block_c = _WEIGHT_BLOCKS[0], _block(geo["Cog"], 16, _WEIGHT_BLOCKS[1]), \
        _block(cg, 16, _WEIGHT_BLOCKS[2])
    k_cb = geo["K"] * triton.cdiv(cg, block_c)
    base = k_cb * triton.cdiv(geo["Cog"], block_co) * groups
    chunks = max(1, triton.cdiv(geo["R"], block_p))
    per_split = triton.cdiv(chunks, max(1, min(chunks, triton.cdiv(_TARGET_PROGRAMS, base))))
    splits = triton.cdiv(chunks, per_split)
    g_w = torch.zeros((splits, co, cg, geo["K"]), dtype=t, device=input.device)
    if geo["R"] > 0 and not (_INTERPRETED and is_fake(input)):
        m = offset if mask is None else mask
        common = dict(HAS_MASK=mask is not None, DOT=dot, ROUND_BF16=round_bf16, PRECISION=precision,
                      num_warps=8)
        conv = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
        data_p, data_co, data_c = _DATA_BLOCKS
        wrap_triton(_bwd_data_kernel)[(triton.cdiv(geo["R"], data_p), geo["K"], offset_groups)](
            grad, input, weight, offset, m, g_in, g_off, g_msk if mask is not None else g_off,
            *geo.values(), *_strides(grad, input, weight, offset, m, g_in), *conv,
            BLOCK_P=data_p, BLOCK_CO=_block(geo["Cog"], 16, data_co), BLOCK_C=data_c, **common)
        # grad_weight sums products over every output position: with fp16/bf16 operands its error
        # grows past a small multiple of the dtype's rounding, so that GEMM runs in fp32 operands
        # (the columns are computed in fp32 anyway); the data-gradient GEMMs keep the input dtype.
        weight_gemm = dict(common, **dict(zip(("DOT", "ROUND_BF16", "PRECISION"), _gemm_config(torch.float32)))) \
            if input.dtype in (torch.float16, torch.bfloat16) else common
        wrap_triton(_bwd_weight_kernel)[(k_cb, triton.cdiv(geo["Cog"], block_co), groups * splits)](
            grad, input, offset, m, g_w, *geo.values(), co, per_split * block_p, splits,
            *_strides(grad, input, offset, m), *conv, BLOCK_P=block_p, BLOCK_CO=block_co,
            BLOCK_C=block_c, **weight_gemm)
    return (g_in.to(input.dtype, memory_format=torch.contiguous_format),
            g_w.sum(0).reshape(weight.shape).to(weight.dtype), g_off, g_msk)


# ------------------------------------------------------------------------------------- autograd

register_deform_conv_autograd(deform_conv2d_triton, deform_conv2d_backward_triton)

if _INTERPRETED:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, op, types, args, kwargs):
        # triton_op decomposes into its kernel launches when AOTAutograd traces (torch.compile,
        # opcheck); an interpreted launch cannot be captured (see the fake early return), so keep
        # the op whole.
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op in (deform_conv2d_triton, deform_conv2d_backward_triton):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque)
