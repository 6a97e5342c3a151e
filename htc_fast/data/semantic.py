"""Semantic (COCO-stuff) label maps for HTC's fused semantic head.

What this module owns: reading a COCO-stuff "stuffthingmaps" PNG, and the fallback map derived
from the instance masks when a dataset has no stuff maps. What it does not own: resizing and
flipping (`transforms.py`), padding with 255 (`collate.py`), the 1/8 downscaling for the loss
(the semantic head does it).

Label convention (mmdetection's HTC, `LoadAnnotations(with_seg=True)` reading
`stuffthingmaps/train2017/<image file name>.png` unchanged): pixel value = COCO-stuff index
0..181 = COCO category id - 1 (things 0..90, stuff 91..181), 255 = unlabeled/ignore; the head has
183 classes. The maps are used as they are (no remapping).

Fallback without stuff maps (`semantic_from_instances`): thing pixels get their category's label,
every other pixel is 255 (ignored: without stuff annotations nothing is known about background).
``thing_ids="stuff_id"`` (default) writes ``category_id - 1``, the value the real stuff maps hold
for that thing, so a 183-class head sees the same channel either way; ``thing_ids="label"`` writes
the contiguous label 0..79 (for heads with fewer classes, e.g. `htc_tiny`). Instances are painted
largest first so that small objects lying on large ones stay visible; crowd regions are painted
too (their pixels do belong to the category).
"""
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from htc_fast.data.image_decode import read_label_map

IGNORE_INDEX = 255
ThingIds = Literal["stuff_id", "label"]


class MissingStuffMapError(FileNotFoundError):
    """A stuff map the dataset expects is not on disk."""


def load_stuff_map(path: Path, expected_hw: Sequence[int]) -> Tensor:
    """(H, W) uint8 COCO-stuff label map from a PNG; clear errors when missing, unreadable or of
    the wrong size."""
    path = Path(path)
    if not path.is_file():
        raise MissingStuffMapError(f"stuff map not found: {path}")
    try:
        seg = read_label_map(path)
    except ValueError as exc:
        raise ValueError(f"cannot decode stuff map {path}: {exc}") from exc
    if tuple(seg.shape) != tuple(expected_hw):
        raise ValueError(f"stuff map {path} is {tuple(seg.shape)} (h, w) but its image is "
                         f"{tuple(expected_hw)}")
    return torch.from_numpy(seg)


def semantic_from_instances(masks: Tensor, values: Sequence[int], hw: Sequence[int]) -> Tensor:
    """(H, W) uint8 map: pixel = `values[i]` where instance i's mask is set (largest painted first,
    so smaller instances win overlaps), 255 elsewhere.

    Args:
        masks: (G, H, W) bool instance masks at the image size.
        values: G label values (0..254).
        hw: (H, W) of the image (used when G = 0).
    """
    out = torch.full(tuple(hw), IGNORE_INDEX, dtype=torch.uint8)
    if masks.shape[0] == 0:
        return out
    areas = masks.flatten(1).sum(1)
    for i in torch.argsort(areas, descending=True, stable=True).tolist():
        out[masks[i]] = int(values[i])
    return out
