"""Matching boxes to ground truth: IoU, the max-IoU assigner and the positive/negative samplers.

Used by the RPN (anchors) and by each cascade stage (proposals, with the ground truth added as
proposals). Semantics are mmdetection's ``bbox_overlaps`` and ``MaxIoUAssigner``, computed without
host synchronisation (no boolean-mask indexing). The samplers are in ``sampling.py``. Does not own
box encoding or losses.

Convention of ``AssignResult.gt_inds`` (mmdet's, kept so recorded assignments compare directly):
``-1`` ignored (neither positive nor negative), ``0`` negative, ``k + 1`` positive matched to
ground truth ``k``. ``SamplingResult.pos_assigned_gt_inds`` is 0-based.
"""
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

# The samplers live in sampling.py; re-exported here, where callers have always found them.
from htc_fast.model.sampling import FirstKSampler, RandomSampler, SamplingResult

__all__ = ["bbox_overlaps", "AssignResult", "MaxIoUAssigner", "SamplingResult", "RandomSampler",
           "FirstKSampler"]


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", eps: float = 1e-6) -> Tensor:
    """Pairwise IoU (or IoF) of xyxy boxes, mmdet's ``bbox_overlaps`` (no +1).

    ``iou = inter / max(area1 + area2 - inter, eps)``; ``iof = inter / max(area1, eps)`` (the
    fraction of each box of ``boxes1`` covered). The ``eps`` floor makes degenerate pairs 0
    instead of NaN (torchvision's ``box_iou`` gives NaN there).

    Args:
        boxes1: (M, 4), boxes2: (N, 4) float.
        mode: "iou" or "iof".

    Returns:
        (M, N) in the boxes' dtype.
    """
    if mode not in ("iou", "iof"):
        raise ValueError(f"bbox_overlaps: mode must be 'iou' or 'iof', got {mode!r}")
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.dim() != 2 or b.shape[-1] != 4:
            raise ValueError(f"bbox_overlaps: {name} must be (N, 4), got {tuple(b.shape)}")
    if boxes1.shape[0] == 0 or boxes2.shape[0] == 0:
        return boxes1.new_zeros((boxes1.shape[0], boxes2.shape[0]))
    # w * h as a product over the last dim: the same single rounding, in fewer ops.
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(dim=-1)
    b1 = boxes1[:, None]
    lt = torch.max(b1[..., :2], boxes2[:, :2])
    rb = torch.min(b1[..., 2:], boxes2[:, 2:])
    overlap = (rb - lt).clamp(min=0).prod(dim=-1)
    if mode == "iou":
        area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(dim=-1)
        union = area1[:, None] + area2 - overlap
    else:
        union = area1[:, None].expand_as(overlap)
    return overlap / union.clamp(min=eps)


class AssignResult(NamedTuple):
    """Assignment of N boxes to G ground-truth boxes.

    num_gts: G.
    gt_inds: (N,) int64: -1 ignored, 0 negative, k + 1 positive for ground truth k.
    max_overlaps: (N,) float: each box's largest IoU with any ground truth (0 when G = 0;
        -1 for boxes ignored through ``gt_boxes_ignore``).
    labels: (N,) int64: the matched ground truth's label for positives, -1 otherwise.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    def with_gts_prepended(self, gt_labels: Tensor) -> "AssignResult":
        """The assignment of ``cat([gt_boxes, boxes])``: ground truth k is positive for itself
        with overlap 1 (mmdet's ``AssignResult.add_gt_``, as a new value)."""
        n = len(gt_labels)
        own = torch.arange(1, n + 1, dtype=torch.long, device=self.gt_inds.device)
        return AssignResult(self.num_gts, torch.cat([own, self.gt_inds]),
                            torch.cat([self.max_overlaps.new_ones(n), self.max_overlaps]),
                            torch.cat([gt_labels.to(self.labels), self.labels]))


class MaxIoUAssigner:
    """mmdet's ``MaxIoUAssigner``, in its order of steps:

    1. every box starts ignored (-1);
    2. boxes whose max IoU is in [0, neg_iou_thr) (or in [lo, hi) for a pair) become negative;
    3. boxes whose max IoU >= pos_iou_thr become positive for their best ground truth (ties: the
       lowest ground-truth index);
    4. with ``match_low_quality``: for each ground truth k in index order whose best IoU is
       >= min_pos_iou, the boxes with exactly that IoU (all of them when ``gt_max_assign_all``,
       else the first) become positive for k, overriding steps 2-3 (a later k wins).

    With ``ignore_iof_thr > 0`` and ignore boxes given, boxes covered by an ignore box by more
    than that IoF (of the box) get overlap -1 with every ground truth, so they stay ignored
    unless step 4 picks them. No ground truth: every box is negative. HTC: RPN (0.7, 0.3, 0.3),
    cascade stages (0.5, 0.5, 0.5), (0.6, ...), (0.7, ...) with ``match_low_quality=False``.
    """

    def __init__(self, pos_iou_thr: float, neg_iou_thr: Union[float, tuple[float, float]],
                 min_pos_iou: float = 0.0, gt_max_assign_all: bool = True,
                 ignore_iof_thr: float = -1.0, match_low_quality: bool = True):
        if isinstance(neg_iou_thr, (tuple, list)):
            if len(neg_iou_thr) != 2:
                raise ValueError(f"MaxIoUAssigner: neg_iou_thr must be a float or a (lo, hi) pair, "
                                 f"got {neg_iou_thr}")
            neg_iou_thr = (float(neg_iou_thr[0]), float(neg_iou_thr[1]))
        else:
            neg_iou_thr = float(neg_iou_thr)
        self.pos_iou_thr = float(pos_iou_thr)
        self.neg_iou_thr = neg_iou_thr
        self.min_pos_iou = float(min_pos_iou)
        self.gt_max_assign_all = bool(gt_max_assign_all)
        self.ignore_iof_thr = float(ignore_iof_thr)
        self.match_low_quality = bool(match_low_quality)

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Optional[Tensor] = None,
               gt_boxes_ignore: Optional[Tensor] = None, valid: Optional[Tensor] = None) -> AssignResult:
        """Assign (N, 4) xyxy ``boxes`` to (G, 4) ``gt_boxes`` with (G,) int64 ``gt_labels``
        (None: all 0, as for the RPN); optional (I, 4) ``gt_boxes_ignore``; optional (N,) bool
        ``valid``: boxes that are not candidates (padding, anchors outside the image) are
        ignored (-1) and take no part in the low-quality matching."""
        if gt_labels is None:
            gt_labels = torch.zeros(len(gt_boxes), dtype=torch.long, device=gt_boxes.device)
        if gt_labels.shape != gt_boxes.shape[:1]:
            raise ValueError(f"MaxIoUAssigner.assign: gt_labels must be ({gt_boxes.shape[0]},), got "
                             f"{tuple(gt_labels.shape)}")
        if valid is not None and valid.shape != boxes.shape[:1]:
            raise ValueError(f"MaxIoUAssigner.assign: valid must be ({boxes.shape[0]},), got {tuple(valid.shape)}")
        overlaps = bbox_overlaps(gt_boxes, boxes)
        if (self.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.numel() > 0
                and boxes.numel() > 0):
            iof = bbox_overlaps(boxes, gt_boxes_ignore, mode="iof").max(dim=1).values
            overlaps = overlaps.masked_fill((iof > self.ignore_iof_thr)[None], -1)
        if valid is not None:
            overlaps = overlaps.masked_fill(~valid[None], -1)
        result = self.assign_wrt_overlaps(overlaps, gt_labels)
        if valid is not None and len(gt_boxes) == 0:
            result = result._replace(gt_inds=result.gt_inds.masked_fill(~valid, -1))
        return result

    def assign_wrt_overlaps(self, overlaps: Tensor, gt_labels: Tensor) -> AssignResult:
        """Assign from a (G, N) overlap matrix (ground truth by box). Columns of -1 are ignored."""
        num_gts, num_boxes = overlaps.shape
        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=overlaps.device)
        labels = torch.full((num_boxes,), -1, dtype=torch.long, device=overlaps.device)
        if num_gts == 0 or num_boxes == 0:
            if num_gts == 0:
                gt_inds.zero_()
            return AssignResult(num_gts, gt_inds, overlaps.new_zeros(num_boxes), labels)

        max_overlaps, argmax = overlaps.max(dim=0)
        lo, hi = self.neg_iou_thr if isinstance(self.neg_iou_thr, tuple) else (0.0, self.neg_iou_thr)
        gt_inds = gt_inds.masked_fill((max_overlaps >= lo) & (max_overlaps < hi), 0)
        gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax + 1, gt_inds)

        if self.match_low_quality:
            gt_max = overlaps.max(dim=1).values
            eligible = gt_max >= self.min_pos_iou  # (G,)
            if self.gt_max_assign_all:
                hit = (overlaps == gt_max[:, None]) & eligible[:, None]  # (G, N)
            else:
                first = overlaps.argmax(dim=1)
                hit = (torch.arange(num_boxes, device=overlaps.device)[None] == first[:, None]) & eligible[:, None]
            # mmdet loops k = 0..G-1 and overwrites, so the LAST matching ground truth wins.
            order = torch.arange(1, num_gts + 1, device=overlaps.device)[:, None]
            winner = (hit.long() * order).max(dim=0).values  # (N,) 0 = none
            gt_inds = torch.where(winner > 0, winner, gt_inds)

        matched = gt_labels.to(torch.long)[(gt_inds - 1).clamp(min=0)]
        labels = torch.where(gt_inds > 0, matched, labels)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)
