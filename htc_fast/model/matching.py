"""Matching boxes to ground truth: IoU, the max-IoU assigner and the positive/negative samplers.

Used by the RPN (anchors) and by each cascade stage (proposals, with the ground truth added as
proposals). Semantics are mmdetection's ``bbox_overlaps`` and ``MaxIoUAssigner``; the assignment
itself is one fused op (``htc_fast.ops.max_iou_assign``: no host synchronisation, one dispatched op
for a batch of images and several threshold sets). The samplers are in ``sampling.py``. Does not
own box encoding or losses.

Convention of ``AssignResult.gt_inds`` (mmdet's, kept so recorded assignments compare directly):
``-1`` ignored (neither positive nor negative), ``0`` negative, ``k + 1`` positive matched to
ground truth ``k``. ``SamplingResult.pos_assigned_gt_inds`` is 0-based.
"""
import copy
import math
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

# The samplers live in sampling.py, the IoU in the assignment op's reference; re-exported here,
# where callers have always found them.
from htc_fast.model.sampling import FirstKSampler, RandomSampler, SamplingResult
from htc_fast.ops import max_iou_assign
from htc_fast.ops.reference.assign import bbox_overlaps

__all__ = ["bbox_overlaps", "pad_boxes", "pad_ground_truth", "AssignResult", "MaxIoUAssigner", "stack_assigners",
           "SamplingResult", "RandomSampler", "FirstKSampler"]


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
        has none; -1 for boxes ignored through ``gt_boxes_ignore`` or ``valid``); the same for
        every threshold set, so a stacked assigner's result has no leading set dim here.
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
                            torch.cat([self.max_overlaps.new_ones((*self.max_overlaps.shape[:-1], n)),
                                       self.max_overlaps], dim=-1),
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
    than that IoF (of the box) are ignored in images with ground truth (mmdet gives them overlap
    -1 with every ground truth) and negative in images without. No ground truth: every box is
    negative. HTC: RPN (0.7, 0.3, 0.3), cascade stages (0.5, 0.5, 0.5), (0.6, ...), (0.7, ...);
    all with ``match_low_quality`` left at its default, True (HTC's config, unlike Cascade
    R-CNN's, does not turn it off for the stages).

    One image or a batch: the ground truth may carry leading batch dims (padded by
    ``pad_ground_truth``, its ``gt_valid`` marking the real rows), and each image is assigned as
    if alone, in one op over the batch (``htc_fast.ops.max_iou_assign``). ``stack_assigners``
    makes one assigner of several threshold sets: its results get a leading dim, one per set.
    """

    def __init__(self, pos_iou_thr: float, neg_iou_thr: Union[float, tuple[float, float]],
                 min_pos_iou: float = 0.0, gt_max_assign_all: bool = True,
                 ignore_iof_thr: float = -1.0, match_low_quality: bool = True):
        if isinstance(neg_iou_thr, (tuple, list)):
            if len(neg_iou_thr) != 2:
                raise ValueError(f"MaxIoUAssigner: neg_iou_thr must be a float or a (lo, hi) pair, "
                                 f"got {neg_iou_thr}")
            neg_lo, neg_hi = float(neg_iou_thr[0]), float(neg_iou_thr[1])
        else:
            neg_lo, neg_hi = 0.0, float(neg_iou_thr)
        # (pos, neg_lo, neg_hi, min_pos) per threshold set: one set, or several (stack_assigners).
        self.thresholds = [(float(pos_iou_thr), neg_lo, neg_hi, float(min_pos_iou))]
        self.stacked = False
        self.gt_max_assign_all = bool(gt_max_assign_all)
        self.ignore_iof_thr = float(ignore_iof_thr)
        self.match_low_quality = bool(match_low_quality)

    def assign(self, boxes: Tensor, gt_boxes: Tensor, gt_labels: Optional[Tensor] = None,
               gt_boxes_ignore: Optional[Tensor] = None, valid: Optional[Tensor] = None,
               gt_valid: Optional[Tensor] = None) -> AssignResult:
        """Assign (..., N, 4) xyxy ``boxes`` to (..., G, 4) ``gt_boxes`` with (..., G) int64
        ``gt_labels`` (None: all 0, as for the RPN); optional (..., I, 4) ``gt_boxes_ignore``
        (zero rows as padding); optional (..., N) bool ``valid``: boxes that are not candidates
        (padding, anchors outside the image) are ignored (-1) and take no part in the
        low-quality matching; optional (..., G) bool ``gt_valid``: the real ground-truth rows of a
        padded batch. ``boxes`` may lack the batch dims (shared anchors). A stacked assigner's
        result has a leading (A,) dim, one per threshold set."""
        batch = gt_boxes.shape[:-2]
        num_gts, num_boxes = gt_boxes.shape[-2], boxes.shape[-2]
        for name, t, want in (("gt_labels", gt_labels, (*batch, num_gts)), ("gt_valid", gt_valid, (*batch, num_gts)),
                              ("valid", valid, (*batch, num_boxes))):
            if t is not None and tuple(t.shape) != want and not (name == "valid" and tuple(t.shape) == (num_boxes,)):
                raise ValueError(f"MaxIoUAssigner.assign: {name} must be {want}, got {tuple(t.shape)}")
        if boxes.shape[:-2] not in ((), batch):
            raise ValueError(f"MaxIoUAssigner.assign: boxes must be (N, 4) or {(*batch, num_boxes, 4)}, got "
                             f"{tuple(boxes.shape)}")
        images = math.prod(batch)
        candidates = valid
        ignored = None
        if (self.ignore_iof_thr > 0 and gt_boxes_ignore is not None and gt_boxes_ignore.numel() > 0
                and boxes.numel() > 0):
            ignored = bbox_overlaps(boxes, gt_boxes_ignore, mode="iof").max(dim=-1).values > self.ignore_iof_thr
            ignored = ignored.expand(*batch, num_boxes)
            candidates = ~ignored if valid is None else valid & ~ignored
        shared = boxes.dim() == 2  # one set of boxes (anchors) for every image
        result = max_iou_assign(_flat(boxes, (1 if shared else images, num_boxes, 4)),
                                _flat(gt_boxes, (images, num_gts, 4)), self.thresholds,
                                gt_labels=_flat(gt_labels, (images, num_gts)),
                                valid=_flat(candidates, (images, num_boxes), expand=True),
                                gt_valid=_flat(gt_valid, (images, num_gts)), match_low_quality=self.match_low_quality,
                                gt_max_assign_all=self.gt_max_assign_all)
        gt_inds, max_overlaps, labels = result
        if ignored is not None:
            # mmdet's ignored boxes are negative in an image without ground truth (its early exit).
            no_gt = ~gt_valid.any(dim=-1) if gt_valid is not None else \
                gt_boxes.new_full(batch, num_gts == 0, dtype=torch.bool)
            no_gt = no_gt[..., None]
            negative = ignored & no_gt if valid is None else ignored & no_gt & valid
            negative = _flat(negative, (images, num_boxes))
            gt_inds = gt_inds.masked_fill(negative, 0)
        sets = (len(self.thresholds),) if self.stacked else ()
        if not self.stacked:
            gt_inds, labels = gt_inds[0], labels[0]
        if gt_inds.shape[-2:-1] != batch:  # unbatched or several leading dims: the caller's shape back
            gt_inds, labels = gt_inds.reshape(*sets, *batch, num_boxes), labels.reshape(*sets, *batch, num_boxes)
            max_overlaps = max_overlaps.reshape(*batch, num_boxes)
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)


def _flat(t: Optional[Tensor], shape: tuple[int, ...], expand: bool = False) -> Optional[Tensor]:
    """``t`` as the op's (B, ...) layout (a view; no op when already so); ``expand``: a shared
    (N,) mask is expanded to every image first."""
    if t is None:
        return None
    if expand and t.dim() == 1:
        t = t.expand(shape)
    return t if t.dim() == len(shape) else t.reshape(shape)


def stack_assigners(assigners: Sequence[MaxIoUAssigner]) -> MaxIoUAssigner:
    """One assigner that applies each of ``assigners`` along a new leading dim of its results:
    one op, the IoU computed once, for cascade stages that sample the same boxes. The assigners
    must follow the same rules and differ only in their thresholds."""
    first = assigners[0]

    def rules(a):
        return a.gt_max_assign_all, a.ignore_iof_thr, a.match_low_quality

    if any(rules(a) != rules(first) for a in assigners):
        raise ValueError("stack_assigners: the assigners must differ in their thresholds only")
    out = copy.copy(first)
    out.thresholds = [t for a in assigners for t in a.thresholds]
    out.stacked = True
    return out
