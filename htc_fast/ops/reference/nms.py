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

__all__ = ["nms", "batched_nms", "batched_nms_padded", "compact"]


def _threshold_as(threshold: float, dtype: torch.dtype) -> Tensor:
    """The largest `dtype` value not above `threshold`: ``x > t`` in double equals ``x > this``."""
    t = torch.tensor(threshold, dtype=dtype)
    # Tensor ops, not .item(): no host read even in a sync counter's eyes (CPU tensors anyway).
    below = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return torch.where(t.double() > threshold, below, t)


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


def batched_nms_padded(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                       max_output: int, max_group_size: int) -> tuple:
    """``batched_nms`` at a fixed capacity, without reading any value on the host.

    Returns (keep, num_kept): keep (max_output,) int64 = batched_nms(...)[:max_output] padded with
    -1; num_kept an int64 0-d tensor, min(K, max_output). A group larger than max_group_size takes
    part with only its max_group_size best-scored boxes (ties by index): the result is then
    batched_nms of those (the kernels size their bit masks with max_group_size).

    The greedy chain is one tensor step per box in score order (a box's "alive" flag stays on the
    device), and the kept boxes are compacted by a scatter to their rank, so the op sequence
    depends only on N. O(N) memory, N steps: a specification, not a fast path.
    """
    n, device = boxes.shape[0], boxes.device
    order = torch.sort(scores, descending=True, stable=True).indices
    acc = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.to(acc)[order]
    group = idxs[order]
    x1, y1, x2, y2 = b.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    threshold = _threshold_as(iou_threshold, acc).to(device)
    removed = _rank_in_group(group) >= max_group_size  # beyond the capacity: neither kept nor suppressing
    for i in range(n):  # as `nms`, with the row's suppression applied only while box i is alive
        xx1 = torch.maximum(x1[i], x1[i + 1:])
        yy1 = torch.maximum(y1[i], y1[i + 1:])
        xx2 = torch.minimum(x2[i], x2[i + 1:])
        yy2 = torch.minimum(y2[i], y2[i + 1:])
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        suppress = (inter / (area[i] + area[i + 1:] - inter) > threshold) & (group[i + 1:] == group[i])
        removed[i + 1:] |= suppress & ~removed[i]
    return compact(order, ~removed, max_output)


def _rank_in_group(group: Tensor) -> Tensor:
    """For boxes in score order with group ids (N,), each box's rank among its group's boxes."""
    keys, perm = torch.sort(group, stable=True)
    first = torch.searchsorted(keys, keys, side="left")
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(group.shape[0], device=group.device) - first
    return rank


def compact(values: Tensor, selected: Tensor, capacity: int) -> tuple:
    """(capacity,) the selected entries of `values` (N,) int64 in order, padded with -1, and their
    count clamped to `capacity` (0-d int64); no host read (a scatter to each entry's rank)."""
    n = values.shape[0]
    rank = torch.cumsum(selected.long(), 0) - 1
    # Entries not placed go to distinct slots past the capacity: no duplicate index, deterministic.
    spill = torch.arange(capacity, capacity + n, device=values.device)
    slot = torch.where(selected & (rank < capacity), rank, spill)
    out = torch.full((capacity + n,), -1, dtype=torch.long, device=values.device)
    out.scatter_(0, slot, values)
    return out[:capacity], selected.sum().clamp(max=capacity)
