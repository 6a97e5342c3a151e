"""Non-maximum suppression, plain and batched (exact per class / per level), at a data-dependent or
a fixed output size.

Owns argument checking, the backend choice, and the registration of ``htc_fast::nms`` /
``htc_fast::batched_nms`` / ``htc_fast::batched_nms_padded`` with torch (fake kernels, so
``torch.compile(fullgraph=True)`` traces through them: a new unbacked size for the plain ops, the
static ``(max_output,)`` for the padded one). The semantics are in ``reference/nms.py``; kernels in
``csrc/nms/`` and ``kernels/nms.py``. HTC's multiclass step is ``multiclass_nms.py``.

Fixed capacity (``max_output=K``): the result is ``PaddedKeep(keep, num_kept)`` with keep of shape
(K,) always, so nothing is read back to size it: on CUDA no host synchronisation at all, and a
static-shape graph (CUDA graphs, torch.compile without dynamic shapes).

Autocast: NMS returns indices and computes IoU in fp32 (fp64 for fp64 boxes) whatever the input
dtype, so it is unaffected by autocast and casts nothing.

Behaviour on odd input (tested): no boxes -> an empty result (``batched_nms`` also takes 1-D empty
boxes, like torchvision); NaN scores rank above every number (torch.sort's order), ties by index;
with ``htc_fast.ops.debug_checks()`` they raise instead (the check costs a host sync); boxes with
x2 < x1 or y2 < y1 are used as given, like torchvision; bad shapes, dtypes, devices and thresholds
raise ``OpArgumentError`` / ``OpTypeError`` naming the argument. On CUDA one group (one class or
level; all boxes for plain ``nms``) may hold at most 393,216 boxes (the reduction keeps a group's
bits in 48 KB of shared memory); more raises RuntimeError.

TorchScript: these functions are not scriptable (keyword-only ``backend=``, Python-level checks);
use ``torch.compile`` or ``torch.export``, which trace through the registered operators.
"""
from typing import NamedTuple

import torch
from torch import Tensor

from htc_fast import _extension
from htc_fast.ops import _backend, _checks, _debug
from htc_fast.ops._errors import OpArgumentError, OpTypeError
from htc_fast.ops.reference import nms as _ref

__all__ = ["nms", "batched_nms", "PaddedKeep", "MAX_OUTPUT"]

# The largest fixed capacity (128 MB of int64 indices): past any detector's needs, and small enough
# that a mistaken value is refused by name rather than by the allocator.
MAX_OUTPUT = 1 << 24


class PaddedKeep(NamedTuple):
    """A fixed-capacity NMS result: ``keep[:num_kept]`` are the kept indices, the rest -1."""

    keep: Tensor      # (max_output,) int64, by descending score (ties by index), padded with -1
    num_kept: Tensor  # () int64 on the boxes' device: min(number kept, max_output)


def nms(boxes, scores, iou_threshold, *, max_output=None, backend=None):
    """Greedy NMS; a drop-in for ``torchvision.ops.nms`` (same kept indices, same order).

    Args:
        boxes: (N, 4) float xyxy boxes (fp32, fp64, fp16 or bf16; IoU in fp32, fp64 for fp64).
        scores: (N,) float scores.
        iou_threshold: a box is dropped when its IoU with a kept, higher-scored box is > this
            (a number, not NaN).
        max_output: None (the default): return every kept index. An int K in [1, 2**24]: return
            ``PaddedKeep`` of static shape (K,), no host synchronisation.
        backend: "reference", "cpp" or "triton"; None uses ``use_backend`` / the default table.

    Returns:
        (num_kept,) int64 indices of the kept boxes by descending score (ties by index), or
        ``PaddedKeep`` when max_output is given.
    """
    _check("nms", boxes, scores, None)
    threshold = _checks.real("nms", "iou_threshold", iou_threshold)
    chosen = _backend.resolve("nms", boxes.device.type, backend)
    if max_output is not None:
        capacity = _checks.integer("nms", "max_output", max_output, minimum=1, maximum=MAX_OUTPUT)
        idxs = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
        return _padded(chosen, boxes, scores, idxs, threshold, capacity, max(boxes.shape[0], 1))
    if chosen == "reference":
        return _ref.nms(boxes, scores, threshold)
    op = torch.ops.htc_fast.nms if chosen == "cpp" else _triton().nms_triton
    return op(boxes, scores, threshold)


def batched_nms(boxes, scores, idxs, iou_threshold, *, max_output=None, max_group_size=None,
                backend=None):
    """NMS run separately for each value of ``idxs`` (class or FPN level), merged by score.

    The signature of ``torchvision.ops.batched_nms``, but exact at every size: equal to a per-class
    loop of ``nms`` (the coordinate-offset trick of torchvision and mmcv is not, in fp32). Boxes of
    different groups are never compared.

    Args:
        boxes: (N, 4) float xyxy (or an empty 1-D tensor, as torchvision allows); scores: (N,)
            float; idxs: (N,) integer group of each box.
        iou_threshold, backend: as in ``nms``.
        max_output: as in ``nms``: an int K >= 1 gives ``PaddedKeep`` of shape (K,).
        max_group_size: with max_output only: an upper bound on the boxes of any one group (e.g.
            the per-level pre-NMS top-k of RPN, N for per-class detections); the CUDA and Triton
            kernels size their IoU bit masks with it instead of reading the largest group back to
            the host. Default N. A larger group takes part with only its max_group_size
            best-scored boxes (ties by index), on every backend; ``debug_checks()`` reports it.

    Returns:
        (num_kept,) int64 indices by descending score (ties by index), or ``PaddedKeep``.
    """
    if _empty_1d(boxes) and _empty_1d(scores) and _empty_1d(idxs):  # torchvision returns early
        boxes, scores, idxs = boxes.reshape(0, 4), scores.reshape(0), idxs.reshape(0).long()
    if not isinstance(idxs, Tensor):  # (None would mean plain nms to _check)
        raise OpTypeError(f"batched_nms: idxs must be a Tensor of shape (N,), got {_checks.describe(idxs)}")
    _check("batched_nms", boxes, scores, idxs)
    threshold = _checks.real("batched_nms", "iou_threshold", iou_threshold)
    chosen = _backend.resolve("batched_nms", boxes.device.type, backend)
    if max_output is not None:
        capacity = _checks.integer("batched_nms", "max_output", max_output, minimum=1,
                                   maximum=MAX_OUTPUT)
        group_size = max(boxes.shape[0], 1) if max_group_size is None else \
            _checks.integer("batched_nms", "max_group_size", max_group_size, minimum=1)
        if _debug.enabled():
            _check_group_size(idxs, group_size)
        return _padded(chosen, boxes, scores, idxs, threshold, capacity, group_size)
    if max_group_size is not None:
        raise OpArgumentError("batched_nms: max_group_size is used only with max_output "
                                      "(the fixed-capacity result); pass both or neither")
    if chosen == "reference":
        return _ref.batched_nms(boxes, scores, idxs, threshold)
    op = torch.ops.htc_fast.batched_nms if chosen == "cpp" else _triton().batched_nms_triton
    return op(boxes, scores, idxs, threshold)


def _padded(chosen, boxes, scores, idxs, threshold, max_output, max_group_size):
    if chosen == "reference":
        keep, num_kept = _ref.batched_nms_padded(boxes, scores, idxs, threshold, max_output, max_group_size)
    else:
        op = torch.ops.htc_fast.batched_nms_padded if chosen == "cpp" else _triton().batched_nms_padded_triton
        keep, num_kept = op(boxes, scores, idxs, threshold, max_output, max_group_size)
    return PaddedKeep(keep, num_kept)


def _empty_1d(t):
    return isinstance(t, Tensor) and t.dim() == 1 and t.numel() == 0


def _check(where, boxes, scores, idxs):
    _checks.tensor(where, "boxes", boxes, dim=2, floating=True)
    _checks.tensor(where, "scores", scores, dim=1, floating=True)
    if boxes.shape[1] != 4:
        raise OpArgumentError(f"{where}: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
    if scores.shape[0] != boxes.shape[0]:
        raise OpArgumentError(f"{where}: scores has {scores.shape[0]} entries for "
                                      f"{boxes.shape[0]} boxes")
    _checks.same_device(where, "boxes", boxes, scores=scores)
    if idxs is not None:
        if not isinstance(idxs, Tensor) or idxs.shape != scores.shape:
            raise OpArgumentError(f"{where}: idxs must be a Tensor of shape ({scores.shape[0]},), "
                                          f"got {_checks.describe(idxs)}")
        _checks.tensor(where, "idxs", idxs, integer=True)
        _checks.same_device(where, "boxes", boxes, idxs=idxs)
    if _debug.enabled():
        _debug.check(torch.isnan(scores), lambda i: f"{where}: scores[{i}] is NaN (debug check; without "
                     "it NaN scores rank above every number)")


def _check_group_size(idxs, max_group_size):
    """Debug check (host sync): no group holds more than max_group_size boxes."""
    if idxs.numel() == 0:
        return
    values, counts = torch.unique(idxs, return_counts=True)
    _debug.check(counts > max_group_size, lambda i: f"batched_nms: group idxs == {int(values[i])} "
                 f"holds {int(counts[i])} boxes, more than max_group_size = {max_group_size} (debug check)")


def _triton():
    from htc_fast.kernels import nms as triton_nms

    return triton_nms


def _fake_nms(boxes, scores, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


def _fake_batched_nms(boxes, scores, idxs, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


def _fake_batched_nms_padded(boxes, scores, idxs, iou_threshold, max_output, max_group_size):
    return boxes.new_empty((max_output,), dtype=torch.long), boxes.new_empty((), dtype=torch.long)


if _extension.loaded:
    torch.library.register_fake("htc_fast::nms", _fake_nms)
    torch.library.register_fake("htc_fast::batched_nms", _fake_batched_nms)
    torch.library.register_fake("htc_fast::batched_nms_padded", _fake_batched_nms_padded)
