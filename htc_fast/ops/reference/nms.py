"""NMS in plain PyTorch: the specification of ``nms`` and ``batched_nms`` and their fallback.

Semantics (torchvision's ``nms``): sort by descending score, ties by index (a stable sort); walk
the boxes in that order; a box not yet removed is kept and removes every later box whose IoU with
it is above the threshold (strict). IoU = inter / (area_a + area_b - inter), xyxy, no +1, computed
in T = float64 for float64 boxes, else float32, with torchvision's operations in its order; the
comparison is torchvision's, a T IoU against the double threshold (``_threshold_as``). A zero union
gives NaN, which never suppresses. Boxes with x2 < x1 or y2 < y1 are used as given (as torchvision
does: their area is negative).

``batched_nms``: exactly ``nms`` on each value of ``idxs`` on its own, merged by descending score,
ties by index.
"""
import torch
from torch import Tensor

__all__ = ["nms", "batched_nms"]


def _threshold_as(threshold: float, dtype: torch.dtype) -> Tensor:
    """The largest `dtype` value not above `threshold`: ``x > t`` in double equals ``x > this``."""
    t = torch.tensor(threshold, dtype=dtype)
    if t.item() > threshold:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return t


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS. boxes (N, 4) xyxy float, scores (N,) float -> kept indices (K,) int64, by score."""
    order = torch.sort(scores, descending=True, stable=True).indices
    acc = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.to(acc)[order]
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    threshold = _threshold_as(iou_threshold, acc).to(boxes.device)
    removed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    kept = []
    for i in range(len(order)):  # the greedy chain is sequential by definition
        if removed[i]:
            continue
        kept.append(i)
        xx1 = torch.maximum(x1[i], x1[i + 1:])
        yy1 = torch.maximum(y1[i], y1[i + 1:])
        xx2 = torch.minimum(x2[i], x2[i + 1:])
        yy2 = torch.minimum(y2[i], y2[i + 1:])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        removed[i + 1:] |= inter / (area[i] + area[i + 1:] - inter) > threshold
    return order[torch.tensor(kept, dtype=torch.long, device=boxes.device)]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """``nms`` per value of idxs (N,) int, merged: kept indices (K,) int64 by score, ties by index."""
    keep = torch.zeros(len(scores), dtype=torch.bool, device=boxes.device)
    for value in torch.unique(idxs):
        members = (idxs == value).nonzero().squeeze(1)
        keep[members[nms(boxes[members], scores[members], iou_threshold)]] = True
    by_score = torch.sort(scores, descending=True, stable=True).indices
    return by_score[keep[by_score]]
