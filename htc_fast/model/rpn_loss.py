"""RPN training: anchor targets (assign + sample) and the objectness / box losses.

mmdetection's ``AnchorHead.get_targets`` / ``loss_by_feat`` for the RPN of HTC:
- anchors are candidates when valid for the padded image (``valid_flags``) and inside the
  resized image with ``allowed_border`` (HTC: 0; a negative value keeps all valid anchors);
- ``MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, match_low_quality=True)`` against the image's
  ground truth (all of one class), then ``RandomSampler(256, 0.5, add_gt_as_proposals=False)``;
- targets: objectness 1 for sampled positives, 0 for sampled negatives (weight 1 each, 0 for
  every other anchor); deltas ``encode(anchor, gt)`` with weight 1 on sampled positives;
- losses per level: sigmoid BCE and smooth L1 (beta 1/9), each summed over the batch's anchors
  of that level and divided by ``avg_factor`` = sum over images of max(P, 1) + max(Q, 1); the
  total is the sum over levels (mmdet logs the per-level lists ``loss_rpn_cls/bbox``).
An image without ground truth gets only sampled negatives: a classification loss and a zero box loss.
"""
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from htc_fast.model.anchors import AnchorGenerator, in_anchor_order
from htc_fast.model.box_coder import DeltaXYWHBoxCoder
from htc_fast.model.constants import host_constant
from htc_fast.model.losses import EPS as _EPS
from htc_fast.model.losses import smooth_l1
from htc_fast.model.matching import MaxIoUAssigner, RandomSampler, SamplingResult, pad_ground_truth
from htc_fast.ops import _debug

__all__ = ["RPNTargets", "RPNLoss", "rpn_targets", "rpn_loss"]


class RPNTargets(NamedTuple):
    """Targets of a batch of N images over all A_total anchors (levels concatenated).

    objectness: (N, A_total) float 1 positive, 0 otherwise.
    objectness_weights: (N, A_total) float 1 on sampled anchors, 0 elsewhere.
    deltas: (N, A_total, 4) float encoded targets (0 where not positive).
    delta_weights: (N, A_total, 4) float 1 on sampled positives.
    avg_factor: 0-dim tensor, the losses' normaliser (on the device: no sync).
    sampling: the batch's ``SamplingResult`` ((N, S) fields; ``sampling[i]`` is image i's); its
        indices are anchor indices (all levels concatenated; only anchors inside the image are
        ever sampled).
    inside: (N, A_total) bool, the candidate anchors of each image.
    """

    objectness: Tensor
    objectness_weights: Tensor
    deltas: Tensor
    delta_weights: Tensor
    avg_factor: Tensor
    sampling: SamplingResult
    inside: Tensor


class RPNLoss(NamedTuple):
    """Per-level RPN losses, already weighted: (L,) tensors, level 0 = stride 4."""

    cls_levels: Tensor
    bbox_levels: Tensor

    @property
    def cls(self) -> tuple[Tensor, ...]:
        """The classification loss of each level (0-dim tensors)."""
        return tuple(self.cls_levels.unbind())

    @property
    def bbox(self) -> tuple[Tensor, ...]:
        """The box loss of each level (0-dim tensors)."""
        return tuple(self.bbox_levels.unbind())

    def total(self) -> Tensor:
        """Sum of every level's classification and box loss."""
        return self.cls_levels.sum() + self.bbox_levels.sum()


def rpn_targets(anchor_generator: AnchorGenerator, featmap_sizes: Sequence[tuple[int, int]],
                gt_boxes: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                pad_shapes: Sequence[tuple[int, int]], coder: DeltaXYWHBoxCoder,
                assigner: MaxIoUAssigner, sampler: RandomSampler, allowed_border: float = 0,
                gt_boxes_ignore: Optional[Sequence[Optional[Tensor]]] = None,
                generator: Optional[torch.Generator] = None, device=None) -> RPNTargets:
    """Assign and sample the anchors of every image at once, without host synchronisation.

    Args:
        anchor_generator: the RPN's anchors; featmap_sizes: (H_l, W_l) per level.
        gt_boxes: per image (G_i, 4) xyxy float, network-input pixels (G_i may be 0).
        image_sizes: per image (h, w) after resizing; pad_shapes: (h, w) after padding to the
            size divisor (for valid flags; the batch tensor may be larger still).
        coder, assigner, sampler: HTC's RPN ones (see the module docstring).
        allowed_border: see ``anchor_inside_flags``.
        gt_boxes_ignore: per image (I_i, 4) or None (used when the assigner's ignore_iof_thr > 0).
        generator: for the sampler's random keys (None: the global one).
        device: of the anchors (default: the first gt tensor's).

    Returns:
        RPNTargets.
    """
    n = len(gt_boxes)
    if not (len(image_sizes) == len(pad_shapes) == n):
        raise ValueError(f"rpn_targets: gt_boxes, image_sizes and pad_shapes must have one entry per "
                         f"image, got {n}, {len(image_sizes)}, {len(pad_shapes)}")
    if gt_boxes_ignore is not None and len(gt_boxes_ignore) != n:
        raise ValueError(f"rpn_targets: gt_boxes_ignore has {len(gt_boxes_ignore)} entries for {n} images")
    device = device if device is not None else (gt_boxes[0].device if n else None)
    anchors = anchor_generator.all_anchors(featmap_sizes, device=device)
    flags = [anchor_generator.inside_flags(featmap_sizes, pad_shapes[i], image_sizes[i], allowed_border, device=device)
             for i in range(n)]
    if _debug.enabled():
        for i, inside in enumerate(flags):
            if not bool(inside.any()):
                raise ValueError(f"rpn_targets: image {i} of size {tuple(image_sizes[i])} has no anchor inside "
                                 f"it with allowed_border={allowed_border}; use a negative allowed_border")
    inside = torch.stack(flags)  # (N, A_total)
    # All images at once: ground truth padded to the batch's largest count; every anchor is a
    # candidate and those outside an image are ignored by the assigner, so nothing is compacted
    # (no boolean-mask indexing) and slot indices are anchor indices.
    gt, _, gt_valid = pad_ground_truth(gt_boxes, dtype=anchors.dtype, device=anchors.device)
    ignore = None
    if gt_boxes_ignore is not None and any(g is not None and len(g) for g in gt_boxes_ignore):
        ignore = pad_ground_truth([g if g is not None else anchors.new_zeros(0, 4) for g in gt_boxes_ignore],
                                  dtype=anchors.dtype, device=anchors.device)[0]
    assign = assigner.assign(anchors, gt, gt_boxes_ignore=ignore, valid=inside, gt_valid=gt_valid)
    result = sampler.sample(assign, anchors, gt, generator=generator, gt_valid=gt_valid)
    # Slot indices are distinct per image (top-k), and an unused slot's anchor is not sampled:
    # scattering each slot's (possibly zero) target to its anchor is exact.
    pos = result.is_pos.to(anchors.dtype)  # (N, S)
    gt_for = torch.where(result.is_pos[..., None], result.gt_boxes, result.boxes)
    encoded = coder.encode(result.boxes.reshape(-1, 4), gt_for.reshape(-1, 4)).view(gt_for.shape) * pos[..., None]
    rows = result.inds[..., None].expand(encoded.shape)
    zeros = anchors.new_zeros((n, anchors.shape[0]))
    objectness = zeros.scatter(1, result.inds, pos)
    objectness_weights = zeros.scatter(1, result.inds, result.valid.to(anchors.dtype))
    deltas = zeros[..., None].expand(-1, -1, 4).scatter(1, rows, encoded)
    delta_weights = zeros[..., None].expand(-1, -1, 4).scatter(1, rows, pos[..., None].expand(encoded.shape))
    return RPNTargets(objectness, objectness_weights, deltas, delta_weights, result.avg_factor.sum(), result, inside)


def rpn_loss(cls_logits: Sequence[Tensor], bbox_deltas: Sequence[Tensor], targets: RPNTargets,
             smooth_l1_beta: float = 1.0 / 9.0, cls_weight: float = 1.0,
             bbox_weight: float = 1.0) -> RPNLoss:
    """Per-level losses of the RPN outputs against ``targets``.

    Args:
        cls_logits: per level (N, A, H_l, W_l); bbox_deltas: per level (N, 4A, H_l, W_l).
        targets: from ``rpn_targets`` for the same feature-map sizes.
        smooth_l1_beta, cls_weight, bbox_weight: HTC 1/9, 1, 1.

    Returns:
        RPNLoss with one classification and one box loss per level.
    """
    if len(cls_logits) != len(bbox_deltas):
        raise ValueError(f"rpn_loss: {len(cls_logits)} cls levels but {len(bbox_deltas)} bbox levels")
    n = targets.objectness.shape[0]
    counts = [c.shape[1] * c.shape[2] * c.shape[3] for c in cls_logits]
    if sum(counts) != targets.objectness.shape[1] or any(c.shape[0] != n for c in cls_logits):
        raise ValueError(f"rpn_loss: the outputs hold {sum(counts)} anchors per image for a batch of "
                         f"{cls_logits[0].shape[0]}, the targets {targets.objectness.shape[1]} for {n}")
    # Every level at once: (N, A, H, W) -> (N, H, W, A) -> (N, H*W*A) per level (the anchors'
    # (y, x, anchor) order), levels concatenated as the targets are; one element-wise loss over
    # all anchors, then each level's sum. Losses in float32 whatever the head's precision.
    pred_cls = torch.cat([in_anchor_order(c) for c in cls_logits], dim=1).float()
    pred_deltas = torch.cat([in_anchor_order(d, 4) for d in bbox_deltas], dim=1).float()
    cls = F.binary_cross_entropy_with_logits(pred_cls, targets.objectness, reduction="none") \
        * targets.objectness_weights
    box = smooth_l1(pred_deltas, targets.deltas, smooth_l1_beta) * targets.delta_weights
    norm = targets.avg_factor + _EPS
    losses_cls = _level_sums(cls, counts) / norm
    losses_bbox = _level_sums(box, counts) / norm
    return RPNLoss(losses_cls if cls_weight == 1 else cls_weight * losses_cls,
                   losses_bbox if bbox_weight == 1 else bbox_weight * losses_bbox)


def _level_sums(loss: Tensor, counts: Sequence[int]) -> Tensor:
    """(L,) sums of (N, A_total, ...) element-wise losses over each level's anchors (contiguous
    ranges of A_total): a segmented sum, deterministic on every device (no atomics), one op
    forward and one backward whatever the number of levels."""
    per_anchor = loss.sum(dim=0) if loss.dim() == 2 else loss.sum(dim=(0, 2))
    lengths = host_constant(("level lengths", tuple(counts), str(loss.device)),
                            lambda: torch.tensor(counts, device=loss.device))
    # unsafe: skip the op's own check of the lengths, two reads of device values (host syncs on
    # a GPU); these lengths are the feature maps' sizes, valid by construction.
    return torch.segment_reduce(per_anchor, "sum", lengths=lengths, unsafe=True)
