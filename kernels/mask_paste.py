"""Mask paste as a Triton kernel, registered as ``htc_fast::paste_masks_triton`` (dense binary
masks) and ``htc_fast::paste_mask_crops_triton`` (column-major crops for COCO RLE).

Owns the kernel, its launch, and ``paste_mask_windows_torch`` (the windows in torch ops, the twin
of ``paste_window`` in csrc/mask_paste/mask_paste_common.h). Argument checking and the backend
choice live in ``htc_fast/ops/mask_paste.py``; the pixel model (the spec every backend follows) in
``htc_fast/ops/reference/mask_paste.py``.

Math (grid_sample, align_corners=False, zero padding, as in the C++ header): for box
(x0, y0, x1, y1), w = x1 - x0 (float32), pixel x has gx = (x + 0.5 - x0) / w * 2 - 1 (IEEE
division: tl.div_rn) and mask coordinate u = fma(gx + 1, Mw / 2, -0.5); taps floor(u) and
floor(u) + 1 with weights 1 - frac and frac, a tap outside [0, Mw) reading 0; same for y. The value
interpolates along x, then along y (``bilinear`` in the header): (nw*e + ne*w)*s + (sw*e + se*w)*n
in float32 (the compiler may contract these into FMAs: a float32 ulp, far inside the tests' 1e-6),
and the pixel is set when it is >= the threshold (float32). Boxes that are not finite or have a
non-positive float32 size paste nothing.

Grid mapping: axis 1 = box (launched in chunks of 65535 boxes, the CUDA limit of that axis),
axis 0 = tiles of BLOCK_Y x BLOCK_X pixels of that box's window (from the windows tensor). The grid
is sized for the largest window the image allows (no host sync for the windows); the programs past
a box's own window do nothing. Dense output: tiles are 16 x 64, x fastest (coalesced row-major
stores into the zero-filled (N, H, W) bool); crops are column-major, so their tiles are 64 x 16.
Program ids are cast to int64 before any offset arithmetic. Deterministic (each pixel written once).
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from htc_fast.kernels._device import on_device
from htc_fast.kernels._math import div_rn

__all__ = ["paste_masks_triton", "paste_mask_crops_triton", "paste_mask_windows_torch"]

_MAX_BOXES_PER_LAUNCH = 65535
# Register ceiling checked by scripts/check_triton_compile.py: 4-warp programs, >= 4 CTAs per SM
# (65536 / (128 * 128)), enough to hide the probability gathers.
MAX_REGS = {"_mask_paste_kernel": 128}


@triton.jit
def _axis_taps(p, lo, size, cells, ok):
    """Taps of pixel indices p (int64 vector) on one axis: (i, w_lo, w_hi, valid), valid False where
    the coordinate is outside (-1, cells) or the box pastes nothing (weights 0 there)."""
    g = div_rn(p.to(tl.float32) + 0.5 - lo, size) * 2.0 - 1.0
    cf = cells.to(tl.float32)
    u = tl.fma(g + 1.0, cf * 0.5, -0.5)
    valid = tl.where((u > -1.0) & (u < cf), ok, False)  # (not `& ok`: the interpreter mis-splats it)
    f = tl.floor(tl.where(valid, u, 0.0))
    w_hi = tl.where(valid, u - f, 0.0)
    w_lo = tl.where(valid, 1.0 - w_hi, 0.0)
    return f.to(tl.int32), w_lo, w_hi, valid


# Image sizes, strides and the chunk offset vary per call; a mask size of 1 must stay a tensor (the
# kernel converts it with .to), not become a constexpr.
@triton.jit(do_not_specialize=["H", "W", "MH", "MW", "k0", "s_n", "s_h", "s_w", "total"])
def _mask_paste_kernel(out_ptr, probs_ptr, boxes_ptr, windows_ptr, offsets_ptr, H, W, MH, MW,
                       s_n, s_h, s_w, thr, k0, total,
                       CROPS: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1).to(tl.int64) + k0
    wx0 = tl.load(windows_ptr + 4 * k)
    wy0 = tl.load(windows_ptr + 4 * k + 1)
    wx1 = tl.load(windows_ptr + 4 * k + 2)
    wy1 = tl.load(windows_ptr + 4 * k + 3)
    off = 0
    if CROPS:  # a direct caller's window or offset that does not fit skips the box (as the CUDA kernel)
        off = tl.load(offsets_ptr + k)
        fits = (wx0 >= 0) & (wy0 >= 0) & (wx1 >= wx0) & (wy1 >= wy0) & (wx1 <= W) & (wy1 <= H)
        end = tl.load(offsets_ptr + k + 1)
        fits = fits & (off >= 0) & (off + (wx1 - wx0) * (wy1 - wy0) <= end) & (end <= total)
        wx1 = tl.where(fits, wx1, wx0)  # an empty window: no tile works
    tiles_x = (wx1 - wx0 + BLOCK_X - 1) // BLOCK_X
    ty = t // tl.maximum(tiles_x, 1)
    tx = t - ty * tiles_x
    if (tiles_x > 0) & (ty * BLOCK_Y < wy1 - wy0):
        bx0 = tl.load(boxes_ptr + 4 * k)
        by0 = tl.load(boxes_ptr + 4 * k + 1)
        bx1 = tl.load(boxes_ptr + 4 * k + 2)
        by1 = tl.load(boxes_ptr + 4 * k + 3)
        w = bx1 - bx0
        h = by1 - by0
        big = 3.4028234663852886e38  # |v| <= max float: finite (False for inf and NaN)
        ok = (tl.abs(bx0) <= big) & (tl.abs(by0) <= big) & (tl.abs(bx1) <= big) & (tl.abs(by1) <= big)
        ok = ok & (w > 0.0) & (w <= big) & (h > 0.0) & (h <= big)
        xs = wx0 + tx * BLOCK_X + tl.arange(0, BLOCK_X)
        ys = wy0 + ty * BLOCK_Y + tl.arange(0, BLOCK_Y)
        ix, e, wgt, vx = _axis_taps(xs, bx0, tl.where(ok, w, 1.0), MW, ok)
        iy, s, n, vy = _axis_taps(ys, by0, tl.where(ok, h, 1.0), MH, ok)
        x_lo = vx & (ix >= 0)
        x_hi = vx & (ix + 1 < MW)
        y_lo = vy & (iy >= 0)
        y_hi = vy & (iy + 1 < MH)
        base = probs_ptr + k * s_n
        r0 = iy.to(tl.int64)[:, None] * s_h
        r1 = r0 + s_h
        c0 = ix.to(tl.int64)[None, :] * s_w
        c1 = c0 + s_w
        v00 = tl.load(base + r0 + c0, mask=y_lo[:, None] & x_lo[None, :], other=0.0).to(tl.float32)
        v01 = tl.load(base + r0 + c1, mask=y_lo[:, None] & x_hi[None, :], other=0.0).to(tl.float32)
        v10 = tl.load(base + r1 + c0, mask=y_hi[:, None] & x_lo[None, :], other=0.0).to(tl.float32)
        v11 = tl.load(base + r1 + c1, mask=y_hi[:, None] & x_hi[None, :], other=0.0).to(tl.float32)
        s2 = s[:, None]
        n2 = n[:, None]
        e2 = e[None, :]
        w2 = wgt[None, :]
        value = (v00 * e2 + v01 * w2) * s2 + (v10 * e2 + v11 * w2) * n2  # along x, then along y
        inside = (ys < wy1)[:, None] & (xs < wx1)[None, :]
        if CROPS:
            idx = off + (xs - wx0)[None, :] * (wy1 - wy0) + (ys - wy0)[:, None]
        else:
            idx = k * H * W + ys[:, None] * W + xs[None, :]
        tl.store(out_ptr + idx, value >= thr, mask=inside)


_INTERPRETED = not isinstance(_mask_paste_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


def paste_mask_windows_torch(boxes: Tensor, mask_height: int, mask_width: int, height: int,
                             width: int) -> Tensor:
    """(N, 4) int64 [x0, y0, x1, y1]: the pixels each box may set, on the boxes' device, without a
    host sync. Equal to ``htc_fast::paste_mask_windows`` (checked by the tests): centres within half
    a mask cell of the box, one pixel of margin each side, clamped; zeros for boxes that paste
    nothing or miss the image."""
    b = boxes.to(torch.float32)
    size = torch.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)  # float32, as the kernels
    ok = torch.isfinite(b).all(1) & torch.isfinite(size).all(1) & (size > 0).all(1)
    cells = torch.tensor([mask_width, mask_height], dtype=torch.float64, device=b.device)
    limit = torch.tensor([width, height], dtype=torch.float64, device=b.device)
    half = size.double() / (2.0 * cells)
    safe = torch.where(ok[:, None], b.double(), torch.zeros((), dtype=torch.float64, device=b.device))
    half = torch.where(ok[:, None], half, torch.zeros_like(half))
    begin = torch.floor(safe[:, :2] - half - 0.5)
    end = torch.ceil(safe[:, 2:] + half - 0.5) + 1.0
    begin = torch.minimum(torch.maximum(begin, torch.zeros_like(begin)), limit)
    end = torch.minimum(torch.maximum(end, begin), limit)
    ok = ok & (end > begin).all(1)
    win = torch.cat([begin, end], 1).to(torch.long)
    return torch.where(ok[:, None], win, torch.zeros_like(win))


def _launch(out, mask_probs, boxes, windows, offsets, height, width, threshold, crops):
    """Paste into `out` (dense (N, H, W) or flat crops of out.numel() values), under the device guard."""
    if _INTERPRETED and is_fake(out):
        # Tracing (torch.compile, opcheck) runs the op on fake tensors; an interpreted launch would
        # read their (absent) data. The shapes are all tracing needs (as in kernels/roi_align.py).
        return
    n = boxes.shape[0]
    block_y, block_x = (64, 16) if crops else (16, 64)
    if _INTERPRETED:  # the interpreter's cost is per program, not per pixel: few, large tiles
        block_y, block_x = 64, 128
    tiles = triton.cdiv(height, block_y) * triton.cdiv(width, block_x)
    with on_device(out):
        for k0 in range(0, n, _MAX_BOXES_PER_LAUNCH):
            count = min(_MAX_BOXES_PER_LAUNCH, n - k0)
            wrap_triton(_mask_paste_kernel)[(tiles, count)](
                out, mask_probs, boxes, windows, offsets, height, width, mask_probs.shape[1],
                mask_probs.shape[2], *mask_probs.stride(), float(threshold), k0, out.numel(),
                CROPS=crops, BLOCK_Y=block_y, BLOCK_X=block_x, num_warps=4)


@triton_op("htc_fast::paste_masks_triton", mutates_args=())
def paste_masks_triton(mask_probs: Tensor, boxes: Tensor, height: int, width: int,
                       threshold: float) -> Tensor:
    """(N, Mh, Mw) probabilities (any strides), (N, 4) float32 boxes -> (N, height, width) bool."""
    out = torch.zeros((boxes.shape[0], height, width), dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] == 0:
        return out
    boxes = boxes.to(torch.float32).contiguous()
    windows = paste_mask_windows_torch(boxes, mask_probs.shape[1], mask_probs.shape[2], height, width)
    _launch(out, mask_probs, boxes, windows, windows, height, width, threshold, crops=False)
    return out


@triton_op("htc_fast::paste_mask_crops_triton", mutates_args=())
def paste_mask_crops_triton(mask_probs: Tensor, boxes: Tensor, windows: Tensor, offsets: Tensor,
                            total: int, height: int, width: int, threshold: float) -> Tensor:
    """Crops as ``htc_fast::paste_mask_crops``: windows (N, 4) int64 inside the (height, width)
    image, offsets (N + 1,) int64 -> flat (total,) bool, crop n column-major at offsets[n]
    (``mask_rle.crop_offsets`` builds them so). A crop that does not fit (window outside the image,
    or not inside [offsets[n], offsets[n + 1]) within total) is skipped (reads as empty), checked in
    the kernel: no host sync, no out-of-bounds write."""
    n = boxes.shape[0]
    if windows.shape != (n, 4) or windows.dtype != torch.int64:
        raise ValueError(f"paste_mask_crops_triton: windows must be int64 of shape ({n}, 4), got "
                         f"{windows.dtype} {tuple(windows.shape)}")
    if offsets.shape != (n + 1,) or offsets.dtype != torch.int64:
        raise ValueError(f"paste_mask_crops_triton: offsets must be int64 of shape ({n + 1},), got "
                         f"{offsets.dtype} {tuple(offsets.shape)}")
    out = torch.zeros((total,), dtype=torch.bool, device=boxes.device)
    if boxes.shape[0] == 0 or total == 0:
        return out
    _launch(out, mask_probs, boxes.to(torch.float32).contiguous(), windows.contiguous(),
            offsets.contiguous(), height, width, threshold, crops=True)
    return out


if _INTERPRETED:
    def _opaque(mode, op, types, args, kwargs):
        # triton_op decomposes into its kernel launches when AOTAutograd traces; an interpreted
        # launch cannot be captured (see _launch), so keep the op whole (as kernels/roi_align.py).
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op in (paste_masks_triton, paste_mask_crops_triton):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque)
