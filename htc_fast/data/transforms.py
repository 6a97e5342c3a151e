"""Training and test transforms of a `Sample`: keep-ratio resize, horizontal flip.

What this module owns: the geometry (image, boxes, instance masks, semantic map moved together).
What it does not own: normalisation and padding, done once per batch in `collate.py` (samples stay
uint8 until then, so a flip applied twice is exactly the identity and workers move 4x less data).

Why plain functions rather than torchvision.transforms.v2: v2.Resize computes the output size by
truncation and antialiases bilinear downscaling, while HTC needs mmcv's keep-ratio rule
(`int(side * factor + 0.5)`, `htc_fast.data.preprocess.rescale_size`), the exact per-axis scale factors
(new_w / w, new_h / h) and the same un-antialiased bilinear resize as inference
(`htc_fast.data.preprocess.resize`); and the random draws must come from an explicit generator for
reproducibility. The rules below are mmdetection's (2.x and 3.x agree):
  * image: bilinear (as `preprocess.resize`); masks and semantic map: NEAREST
    (`BitmapMasks.rescale(scale, interpolation='nearest')`, `mmcv.imrescale(seg, interpolation=
    'nearest')`; torch's "nearest" picks src = floor(dst * src_size / dst_size), like OpenCV's
    INTER_NEAREST);
  * boxes: multiplied by (w_scale, h_scale, w_scale, h_scale), then clipped to the resized image
    (`Resize` with `clip_object_border=True`);
  * horizontal flip: x1' = w - x2, x2' = w - x1 (`RandomFlip.bbox_flip`, no -1), masks and
    semantic map mirrored;
  * multi-scale "range" training (the DCN preset): short side drawn uniformly from the integers
    [low, high] (`np.random.randint(low, high + 1)`), long side capped at `train_scale[0]`.
"""
from dataclasses import replace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from htc_fast.config import DataConfig
from htc_fast.data.coco import Sample
from htc_fast.data.preprocess import rescale_size, resize


def resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(..., h, w) bool/uint8 -> (..., H, W), nearest (src = floor(dst * h / H))."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x.clone()
    lead = x.shape[:-2]
    flat = x.reshape(1, -1, *x.shape[-2:]).to(torch.uint8)
    if flat.shape[1] == 0:
        return x.new_zeros(*lead, *size)
    out = F.interpolate(flat, size=size, mode="nearest")
    return out.reshape(*lead, *size).to(x.dtype)


def resize_boxes(boxes: Tensor, scale_factor: tuple[float, float], size: tuple[int, int]) -> Tensor:
    """(G, 4) xyxy scaled by (w_scale, h_scale) and clipped to size (h, w)."""
    w_scale, h_scale = scale_factor
    out = boxes * boxes.new_tensor([w_scale, h_scale, w_scale, h_scale])
    out[:, 0::2] = out[:, 0::2].clamp(0, size[1])
    out[:, 1::2] = out[:, 1::2].clamp(0, size[0])
    return out


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """Horizontal flip of (G, 4) xyxy boxes in an image `width` wide: x1' = w - x2, x2' = w - x1."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def resize_sample(sample: Sample, scale: tuple[int, int]) -> Sample:
    """Keep-ratio resize into `scale` (long max, short max); scale factors are new/old per axis."""
    if sample.semantic_stride != 1:
        raise ValueError(f"resize_sample needs a full semantic map, got one sampled every "
                         f"{sample.semantic_stride} pixels")
    h, w = sample.image_shape
    nh, nw = rescale_size(h, w, scale)
    factor = (nw / w, nh / h)
    sf = (sample.scale_factor[0] * factor[0], sample.scale_factor[1] * factor[1])
    return replace(
        sample, image=resize(sample.image, (nh, nw)) if (nh, nw) != (h, w) else sample.image.clone(),
        boxes=resize_boxes(sample.boxes, factor, (nh, nw)),
        ignore_boxes=resize_boxes(sample.ignore_boxes, factor, (nh, nw)),
        masks=None if sample.masks is None else resize_nearest(sample.masks, (nh, nw)),
        semantic=None if sample.semantic is None else resize_nearest(sample.semantic, (nh, nw)),
        scale_factor=sf)


def flip_sample(sample: Sample) -> Sample:
    """Horizontal flip of the image, boxes, masks and semantic map (applied twice: identity)."""
    if sample.semantic_stride != 1:
        raise ValueError(f"flip_sample needs a full semantic map, got one sampled every "
                         f"{sample.semantic_stride} pixels")
    w = sample.image_shape[1]
    return replace(
        sample, image=sample.image.flip(-1), boxes=flip_boxes(sample.boxes, w),
        ignore_boxes=flip_boxes(sample.ignore_boxes, w),
        masks=None if sample.masks is None else sample.masks.flip(-1),
        semantic=None if sample.semantic is None else sample.semantic.flip(-1),
        flipped=not sample.flipped)


def draw_train_scale(cfg: DataConfig, rng: np.random.Generator) -> tuple[int, int]:
    """The (long max, short) scale of one training image: `train_scale`, or in range mode a short
    side uniform in the integers of `train_short_range` with the long side <= `train_scale[0]`."""
    if not cfg.train_short_range:
        return tuple(cfg.train_scale)
    low, high = cfg.train_short_range
    return (max(cfg.train_scale), int(rng.integers(low, high + 1)))


class TrainTransform:
    """Resize (fixed or multi-scale range) then flip with probability `cfg.flip_prob`."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def draw(self, rng: np.random.Generator) -> tuple[tuple[int, int], bool]:
        """The random part: (scale, flip), drawn in this order (what `__call__` applies)."""
        scale = draw_train_scale(self.cfg, rng)
        return scale, bool(rng.random() < self.cfg.flip_prob)

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        scale, flip = self.draw(np.random.default_rng() if rng is None else rng)
        sample = resize_sample(sample, scale)
        return flip_sample(sample) if flip else sample


class TestTransform:
    """Resize to `cfg.test_scale`, no flip (what `htc_fast.data.preprocess.make_batch` does)."""
    __test__ = False  # not a pytest class

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg

    def draw(self, rng: Optional[np.random.Generator] = None) -> tuple[tuple[int, int], bool]:
        return tuple(self.cfg.test_scale), False

    def __call__(self, sample: Sample, rng: Optional[np.random.Generator] = None) -> Sample:
        return resize_sample(sample, tuple(self.cfg.test_scale))
