"""Gradients of the Triton deformable convolution (forward, math and layout: kernels/deform_conv.py):
``htc_fast::deform_conv2d_backward_triton``.

- _bwd_data_kernel, grid (R / BLOCK_P, K, offset_groups): one program owns (rows, tap, offset
  group) and loops over all the offset group's channels: gcol is recomputed on the fly by tl.dot
  of the grad tile with W_k (looping over the conv groups a chunk overlaps), then reduced into
  grad_offset / grad_mask (owned: deterministic) and scattered into grad_input (atomics).
- _bwd_weight_kernel, grid (K * Cg / BLOCK_C, Cout_g / BLOCK_CO, groups * SPLITS): each program
  reduces tl.dot(grad^T, A) over one slice of the rows into a (SPLITS, Co, Cg, K) partial buffer
  (bounded: SPLITS is chosen so that ~1k programs run), summed by torch afterwards.

Determinism: grad_offset, grad_mask and grad_weight are deterministic; grad_input uses
tl.atomic_add, so the op alerts under torch.use_deterministic_algorithms(True).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from htc_fast.kernels._determinism import alert_not_deterministic
from htc_fast.kernels._device import on_device
from htc_fast.kernels.deform_conv_common import (
    _INTERPRETED,
    GEOMETRY_ARGS,
    TWO_CTAS_PER_SM,
    _columns,
    _corner_masks,
    _operand,
    _rows,
    _tap,
    block,
    gemm_config,
    geometry,
    strides,
    tile_class,
)

__all__ = ["deform_conv2d_backward_triton"]


@triton.jit(do_not_specialize=GEOMETRY_ARGS)
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



@triton.jit(do_not_specialize=GEOMETRY_ARGS + ["rows_per_split"])
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

_TARGET_PROGRAMS = 1024  # grad_weight splits its row reduction until about this many programs run
# (BLOCK_P, max BLOCK_CO, BLOCK_C, num_warps, num_stages) by tile_class. MAX_REGS: checked by
# scripts/check_triton_compile.py for sm_80 and sm_90.
# Both kernels: 2 CTAs per SM (8 warps within 128 registers; the former 64 x 32 data tiles needed
# 182 and the 32 x 64 x 32 weight tiles 200). float64 grad-input tiles take 4 warps: at 8 warps
# ptxas (sm_80) caps them at 128 registers and spills.
DATA_TILES = {"fp32": (16, 32, 16, 8, 1), "fp64": (16, 32, 16, 4, 1)}
WEIGHT_TILES = {"fp32": (16, 32, 16, 8, 3), "fp64": (16, 32, 16, 8, 3)}
MAX_REGS = {"_bwd_data_kernel": TWO_CTAS_PER_SM, "_bwd_weight_kernel": TWO_CTAS_PER_SM}


@triton_op("htc_fast::deform_conv2d_backward_triton", mutates_args=())
def deform_conv2d_backward_triton(grad: Tensor, input: Tensor, weight: Tensor, offset: Tensor,
                                  mask: Optional[Tensor], stride_h: int, stride_w: int, pad_h: int,
                                  pad_w: int, dilation_h: int, dilation_w: int, groups: int,
                                  offset_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients as ``htc_fast::deform_conv2d_backward``: grad (N, Co, Ho, Wo) -> (grad_input,
    grad_weight, grad_offset, grad_mask) in the dtypes of input, weight, offset, mask; grad_mask
    is an empty (0,) tensor when mask is None. grad_input is nondeterministic (atomics)."""
    alert_not_deterministic("deform_conv2d_backward_triton")  # grad_input: atomic adds
    offset = offset.contiguous()  # grad_offset / grad_mask are written with these strides
    mask = None if mask is None else mask.contiguous()
    geo = geometry(input, weight, offset, groups, offset_groups)
    t = offset.dtype
    n, c, h, w = input.shape
    co, cg = weight.shape[0], weight.shape[1]
    g_in = torch.zeros((n, h, w, c), dtype=t, device=input.device).permute(0, 3, 1, 2)
    g_off = torch.empty_like(offset)
    g_msk = offset.new_zeros((0,)) if mask is None else torch.empty_like(mask)
    dot, round_bf16, precision = gemm_config(input.dtype)
    block_p, max_co, max_c, weight_warps, weight_stages = WEIGHT_TILES[tile_class(input.dtype)]
    block_co, block_c = block(geo["Cog"], 16, max_co), block(cg, 16, max_c)
    k_cb = geo["K"] * triton.cdiv(cg, block_c)
    base = k_cb * triton.cdiv(geo["Cog"], block_co) * groups
    chunks = max(1, triton.cdiv(geo["R"], block_p))
    per_split = triton.cdiv(chunks, max(1, min(chunks, triton.cdiv(_TARGET_PROGRAMS, base))))
    splits = triton.cdiv(chunks, per_split)
    g_w = torch.zeros((splits, co, cg, geo["K"]), dtype=t, device=input.device)
    if geo["R"] > 0 and not (_INTERPRETED and is_fake(input)):
        m = offset if mask is None else mask
        common = dict(HAS_MASK=mask is not None, DOT=dot, ROUND_BF16=round_bf16, PRECISION=precision)
        conv = (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w)
        data_p, data_co, data_c, data_warps, data_stages = DATA_TILES[tile_class(input.dtype)]
        # grad_weight sums products over every output position: with fp16/bf16 operands its error
        # grows past a small multiple of the dtype's rounding, so that GEMM runs in fp32 operands
        # (the columns are computed in fp32 anyway); the data-gradient GEMMs keep the input dtype.
        weight_gemm = dict(common, **dict(zip(("DOT", "ROUND_BF16", "PRECISION"), gemm_config(
            torch.float32 if input.dtype != torch.float64 else input.dtype, "tf32x3"))))
        with on_device(input):
            wrap_triton(_bwd_data_kernel)[(triton.cdiv(geo["R"], data_p), geo["K"], offset_groups)](
                grad, input, weight, offset, m, g_in, g_off, g_msk if mask is not None else g_off,
                *geo.values(), *strides(grad, input, weight, offset, m, g_in), *conv,
                BLOCK_P=data_p, BLOCK_CO=block(geo["Cog"], 16, data_co), BLOCK_C=data_c,
                num_warps=data_warps, num_stages=data_stages, maxnreg=TWO_CTAS_PER_SM[data_warps],
                **common)  # maxnreg: left alone, ptxas spills some float64 variants below it
            wrap_triton(_bwd_weight_kernel)[(k_cb, triton.cdiv(geo["Cog"], block_co), groups * splits)](
                grad, input, offset, m, g_w, *geo.values(), co, per_split * block_p, splits,
                *strides(grad, input, offset, m), *conv, BLOCK_P=block_p, BLOCK_CO=block_co,
                BLOCK_C=block_c, num_warps=weight_warps, num_stages=weight_stages, **weight_gemm)
    return (g_in.to(input.dtype, memory_format=torch.contiguous_format),
            g_w.sum(0).reshape(weight.shape).to(weight.dtype), g_off, g_msk)


