"""RoIAlign in plain PyTorch: the specification every htc_fast backend must match.

Owns the meaning of ``roi_align``, ``multilevel_roi_align`` and ``map_roi_levels``; it is also the
test oracle and the fallback when htc_fast._C is missing. It does not check arguments (the public
functions in ``htc_fast/ops/roi_align.py`` do) and has no custom backward: it is differentiable
w.r.t. the features by plain autograd.

Semantics (torchvision's C++ ``roi_align``, average pooling). Features ``(N, C, H, W)``; rois
``(K, 5) = [b, x1, y1, x2, y2]`` in image pixels; ``s = spatial_scale``; pooled size ``(PH, PW)``.
Everything is computed in T = float64 for float64 features, else float32; the output is cast to
the features' dtype. For RoI k::

    off = 0.5 if aligned else 0
    sw, sh, ew, eh = x1*s - off, y1*s - off, x2*s - off, y2*s - off
    roi_w, roi_h = ew - sw, eh - sh            (not aligned: each at least 1)
    bin_h, bin_w = roi_h / PH, roi_w / PW
    grid_h = sampling_ratio if > 0 else ceil(roi_h / PH)   (clamped to [0, 2**30]; <= 0: no samples)
    count = max(grid_h * grid_w, 1)
    y(py, iy) = sh + py*bin_h + (iy + 0.5) * bin_h / grid_h        (x likewise)
    out[k, c, py, px] = sum over samples of bilinear(F[b, c], y, x) / count

``bilinear`` is zero unless ``-1 <= y <= H`` and ``-1 <= x <= W`` (false for NaN); otherwise the
coordinate is clamped to >= 0 and the taps to the last row/column. A RoI with a non-finite
coordinate or a batch index outside [0, N) gives zeros.

How it is computed. Both the validity test and the bilinear weights are products of a y part and
an x part, so RoIAlign is separable::

    out[k, c, py, px] = sum_{r, q} Wy[k, py, r] * F[b_k, c, r, q] * Wx[k, px, q] / count[k]

where ``Wy[k, py, r]`` sums, over the y-samples of bin row ``py``, their bilinear weight on feature
row ``r``. The weights are built by scatter-adding per-sample weights; only the samples that can
land in ``[-1, H]`` are enumerated (bounded work for a huge RoI), and each is tested exactly. The
contraction reads each RoI's window of touched rows/columns only, in chunks of RoIs whose padded
windows fit ``_CHUNK_ELEMENTS``, so memory stays bounded on HTC shapes.

Non-finite features: a NaN/inf inside the rows x columns a RoI's samples touch may reach every bin
of that RoI (the matrix products multiply it by zero weights); it never reaches another RoI.
"""
import contextlib

import torch
from torch import Tensor

__all__ = ["roi_align", "multilevel_roi_align", "map_roi_levels"]

# Elements of T per chunk of the contraction (window gather + intermediate): 2**25 is 128 MB in fp32.
_CHUNK_ELEMENTS = 1 << 25
# The sample grid is clamped before converting to an integer (semantics: [0, 2**30]).
_MAX_GRID = float(1 << 30)


def roi_align(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
              pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Single-level RoIAlign.

    Args:
        input: (N, C, H, W) float features, any memory layout.
        rois: (K, 5) float ``[batch_index, x1, y1, x2, y2]`` in image pixels.
        spatial_scale: feature pixels per image pixel (1 / stride).
        pooled_height, pooled_width: output bins per RoI (PH, PW).
        sampling_ratio: samples per bin side; <= 0 means ``ceil(roi_size / pooled_size)`` per RoI.
        aligned: shift the RoI by -0.5 feature pixels (pixel-centre model).

    Returns:
        (K, C, PH, PW) contiguous, in ``input.dtype``.
    """
    # Under autocast the matmuls below would run in fp16/bf16; the spec accumulates in T.
    device_type = input.device.type
    no_autocast = (torch.autocast(device_type, enabled=False) if torch.amp.is_autocast_available(device_type)
                   else contextlib.nullcontext())
    with no_autocast:
        return _roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    n, c, h, w = input.shape
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    k = rois.shape[0]
    if k == 0 or c == 0 or h == 0 or w == 0:  # nothing to compute, or no pixels to read
        return _zeros_in_graph(input, (k, c, pooled_height, pooled_width))
    rois = rois.to(acc)
    idx, x1, y1, x2, y2 = rois.unbind(1)
    idx = torch.trunc(idx)  # b = int(rois[k, 0]), as the kernels convert it
    valid = torch.isfinite(rois).all(1) & (idx >= 0) & (idx < n)
    batch = torch.where(valid, idx, 0).long()

    scale = torch.tensor(spatial_scale, dtype=acc, device=rois.device)
    off = 0.5 if aligned else 0.0
    start_w, start_h = x1 * scale - off, y1 * scale - off
    roi_w, roi_h = (x2 * scale - off) - start_w, (y2 * scale - off) - start_h
    if not aligned:  # legacy Detectron: force malformed RoIs to 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    bin_h, bin_w = roi_h / pooled_height, roi_w / pooled_width
    grid_h = _grid(bin_h, sampling_ratio, valid)
    grid_w = _grid(bin_w, sampling_ratio, valid)
    count = (grid_h * grid_w).clamp(min=1).to(acc)  # int64 product: no overflow at 2**30 x 2**30

    wy, row0, row1 = _axis_weights(start_h, bin_h, grid_h, pooled_height, h)
    wx, col0, col1 = _axis_weights(start_w, bin_w, grid_w, pooled_width, w)

    # Channels-last rows of C values, with one extra zero row and column per image: window
    # padding points there, so padding reads exact zeros (a NaN/inf feature cannot leak in
    # through a zero weight). One copy of the maps, which also does the cast to T.
    table = input.new_zeros((n, h + 1, w + 1, c), dtype=acc)
    table[:, :h, :w] = input.permute(0, 2, 3, 1)
    table = table.view(-1, c)
    rows_n, cols_n = (row1 - row0).clamp(min=0), (col1 - col0).clamp(min=0)

    pieces, order = [], []
    for chunk, hh, ww in _chunks(rows_n, cols_n, c, pooled_height, pooled_width):
        r = row0[chunk, None] + torch.arange(hh, device=rois.device)  # (k, hh)
        q = col0[chunk, None] + torch.arange(ww, device=rois.device)  # (k, ww)
        r = torch.where(r < row1[chunk, None], r, h)  # padding -> the zero row
        q = torch.where(q < col1[chunk, None], q, w)  # padding -> the zero column
        flat = (batch[chunk, None, None] * (h + 1) + r[:, :, None]) * (w + 1) + q[:, None, :]
        win = table.index_select(0, flat.flatten()).view(len(chunk), hh, ww * c)  # (k, hh, ww*C)
        wy_win = wy[chunk].gather(2, r.clamp(max=h - 1)[:, None, :].expand(-1, pooled_height, -1))
        wx_win = wx[chunk].gather(2, q.clamp(max=w - 1)[:, None, :].expand(-1, pooled_width, -1))
        # out[k, c, p, q] = sum_ij wy_win[k, p, i] * win[k, i, j, c] * wx_win[k, q, j], as two
        # batched matmuls that need no transposed copy of the window.
        tmp = torch.matmul(wy_win, win).view(len(chunk), pooled_height, ww, c)  # (k, PH, ww, C)
        out = torch.matmul(wx_win[:, None], tmp)  # (k, PH, PW, C)
        pieces.append(out.permute(0, 3, 1, 2) / count[chunk, None, None, None])
        order.append(chunk)
    out = torch.cat(pieces)[torch.argsort(torch.cat(order))]
    return out.to(input.dtype).contiguous()


def multilevel_roi_align(features, rois: Tensor, spatial_scales, pooled_height: int,
                         pooled_width: int, sampling_ratio: int, aligned: bool,
                         finest_scale: float) -> Tensor:
    """FPN RoIAlign: each RoI pooled from the level ``map_roi_levels`` assigns it.

    Args:
        features: L tensors (N, C, H_l, W_l) of one dtype and device.
        rois: (K, 5) float ``[batch_index, x1, y1, x2, y2]`` in image pixels.
        spatial_scales: L floats, 1 / stride of each level.
        pooled_height, pooled_width, sampling_ratio, aligned: as in ``roi_align``.
        finest_scale: the RoI scale mapped to level 0 (mmdetection: 56).

    Returns:
        (K, C, PH, PW) in the features' dtype, rows in the order of ``rois``; zeros for a RoI whose
        level is undefined (-1). Gradients flow to every level by autograd.
    """
    first = features[0]
    acc = torch.float64 if first.dtype == torch.float64 else torch.float32
    rois = rois.to(acc)
    level = map_roi_levels(rois, len(features), finest_scale)
    pieces, order = [], []
    # A loop over levels (not RoIs): the boolean selection syncs with the host, fine for a spec.
    for lvl, (feat, scale) in enumerate(zip(features, spatial_scales)):
        sel = (level == lvl).nonzero().squeeze(1)
        pieces.append(roi_align(feat, rois[sel], scale, pooled_height, pooled_width,
                                sampling_ratio, aligned))
        order.append(sel)
    none = (level < 0).nonzero().squeeze(1)
    pieces.append(first.new_zeros((none.shape[0], first.shape[1], pooled_height, pooled_width)))
    order.append(none)
    return torch.cat(pieces)[torch.argsort(torch.cat(order))].contiguous()


def map_roi_levels(rois: Tensor, num_levels: int, finest_scale: float = 56) -> Tensor:
    """mmdetection's FPN level of each RoI (SingleRoIExtractor.map_roi_levels).

    ``level = clamp(floor(log2(sqrt((x2 - x1) * (y2 - y1)) / finest_scale + 1e-6)), 0, L - 1)``,
    computed in float32 (float64 for float64 rois). Levels: scale < 112 -> 0, [112, 224) -> 1,
    [224, 448) -> 2, >= 448 -> 3 for finest_scale 56.

    Args:
        rois: (K, 5) float ``[batch_index, x1, y1, x2, y2]``.
        num_levels: L.
        finest_scale: see above.

    Returns:
        (K,) int64 in [0, L); -1 where the formula gives NaN (negative area, NaN coordinates),
        which mmdetection's per-level masks never select: such RoIs pool to zeros.
    """
    acc = torch.float64 if rois.dtype == torch.float64 else torch.float32
    rois = rois.to(acc)
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    level = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    clamped = level.clamp(0, num_levels - 1)
    return torch.where(torch.isnan(level), -1.0, clamped).long()


# ------------------------------------------------------------------------------------- helpers

def _zeros_in_graph(input, shape):
    """Zeros of ``shape`` that still depend on ``input``, so backward through an empty result works."""
    if not input.requires_grad:
        return input.new_zeros(shape)
    # The sum over an empty slice is 0 even when the features hold inf/NaN.
    return input.narrow(0, 0, 0).sum().expand(shape).contiguous()


def _grid(bin_size, sampling_ratio, valid):
    """(K,) int64 samples per bin side: sampling_ratio, or ceil(bin) per RoI; 0 for invalid RoIs."""
    if sampling_ratio > 0:
        grid = torch.full_like(bin_size, float(sampling_ratio))
    else:
        grid = torch.ceil(bin_size)
    # Clamp in T before converting (a huge RoI must not overflow); NaN only occurs on invalid RoIs.
    grid = torch.where(valid, grid.clamp(0.0, _MAX_GRID), 0.0)
    return grid.long()


def _axis_weights(start, bin_size, grid, pooled, size):
    """Per-bin bilinear weights along one axis, summed over that axis' samples.

    Args:
        start, bin_size: (K,) in T; grid: (K,) int64 samples per bin (0: none); pooled: P bins;
        size: H (or W), the feature map's extent on this axis.

    Returns:
        weights (K, P, size) in T; first, end (K,) int64: the touched rows are [first, end)
        (first >= end when the RoI touches none). Taps of weight 0 still count as touched.
    """
    k, device, acc = start.shape[0], start.device, start.dtype
    base = start[:, None] + torch.arange(pooled, device=device).to(acc) * bin_size[:, None]  # (K, P)

    # Which sample indices can land in [-1, size]? Solve base + (i + 0.5) * step in float64, then
    # widen by the rounding error of computing y in T (large for a 1e7-pixel RoI in float32).
    step = (bin_size.double() / grid.clamp(min=1).double())[:, None]
    b64 = base.double()
    lo, hi = (-1.0 - b64) / step - 0.5, (size - b64) / step - 0.5
    lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
    margin = 1.0 + torch.ceil(8 * torch.finfo(acc).eps * (b64.abs() + size + 2) / step.abs())
    g = grid[:, None].double()
    lo = torch.floor(lo - margin).clamp(0.0, _MAX_GRID)
    hi = torch.minimum(torch.ceil(hi + margin), g - 1)
    # step == 0 (zero-size bin): every sample sits at `base`, test them all (grid <= sampling_ratio).
    lo = torch.where(step == 0, 0.0, lo)
    hi = torch.where(step == 0, g - 1, hi)
    # NaN bounds happen only when every coordinate is NaN (infinite bins): no samples.
    n_samples = torch.nan_to_num(hi - lo + 1, nan=0.0).clamp(min=0.0).long().flatten()  # (K*P,)
    lo = torch.nan_to_num(lo, nan=0.0).long().flatten()

    # Enumerate the (bin, sample) pairs as flat ragged ranges: no loop over RoIs or bins.
    total = int(n_samples.sum())
    seg = torch.repeat_interleave(torch.arange(k * pooled, device=device), n_samples,
                                  output_size=total)  # bin (k * P + p) of each sample
    first_of_seg = torch.cumsum(n_samples, 0) - n_samples
    i = lo[seg] + torch.arange(total, device=device) - first_of_seg[seg]
    roi = seg // pooled
    # This operation order is the specification's (torchvision's): start + p*bin + (i+.5)*bin/grid.
    y = base.flatten()[seg] + (i.to(acc) + 0.5) * bin_size[roi] / grid[roi].to(acc)

    ok = (y >= -1.0) & (y <= size)  # False for NaN
    y = torch.where(ok, y, 0.0).clamp(min=0.0)
    low = y.long()  # y >= 0: truncation is floor
    at_edge = low >= size - 1
    low = torch.where(at_edge, size - 1, low)
    high = torch.where(at_edge, size - 1, low + 1)
    y = torch.where(at_edge, low.to(acc), y)
    frac = y - low.to(acc)
    w_low = torch.where(ok, 1.0 - frac, 0.0)
    w_high = torch.where(ok, frac, 0.0)

    weights = torch.zeros(k * pooled * size, dtype=acc, device=device)
    weights.index_add_(0, seg * size + low, w_low)
    weights.index_add_(0, seg * size + high, w_high)

    first = torch.full((k,), size, dtype=torch.long, device=device)
    end = torch.zeros(k, dtype=torch.long, device=device)
    first.scatter_reduce_(0, roi, torch.where(ok, low, size), reduce="amin")
    end.scatter_reduce_(0, roi, torch.where(ok, high + 1, 0), reduce="amax")
    return weights.view(k, pooled, size), first, end


def _chunks(rows_n, cols_n, channels, pooled_height, pooled_width):
    """Split RoIs into chunks whose padded windows fit ``_CHUNK_ELEMENTS``.

    Args:
        rows_n, cols_n: (K,) int64 window height and width of each RoI.

    Yields:
        (index (k,) int64 of the RoIs in the chunk, padded window height, padded window width).
    """
    # Tallest windows first, so a chunk's padded height is its first RoI's; its padded width is
    # the running max. One host sync per chunk, never one per RoI.
    order = torch.argsort(rows_n, descending=True, stable=True)
    rows_sorted, cols_sorted = rows_n[order], cols_n[order]
    k, s = order.shape[0], 0
    while s < k:
        hh = int(rows_sorted[s])
        ww = torch.cummax(cols_sorted[s:], 0).values
        per_roi = channels * (hh * ww + pooled_height * ww + pooled_height * pooled_width)
        cost = torch.arange(1, k - s + 1, device=ww.device) * per_roi
        n = max(1, int((cost <= _CHUNK_ELEMENTS).sum()))
        yield order[s:s + n], hh, int(ww[n - 1])
        s += n
