"""Fused mask paste: HTC's last inference step, per-detection mask probabilities -> image masks.

Owns argument checking, the backend choice, HTC's stage merge (``htc_mask_probs``) and what torch
needs to know about the compiled operators ``htc_fast::paste_masks``, ``paste_mask_windows`` and
``paste_mask_crops`` (fake kernels, so ``torch.compile(fullgraph=True)`` traces through them). The
pixel model lives in ``reference/mask_paste.py`` (the spec), the kernels in ``csrc/mask_paste/``
(C++/CUDA) and ``kernels/mask_paste.py`` (Triton); COCO RLE output in ``mask_rle.py``.

Why fused: mmdetection's ``_do_paste_mask`` builds an N x h x w x 2 float32 grid and an N x h x w
float32 image (12-14 bytes per pixel per mask over the boxes' union), and paints a stripe for a
zero-width box. Here one kernel visits only the pixels within half a mask cell of each box and
writes booleans: memory is the (N, H, W) bool output plus O(N * M^2) (on CPU, per thread, a
padded float32 mask and its rows interpolated along the box's window: O(M^2 + M * W)). Inference
only: no autograd. Autocast: nothing to decide (no float output; the mask probabilities are read
in their dtype and interpolated in float32, boxes are float32 geometry).
"""
import math

import torch
from torch import Tensor

from htc_fast import _extension
from htc_fast.ops import _backend, _checks, _debug
from htc_fast.ops._errors import OpArgumentError
from htc_fast.ops.reference import mask_paste as _ref

__all__ = ["paste_masks", "htc_mask_probs"]


def paste_masks(mask_probs, boxes, image_size, threshold=0.5, *, backend=None):
    """Paste per-box mask probabilities into full-image binary masks.

    Equal to mmdetection's ``_do_paste_mask`` (grid_sample, ``align_corners=False``, zero padding)
    followed by ``>= threshold``, up to pixels whose probability is within ~1e-6 of the threshold
    (float32 rounding differs between grid_sample's own CPU and CUDA kernels there).

    Args:
        mask_probs: (N, M, M) probabilities (any (N, M_h, M_w)), float32/float16/bfloat16/float64;
            interpolated in float32.
        boxes: (N, 4) ``[x0, y0, x1, y1]`` in image pixels (pixel i covers [i, i + 1)); converted
            to float32. Boxes may extend past the image or lie outside it.
        image_size: ``(height, width)`` of the output, positive ints.
        threshold: a pixel is set where the interpolated probability is >= this (compared in
            float32); must be positive (mmdetection's ``mask_thr_binary``, 0.5 for HTC).
        backend: "reference", "cpp" or "triton"; None uses ``use_backend`` / the default table.

    Returns:
        (N, height, width) bool on the device of the inputs. A box with a NaN/inf coordinate, or
        whose float32 width or height is not positive and finite (zero-width, zero-height and
        flipped boxes), gives an empty mask.
    """
    mask_probs, boxes, height, width, threshold = check_args(mask_probs, boxes, image_size, threshold,
                                                             "paste_masks")
    chosen = _backend.resolve("paste_masks", boxes.device.type, backend)
    if chosen == "reference":
        return _ref.paste_masks(mask_probs, boxes, height, width, threshold)
    op = torch.ops.htc_fast.paste_masks if chosen == "cpp" else _triton().paste_masks_triton
    return op(mask_probs, boxes, height, width, threshold)


def htc_mask_probs(stage_logits, labels):
    """HTC's merged mask of each detection: the mean over stages of the sigmoid of the stage's
    logits for the detection's class (mmdetection's ``merge_aug_masks`` then the class gather).

    The class is gathered first, so only (N, M, M) per stage is ever activated and the (N, C, M, M)
    tensors stay where they are; the result feeds ``paste_masks``.

    Args:
        stage_logits: S >= 1 tensors (N, C, M, M) of mask logits, one per cascade stage.
        labels: (N,) integer class of each detection, in [0, C).

    Returns:
        (N, M, M) float32 probabilities: (sigmoid(l_0) + ... + sigmoid(l_{S-1})) / S in float32.
        A label outside [0, C) gives an all-zero mask (``debug_checks`` turns it into an error).
    """
    where = "htc_mask_probs"
    if not isinstance(stage_logits, (list, tuple)) or not stage_logits:
        raise OpArgumentError(f"{where}: stage_logits must be a list of at least one (N, C, M, M) tensor, "
                              f"got {_checks.describe(stage_logits)}")
    first = stage_logits[0]
    for i, t in enumerate(stage_logits):
        _checks.tensor(where, f"stage_logits[{i}]", t, floating=True)
        if t.dim() != 4:
            raise OpArgumentError(f"{where}: stage_logits[{i}] must be a float (N, C, M, M) tensor, got "
                                  f"{tuple(t.shape)}")
        if t.shape != first.shape or t.device != first.device:
            raise OpArgumentError(f"{where}: stage_logits[{i}] is {tuple(t.shape)} on {t.device}, "
                                  f"stage_logits[0] is {tuple(first.shape)} on {first.device}")
    if (not isinstance(labels, Tensor) or labels.shape != (first.shape[0],) or labels.is_floating_point()
            or labels.is_complex() or labels.dtype == torch.bool):
        raise OpArgumentError(f"{where}: labels must be an integer tensor of shape ({first.shape[0]},), "
                              f"got {_checks.describe(labels)}")
    _checks.tensor(where, "labels", labels)
    if labels.device != first.device:
        raise OpArgumentError(f"{where}: labels are on {labels.device} but the logits on {first.device}")
    num_classes = first.shape[1]
    valid = (labels >= 0) & (labels < num_classes)
    if _debug.enabled():
        _debug.check(~valid, lambda i: f"htc_mask_probs: labels[{i}] = {int(labels[i])} is not a class in "
                                       f"[0, {num_classes}) (debug check)")
    # Out-of-range labels gather class 0 (an in-bounds read: no device assert) and are zeroed below.
    safe = torch.where(valid, labels, 0).long()
    rows = torch.arange(first.shape[0], device=first.device)
    # torch.stack(...).mean(0): the arithmetic of mmdetection's merge, so the result is bit-equal
    # to its merged masks (scripts/compare_oracle.py).
    merged = torch.stack([t[rows, safe].float().sigmoid() for t in stage_logits]).mean(0)
    return torch.where(valid[:, None, None], merged, 0.0)


# ----------------------------------------------------------------------------- argument checks

def check_args(mask_probs, boxes, image_size, threshold, where):
    """Validated (mask_probs, float32 contiguous boxes, height, width, threshold); OpArgumentError
    or OpTypeError naming the argument otherwise."""
    _checks.tensor(where, "mask_probs", mask_probs, floating=True)
    if mask_probs.dim() != 3 or mask_probs.shape[1] == 0 or mask_probs.shape[2] == 0:
        raise OpArgumentError(f"{where}: mask_probs must have shape (N, M, M), got {tuple(mask_probs.shape)}")
    _checks.tensor(where, "boxes", boxes, floating=True)
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise OpArgumentError(f"{where}: boxes must have shape (N, 4) [x0, y0, x1, y1], got "
                              f"{tuple(boxes.shape)}")
    if boxes.shape[0] != mask_probs.shape[0]:
        raise OpArgumentError(f"{where}: mask_probs has {mask_probs.shape[0]} masks for {boxes.shape[0]} boxes")
    if boxes.device != mask_probs.device:
        raise OpArgumentError(f"{where}: boxes are on {boxes.device} but mask_probs on {mask_probs.device}")
    if not isinstance(image_size, (tuple, list)) or len(image_size) != 2:
        raise OpArgumentError(f"{where}: image_size must be (height, width), got {_checks.describe(image_size)}")
    height = _checks.integer(where, "image_size[0] (height)", image_size[0])
    width = _checks.integer(where, "image_size[1] (width)", image_size[1])
    if height <= 0 or width <= 0:
        raise OpArgumentError(f"{where}: image_size must be positive, got ({height}, {width})")
    threshold = _checks.real(where, "threshold", threshold, allow_nan=True)
    if not (math.isfinite(threshold) and threshold > 0):
        raise OpArgumentError(f"{where}: threshold must be positive and finite (pixels outside every box "
                              f"have probability 0), got {threshold}")
    return mask_probs, boxes.to(torch.float32).contiguous(), height, width, threshold


def _triton():
    from htc_fast.kernels import mask_paste as triton_mask_paste

    return triton_mask_paste


# ----------------------------------------------------------------- registration of the C++ ops

def _fake_paste_masks(mask_probs, boxes, height, width, threshold):
    return boxes.new_empty((boxes.shape[0], height, width), dtype=torch.bool)


def _fake_windows(boxes, mask_height, mask_width, height, width):
    return boxes.new_empty((boxes.shape[0], 4), dtype=torch.long)


def _fake_crops(mask_probs, boxes, windows, offsets, total, height, width, threshold):
    return boxes.new_empty((total,), dtype=torch.bool)


def _fake_rle_encode(crops, windows, offsets, height, width):
    chars = crops.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.uint8)
    return chars, offsets.new_empty(offsets.shape)


if _extension.loaded:
    torch.library.register_fake("htc_fast::paste_masks", _fake_paste_masks)
    torch.library.register_fake("htc_fast::paste_mask_windows", _fake_windows)
    torch.library.register_fake("htc_fast::paste_mask_crops", _fake_crops)
    torch.library.register_fake("htc_fast::mask_rle_encode", _fake_rle_encode)
