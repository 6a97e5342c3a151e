"""HTC's final detection step, mmdetection's ``multiclass_nms``: per-class NMS over the (row, class)
pairs whose score is above a threshold, the best ``max_per_image`` kept.

Two forms with the same detections:
  * ``padded=False``: ``MulticlassNMSResult`` sized by the data (selects candidates with nonzero,
    then the data-dependent ``batched_nms``: host syncs);
  * ``padded=True``: ``PaddedDetections`` of static shape (max_per_image, ...) plus a device count,
    with no host synchronisation: every (row, class) pair enters a fixed-capacity ``batched_nms``,
    pairs at or below the threshold (or NaN) with score -inf. They sort after every candidate, so
    they can suppress none, and they are cut off by the count.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from htc_fast.ops import _checks, _debug
from htc_fast.ops._errors import OpArgumentError
from htc_fast.ops.nms import batched_nms

__all__ = ["multiclass_nms", "MulticlassNMSResult", "PaddedDetections"]


class MulticlassNMSResult(NamedTuple):
    """Detections of one image. M <= max_per_image, sorted by descending score."""

    boxes: Tensor    # (M, 4) float xyxy
    scores: Tensor   # (M,) float
    labels: Tensor   # (M,) int64 class in [0, C)
    indices: Tensor  # (M,) int64 row of the input each detection came from


class PaddedDetections(NamedTuple):
    """``MulticlassNMSResult`` at a fixed capacity K: rows [0, num_dets) are the detections (by
    descending score), the rest padding (boxes and scores 0, labels and indices -1)."""

    boxes: Tensor     # (K, 4) float xyxy
    scores: Tensor    # (K,) float
    labels: Tensor    # (K,) int64
    indices: Tensor   # (K,) int64
    num_dets: Tensor  # () int64 on the device


def multiclass_nms(boxes, scores, score_threshold, iou_threshold, max_per_image, *, padded=False,
                   backend=None):
    """HTC's final detection step (mmdetection's ``multiclass_nms``).

    Args:
        boxes: (N, 4) class-agnostic boxes, or (N, C, 4) one box per class.
        scores: (N, C + 1) class probabilities, background LAST (dropped).
        score_threshold: keep (row, class) pairs with score > this (HTC test: 0.001). A NaN score
            is never above it (``debug_checks()`` reports NaN scores instead).
        iou_threshold: per-class NMS threshold (HTC: 0.5).
        max_per_image: an int; keep at most this many, the highest scored (HTC: 100); <= 0 keeps
            all (with ``padded``: capacity N * C).
        padded: return ``PaddedDetections`` of capacity max_per_image, without host syncs.
        backend: for the batched NMS.

    Returns:
        ``MulticlassNMSResult(boxes, scores, labels, indices)`` or, with ``padded``,
        ``PaddedDetections(boxes, scores, labels, indices, num_dets)``.
    """
    where = "multiclass_nms"
    per_class = _check(boxes, scores)
    score_threshold = _checks.real(where, "score_threshold", score_threshold)
    iou_threshold = _checks.real(where, "iou_threshold", iou_threshold)
    max_per_image = _checks.integer(where, "max_per_image", max_per_image)
    if not isinstance(padded, bool):
        raise _checks.OpTypeError(f"{where}: padded must be a bool, got {_checks.describe(padded)}")
    n, num_classes = scores.shape[0], scores.shape[1] - 1
    flat_scores = scores[:, :num_classes].reshape(-1)
    if _debug.enabled():
        _debug.check(torch.isnan(flat_scores), lambda i: f"{where}: scores[{i // num_classes}, "
                     f"{i % num_classes}] is NaN (debug check; without it a NaN score is never above "
                     "score_threshold, so the pair is dropped)")
    if padded:
        capacity = max_per_image if max_per_image > 0 else n * num_classes
        return _padded(boxes, flat_scores, per_class, num_classes, score_threshold, iou_threshold,
                       capacity, backend)
    candidates = (flat_scores > score_threshold).nonzero().squeeze(1)
    rows, labels = candidates // num_classes, candidates % num_classes
    # Class-agnostic boxes are gathered by row: no (N, C, 4) copy.
    cand_boxes = boxes.reshape(-1, 4)[candidates] if per_class else boxes[rows]
    keep = batched_nms(cand_boxes, flat_scores[candidates], labels, iou_threshold, backend=backend)
    if max_per_image > 0:
        keep = keep[:max_per_image]
    return MulticlassNMSResult(cand_boxes[keep], flat_scores[candidates[keep]], labels[keep], rows[keep])


def _padded(boxes, flat_scores, per_class, num_classes, score_threshold, iou_threshold, capacity,
            backend):
    n = flat_scores.shape[0] // max(num_classes, 1)
    device = flat_scores.device
    if n * num_classes == 0:  # no rows: all padding (a static condition: it reads no data)
        none = torch.full((capacity,), -1, dtype=torch.long, device=device)
        return PaddedDetections(boxes.new_zeros((capacity, 4)), flat_scores.new_zeros((capacity,)), none,
                                none.clone(), torch.zeros((), dtype=torch.long, device=device))
    pair = torch.arange(n * num_classes, device=device)
    masked = torch.where(flat_scores > score_threshold, flat_scores, float("-inf"))
    pair_boxes = boxes.reshape(-1, 4) if per_class else \
        boxes[:, None].expand(n, num_classes, 4).reshape(-1, 4)
    keep, _ = batched_nms(pair_boxes, masked, pair % num_classes, iou_threshold, max_output=capacity,
                          max_group_size=max(n, 1), backend=backend)
    safe = keep.clamp(min=0)
    valid = (keep >= 0) & (masked[safe] > float("-inf"))  # a prefix: candidates sort first
    return PaddedDetections(
        torch.where(valid[:, None], pair_boxes[safe], 0), torch.where(valid, flat_scores[safe], 0),
        torch.where(valid, safe % num_classes, -1), torch.where(valid, safe // num_classes, -1),
        valid.sum())


def _check(boxes, scores):
    """Validate the tensors; return whether boxes are per class (N, C, 4)."""
    where = "multiclass_nms"
    _checks.tensor(where, "scores", scores, floating=True)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise OpArgumentError(f"{where}: scores must be (N, C + 1) with background last, got "
                              f"{tuple(scores.shape)}")
    _checks.tensor(where, "boxes", boxes, floating=True)
    _checks.same_device(where, "scores", scores, boxes=boxes)
    n, num_classes = scores.shape[0], scores.shape[1] - 1
    per_class = boxes.dim() == 3 and boxes.shape == (n, num_classes, 4)
    if not per_class and not (boxes.dim() == 2 and boxes.shape == (n, 4)):
        raise OpArgumentError(f"{where}: boxes must be ({n}, 4) or ({n}, {num_classes}, 4) for scores "
                              f"{tuple(scores.shape)}, got {tuple(boxes.shape)}")
    return per_class
