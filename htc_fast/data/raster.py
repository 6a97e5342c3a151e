"""Ground truth rasterised directly at the network resolution (the fast training path).

What this module owns: instance masks and semantic label maps of one image produced at the
resized (and possibly flipped) size in one step, instead of decoding them at the original size and
resizing them (`transforms.resize_sample`, the reference path).

  * polygons: the coordinates are scaled by (w_scale, h_scale) (and mirrored, x' = W - x) and
    rasterised at (H, W) by pycocotools -- no full-resolution bitmap, no resize. The masks differ
    from "rasterise at the original size, nearest-resize, flip" only on boundary pixels (nearest
    resizing shifts edges by up to half a source pixel; tests/data_pipeline/test_raster.py measures
    the per-instance IoU on real COCO images);
  * RLE segmentations (crowd regions, rare non-crowd RLEs): decoded at the original size, then
    sampled with the nearest rule of `transforms.resize_nearest` (src = floor(dst * h / H) in
    float32, as PyTorch and OpenCV compute it), mirrored when flipped: exactly the reference;
  * semantic maps at `stride` (the semantic head's 1/8; the loss reads only every 8th pixel of the
    padded full-resolution map: `HTC._downscale_labels`): the samples at rows 0, s, 2s, ... and
    columns 0, s, 2s, ... of the resized (flipped) map, gathered straight from the original
    stuff map -- bit-identical to the reference for stuff maps.
"""
from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils
from torch import Tensor

from htc_fast.data.mask_crops import MaskCrops


def nearest_source_index(src: int, dst: int, step: int = 1, flip: bool = False) -> np.ndarray:
    """Source indices read by a nearest resize src -> dst (PyTorch's / OpenCV's rule,
    floor(i * (src / dst)) in float32, identity when equal) at the output positions
    0, step, 2*step, ... < dst, of the output mirrored when `flip`. (ceil(dst / step),) int64."""
    out = np.arange(0, dst, step, dtype=np.int64)
    if flip:
        out = dst - 1 - out
    if src == dst:
        return out
    scale = np.float32(src) / np.float32(dst)
    return np.minimum(np.floor(out.astype(np.float32) * scale).astype(np.int64), src - 1)


def polygon_crops(instances: Sequence[Sequence[Sequence[float]]], scale: tuple[float, float],
                  size: tuple[int, int], flip: bool = False) -> MaskCrops:
    """G polygon instances (each a list of flat [x0, y0, x1, y1, ...] polygons in original
    pixels), scaled by `scale` = (w_scale, h_scale), mirrored (x' = W - x) when `flip`, rasterised
    at `size` = (H, W) by pycocotools, as `MaskCrops`.

    Each instance is rasterised in its own bounding window (a pixel of margin, clipped to the
    image): pycocotools' rasteriser is invariant to integer shifts, so this is its full-image
    result, for work proportional to the boxes' areas, not G x H x W."""
    h, w = size
    sx, sy = scale
    windows, crops = [], []
    for inst in instances:
        polys = [np.asarray(p, dtype=np.float64).reshape(-1, 2) * (sx, sy) for p in inst]
        if flip:
            for xy in polys:
                xy[:, 0] = w - xy[:, 0]
        lo = np.min([xy.min(0) for xy in polys], axis=0)
        hi = np.max([xy.max(0) for xy in polys], axis=0)
        x0, y0 = min(max(int(np.floor(lo[0])) - 1, 0), w), min(max(int(np.floor(lo[1])) - 1, 0), h)
        x1, y1 = max(min(int(np.ceil(hi[0])) + 2, w), x0), max(min(int(np.ceil(hi[1])) + 2, h), y0)
        windows.append((x0, y0, x1, y1))
        if x1 == x0 or y1 == y0:  # entirely outside the image
            crops.append(np.zeros(0, np.uint8))
            continue
        rles = mask_utils.frPyObjects([(xy - (x0, y0)).ravel() for xy in polys], y1 - y0, x1 - x0)
        rle = rles[0] if len(rles) == 1 else mask_utils.merge(rles)
        crops.append(mask_utils.decode([rle])[:, :, 0].T)  # (x1 - x0, y1 - y0), a view
    return MaskCrops.from_columns(size, windows, crops)


def rasterise_polygons(instances: Sequence[Sequence[Sequence[float]]], scale: tuple[float, float],
                       size: tuple[int, int], flip: bool = False) -> Tensor:
    """(G, H, W) bool: `polygon_crops(...)` made dense."""
    return polygon_crops(instances, scale, size, flip).dense()


def dense_crops(masks: np.ndarray) -> MaskCrops:
    """(G, H, W) masks as `MaskCrops` with whole-image windows (for the rare RLE instances)."""
    g, h, w = masks.shape
    return MaskCrops.from_columns((h, w), [(0, 0, w, h)] * g, [m.T for m in masks.astype(np.uint8)])


def decode_rle(seg: dict, height: int, width: int) -> np.ndarray:
    """(h, w) uint8 0/1 of an uncompressed (counts list) or compressed (counts str) COCO RLE."""
    if isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": list(seg["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    return mask_utils.decode([rle])[:, :, 0]


def sample_grid(full: np.ndarray, size: tuple[int, int], step: int = 1, flip: bool = False) -> np.ndarray:
    """(..., h, w) array at the original size -> its nearest resize to `size` = (H, W), mirrored
    when `flip`, sampled every `step` pixels: (..., ceil(H / step), ceil(W / step))."""
    rows = nearest_source_index(full.shape[-2], size[0], step)
    cols = nearest_source_index(full.shape[-1], size[1], step, flip)
    return full[..., rows[:, None], cols[None, :]]


def paint_labels(masks: np.ndarray, values: Sequence[int], areas: Sequence[float],
                 fill: int = 255) -> np.ndarray:
    """(h, w) uint8 label map: `values[i]` where (G, h, w) `masks[i]` is set, instances painted in
    decreasing `areas` (stable) so that smaller ones win overlaps, `fill` elsewhere."""
    out = np.full(masks.shape[1:], fill, dtype=np.uint8)
    for i in sorted(range(len(values)), key=lambda k: -areas[k]):
        out[masks[i] != 0] = values[i]
    return out
