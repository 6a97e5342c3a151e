"""Mask paste and COCO RLE in plain PyTorch/numpy: the specification of ``paste_masks`` and
``paste_masks_rle``, the test oracle, and the fallback when ``htc_fast._C`` is missing.

Pixel model (mmdetection's ``_do_paste_mask`` followed by ``masks >= mask_thr_binary``): for a box
(x0, y0, x1, y1) in image pixels and a (Mh, Mw) mask of probabilities, pixel (x, y) of the image
takes the value that ``grid_sample(mask, grid, mode="bilinear", padding_mode="zeros",
align_corners=False)`` gives at the float32 grid point

    gx = (x + 0.5 - x0) / (x1 - x0) * 2 - 1,    gy = (y + 0.5 - y0) / (y1 - y0) * 2 - 1,

and is set when that value is >= threshold (compared in float32). The value is exactly 0 unless the
pixel centre lies within half a mask cell of the box, so each box is sampled on a window that
covers that region with room to spare (``_sample_window``), not on the whole image; that changes
nothing but the cost.

Where we differ from mmdetection on purpose: a box with a non-finite coordinate, or whose float32
width or height is not finite and positive (zero-width and flipped boxes included), pastes an
empty mask. (mmdetection replaces the infinite grid of a zero-width box by 0, which paints a
full-height stripe through the box's centre.) mmdetection also crops its grid to the boxes grown by
one pixel; below threshold 0.5 pixels beyond that (up to half a cell out) can be set here.

COCO RLE (``rle_encode``): pycocotools' format, ``{"size": [H, W], "counts": bytes}``: run lengths
of the mask in column-major order starting with a run of zeros, compressed as pycocotools'
``rleToString`` does.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["paste_masks", "paste_mask_probs", "pasted", "rle_encode", "rle_string"]


def pasted(boxes: Tensor) -> Tensor:
    """(N,) bool: which boxes paste anything (finite, float32 width and height finite and > 0)."""
    b = boxes.float()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    ok = torch.isfinite(b).all(1) & torch.isfinite(w) & torch.isfinite(h)
    return ok & (w > 0) & (h > 0)


def _sample_window(box, mask_h, mask_w, height, width):
    """(x_begin, y_begin, x_end, y_end): the box grown by one whole mask cell and one pixel, clamped
    to the image. The support (half a cell) lies well inside it, so the kernels' tighter windows are
    tested against values computed beyond them."""
    x0, y0, x1, y1 = box
    cw, ch = (x1 - x0) / mask_w, (y1 - y0) / mask_h
    xa = min(max(math.floor(x0 - cw) - 1, 0), width)
    ya = min(max(math.floor(y0 - ch) - 1, 0), height)
    xb = min(max(math.ceil(x1 + cw) + 2, xa), width)
    yb = min(max(math.ceil(y1 + ch) + 2, ya), height)
    return xa, ya, xb, yb


def _sample_box(mask: Tensor, box: Tensor, height: int, width: int):
    """The grid_sample values of one pasted box on its sample window: (window, (h, w) float32)."""
    window = _sample_window([float(v) for v in box.tolist()], mask.shape[0], mask.shape[1], height, width)
    xa, ya, xb, yb = window
    x0, y0, x1, y1 = box.float().unbind()
    xs = torch.arange(xa, xb, device=box.device, dtype=torch.float32) + 0.5
    ys = torch.arange(ya, yb, device=box.device, dtype=torch.float32) + 0.5
    gx = (xs - x0) / (x1 - x0) * 2 - 1
    gy = (ys - y0) / (y1 - y0) * 2 - 1
    grid = torch.stack([gx[None, :].expand(len(ys), len(xs)), gy[:, None].expand(len(ys), len(xs))], -1)
    values = F.grid_sample(mask.float()[None, None], grid[None], mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return window, values[0, 0]


def paste_mask_probs(mask_probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """The pasted probabilities: (N, Mh, Mw) float, (N, 4) boxes -> (N, height, width) float32.
    (What ``paste_masks`` thresholds; the tests use it to find pixels on the threshold.)"""
    out = torch.zeros(boxes.shape[0], height, width, dtype=torch.float32, device=boxes.device)
    for k in pasted(boxes).nonzero().flatten().tolist():
        (xa, ya, xb, yb), values = _sample_box(mask_probs[k], boxes[k], height, width)
        out[k, ya:yb, xa:xb] = values
    return out


def paste_masks(mask_probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float) -> Tensor:
    """Binary masks: (N, Mh, Mw) float, (N, 4) boxes -> (N, height, width) bool, value >= threshold.
    One box at a time: no float buffer larger than a box's window."""
    out = torch.zeros(boxes.shape[0], height, width, dtype=torch.bool, device=boxes.device)
    for k in pasted(boxes).nonzero().flatten().tolist():
        (xa, ya, xb, yb), values = _sample_box(mask_probs[k], boxes[k], height, width)
        out[k, ya:yb, xa:xb] = values >= threshold
    return out


def rle_counts(mask: np.ndarray) -> list:
    """Uncompressed COCO run lengths of an (H, W) bool mask: column-major, zeros first."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return [0]
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return [0] + counts if flat[0] else counts


def rle_string(counts) -> bytes:
    """pycocotools' compressed counts: each count (less the count two back, from the fourth on) in
    little-endian 5-bit groups, 0x20 meaning "more follows", plus 48."""
    out = bytearray()
    for i, count in enumerate(counts):
        x = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # Python's shift is arithmetic, as the C code's on a signed long
            more = x != -1 if c & 0x10 else x != 0
            out.append((c | 0x20 if more else c) + 48)
    return bytes(out)


def rle_encode(mask) -> dict:
    """COCO RLE of one (H, W) bool mask (Tensor or array), as ``pycocotools.mask.encode`` of its
    Fortran-ordered uint8 copy: ``{"size": [H, W], "counts": bytes}``."""
    mask = mask.cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle_string(rle_counts(mask))}
