"""The independent oracle for deformable-convolution tests, and the random inputs the tests feed
every backend.

``naive_deform_conv2d`` is written from the semantics (docs/ops.md "deform_conv2d",
csrc/deform_conv/deform_conv_common.h) with explicit Python loops over n, co, ho, wo, c, i, j and a
scalar bilinear interpolation -- nothing shared with the reference's vectorised gathers. The
sampling position is computed in the geometry type T (float32, float64 for float64 features) with
the same single rounding as the kernels (integer base + offset), because the validity test
``-1 < y < H`` is discontinuous and must see the same rounded coordinate; the sums are float64.
Tiny shapes only (a few thousand multiply-adds per output element at most).
"""
import math

import numpy as np
import torch


def naive_deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable convolution by loops (DCNv1, or modulated DCNv2 when `mask` is given).

    Args:
        input: (N, C, H, W); offset: (N, 2 * dg * kh * kw, Ho, Wo), (dy, dx) per (group, tap);
        weight: (Co, C / groups, kh, kw); bias: (Co,) or None; mask: (N, dg * kh * kw, Ho, Wo) or
        None; stride, padding, dilation: int or (h, w).

    Returns:
        (N, Co, Ho, Wo) float64 on the CPU.
    """
    t = np.float64 if input.dtype == torch.float64 else np.float32
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    x = input.detach().double().cpu().tolist()
    wt = weight.detach().double().cpu().tolist()
    off = offset.detach().to(torch.float64 if t is np.float64 else torch.float32).cpu().numpy()
    msk = None if mask is None else mask.detach().double().cpu().tolist()
    b = None if bias is None else bias.detach().double().cpu().tolist()
    n_, c_, h_, w_ = input.shape
    co_, cg, kh, kw = weight.shape
    ho_, wo_ = offset.shape[2], offset.shape[3]
    groups = c_ // cg
    dg = offset.shape[1] // (2 * kh * kw)
    per_dg = c_ // dg
    cog = co_ // groups
    out = torch.zeros(n_, co_, ho_, wo_, dtype=torch.float64)
    for n in range(n_):
        for co in range(co_):
            g = co // cog
            for ho in range(ho_):
                for wo in range(wo_):
                    acc = 0.0 if b is None else b[co]
                    for ci in range(cg):
                        c = g * cg + ci
                        og = c // per_dg
                        for i in range(kh):
                            for j in range(kw):
                                k = i * kw + j
                                dy = off[n, (og * kh * kw + k) * 2, ho, wo]
                                dx = off[n, (og * kh * kw + k) * 2 + 1, ho, wo]
                                y = t(ho * sh - ph + i * dh) + dy  # one rounding in T, as the kernels
                                xx = t(wo * sw - pw + j * dw) + dx
                                v = bilinear(x[n][c], float(y), float(xx), h_, w_)
                                if msk is not None:
                                    v *= msk[n][og * kh * kw + k][ho][wo]
                                acc += wt[co][ci][i][j] * v
                    out[n, co, ho, wo] = acc
    return out


def bilinear(plane, y, x, height, width):
    """One sample of a (H, W) nested list at (y, x): corners outside the map read 0; a position
    outside (-1, H) x (-1, W) or not finite reads 0."""
    if not (math.isfinite(y) and math.isfinite(x)):
        return 0.0
    if not (-1.0 < y < height and -1.0 < x < width):
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, xx, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                        (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        if 0 <= yy < height and 0 <= xx < width:
            total += wgt * plane[yy][xx]
    return total


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def out_size(h, w, kh, kw, stride, padding, dilation):
    """(Ho, Wo) of the convolution."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def random_offsets(n, dg, kh, kw, ho, wo, kind="normal", scale=1.5, dtype=torch.float32, device="cpu"):
    """(N, 2 * dg * kh * kw, Ho, Wo) offsets.

    kind: "normal": N(0, scale^2), fractional everywhere, a few samples leave the map;
    "far": uniform in [-scale, scale] with `scale` beyond the map, most samples outside;
    "integer": whole numbers in [-scale, scale] (samples exactly on pixels, and on -1 / H / W);
    "fractional": integer part in [-scale, scale] plus a fraction in [0.1, 0.9] (never an integer
    sample position, where the bilinear derivative jumps: for gradcheck).
    """
    shape = (n, 2 * dg * kh * kw, ho, wo)
    s = int(math.ceil(scale))
    if kind == "normal":
        return torch.randn(shape, dtype=dtype, device=device) * scale
    if kind == "far":
        return (torch.rand(shape, dtype=dtype, device=device) * 2 - 1) * scale
    if kind == "integer":
        return torch.randint(-s, s + 1, shape, device=device).to(dtype)
    if kind == "fractional":
        whole = torch.randint(-s, s, shape, device=device).to(dtype)
        return whole + 0.1 + 0.8 * torch.rand(shape, dtype=dtype, device=device)
    raise ValueError(kind)


def with_layout(t, layout):
    """The same values as a contiguous tensor, a channels-last one, a transposed view (H and W
    strides swapped) or a strided slice of a larger buffer."""
    if t is None or layout == "contiguous":
        return None if t is None else t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        view = t.transpose(2, 3).contiguous().transpose(2, 3)
    elif layout == "strided":
        big = torch.zeros(t.shape[0], t.shape[1] + 1, t.shape[2], 2 * t.shape[3], dtype=t.dtype,
                          device=t.device)
        big[:, 1:, :, ::2] = t
        view = big[:, 1:, :, ::2]
    else:
        raise ValueError(layout)
    assert torch.equal(view, t) and (t.shape[2] == 1 or t.shape[3] == 1 or not view.is_contiguous())
    return view
