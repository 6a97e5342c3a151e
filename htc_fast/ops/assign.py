"""Max-IoU assignment of boxes to ground truth, fused: one op for a batch of images and several
threshold sets, instead of ~70 dispatched ops (IoU matrix, maxima, thresholds, low-quality match).

Owns argument checking, the backend choice and the registration of ``htc_fast::max_iou_assign``
with torch (a fake kernel, so ``torch.compile`` traces through it). The semantics (mmdetection's
``MaxIoUAssigner``) are in ``reference/assign.py``; kernels in ``csrc/assign/`` (C++ and CUDA) and
``kernels/assign.py`` (Triton). ``htc_fast.model.matching.MaxIoUAssigner`` is the model's front end.

Why fused: the unfused form materialises the (B, G, N) overlap matrix (N = all anchors of the
RPN: ~24k for a 256x384 image, ~200k at 1333x800) and reads it about ten times; the kernels
compute each overlap twice in registers and write only the (A, B, N) result. On every backend the
overlaps are computed with the reference's operations in its order, so the labels agree bit for
bit (an overlap equal to a ground truth's best overlap is decided by ==).

No autograd (the outputs are indices and a detached overlap); autocast: nothing to decide (float16
and bfloat16 boxes are converted to float32 here, on every backend).
"""
from typing import NamedTuple

import torch
from torch import Tensor

from htc_fast import _extension
from htc_fast.ops import _backend, _checks
from htc_fast.ops._errors import OpArgumentError, OpTypeError
from htc_fast.ops.reference import assign as _ref

__all__ = ["max_iou_assign", "Assignment", "MAX_THRESHOLD_SETS"]

MAX_THRESHOLD_SETS = 8  # csrc/assign/assign_common.h kMaxSets: the kernels keep a winner per set


class Assignment(NamedTuple):
    """The assignment of N boxes per image for A threshold sets (mmdet's convention)."""

    gt_inds: Tensor       # (A, B, N) int64: -1 ignored, 0 negative, k + 1 positive for ground truth k
    max_overlaps: Tensor  # (B, N) each box's largest overlap (-1: not valid; 0: image without ground truth)
    labels: Tensor        # (A, B, N) int64: the matched ground truth's label for positives, -1 otherwise


def max_iou_assign(boxes, gt_boxes, thresholds, *, gt_labels=None, valid=None, gt_valid=None,
                   match_low_quality=True, gt_max_assign_all=True, backend=None) -> Assignment:
    """Assign every box of B images to their ground truth, for A threshold sets at once.

    Args:
        boxes: (B, N, 4) xyxy candidates, or (1, N, 4) shared by every image (anchors); float32
            or float64 (float16/bfloat16 are converted to float32).
        gt_boxes: (B, G, 4) ground truth, padded per image (``pad_ground_truth``), boxes' dtype.
        thresholds: A (pos_iou_thr, neg_iou_lo, neg_iou_hi, min_pos_iou) tuples, 1 <= A <= 8: a box
            is negative when neg_iou_lo <= max overlap < neg_iou_hi, positive when >= pos_iou_thr.
        gt_labels: (B, G) int64 or None (zeros, as for the RPN).
        valid: (B, N) bool or None: boxes that are not candidates (padding, anchors outside the
            image) are ignored and take no part in the low-quality matching.
        gt_valid: (B, G) bool or None: the real rows of padded ground truth.
        match_low_quality, gt_max_assign_all: mmdet's MaxIoUAssigner options (see reference).
        backend: "reference", "cpp" or "triton"; None uses ``use_backend`` / the default table.

    Returns:
        ``Assignment`` (see its fields), on the boxes' device.
    """
    where = "max_iou_assign"
    _checks.tensor(where, "boxes", boxes, dim=3, floating=True)
    _checks.tensor(where, "gt_boxes", gt_boxes, dim=3, floating=True)
    batch, num_gts = gt_boxes.shape[0], gt_boxes.shape[1]
    if gt_boxes.shape[2] != 4:
        raise OpArgumentError(f"{where}: gt_boxes must have shape (B, G, 4), got {tuple(gt_boxes.shape)}")
    if boxes.shape[2] != 4 or boxes.shape[0] not in (1, batch):
        raise OpArgumentError(f"{where}: boxes must have shape ({batch}, N, 4) or (1, N, 4), got "
                              f"{tuple(boxes.shape)}")
    _checks.same_device(where, "gt_boxes", gt_boxes, boxes=boxes)
    num_boxes = boxes.shape[1]
    for name, t, shape, dtype in (("gt_labels", gt_labels, (batch, num_gts), torch.long),
                                  ("valid", valid, (batch, num_boxes), torch.bool),
                                  ("gt_valid", gt_valid, (batch, num_gts), torch.bool)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            raise OpArgumentError(f"{where}: {name} must be a {dtype} tensor of shape {shape}, got "
                                  f"{_checks.describe(t)}")
        _checks.same_device(where, "gt_boxes", gt_boxes, **{name: t})
    flat = _flat_thresholds(where, thresholds)
    dtype = torch.float64 if torch.float64 in (boxes.dtype, gt_boxes.dtype) else torch.float32
    # (No op when already so: .to of the same dtype returns the tensor, detach only what has grad.)
    boxes, gt_boxes = (t.detach().to(dtype) if t.requires_grad else t.to(dtype) for t in (boxes, gt_boxes))
    chosen = _backend.resolve(where, gt_boxes.device.type, backend)
    if chosen == "reference":
        op = _ref.max_iou_assign
    else:
        op = torch.ops.htc_fast.max_iou_assign if chosen == "cpp" else _triton().max_iou_assign_triton
    return Assignment(*op(boxes, gt_boxes, gt_labels, valid, gt_valid, flat, bool(match_low_quality),
                          bool(gt_max_assign_all)))


def _flat_thresholds(where, thresholds) -> list[float]:
    """A (pos, neg_lo, neg_hi, min_pos) tuples -> 4 A checked floats."""
    if not isinstance(thresholds, (list, tuple)) or not 1 <= len(thresholds) <= MAX_THRESHOLD_SETS:
        raise OpTypeError(f"{where}: thresholds must be a list of 1 to {MAX_THRESHOLD_SETS} (pos_iou_thr, "
                          f"neg_iou_lo, neg_iou_hi, min_pos_iou) tuples, got {_checks.describe(thresholds)}")
    flat = []
    for i, group in enumerate(thresholds):
        if not isinstance(group, (list, tuple)) or len(group) != 4:
            raise OpTypeError(f"{where}: thresholds[{i}] must be a (pos_iou_thr, neg_iou_lo, neg_iou_hi, "
                              f"min_pos_iou) tuple, got {_checks.describe(group)}")
        flat += [_checks.real(where, f"thresholds[{i}][{j}]", v) for j, v in enumerate(group)]
    return flat


def _triton():
    from htc_fast.kernels import assign as triton_assign

    return triton_assign


def _fake_max_iou_assign(boxes, gt_boxes, gt_labels, valid, gt_valid, thresholds, match_low_quality,
                         gt_max_assign_all):
    sets, batch, num_boxes = len(thresholds) // 4, gt_boxes.shape[0], boxes.shape[1]
    return (gt_boxes.new_empty((sets, batch, num_boxes), dtype=torch.long),
            gt_boxes.new_empty((batch, num_boxes)),
            gt_boxes.new_empty((sets, batch, num_boxes), dtype=torch.long))


if _extension.loaded:
    torch.library.register_fake("htc_fast::max_iou_assign", _fake_max_iou_assign)
