"""The independent oracle for RoIAlign tests, and the random RoIs the tests feed every backend.

``naive_roi_align`` is written line by line from the semantics (htc_fast/ops/reference/roi_align.py
module docstring): Python loops over RoIs, bins and samples, no vectorisation, no sample-range
bounding. Coordinates are computed in the accumulation type T of the features (float32 unless
float64), exactly as the specification says, because the validity test ``-1 <= y <= H`` is
discontinuous and must see the same rounded coordinates; the sums are float64. Small inputs only.
"""
import math

import numpy as np
import torch


def naive_roi_align(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Reference by loops.

    Args:
        input: (N, C, H, W) float features (any dtype; values are read as float64).
        rois: (K, 5) ``[batch_index, x1, y1, x2, y2]``.
        output_size: (PH, PW).

    Returns:
        (K, C, PH, PW) float64 on the CPU.
    """
    t = np.float64 if input.dtype == torch.float64 else np.float32
    feats = input.detach().double().cpu().numpy()
    n, c, h, w = feats.shape
    ph_, pw_ = output_size
    out = np.zeros((rois.shape[0], c, ph_, pw_))
    for k, (b, x1, y1, x2, y2) in enumerate(rois.detach().double().cpu().tolist()):
        if not all(math.isfinite(v) for v in (b, x1, y1, x2, y2)) or not 0 <= math.trunc(b) < n:
            continue  # invalid RoI: zeros
        b = math.trunc(b)
        x1, y1, x2, y2 = t(x1), t(y1), t(x2), t(y2)
        s = t(spatial_scale)
        off = t(0.5) if aligned else t(0.0)
        sw, sh, ew, eh = x1 * s - off, y1 * s - off, x2 * s - off, y2 * s - off
        roi_w, roi_h = ew - sw, eh - sh
        if not aligned:
            roi_w, roi_h = max(roi_w, t(1.0)), max(roi_h, t(1.0))
        bin_h, bin_w = roi_h / t(ph_), roi_w / t(pw_)
        grid_h = sampling_ratio if sampling_ratio > 0 else _ceil_grid(roi_h / t(ph_))
        grid_w = sampling_ratio if sampling_ratio > 0 else _ceil_grid(roi_w / t(pw_))
        count = max(grid_h * grid_w, 1)
        plane = feats[b]
        for py in range(ph_):
            for px in range(pw_):
                acc = np.zeros(c)
                for iy in range(grid_h):
                    y = sh + t(py) * bin_h + (t(iy) + t(0.5)) * bin_h / t(grid_h)
                    for ix in range(grid_w):
                        x = sw + t(px) * bin_w + (t(ix) + t(0.5)) * bin_w / t(grid_w)
                        acc += _bilinear(plane, y, x, t)
                out[k, :, py, px] = acc / count
    return torch.from_numpy(out)


def _ceil_grid(v):
    return int(min(max(math.ceil(v), 0), 2 ** 30))


def _bilinear(plane, y, x, t):
    """torchvision's bilinear_interpolate on one (C, H, W) plane; (C,) float64."""
    _, h, w = plane.shape
    if not (y >= -1.0 and y <= h and x >= -1.0 and x <= w):
        return 0.0
    y, x = max(y, t(0.0)), max(x, t(0.0))
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = t(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = t(x_low)
    else:
        x_high = x_low + 1
    ly, lx = float(y) - y_low, float(x) - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * plane[:, y_low, x_low] + hy * lx * plane[:, y_low, x_high]
            + ly * hx * plane[:, y_high, x_low] + ly * lx * plane[:, y_high, x_high])


def random_rois(num, batch_size, height, width, spatial_scale, *, kinds=("inside", "border", "outside"),
                dtype=torch.float32, device="cpu"):
    """(num, 5) random rois in image pixels for a (height, width) feature map at ``spatial_scale``.

    kinds (cycled over the RoIs):
        "inside": within the map; "border": straddles an edge; "outside": entirely off the map, at
        least 1 feature pixel beyond the -1 / H+1 limits (every sample is zero); "zero": zero width
        or height; "flipped": x2 < x1 and/or y2 < y1; "point": x1 == x2 and y1 == y2.
    Batch indices are uniform in [0, batch_size), so indices > 0 occur.
    """
    extent = torch.tensor([width, height], dtype=torch.float64)
    rows = []
    for i in range(num):
        kind = kinds[i % len(kinds)]
        # In feature pixels first; divided by spatial_scale at the end.
        size = (torch.rand(2, dtype=torch.float64) * 0.45 + 0.05) * extent
        lo = torch.rand(2, dtype=torch.float64) * (extent - size)
        if kind == "border":  # over the top-left edge, or over the bottom-right one
            lo = -size * torch.rand(2) * 0.8 if i % 2 else extent - size * (0.2 + torch.rand(2) * 0.8)
        elif kind == "outside":
            axis, far = i % 2, (i // 2) % 2 == 1
            gap = 2.0 + torch.rand(()).item() * extent[axis]
            lo[axis] = extent[axis] + gap if far else -gap - size[axis]
        box = torch.cat([lo, lo + size])
        if kind == "zero":
            box[2 + i % 2] = box[i % 2]
        elif kind == "flipped":
            box = box[[2, 1, 0, 3]] if i % 2 else box[[2, 3, 0, 1]]
        elif kind == "point":
            box[2:] = box[:2]
        batch = torch.randint(0, batch_size, (1,), dtype=torch.float64)
        rows.append(torch.cat([batch, box / spatial_scale]))
    if not rows:
        return torch.zeros(0, 5, dtype=dtype, device=device)
    return torch.stack(rows).to(dtype=dtype, device=device)
