"""The delta-xywh box coder of R-CNN (mmdetection's ``DeltaXYWHBBoxCoder``), used by the RPN
(means 0, stds 1) and by the three cascade stages (stds 0.1/0.2, 0.05/0.1, 0.033/0.067).

Boxes are (N, 4) xyxy float pixels; widths are ``x2 - x1`` (no +1: mmdet v2.0+). For a source box
with centre (px, py) and size (pw, ph) and a target (gx, gy, gw, gh):

    dx = (gx - px) / pw,  dy = (gy - py) / ph,  dw = log(gw / pw),  dh = log(gh / ph)

normalised as ``(d - mean) / std``. Decoding inverts this with dw, dh clamped to
``|log(wh_ratio_clip)|`` (16/1000: a box may grow at most 62.5x per step) and, given the image
size, clips x to [0, W] and y to [0, H]. The operations follow mmdet's order so that float32
results are bit-identical (tested against a float64 formula). No centre clamp (mmdet's
``add_ctr_clamp`` is only used by YOLOF).
"""
import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from htc_fast.model.constants import host_constant

__all__ = ["DeltaXYWHBoxCoder", "encode_boxes", "decode_boxes"]


def _check_vec(name, v):
    if len(v) != 4:
        raise ValueError(f"DeltaXYWHBoxCoder: {name} must have 4 values, got {tuple(v)}")
    return tuple(float(x) for x in v)


def encode_boxes(boxes: Tensor, gt_boxes: Tensor, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Deltas that move ``boxes`` onto ``gt_boxes`` (mmdet's ``bbox2delta``).

    Args:
        boxes, gt_boxes: (N, 4) xyxy, paired row by row. Computed in float32 (as mmdet does),
            float64 inputs stay float64.
        means, stds: per-coordinate normalisation of (dx, dy, dw, dh).

    Returns:
        (N, 4) deltas; degenerate boxes (zero width or height) give inf/NaN, as in mmdet.
    """
    if boxes.shape != gt_boxes.shape or boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"encode_boxes: boxes and gt_boxes must both be (N, 4), got "
                         f"{tuple(boxes.shape)} and {tuple(gt_boxes.shape)}")
    if boxes.dtype != torch.float64:
        boxes, gt_boxes = boxes.float(), gt_boxes.float()
    else:
        gt_boxes = gt_boxes.double()
    # Pairs of coordinates at once ((x, y) and (w, h) columns): the same arithmetic per element
    # as one coordinate at a time, in fewer ops.
    p1, p2, g1, g2 = boxes[:, :2], boxes[:, 2:], gt_boxes[:, :2], gt_boxes[:, 2:]
    pxy, pwh = (p1 + p2) * 0.5, p2 - p1
    gxy, gwh = (g1 + g2) * 0.5, g2 - g1
    deltas = torch.cat([(gxy - pxy) / pwh, torch.log(gwh / pwh)], dim=-1)
    if _is_identity(means, stds):
        return deltas
    return (deltas - _const(means, deltas)) / _const(stds, deltas)


def _const(values, like: Tensor) -> Tensor:
    """A (1, 4) tensor of ``values`` on ``like``'s device and dtype, made once (no ops per call)."""
    values = tuple(float(v) for v in values)
    return host_constant(("coder", values, str(like.device), like.dtype),
                         lambda: torch.tensor([values], dtype=like.dtype, device=like.device))


def _is_identity(means, stds) -> bool:
    """Normalisation by means 0 and stds 1 changes no value: skip it."""
    return all(float(m) == 0.0 for m in means) and all(float(v) == 1.0 for v in stds)


def decode_boxes(boxes: Tensor, deltas: Tensor, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 max_shape: Union[tuple[int, int], Tensor, None] = None,
                 wh_ratio_clip: float = 16 / 1000) -> Tensor:
    """Apply ``deltas`` to ``boxes`` (mmdet's ``delta2bbox``, ``clip_border=True``).

    Args:
        boxes: (N, 4) xyxy source boxes (anchors or rois).
        deltas: (N, 4 * C) normalised deltas (C = 1 for class-agnostic regression); each group of 4
            is applied to the same source box.
        means, stds: the normalisation used by ``encode_boxes``.
        max_shape: (H, W) of the image; when given, x is clipped to [0, W] and y to [0, H]. Or an
            (N, 2) tensor of each box's (H, W), or (N, 4) of its (W, H, W, H), to decode boxes of
            several images in one pass.
        wh_ratio_clip: dw and dh are clamped to ``[-|log r|, |log r|]``.

    Returns:
        (N, 4 * C) decoded xyxy boxes in the promoted dtype of ``boxes`` and ``deltas``.
        Differentiable in ``deltas``.
    """
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"decode_boxes: boxes must be (N, 4), got {tuple(boxes.shape)}")
    if deltas.dim() != 2 or deltas.shape[0] != boxes.shape[0] or deltas.shape[1] % 4 != 0 \
            or deltas.shape[1] == 0:
        raise ValueError(f"decode_boxes: deltas must be ({boxes.shape[0]}, 4 * C), got {tuple(deltas.shape)}")
    num_boxes, num_classes = deltas.shape[0], deltas.shape[1] // 4
    if num_boxes == 0:
        return deltas.new_zeros((0, deltas.shape[1]), dtype=torch.promote_types(boxes.dtype, deltas.dtype))
    # Geometry in the wider of the two dtypes (float32 for float32 anchors and fp16 deltas).
    dtype = torch.promote_types(boxes.dtype, deltas.dtype)
    denorm = deltas.reshape(-1, 4).to(dtype)
    if not _is_identity(means, stds):
        denorm = denorm * _const(stds, denorm) + _const(means, denorm)
    dxy, dwh = denorm[:, :2], denorm[:, 2:]
    rois = boxes.to(dtype)
    if num_classes > 1:
        rois = rois.repeat(1, num_classes).reshape(-1, 4)
    r1, r2 = rois[:, :2], rois[:, 2:]
    pxy, pwh = (r1 + r2) * 0.5, r2 - r1
    max_ratio = abs(math.log(wh_ratio_clip))
    dwh = dwh.clamp(min=-max_ratio, max=max_ratio)
    gxy = pxy + pwh * dxy
    half = pwh * dwh.exp() * 0.5
    out = torch.cat([gxy - half, gxy + half], dim=-1)
    if isinstance(max_shape, Tensor):
        # Per-box bounds (several images in one pass): (N, 2) [h, w] -> [w, h, w, h] per row,
        # or given as (N, 4) [w, h, w, h] already (made once per batch layout: no ops here).
        bound = max_shape.to(dtype)
        if bound.shape[-1] == 2:
            bound = bound.flip(-1).repeat(1, 2)
        if num_classes > 1:
            bound = bound.repeat_interleave(num_classes, dim=0)
        out = torch.minimum(out.clamp(min=0), bound)
    elif max_shape is not None:
        # clamp(x, 0, w) == minimum(maximum(x, 0), w), for the four columns at once.
        h, w = max_shape[0], max_shape[1]
        out = torch.minimum(out.clamp(min=0), _const((w, h, w, h), out))
    return out.reshape(num_boxes, -1)


class DeltaXYWHBoxCoder:
    """``encode_boxes`` / ``decode_boxes`` with fixed normalisation (no parameters, no state).

    Args:
        means, stds: 4 values each; RPN (0,0,0,0)/(1,1,1,1), cascade stage 1 (0,...)/(0.1, 0.1, 0.2, 0.2).
        wh_ratio_clip: see ``decode_boxes``.
    """

    def __init__(self, means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0), wh_ratio_clip: float = 16 / 1000):
        self.means = _check_vec("means", means)
        self.stds = _check_vec("stds", stds)
        if any(s <= 0 for s in self.stds):
            raise ValueError(f"DeltaXYWHBoxCoder: stds must be positive, got {self.stds}")
        if not 0 < wh_ratio_clip < 1:
            raise ValueError(f"DeltaXYWHBoxCoder: wh_ratio_clip must be in (0, 1), got {wh_ratio_clip}")
        self.wh_ratio_clip = float(wh_ratio_clip)

    def encode(self, boxes: Tensor, gt_boxes: Tensor) -> Tensor:
        """(N, 4) boxes, (N, 4) targets -> (N, 4) normalised deltas."""
        return encode_boxes(boxes, gt_boxes, self.means, self.stds)

    def decode(self, boxes: Tensor, deltas: Tensor, max_shape: Optional[tuple[int, int]] = None) -> Tensor:
        """(N, 4) boxes, (N, 4 * C) deltas, optional (H, W) clip -> (N, 4 * C) boxes."""
        return decode_boxes(boxes, deltas, self.means, self.stds, max_shape, self.wh_ratio_clip)

    def __repr__(self):
        return f"DeltaXYWHBoxCoder(means={self.means}, stds={self.stds}, wh_ratio_clip={self.wh_ratio_clip})"
