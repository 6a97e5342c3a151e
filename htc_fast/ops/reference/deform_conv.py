"""Deformable convolution v1 / modulated v2 in plain PyTorch: the specification and test oracle.

Every tap of the kernel samples the input bilinearly at its regular position plus a learned
offset (corners outside the map read 0), v2 multiplies the sample by a mask, and a grouped GEMM
with the weights sums over (channel, tap). Written as gathers so that autograd differentiates it
with respect to input, offset, mask, weight and bias. It builds the whole column matrix
(N, C, K, Ho*Wo): fine for a specification, not for speed.

Coordinates are computed in the offsets' dtype (float32, float64 for float64 inputs); fp16/bf16
features are computed in float32 and the output is rounded once to their dtype.
"""
import torch
from torch import Tensor


def deform_conv2d(input: Tensor, weight: Tensor, offset: Tensor, mask, bias, stride, padding,
                  dilation, groups: int, offset_groups: int) -> Tensor:
    """Arguments as ``htc_fast.ops.deform_conv2d`` after checking (all tuples are (h, w) pairs).

    Shapes: input (N, C, H, W); weight (Co, C/groups, kh, kw); offset (N, 2*dg*kh*kw, Ho, Wo) with
    (dy, dx) interleaved per (group, tap); mask (N, dg*kh*kw, Ho, Wo) or None; bias (Co,) or None.
    Returns (N, Co, Ho, Wo) in input.dtype.
    """
    # Under autocast the einsum below would run in fp16/bf16; the spec computes in float32/64.
    device_type = input.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return deform_conv2d(input, weight, offset, mask, bias, stride, padding, dilation, groups,
                                 offset_groups)
    out_dtype = input.dtype
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(compute)
    n, c, h, w = x.shape
    co, cg, kh, kw = weight.shape
    ho, wo = offset.shape[-2:]
    k, p, dg = kh * kw, ho * wo, offset_groups
    y, xs = sample_positions(offset.to(compute), kh, kw, stride, padding, dilation)  # (N, dg, K, P)
    cols = bilinear(x.reshape(n, dg, c // dg, h * w), y, xs, h, w)  # (N, dg, C/dg, K, P)
    if mask is not None:
        cols = cols * mask.to(compute).reshape(n, dg, 1, k, p)
    cols = cols.reshape(n, groups, cg, k, p)
    wg = weight.to(compute).reshape(groups, co // groups, cg, k)
    out = torch.einsum("ngckp,gock->ngop", cols, wg).reshape(n, co, ho, wo).contiguous()
    if bias is not None:
        out = out + bias.to(compute).reshape(1, co, 1, 1)
    return out.to(out_dtype)


def sample_positions(offset, kh, kw, stride, padding, dilation):
    """Sampling coordinates (y, x), each (N, dg, K, Ho*Wo), of every tap at every output position."""
    n, _, ho, wo = offset.shape
    k = kh * kw
    off = offset.reshape(n, offset.shape[1] // (2 * k), k, 2, ho * wo)  # no -1: n may be 0
    dev, dt = offset.device, offset.dtype
    oy = torch.arange(ho, device=dev, dtype=dt) * stride[0] - padding[0]
    ox = torch.arange(wo, device=dev, dtype=dt) * stride[1] - padding[1]
    base_y = oy[:, None].expand(ho, wo).reshape(1, 1, 1, ho * wo)
    base_x = ox[None, :].expand(ho, wo).reshape(1, 1, 1, ho * wo)
    tap_y = (torch.arange(kh, device=dev, dtype=dt) * dilation[0]).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev, dtype=dt) * dilation[1]).repeat(kh)
    y = base_y + tap_y.reshape(1, 1, k, 1) + off[:, :, :, 0]
    x = base_x + tap_x.reshape(1, 1, k, 1) + off[:, :, :, 1]
    return y, x


def bilinear(planes, y, x, height, width):
    """Bilinear samples with zero padding per corner.

    planes: (N, G, Cg, H*W); y, x: (N, G, K, P) -> (N, G, Cg, K, P). Samples outside
    (-1, H) x (-1, W) and non-finite ones are 0 with zero gradient.
    """
    n, g, cg, _ = planes.shape
    _, _, k, p = y.shape
    inside = (y > -1) & (y < height) & (x > -1) & (x < width)
    # Park outside samples at 0 so floor() and the weights stay finite (their result is masked).
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = y.detach().floor(), x.detach().floor()
    ly, lx = y - y0, x - x0
    out = None
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx),
                        (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        ok = inside & (yy >= 0) & (yy <= height - 1) & (xx >= 0) & (xx <= width - 1)
        idx = torch.where(ok, yy * width + xx, torch.zeros_like(yy)).long()
        v = planes.gather(3, idx.reshape(n, g, 1, k * p).expand(n, g, cg, k * p)).reshape(n, g, cg, k, p)
        term = torch.where(ok.unsqueeze(2), v * wgt.unsqueeze(2), torch.zeros((), dtype=v.dtype, device=v.device))
        out = term if out is None else out + term
    return out
