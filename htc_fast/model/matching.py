"""Matching boxes to ground truth: IoU, the max-IoU assigner and the positive/negative samplers.

Used by the RPN (anchors) and by each cascade stage (proposals, with the ground truth added as
proposals). Semantics are mmdetection's ``bbox_overlaps`` and ``MaxIoUAssigner``, computed without
host synchronisation (no boolean-mask indexing). The samplers are in ``sampling.py``. Does not own
box encoding or losses.

Convention of ``AssignResult.gt_inds`` (mmdet's, kept so recorded assignments compare directly):
``-1`` ignored (neither positive nor negative), ``0`` negative, ``k + 1`` positive matched to
ground truth ``k``. ``SamplingResult.pos_assigned_gt_inds`` is 0-based.
"""
import copy
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from htc_fast.model.constants import host_constant

# The samplers live in sampling.py; re-exported here, where callers have always found them.
from htc_fast.model.sampling import FirstKSampler, RandomSampler, SamplingResult

__all__ = ["bbox_overlaps", "pad_boxes", "pad_ground_truth", "AssignResult", "MaxIoUAssigner", "stack_assigners",
           "SamplingResult", "RandomSampler", "FirstKSampler"]


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", eps: float = 1e-6) -> Tensor:
    """Pairwise IoU (or IoF) of xyxy boxes, mmdet's ``bbox_overlaps`` (no +1).

    ``iou = inter / max(area1 + area2 - inter, eps)``; ``iof = inter / max(area1, eps)`` (the
    fraction of each box of ``boxes1`` covered). The ``eps`` floor makes degenerate pairs 0
    instead of NaN (torchvision's ``box_iou`` gives NaN there).

    Args:
        boxes1: (..., M, 4), boxes2: (..., N, 4) float; the leading (batch) dims broadcast, so a
            batch of images' boxes pairs with one shared set (e.g. anchors) in one call.
        mode: "iou" or "iof".

    Returns:
        (..., M, N) in the boxes' dtype.
    """
    if mode not in ("iou", "iof"):
        raise ValueError(f"bbox_overlaps: mode must be 'iou' or 'iof', got {mode!r}")
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.dim() < 2 or b.shape[-1] != 4:
            raise ValueError(f"bbox_overlaps: {name} must be (..., N, 4), got {tuple(b.shape)}")
    if boxes1.shape[-2] == 0 or boxes2.shape[-2] == 0:
        batch = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
        return boxes1.new_zeros((*batch, boxes1.shape[-2], boxes2.shape[-2]))
    # w * h as a product over the last dim: the same single rounding, in fewer ops.
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).prod(dim=-1)
    b1, b2 = boxes1[..., :, None, :], boxes2[..., None, :, :]
    lt = torch.max(b1[..., :2], b2[..., :2])
    rb = torch.min(b1[..., 2:], b2[..., 2:])
    overlap = (rb - lt).clamp(min=0).prod(dim=-1)
    if mode == "iou":
        area2 = (boxes2[..., 2:] - boxes2[..., :2]).prod(dim=-1)
        union = area1[..., :, None] + area2[..., None, :] - overlap
    else:
        union = area1[..., :, None].expand_as(overlap)
    return overlap / union.clamp(min=eps)


def pad_boxes(boxes: Sequence[Tensor], dtype: Optional[torch.dtype] = None,
              device=None) -> tuple[Tensor, Optional[Tensor]]:
    """Per-image (K_i, 4) boxes as one (B, K, 4) batch, K = max K_i, padded with zero boxes
    (which overlap nothing), and the (B, K) bool mask of the real rows -- None when every image
    has K boxes (nothing to mask). Shapes come from the host: no sync. ``dtype`` / ``device``:
    of the result (default: the first image's)."""
    if not boxes:
        raise ValueError("pad_boxes: no images")
    dtype = dtype or boxes[0].dtype
    device = device if device is not None else boxes[0].device
    counts = [len(b) for b in boxes]
    rows = [b.to(device=device, dtype=dtype) for b in boxes]
    rows = [b if b.dim() == 2 else b.reshape(-1, 4) for b in rows]  # (0,) for an image without any
    if len(set(counts)) == 1:
        return torch.stack(rows), None
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), _real_rows(counts, device)


def _real_rows(counts: Sequence[int], device) -> Tensor:
    """(B, max count) bool: row j of image i is real when j < counts[i]."""
    return torch.arange(max(counts), device=device) < torch.tensor(counts, device=device)[:, None]


def pad_ground_truth(gt_boxes: Sequence[Tensor], gt_labels: Optional[Sequence[Tensor]] = None,
                     dtype: Optional[torch.dtype] = None,
                     device=None) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Per-image ground truth as one padded batch, for assigning and sampling every image at once.

    gt_boxes: B tensors (G_i, 4); gt_labels: B tensors (G_i,) int64 or None (as for the RPN).
    Returns ``pad_boxes``' (B, G, 4) boxes and (B, G) ``valid`` (None without padding: the
    assigner and sampler then skip the mask), with the (B, G) int64 labels between them (0 on
    padding; None without gt_labels)."""
    if not gt_boxes:
        raise ValueError("pad_ground_truth: gt_boxes is empty (no images)")
    padded, valid = pad_boxes(gt_boxes, dtype, device)
    if gt_labels is None:
        return padded, None, valid
    labels = [lab.to(device=padded.device, dtype=torch.long) for lab in gt_labels]
    if valid is None:
        return padded, torch.stack(labels), None
    return padded, torch.nn.utils.rnn.pad_sequence(labels, batch_first=True), valid


class AssignResult(NamedTuple):
    """Assignment of N boxes to G ground-truth boxes, for one image or a batch (leading dims ...).

    num_gts: G (for a batch: the padded G).
    gt_inds: (..., N) int64: -1 ignored, 0 negative, k + 1 positive for ground truth k.
    max_overlaps: (..., N) float: each box's largest IoU with any ground truth (0 when the image
        has none; -1 for boxes ignored through ``gt_boxes_ignore`` or ``valid``).
    labels: (..., N) int64: the matched ground truth's label for positives, -1 otherwise.
    """

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    def with_gts_prepended(self, gt_labels: Tensor, gt_valid: Optional[Tensor] = None) -> "AssignResult":
        """The assignment of ``cat([gt_boxes, boxes])`` along the box dim: ground truth k is
        positive for itself with overlap 1 (mmdet's ``AssignResult.add_gt_``, as a new value).
        gt_labels: (..., G); gt_valid: (..., G) bool, padding rows (False) are ignored (-1)."""
        n = gt_labels.shape[-1]
        own = torch.arange(1, n + 1, dtype=torch.long, device=self.gt_inds.device).expand(gt_labels.shape)
        if gt_valid is not None:
            own = own.masked_fill(~gt_valid, -1)
        return AssignResult(self.num_gts, torch.cat([own, self.gt_inds], dim=-1),
                            torch.cat([self.max_overlaps.new_ones(gt_labels.shape), self.max_overlaps], dim=-1),
                            torch.cat([gt_labels.to(self.labels), self.labels], dim=-1))


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
    cascade stages (0.5, 0.5, 0.5), (0.6, ...), (0.7, ...); all with ``match_low_quality`` left at
    its default, True (HTC's config, unlike Cascade R-CNN's, does not turn it off for the stages).

    One image or a batch: every argument may carry the same leading batch dims (ground truth
    padded by ``pad_ground_truth``, its ``gt_valid`` marking the real rows), and each image is
    assigned as if alone, in one pass over the batch.
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
               gt_boxes_ignore: Optional[Tensor] = None, valid: Optional[Tensor] = None,
               gt_valid: Optional[Tensor] = None, overlaps: Optional[Tensor] = None) -> AssignResult:
        """Assign (..., N, 4) xyxy ``boxes`` to (..., G, 4) ``gt_boxes`` with (..., G) int64
        ``gt_labels`` (None: all 0, as for the RPN); optional (..., I, 4) ``gt_boxes_ignore``
        (zero rows as padding); optional (..., N) bool ``valid``: boxes that are not candidates
        (padding, anchors outside the image) are ignored (-1) and take no part in the
        low-quality matching; optional (..., G) bool ``gt_valid``: the real ground-truth rows of a
        padded batch. ``boxes`` may lack the batch dims (shared anchors). ``overlaps``: the
        (..., G, N) ``bbox_overlaps(gt_boxes, boxes)`` when the caller has it already (two
        assigners with other thresholds on the same boxes compute it once)."""
        if gt_labels is None:
            gt_labels = torch.zeros(gt_boxes.shape[:-1], dtype=torch.long, device=gt_boxes.device)
        if gt_labels.shape != gt_boxes.shape[:-1]:
            raise ValueError(f"MaxIoUAssigner.assign: gt_labels must be {tuple(gt_boxes.shape[:-1])}, got "
                             f"{tuple(gt_labels.shape)}")
        if gt_valid is not None and gt_valid.shape != gt_boxes.shape[:-1]:
            raise ValueError(f"MaxIoUAssigner.assign: gt_valid must be {tuple(gt_boxes.shape[:-1])}, got "
                             f"{tuple(gt_valid.shape)}")
        num_boxes = boxes.shape[-2]
        if valid is not None and valid.shape[-1] != num_boxes:
            raise ValueError(f"MaxIoUAssigner.assign: valid must be (..., {num_boxes}), got {tuple(valid.shape)}")
        if overlaps is None:
            overlaps = bbox_overlaps(gt_boxes, boxes)  # (..., G, N)
        elif overlaps.shape[-2:] != (gt_boxes.shape[-2], num_boxes):
            raise ValueError(f"MaxIoUAssigner.assign: overlaps must be (..., {gt_boxes.shape[-2]}, {num_boxes}), "
                             f"got {tuple(overlaps.shape)}")
        if (self.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.numel() > 0
                and boxes.numel() > 0):
            iof = bbox_overlaps(boxes, gt_boxes_ignore, mode="iof").max(dim=-1).values
            overlaps = overlaps.masked_fill((iof > self.ignore_iof_thr)[..., None, :], -1)
        invalid = None if valid is None else ~valid
        if invalid is not None:
            overlaps = overlaps.masked_fill(invalid[..., None, :], -1)
        result = self.assign_wrt_overlaps(overlaps, gt_labels, gt_valid)
        if invalid is not None and (gt_boxes.shape[-2] == 0 or gt_valid is not None):
            # An image without ground truth makes every box negative; the non-candidates are
            # ignored all the same (images with ground truth already ignore them).
            result = result._replace(gt_inds=result.gt_inds.masked_fill(invalid, -1))
        return result

    def assign_wrt_overlaps(self, overlaps: Tensor, gt_labels: Tensor,
                            gt_valid: Optional[Tensor] = None) -> AssignResult:
        """Assign from a (..., G, N) overlap matrix (ground truth by box). Columns of -1 are
        ignored; (..., G) ``gt_valid`` marks the real rows of padded ground truth (padding rows
        must hold overlaps <= 0, as zero boxes give)."""
        num_gts, num_boxes = overlaps.shape[-2:]
        batch = overlaps.shape[:-2]
        device = overlaps.device
        gt_inds = torch.full((*batch, num_boxes), -1, dtype=torch.long, device=device)
        if num_gts == 0 or num_boxes == 0:
            if num_gts == 0:
                gt_inds.zero_()
            return AssignResult(num_gts, gt_inds, overlaps.new_zeros((*batch, num_boxes)),
                                torch.full_like(gt_inds, -1))

        max_overlaps, argmax = overlaps.max(dim=-2)
        lo, hi = self.neg_iou_thr if isinstance(self.neg_iou_thr, tuple) else (0.0, self.neg_iou_thr)
        negative = (max_overlaps >= lo) & (max_overlaps < hi)
        if gt_valid is not None:
            # An image whose rows are all padding has no ground truth: every box is negative
            # (mmdet's rule, whatever the thresholds) with overlap 0.
            no_gt = ~gt_valid.any(dim=-1)[..., None]
            negative = negative | no_gt
            max_overlaps = max_overlaps.masked_fill(no_gt, 0)
        gt_inds = gt_inds.masked_fill(negative, 0)
        gt_inds = torch.where(max_overlaps >= self.pos_iou_thr, argmax + 1, gt_inds)

        if self.match_low_quality:
            gt_max = overlaps.max(dim=-1).values  # (..., G)
            eligible = gt_max >= self.min_pos_iou
            if gt_valid is not None:
                eligible = eligible & gt_valid
            if self.gt_max_assign_all:
                # An ineligible ground truth's target value is 2, which no IoU equals.
                hit = overlaps == torch.where(eligible, gt_max, 2.0)[..., None]  # (..., G, N)
            else:
                first = overlaps.argmax(dim=-1).masked_fill(~eligible, -1)  # -1: no box
                hit = _arange(num_boxes, device, 0, 1) == first[..., None]
            # mmdet loops k = 0..G-1 and overwrites, so the LAST matching ground truth wins.
            winner = (hit * _arange(num_gts, device, 1, 2)).max(dim=-2).values  # (..., N) 0 = none
            gt_inds = torch.where(winner > 0, winner, gt_inds)

        matched = gt_labels.to(torch.long).gather(-1, (gt_inds - 1).clamp(min=0))
        return AssignResult(num_gts, gt_inds, max_overlaps, matched.masked_fill(gt_inds <= 0, -1))


def stack_assigners(assigners: Sequence[MaxIoUAssigner], like: Tensor) -> MaxIoUAssigner:
    """One assigner that applies ``assigners[a]`` along a new leading dim: its ``assign`` takes
    (A, B, ...) ground truth (and overlaps), expanded views are enough, and shared (B, N, 4)
    boxes. The assigners must follow the same rules and differ only in their thresholds, which
    become (A, 1, 1) tensors in ``like``'s dtype and device (made once): a comparison with them
    rounds as the comparison with the float did. For cascade stages that sample the same boxes."""
    first = assigners[0]

    def rules(a):
        return a.gt_max_assign_all, a.ignore_iof_thr, a.match_low_quality, isinstance(a.neg_iou_thr, tuple)

    if any(rules(a) != rules(first) for a in assigners):
        raise ValueError("stack_assigners: the assigners must differ in their thresholds only")

    def column(values) -> Tensor:
        values = tuple(float(v) for v in values)
        return host_constant(("thresholds", values, like.dtype, str(like.device)), lambda: torch.tensor(
            values, dtype=like.dtype, device=like.device).view(-1, 1, 1))

    out = copy.copy(first)
    out.pos_iou_thr = column(a.pos_iou_thr for a in assigners)
    out.min_pos_iou = column(a.min_pos_iou for a in assigners)
    if isinstance(first.neg_iou_thr, tuple):
        out.neg_iou_thr = tuple(column(a.neg_iou_thr[k] for a in assigners) for k in (0, 1))
    else:
        out.neg_iou_thr = column(a.neg_iou_thr for a in assigners)
    return out


def _arange(n: int, device, start: int, dims: int) -> Tensor:
    """arange(start, start + n) as a (n,) (dims 1) or (n, 1) (dims 2) int64 tensor, made once."""
    return host_constant(("arange", n, str(device), start, dims), lambda: torch.arange(
        start, start + n, device=device).reshape((n,) + (1,) * (dims - 1)))
