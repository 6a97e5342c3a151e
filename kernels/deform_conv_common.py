"""Shared pieces of the Triton deformable convolution (kernels/deform_conv.py: forward and the
op's documentation; kernels/deform_conv_backward.py: the gradients): the sampling of one tap and
of a column tile, GEMM operand handling, and the host-side geometry and GEMM configuration.
"""
import torch
import triton
import triton.language as tl

GEOMETRY_ARGS = ["H", "W", "Wo", "P", "R", "sx_n", "sx_c", "sx_h", "so_n", "so_c", "so_h",
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




# ------------------------------------------------------------------------------------ host side

_INTERPRETED = not isinstance(_columns, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


# Register ceiling for 2 resident CTAs per SM, by num_warps: 65536 / (2 * 32 * num_warps), capped
# at the 255 a thread can address (the MAX_REGS of every DCN kernel).
TWO_CTAS_PER_SM = {warps: min(255, 65536 // (2 * 32 * warps)) for warps in (1, 2, 4, 8)}


def tile_class(dtype):
    """The key of the per-kernel tile tables: float64 tiles hold twice the registers."""
    return "fp64" if dtype == torch.float64 else "fp32"


def block(n, lo, hi):
    return min(hi, max(lo, triton.next_power_of_2(n)))


def gemm_config(dtype, fp32_precision="ieee"):
    """(DOT, ROUND_BF16, PRECISION) for GEMM operands of `dtype` (see kernels/deform_conv.py's
    header); fp32 operands use `fp32_precision`: "tf32x3" (tensor cores, three TF32 products per
    product: about fp32's rounding) or "ieee" (FMA units, exact fp32 products)."""
    if dtype == torch.float64:
        return tl.float64, False, "ieee"
    if dtype == torch.float32:
        return tl.float32, False, fp32_precision
    if dtype == torch.bfloat16 and _INTERPRETED:
        return tl.float32, True, "ieee"
    return (tl.bfloat16 if dtype == torch.bfloat16 else tl.float16), False, "tf32"


def geometry(input, weight, offset, groups, offset_groups):
    n, c, h, w = input.shape
    co, cg, kh, kw = weight.shape
    ho, wo = offset.shape[2], offset.shape[3]
    return dict(R=n * ho * wo, P=ho * wo, Wo=wo, H=h, W=w, K=kh * kw, KW=kw, Cg=cg,
                Cog=co // groups, Cdg=c // offset_groups)


def strides(*tensors):
    return [s for t in tensors for s in t.stride()]


