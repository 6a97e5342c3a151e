"""RPN post-processing: from objectness logits and deltas to proposals, per image.

mmdetection's ``RPNHead._predict_by_feat_single`` + ``_bbox_post_process`` (docs/model.md,
test-time data flow, step 4). Per level, the ``nms_pre`` highest sigmoid scores (all when the
level has no more); decode them against their anchors, clip to the image; concatenate the
levels; drop boxes with width or height ``<= min_bbox_size``; NMS per level (the level is the
group) at ``iou_threshold``; keep the ``max_per_img`` best. HTC test: 1000 / 1000, train: 2000 /
2000, IoU 0.7, min size 0.

Proposals carry no gradient (mmdet detaches the RPN outputs before post-processing).
Does not own the network (``rpn_head.py``) or the training targets (``rpn_loss.py``).
"""
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from htc_fast.model.anchors import in_anchor_order
from htc_fast.model.box_coder import DeltaXYWHBoxCoder
from htc_fast.model.constants import host_constant, row_layout
from htc_fast.ops import batched_nms

__all__ = ["Proposals", "rpn_proposals"]


class Proposals(NamedTuple):
    """The proposals of one image, sorted by descending score (K <= max_per_img).

    boxes: (K, 4) float32 xyxy in network-input pixels, clipped to the image.
    scores: (K,) float32 sigmoid objectness.
    levels: (K,) int64 FPN level (0 = stride 4) each proposal came from.
    valid: None when compact; with ``padded=True`` K is fixed (max_per_img) and valid is (K,) bool,
        True for the first ``num`` rows (the proposals), False for padding (boxes and scores 0,
        levels -1).
    """

    boxes: Tensor
    scores: Tensor
    levels: Tensor
    valid: Optional[Tensor] = None


def _check(cls_logits, bbox_deltas, anchors, image_sizes):
    if not (len(cls_logits) == len(bbox_deltas) == len(anchors)) or len(cls_logits) == 0:
        raise ValueError(f"rpn_proposals: cls_logits, bbox_deltas and anchors must have one entry per "
                         f"level, got {len(cls_logits)}, {len(bbox_deltas)}, {len(anchors)}")
    n = cls_logits[0].shape[0]
    if len(image_sizes) != n:
        raise ValueError(f"rpn_proposals: image_sizes has {len(image_sizes)} entries for a batch of {n}")
    for level, (c, d, a) in enumerate(zip(cls_logits, bbox_deltas, anchors)):
        if c.dim() != 4 or d.dim() != 4 or c.shape[0] != n or d.shape[0] != n:
            raise ValueError(f"rpn_proposals: level {level}: cls_logits must be (N, A, H, W) and "
                             f"bbox_deltas (N, 4A, H, W), got {tuple(c.shape)} and {tuple(d.shape)}")
        if d.shape[1] != 4 * c.shape[1] or d.shape[2:] != c.shape[2:]:
            raise ValueError(f"rpn_proposals: level {level}: bbox_deltas {tuple(d.shape)} does not match "
                             f"cls_logits {tuple(c.shape)}")
        if a.shape != (c.shape[1] * c.shape[2] * c.shape[3], 4):
            raise ValueError(f"rpn_proposals: level {level}: anchors must be "
                             f"({c.shape[1] * c.shape[2] * c.shape[3]}, 4), got {tuple(a.shape)}")


@torch.no_grad()
def rpn_proposals(cls_logits: Sequence[Tensor], bbox_deltas: Sequence[Tensor], anchors: Sequence[Tensor],
                  image_sizes: Sequence[tuple[int, int]], coder: DeltaXYWHBoxCoder, nms_pre: int,
                  max_per_img: int, iou_threshold: float = 0.7, min_bbox_size: float = 0.0,
                  nms_backend: Optional[str] = None, padded: bool = False) -> list[Proposals]:
    """Proposals for each image of a batch.

    Args:
        cls_logits: per level (N, A, H_l, W_l) objectness logits (one sigmoid logit per anchor).
        bbox_deltas: per level (N, 4A, H_l, W_l) deltas, channel ``4a + c`` for anchor a.
        anchors: per level (H_l * W_l * A, 4), ``AnchorGenerator.grid_anchors`` order.
        image_sizes: (h, w) of each image after resizing, before padding (boxes are clipped to it).
        coder: the RPN's box coder.
        nms_pre: per-level candidates kept before NMS; <= 0 keeps all.
        max_per_img: proposals kept after NMS; <= 0 keeps all.
        iou_threshold: per-level NMS IoU threshold.
        min_bbox_size: boxes need width > this and height > this (mmdet: a value < 0 disables).
        nms_backend: ``backend=`` of ``htc_fast.ops.batched_nms``.
        padded: fixed-capacity proposals (see ``Proposals.valid``) without host synchronisation:
            too-small boxes enter the NMS with score -inf (they sort after every real candidate,
            so they suppress none) and the NMS has a fixed capacity.

    Returns:
        One ``Proposals`` per image.
    """
    _check(cls_logits, bbox_deltas, anchors, image_sizes)
    n = len(image_sizes)
    # All images at once up to the NMS: per level the nms_pre best anchors of each image.
    level_scores, level_deltas, level_anchors = [], [], []
    for logits, deltas, level_anchor in zip(cls_logits, bbox_deltas, anchors):
        # The (y, x, anchor) order of the anchors (in_anchor_order). Scores and geometry
        # in float32 even when the head ran in low precision (AMP).
        # The sigmoid runs image by image: on CPU a vectorised kernel and its scalar tail differ in
        # the last bit, so one pass over the batch would move the tail and change tie order.
        flat = in_anchor_order(logits).float()
        scores = torch.stack([row.sigmoid() for row in flat])  # each row is contiguous, as one image's
        d = in_anchor_order(deltas, 4).float()
        a = level_anchor.expand(n, -1, -1)
        if 0 < nms_pre < scores.shape[1]:
            # A stable sort: ties (saturated sigmoids are exactly 1.0) are broken by anchor
            # index, as mmdet's sort does on CPU and CUDA.
            scores, order = scores.sort(dim=1, descending=True, stable=True)
            scores, order = scores[:, :nms_pre], order[:, :nms_pre]
            d = d.gather(1, order[..., None].expand(-1, -1, 4))
            a = level_anchor[order]
        level_scores.append(scores)
        level_deltas.append(d)
        level_anchors.append(a)
    scores = torch.cat(level_scores, dim=1)
    sizes = tuple(s.shape[1] for s in level_scores)
    ids = host_constant(("rpn level ids", sizes, str(scores.device)), lambda: torch.cat(  # each candidate's level
        [torch.full((k,), level, dtype=torch.long) for level, k in enumerate(sizes)]).to(scores.device))
    total = scores.shape[1]
    bounds = row_layout(image_sizes, [total] * n, scores.device)[0]
    boxes = coder.decode(torch.cat(level_anchors, dim=1).reshape(-1, 4), torch.cat(level_deltas, dim=1).reshape(-1, 4),
                         max_shape=bounds).reshape(n, total, 4)
    if min_bbox_size >= 0:
        big = ((boxes[..., 2] - boxes[..., 0]) > min_bbox_size) & ((boxes[..., 3] - boxes[..., 1]) > min_bbox_size)
    else:
        big = torch.ones_like(scores, dtype=torch.bool)
    if padded:
        group = max(s.shape[1] for s in level_scores)
        return [_padded_nms(boxes[i], scores[i], ids, big[i], iou_threshold, max_per_img, group, nms_backend)
                for i in range(n)]
    results = []
    for i in range(n):
        keep = big[i]
        b, sc, lv = boxes[i][keep], scores[i][keep], ids[keep]
        if b.shape[0] > 0:
            kept = batched_nms(b, sc, lv, iou_threshold, backend=nms_backend)
            if max_per_img > 0:
                kept = kept[:max_per_img]
            b, sc, lv = b[kept], sc[kept], lv[kept]
        results.append(Proposals(b, sc, lv))
    return results


def _padded_nms(boxes, scores, ids, big, iou_threshold, max_per_img, group, backend) -> Proposals:
    capacity = max_per_img if max_per_img > 0 else max(boxes.shape[0], 1)
    masked = scores.masked_fill(~big, float("-inf"))
    keep, _ = batched_nms(boxes, masked, ids, iou_threshold, max_output=capacity, max_group_size=max(group, 1),
                          backend=backend)
    safe = keep.clamp(min=0)
    valid = (keep >= 0) & (masked[safe] > float("-inf"))  # a prefix: real candidates sort first
    pad = ~valid
    return Proposals(boxes[safe].masked_fill(pad[:, None], 0), scores[safe].masked_fill(pad, 0),
                     ids[safe].masked_fill(pad, -1), valid)
