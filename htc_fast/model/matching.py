"""Matching boxes to ground truth: IoU, the max-IoU assigner and the positive/negative samplers.

Used by the RPN (anchors) and by each cascade stage (proposals, with the ground truth added as
proposals). Semantics are mmdetection's ``bbox_overlaps``, ``MaxIoUAssigner``, ``RandomSampler``
and ``SamplingResult``. Does not own box encoding or losses.

Convention of ``AssignResult.gt_inds`` (mmdet's, kept so recorded assignments compare directly):
``-1`` ignored (neither positive nor negative), ``0`` negative, ``k + 1`` positive matched to
ground truth ``k``. ``SamplingResult.pos_assigned_gt_inds`` is 0-based.
"""
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

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
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    if mode == "iou":
        area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
        union = area1[:, None] + area2[None, :] - overlap
    else:
        union = area1[:, None].expand_as(overlap)
    return overlap / torch.max(union, union.new_tensor([eps]))


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

    def __init__(self, pos_iou_thr: float, neg_iou_thr: Union[float, Tuple[float, float]],
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
               gt_boxes_ignore: Optional[Tensor] = None) -> AssignResult:
        """Assign (N, 4) xyxy ``boxes`` to (G, 4) ``gt_boxes`` with (G,) int64 ``gt_labels``
        (None: all 0, as for the RPN); optional (I, 4) ``gt_boxes_ignore``."""
        if gt_labels is None:
            gt_labels = torch.zeros(len(gt_boxes), dtype=torch.long, device=gt_boxes.device)
        if gt_labels.shape != gt_boxes.shape[:1]:
            raise ValueError(f"MaxIoUAssigner.assign: gt_labels must be ({gt_boxes.shape[0]},), got "
                             f"{tuple(gt_labels.shape)}")
        overlaps = bbox_overlaps(gt_boxes, boxes)
        if (self.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.numel() > 0
                and boxes.numel() > 0):
            iof = bbox_overlaps(boxes, gt_boxes_ignore, mode="iof").max(dim=1).values
            ignored = iof > self.ignore_iof_thr
            overlaps[:, ignored] = -1
        return self.assign_wrt_overlaps(overlaps, gt_labels)

    def assign_wrt_overlaps(self, overlaps: Tensor, gt_labels: Tensor) -> AssignResult:
        """Assign from a (G, N) overlap matrix (ground truth by box)."""
        num_gts, num_boxes = overlaps.shape
        gt_inds = torch.full((num_boxes,), -1, dtype=torch.long, device=overlaps.device)
        labels = torch.full((num_boxes,), -1, dtype=torch.long, device=overlaps.device)
        if num_gts == 0 or num_boxes == 0:
            if num_gts == 0:
                gt_inds.zero_()
            return AssignResult(num_gts, gt_inds, overlaps.new_zeros(num_boxes), labels)

        max_overlaps, argmax = overlaps.max(dim=0)
        if isinstance(self.neg_iou_thr, tuple):
            lo, hi = self.neg_iou_thr
            gt_inds[(max_overlaps >= lo) & (max_overlaps < hi)] = 0
        else:
            gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        pos = max_overlaps >= self.pos_iou_thr
        gt_inds[pos] = argmax[pos] + 1

        if self.match_low_quality:
            gt_max = overlaps.max(dim=1).values
            eligible = gt_max >= self.min_pos_iou  # (G,)
            if self.gt_max_assign_all:
                hit = (overlaps == gt_max[:, None]) & eligible[:, None]  # (G, N)
            else:
                hit = torch.zeros_like(overlaps, dtype=torch.bool)
                first = overlaps.argmax(dim=1)
                hit[torch.arange(num_gts, device=overlaps.device), first] = True
                hit &= eligible[:, None]
            # mmdet loops k = 0..G-1 and overwrites, so the LAST matching ground truth wins.
            order = torch.arange(1, num_gts + 1, device=overlaps.device)[:, None]
            winner = (hit.long() * order).max(dim=0).values  # (N,) 0 = none
            gt_inds = torch.where(winner > 0, winner, gt_inds)

        pos_mask = gt_inds > 0
        labels[pos_mask] = gt_labels[gt_inds[pos_mask] - 1].to(torch.long)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)


@dataclass(frozen=True, eq=False)
class SamplingResult:
    """Sampled positives and negatives of one image (mmdet's ``SamplingResult``).

    Indices refer to the sampler's candidate list: ``cat([gt_boxes, boxes])`` when ground truth
    was added as proposals, else ``boxes``. Both index lists are ascending (mmdet applies
    ``unique``, which sorts), so the sampled rois come in index order.

    pos_inds: (P,) int64; neg_inds: (Q,) int64.
    pos_boxes: (P, 4), neg_boxes: (Q, 4) xyxy.
    pos_is_gt: (P,) bool, the positive is a ground-truth box added as a proposal.
    pos_assigned_gt_inds: (P,) int64 0-based ground-truth index of each positive.
    pos_gt_boxes: (P, 4) its ground-truth box; pos_gt_labels: (P,) int64 its label.
    num_gts: G.
    """

    pos_inds: Tensor
    neg_inds: Tensor
    pos_boxes: Tensor
    neg_boxes: Tensor
    pos_is_gt: Tensor
    pos_assigned_gt_inds: Tensor
    pos_gt_boxes: Tensor
    pos_gt_labels: Tensor
    num_gts: int

    @property
    def num_pos(self) -> int:
        return int(self.pos_inds.numel())

    @property
    def num_neg(self) -> int:
        return int(self.neg_inds.numel())

    @property
    def avg_factor(self) -> int:
        """mmdet's loss normaliser for sampled heads: max(P, 1) + max(Q, 1)."""
        return max(self.num_pos, 1) + max(self.num_neg, 1)

    @property
    def boxes(self) -> Tensor:
        """(P + Q, 4) positives then negatives: the rois a cascade stage runs on."""
        return torch.cat([self.pos_boxes, self.neg_boxes], dim=0)


class RandomSampler:
    """mmdet's ``RandomSampler``: up to ``int(num * pos_fraction)`` random positives, the rest of
    ``num`` random negatives (at most ``neg_pos_ub * max(P, 1)`` when ``neg_pos_ub >= 0``).

    ``add_gt_as_proposals`` prepends the ground truth to the candidates (each positive for
    itself). HTC: RPN (256, 0.5, -1, False), cascade stages (512, 0.25, -1, True).

    Random choice is ``torch.randperm(len(pool), generator=generator)[:k]`` on the CPU, drawn for
    positives then negatives, image after image: with ``generator=None`` (the global CPU
    generator) this is the random stream of mmdet's sampler, so a run seeded the same way draws
    the same samples.
    """

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: float = -1,
                 add_gt_as_proposals: bool = True):
        if num <= 0:
            raise ValueError(f"{type(self).__name__}: num must be positive, got {num}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"{type(self).__name__}: pos_fraction must be in [0, 1], got {pos_fraction}")
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = bool(add_gt_as_proposals)

    def _choose(self, pool: Tensor, k: int, generator: Optional[torch.Generator]) -> Tensor:
        perm = torch.randperm(pool.numel(), generator=generator)[:k].to(pool.device)
        return pool[perm]

    def _take(self, mask: Tensor, k: int, generator) -> Tensor:
        pool = mask.nonzero().squeeze(1)
        if pool.numel() > k:
            pool = self._choose(pool, k, generator)
        return pool.unique()  # sorted, as mmdet's

    def sample(self, assign_result: AssignResult, boxes: Tensor, gt_boxes: Tensor,
               gt_labels: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None) -> SamplingResult:
        """Sample one image.

        Args:
            assign_result: the assignment of ``boxes`` (not including the ground truth).
            boxes: (N, 4) candidate boxes (anchors or proposals).
            gt_boxes: (G, 4) ground truth; gt_labels: (G,) int64 (None: zeros).
            generator: a CPU ``torch.Generator``; None uses the global one.

        Returns:
            SamplingResult.
        """
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{type(self).__name__}.sample: boxes must be (N, 4), got {tuple(boxes.shape)}")
        if assign_result.gt_inds.shape[0] != boxes.shape[0]:
            raise ValueError(f"{type(self).__name__}.sample: assign_result covers "
                             f"{assign_result.gt_inds.shape[0]} boxes, boxes has {boxes.shape[0]}")
        if gt_labels is None:
            gt_labels = torch.zeros(len(gt_boxes), dtype=torch.long, device=gt_boxes.device)
        is_gt = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        if self.add_gt_as_proposals and len(gt_boxes) > 0:
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes], dim=0)
            assign_result = assign_result.with_gts_prepended(gt_labels)
            is_gt = torch.cat([torch.ones(len(gt_boxes), dtype=torch.bool, device=boxes.device), is_gt])

        pos_inds = self._take(assign_result.gt_inds > 0, int(self.num * self.pos_fraction), generator)
        num_neg = self.num - pos_inds.numel()
        if self.neg_pos_ub >= 0:
            num_neg = min(num_neg, int(self.neg_pos_ub * max(1, pos_inds.numel())))
        neg_inds = self._take(assign_result.gt_inds == 0, num_neg, generator)

        assigned = assign_result.gt_inds[pos_inds] - 1
        if len(gt_boxes) > 0:
            pos_gt_boxes = gt_boxes[assigned]
        else:
            pos_gt_boxes = gt_boxes.reshape(-1, 4)[:0]
        return SamplingResult(pos_inds=pos_inds, neg_inds=neg_inds, pos_boxes=boxes[pos_inds],
                              neg_boxes=boxes[neg_inds], pos_is_gt=is_gt[pos_inds],
                              pos_assigned_gt_inds=assigned, pos_gt_boxes=pos_gt_boxes,
                              pos_gt_labels=assign_result.labels[pos_inds],
                              num_gts=assign_result.num_gts)


class FirstKSampler(RandomSampler):
    """``RandomSampler`` choosing the first k of each pool in index order instead of at random
    (the oracle's "first-k" mode): deterministic, for exact loss comparisons. Draws nothing."""

    def _choose(self, pool: Tensor, k: int, generator: Optional[torch.Generator]) -> Tensor:
        return pool[:k]
