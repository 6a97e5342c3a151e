"""Max-IoU assignment in plain PyTorch: the specification of ``max_iou_assign`` and its fallback.

Semantics: mmdetection's ``bbox_overlaps`` (xyxy, no +1) and ``MaxIoUAssigner``, for B images and
A threshold sets at once (cascade stages assigning the same boxes). For image b, with
``has_gt = any(gt_valid[b])`` (False when G = 0) and the (G, N) overlaps of every ground-truth row
(padding rows included, as stored) with every box, computed in the boxes' dtype T as
``(area_gt + area_box - inter)`` floored at ``eps = 1e-6``, then ``inter / that``:

* a box with ``valid`` False is ignored (-1) with max overlap -1 (0 when the image has no ground
  truth), and takes no part in the low-quality matching;
* in an image without ground truth every valid box is negative (0) with max overlap 0;
* otherwise, for threshold set a: ``max_overlap, argmax`` = the box's largest overlap over the
  ground-truth rows and its first row (NaN counts as the largest, as in ``torch.max``); the box
  starts ignored, is negative when ``neg_lo <= max_overlap < neg_hi``, positive for ``argmax``
  when ``max_overlap >= pos``; then, with ``match_low_quality``, for every real ground truth k in
  index order whose best overlap over the valid boxes is ``>= min_pos``, the valid boxes with
  exactly that overlap (``gt_max_assign_all``; else only the first such box) become positive for
  k, a later k overriding an earlier one.

Thresholds are compared in T (a float32 overlap against ``float32(0.7)``, as a comparison of a
float32 tensor with a Python float does). Labels: the matched ground truth's label for positives,
-1 otherwise.
"""
import torch
from torch import Tensor

__all__ = ["bbox_overlaps", "max_iou_assign", "EPS"]

EPS = 1e-6  # mmdet's floor on the union (and IoF denominator): degenerate pairs give 0, not NaN


def bbox_overlaps(boxes1: Tensor, boxes2: Tensor, mode: str = "iou", eps: float = EPS) -> Tensor:
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


def max_iou_assign(boxes: Tensor, gt_boxes: Tensor, gt_labels, valid, gt_valid, thresholds,
                   match_low_quality: bool, gt_max_assign_all: bool) -> tuple[Tensor, Tensor, Tensor]:
    """boxes (B or 1, N, 4), gt_boxes (B, G, 4) float32/float64; gt_labels (B, G) int64 or None;
    valid (B, N) / gt_valid (B, G) bool or None; thresholds: 4 A floats (pos, neg_lo, neg_hi,
    min_pos per set). Returns gt_inds (A, B, N) int64, max_overlaps (B, N), labels (A, B, N)."""
    batch, num_gts, _ = gt_boxes.shape
    num_boxes = boxes.shape[1]
    device, dtype = gt_boxes.device, gt_boxes.dtype
    th = torch.tensor(list(thresholds), dtype=dtype, device=device).view(-1, 4, 1, 1)
    pos, neg_lo, neg_hi, min_pos = th.unbind(1)  # each (A, 1, 1)
    sets = th.shape[0]
    valid = torch.ones((batch, num_boxes), dtype=torch.bool, device=device) if valid is None else valid
    gt_valid = torch.ones((batch, num_gts), dtype=torch.bool, device=device) if gt_valid is None else gt_valid
    has_gt = gt_valid.any(dim=-1)[:, None]  # (B, 1); False when G = 0
    if num_gts == 0 or num_boxes == 0:
        gt_inds = torch.zeros((sets, batch, num_boxes), dtype=torch.long, device=device).masked_fill(~valid, -1)
        max_overlaps = torch.zeros((batch, num_boxes), dtype=dtype, device=device)
        return gt_inds, max_overlaps, torch.full_like(gt_inds, -1)

    overlaps = bbox_overlaps(gt_boxes, boxes.expand(batch, num_boxes, 4))  # (B, G, N)
    overlaps = overlaps.masked_fill(~valid[:, None, :], -1)
    max_overlaps, argmax = overlaps.max(dim=1)  # (B, N): first row on ties
    max_overlaps = max_overlaps.masked_fill(~has_gt, 0)
    gt_inds = torch.full((sets, batch, num_boxes), -1, dtype=torch.long, device=device)
    gt_inds = gt_inds.masked_fill((max_overlaps >= neg_lo) & (max_overlaps < neg_hi), 0)
    gt_inds = torch.where(max_overlaps >= pos, argmax + 1, gt_inds)
    if match_low_quality:
        gt_max, first = overlaps.max(dim=2)  # (B, G): over the valid boxes (the others are -1)
        eligible = gt_valid & (gt_max >= min_pos)  # (A, B, G)
        if gt_max_assign_all:
            hit = overlaps == gt_max[..., None]
        else:
            hit = torch.arange(num_boxes, device=device) == first[..., None]
        hit = hit & valid[:, None, :] & eligible[..., None]  # (A, B, G, N)
        rows = torch.arange(1, num_gts + 1, device=device)[:, None]
        winner = (hit * rows).amax(dim=2)  # (A, B, N): the last matching ground truth, 0 = none
        gt_inds = torch.where(winner > 0, winner, gt_inds)
    gt_inds = gt_inds.masked_fill(~has_gt, 0).masked_fill(~valid, -1)
    if gt_labels is None:
        gt_labels = torch.zeros((batch, num_gts), dtype=torch.long, device=device)
    labels = gt_labels.expand(sets, batch, num_gts).gather(-1, (gt_inds - 1).clamp(min=0))
    return gt_inds, max_overlaps, labels.masked_fill(gt_inds <= 0, -1)
