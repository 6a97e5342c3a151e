"""Non-maximum suppression: plain, batched (exact per class / per level), and HTC's multiclass step.

Owns argument checking, the backend choice, and the registration of ``htc_fast::nms`` /
``htc_fast::batched_nms`` with torch (fake kernels with a data-dependent output size, so
``torch.compile(fullgraph=True)`` traces through them). The semantics are in ``reference/nms.py``;
kernels in ``csrc/nms/``.

Autocast: NMS returns indices and computes IoU in fp32 (fp64 for fp64 boxes) whatever the input
dtype, so it is unaffected by autocast and casts nothing.

Behaviour on odd input (tested): no boxes -> an empty int64 tensor; NaN scores -> ValueError
(their rank is undefined; the check costs one device->host sync on CUDA, where NMS syncs for its
output size anyway); boxes with x2 < x1 or y2 < y1 -> used as given, like torchvision; mismatched
lengths, wrong ranks, non-float boxes, mixed devices -> ValueError/TypeError naming the argument.
On CUDA one group (one class or level; all boxes for plain ``nms``) may hold at most 393,216
boxes (the reduction keeps a group's bits in 48 KB of shared memory); more raises RuntimeError.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from htc_fast import _extension
from htc_fast.ops import _backend, _debug
from htc_fast.ops.reference import nms as _ref

__all__ = ["nms", "batched_nms", "multiclass_nms", "MulticlassNMSResult"]


def nms(boxes, scores, iou_threshold, *, backend=None):
    """Greedy NMS; a drop-in for ``torchvision.ops.nms`` (same kept indices, same order).

    Args:
        boxes: (N, 4) float xyxy boxes (fp32, fp64, fp16 or bf16; IoU in fp32, fp64 for fp64).
        scores: (N,) float scores.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scored box is > this.
        backend: "reference", "cpp" or "triton"; None uses ``use_backend`` / the default table.

    Returns:
        (K,) int64 indices of the kept boxes, by descending score (ties by index).
    """
    _check(boxes, scores, None)
    chosen = _backend.resolve("nms", boxes.device.type, backend)
    if chosen == "reference":
        return _ref.nms(boxes, scores, float(iou_threshold))
    op = torch.ops.htc_fast.nms if chosen == "cpp" else _triton().nms_triton
    return op(boxes, scores, float(iou_threshold))


def batched_nms(boxes, scores, idxs, iou_threshold, *, backend=None):
    """NMS run separately for each value of ``idxs`` (class or FPN level), merged by score.

    The signature of ``torchvision.ops.batched_nms``, but exact at every size: equal to a per-class
    loop of ``nms`` (the coordinate-offset trick of torchvision and mmcv is not, in fp32). Boxes of
    different groups are never compared.

    Args:
        boxes: (N, 4) float xyxy; scores: (N,) float; idxs: (N,) integer group of each box.
        iou_threshold, backend: as in ``nms``.

    Returns:
        (K,) int64 indices of the kept boxes, by descending score (ties by index).
    """
    _check(boxes, scores, idxs)
    chosen = _backend.resolve("batched_nms", boxes.device.type, backend)
    if chosen == "reference":
        return _ref.batched_nms(boxes, scores, idxs, float(iou_threshold))
    op = torch.ops.htc_fast.batched_nms if chosen == "cpp" else _triton().batched_nms_triton
    return op(boxes, scores, idxs, float(iou_threshold))


class MulticlassNMSResult(NamedTuple):
    """Detections of one image. M <= max_per_image, sorted by descending score."""

    boxes: Tensor    # (M, 4) float xyxy
    scores: Tensor   # (M,) float
    labels: Tensor   # (M,) int64 class in [0, C)
    indices: Tensor  # (M,) int64 row of the input each detection came from


def multiclass_nms(boxes, scores, score_threshold, iou_threshold, max_per_image, *, backend=None):
    """HTC's final detection step (mmdetection's ``multiclass_nms``).

    Args:
        boxes: (N, 4) class-agnostic boxes, or (N, C, 4) one box per class.
        scores: (N, C + 1) class probabilities, background LAST (dropped).
        score_threshold: keep (row, class) pairs with score > this (HTC test: 0.001).
        iou_threshold: per-class NMS threshold (HTC: 0.5).
        max_per_image: keep at most this many, the highest scored (HTC: 100); <= 0 keeps all.
        backend: for the batched NMS.

    Returns:
        MulticlassNMSResult(boxes, scores, labels, indices).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"multiclass_nms: scores must be (N, C + 1) with background last, got "
                         f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}")
    n, num_classes = scores.shape[0], scores.shape[1] - 1
    if not isinstance(boxes, Tensor):
        raise TypeError(f"multiclass_nms: boxes must be a Tensor, got {type(boxes).__name__}")
    for name, t in (("boxes", boxes), ("scores", scores)):
        if not t.is_floating_point():
            raise TypeError(f"multiclass_nms: {name} must be floating point, got {t.dtype}")
    if boxes.device != scores.device:
        raise ValueError(f"multiclass_nms: boxes are on {boxes.device} but scores on {scores.device}")
    per_class = boxes.dim() == 3 and boxes.shape == (n, num_classes, 4)
    if not per_class and not (boxes.dim() == 2 and boxes.shape == (n, 4)):
        raise ValueError(f"multiclass_nms: boxes must be ({n}, 4) or ({n}, {num_classes}, 4) for scores "
                         f"{tuple(scores.shape)}, got {tuple(boxes.shape)}")
    flat_scores = scores[:, :num_classes].reshape(-1)
    if _debug.enabled():
        _debug.check(torch.isnan(flat_scores), lambda i: f"multiclass_nms: scores[{i // num_classes}, "
                     f"{i % num_classes}] is NaN (debug check; without it a NaN score is never above "
                     "score_threshold, so the pair is dropped)")
    candidates = (flat_scores > score_threshold).nonzero().squeeze(1)
    rows, labels = candidates // num_classes, candidates % num_classes
    # Class-agnostic boxes are gathered by row: no (N, C, 4) copy.
    cand_boxes = boxes.reshape(-1, 4)[candidates] if per_class else boxes[rows]
    keep = batched_nms(cand_boxes, flat_scores[candidates], labels, iou_threshold, backend=backend)
    if max_per_image > 0:
        keep = keep[:max_per_image]
    return MulticlassNMSResult(cand_boxes[keep], flat_scores[candidates[keep]], labels[keep], rows[keep])


def _check(boxes, scores, idxs):
    where = "nms" if idxs is None else "batched_nms"
    for name, t, dim in (("boxes", boxes, 2), ("scores", scores, 1)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != dim:
            raise ValueError(f"{where}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
    if boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{where}: scores has {scores.shape[0]} entries for {boxes.shape[0]} boxes")
    if scores.device != boxes.device:
        raise ValueError(f"{where}: scores are on {scores.device} but boxes are on {boxes.device}")
    if idxs is not None:
        if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
            raise ValueError(f"{where}: idxs must be a Tensor of shape ({scores.shape[0]},), got "
                             f"{tuple(idxs.shape) if isinstance(idxs, Tensor) else type(idxs).__name__}")
        if idxs.is_floating_point() or idxs.dtype == torch.bool or idxs.is_complex():
            raise TypeError(f"{where}: idxs must be an integer tensor, got {idxs.dtype}")
        if idxs.device != boxes.device:
            raise ValueError(f"{where}: idxs are on {idxs.device} but boxes are on {boxes.device}")
    if _debug.enabled():
        _debug.check(torch.isnan(scores), lambda i: f"{where}: scores[{i}] is NaN (debug check; without "
                     "it NaN scores rank above every number)")


def _triton():
    from htc_fast.kernels import nms as triton_nms

    return triton_nms


def _fake_nms(boxes, scores, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


def _fake_batched_nms(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


if _extension.loaded:
    torch.library.register_fake("htc_fast::nms", _fake_nms)
    torch.library.register_fake("htc_fast::batched_nms", _fake_batched_nms)
