"""Mask paste straight to COCO RLE: every backend against pycocotools.

Oracle: ``pycocotools.mask.encode`` of the dense masks (Fortran-ordered uint8, as COCO tools call
it), compared byte for byte with ``torch.equal``-strictness (dict equality):
  * ``paste_masks_rle(backend)`` equals pycocotools' encoding of ``paste_masks(backend)``, so the
    crops, their windows and the closed-form runs outside them lose and invent nothing;
  * the reference encoder (``reference.rle_encode``, the fallback without _C) and the C++ encoder
    of arbitrary crops equal pycocotools on masks built to hit the format's corners: empty, full,
    set first or last pixel, one pixel, long runs (multi-group counts), negative count deltas.
Inputs are fresh every run. Dense parity with the grid_sample reference: test_mask_paste.py.
"""
import random

import numpy as np
import pytest
import torch

from htc_fast import ops
from htc_fast.ops import mask_rle
from htc_fast.ops.reference import mask_paste as reference
from tests.ops.test_mask_paste import problem, random_boxes, random_masks
from tests.support import require_backend

mask_util = pytest.importorskip("pycocotools.mask")


def coco_encode(dense):
    """pycocotools' RLE of (N, H, W) bool masks, as its users call it."""
    dense = dense.cpu().numpy()
    if dense.shape[0] == 0:
        return []
    return mask_util.encode(np.asfortranarray(dense.transpose(1, 2, 0).astype(np.uint8)))


def corner_masks(height, width):
    """(K, H, W) bool masks that hit the corners of the RLE format, plus random ones."""
    masks = [torch.zeros(height, width, dtype=torch.bool), torch.ones(height, width, dtype=torch.bool)]
    one = torch.zeros(height, width, dtype=torch.bool)
    one[random.randrange(height), random.randrange(width)] = True
    first, last = torch.zeros_like(one), torch.zeros_like(one)
    first[0, 0], last[-1, -1] = True, True
    stripes = torch.zeros_like(one)
    stripes[:, random.randrange(width):] = True  # one long run: counts of several 5-bit groups
    masks += [one, first, last, stripes, torch.rand(height, width) < 0.5, torch.rand(height, width) < 0.02]
    block = torch.zeros_like(one)  # short runs after long ones: negative deltas against counts[i - 2]
    block[random.randrange(height):, random.randrange(width)] = True
    block[: random.randint(1, height), -1] = True
    masks.append(block)
    return torch.stack(masks)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (9, 1), (37, 91), (120, 45)])
def test_reference_encoder_matches_pycocotools(size):
    masks = corner_masks(*size)
    assert [reference.rle_encode(m) for m in masks] == coco_encode(masks)


@pytest.mark.parametrize("size", [(1, 1), (37, 91), (120, 45), (300, 500)])
def test_cpp_encoder_matches_pycocotools(size):
    """htc_fast::mask_rle_encode on random crops of random windows (any window, any content)."""
    require_backend("cpp", "cpu")
    height, width = size
    masks = corner_masks(height, width)
    windows, crops = [], []
    for m in masks:
        x0, x1 = sorted(random.sample(range(width + 1), 2)) if width > 1 else (0, 1)
        y0, y1 = sorted(random.sample(range(height + 1), 2)) if height > 1 else (0, 1)
        if random.random() < 0.1:
            x1 = x0  # an empty window
        m[:, :x0], m[:, x1:], m[:y0], m[y1:] = False, False, False, False
        windows.append([x0, y0, x1, y1])
        crops.append(m[y0:y1, x0:x1].t().reshape(-1))  # column-major crop
    windows = torch.tensor(windows)
    offsets = mask_rle.crop_offsets(windows)
    got = mask_rle.encode_crops(torch.cat(crops), windows, offsets, height, width)
    assert got == coco_encode(masks)


@pytest.mark.parametrize("threshold", [0.5, 0.2])
def test_paste_masks_rle_matches_pycocotools(backend, device, threshold):
    n, (mh, mw), size = problem(backend)
    boxes = random_boxes(n, *size).to(device)
    probs = random_masks(n, mh, mw, smooth=random.random() < 0.5).to(device)
    dense = ops.paste_masks(probs, boxes, size, threshold, backend=backend)
    got = ops.paste_masks_rle(probs, boxes, size, threshold, backend=backend)
    assert isinstance(got, list) and len(got) == n
    assert got == coco_encode(dense)
    assert all(isinstance(r["counts"], bytes) and r["size"] == list(size) for r in got)


def test_paste_masks_rle_no_boxes(backend, device):
    got = ops.paste_masks_rle(torch.zeros(0, 28, 28, device=device), torch.zeros(0, 4, device=device),
                              (5, 6), backend=backend)
    assert got == []


def test_paste_masks_rle_only_empty_masks(backend, device):
    """Every box degenerate or outside: every crop is empty, the buffer has size 0."""
    boxes = torch.tensor([[5, 5, 5, 20], [float("nan"), 1, 9, 9], [-50, -50, -20, -10]], device=device)
    got = ops.paste_masks_rle(torch.rand(3, 28, 28, device=device), boxes, (30, 40), backend=backend)
    assert got == coco_encode(torch.zeros(3, 30, 40, dtype=torch.bool))


def test_encode_crops_without_extension(monkeypatch):
    """The pure-Python path of encode_crops (used when _C is missing) gives the same strings."""
    require_backend("cpp", "cpu")
    n, (mh, mw), size = problem("cpp")
    boxes = random_boxes(n, *size)
    probs = random_masks(n, mh, mw, smooth=True)
    expected = ops.paste_masks_rle(probs, boxes, size, backend="cpp")
    windows = torch.ops.htc_fast.paste_mask_windows(boxes, mh, mw, *size)
    offsets = mask_rle.crop_offsets(windows)
    crops = torch.ops.htc_fast.paste_mask_crops(probs, boxes, windows, offsets, int(offsets[-1]), *size, 0.5)
    monkeypatch.setattr(mask_rle._extension, "loaded", False)
    assert mask_rle.encode_crops(crops, windows, offsets, *size) == expected
