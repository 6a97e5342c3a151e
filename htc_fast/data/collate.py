"""Batching: a list of transformed `Sample`s -> the model's `ImageBatch` (+ `Targets`).

What this module owns: normalisation ((x - mean) / std on uint8 RGB), zero padding of images and
255 padding of semantic maps bottom/right to a common multiple of `size_divisor`. Instance masks
stay unpadded at each image's resized size (`Targets` requires it). Batches are small dataclasses
with `pin_memory()` (called by the DataLoader's pin thread) and `to(device)`; they unpack like the
pair they carry: `inputs, targets = batch`.

Training batches carry the images as unpadded uint8 (`TrainBatch.images`) and the instance masks
as window crops (`MaskCrops`), and build the model's padded float batch and dense masks where they
are when `inputs` / `targets` are first read: after `batch.to("cuda")` that is on the GPU (as
mmdetection's data preprocessor normalises there), so the workers do no float work, write no
zeros, and share and copy a fraction of the bytes.
"""
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from htc_fast.data.coco import Sample
from htc_fast.data.device_decode import EncodedImage, decode_batch
from htc_fast.data.mask_crops import MaskCrops
from htc_fast.data.preprocess import MEAN, STD
from htc_fast.data.semantic import IGNORE_INDEX
from htc_fast.model.inputs import ImageBatch, Targets


def _pin(t: Tensor) -> Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def normalize_into_batch(images: Sequence[Tensor], padded: tuple[int, int], mean=MEAN, std=STD) -> Tensor:
    """(3, h_i, w_i) uint8 images (one device) -> (N, 3, H, W) float32 there, `padded` = (H, W):
    (x - mean) / std inside each image, 0 in the padding (bit for bit what `batch_images` gives).
    The statistics are Python floats: no host-to-device copy, no synchronisation."""
    out = torch.zeros((len(images), 3, *padded), dtype=torch.float32, device=images[0].device)
    for k, image in enumerate(images):
        h, w = image.shape[1:]
        for c in range(3):
            out[k, c, :h, :w].copy_(image[c]).sub_(mean[c]).div_(std[c])
    return out


@dataclass(frozen=True)
class TrainBatch:
    """A training batch. images: per image (3, h, w) uint8 RGB; padded_shape: (H, W), the common
    multiple of the size divisor the model's batch is padded to; image_shapes / scale_factors /
    original_shapes as in `ImageBatch`; ground_truth: the model's `Targets` except that masks may
    be `MaskCrops`; image_ids; ignore_boxes: per image (K, 4) crowd boxes; mean / std: the
    normalisation. `inputs` (the model's ImageBatch) and `targets` (dense masks) are built on the
    batch's device when first read."""
    images: list[Tensor]
    padded_shape: tuple[int, int]
    image_shapes: list[tuple[int, int]]
    scale_factors: list[tuple[float, float]]
    original_shapes: list[tuple[int, int]]
    ground_truth: Targets
    image_ids: list[int]
    ignore_boxes: list[Tensor]
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @cached_property
    def inputs(self) -> ImageBatch:
        images = self.images
        if isinstance(images[0], EncodedImage):  # the GPU-side path: decode the batch on its device
            images = decode_batch(images)
        return ImageBatch(normalize_into_batch(images, self.padded_shape, self.mean, self.std),
                          self.image_shapes, self.scale_factors, self.original_shapes)

    @cached_property
    def targets(self) -> Targets:
        t = self.ground_truth
        return Targets(t.boxes, t.labels, [m.dense() if isinstance(m, MaskCrops) else m for m in t.masks],
                       t.semantic)

    def __iter__(self) -> Iterator:
        return iter((self.inputs, self.targets))

    def _map(self, fn, image_fn=None) -> "TrainBatch":
        t = self.ground_truth
        targets = Targets([fn(b) for b in t.boxes], [fn(x) for x in t.labels],
                          [m.to_device(fn) if isinstance(m, MaskCrops) else fn(m) for m in t.masks],
                          None if t.semantic is None else fn(t.semantic))
        return TrainBatch([(image_fn or fn)(x) for x in self.images], self.padded_shape, self.image_shapes,
                          self.scale_factors, self.original_shapes, targets, self.image_ids,
                          [fn(b) for b in self.ignore_boxes], self.mean, self.std)

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainBatch":
        return self._map(_pin, lambda x: x.pin_memory() if isinstance(x, EncodedImage) else _pin(x))


@dataclass(frozen=True)
class TestBatch:
    """inputs for the model and the COCO image ids of its images (for evaluation)."""
    __test__ = False  # not a pytest class
    inputs: ImageBatch
    image_ids: list[int]

    def __iter__(self) -> Iterator:
        return iter((self.inputs, self.image_ids))

    def to(self, device, non_blocking: bool = False) -> "TestBatch":
        i = self.inputs
        return TestBatch(ImageBatch(i.images.to(device, non_blocking=non_blocking), i.image_shapes,
                                    i.scale_factors, i.original_shapes), self.image_ids)

    def pin_memory(self) -> "TestBatch":
        i = self.inputs
        return TestBatch(ImageBatch(_pin(i.images), i.image_shapes, i.scale_factors, i.original_shapes),
                         self.image_ids)


def padded_size(shapes: Sequence[tuple[int, int]], size_divisor: int) -> tuple[int, int]:
    ph = -(-max(s[0] for s in shapes) // size_divisor) * size_divisor
    pw = -(-max(s[1] for s in shapes) // size_divisor) * size_divisor
    return ph, pw


def batch_images(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> ImageBatch:
    """Normalise each uint8 image and zero-pad all to a common multiple of `size_divisor` (on the
    images' device; `EncodedImage`s are decoded first, on theirs)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    shapes = [s.image_shape for s in samples]
    images = [s.image for s in samples]
    if isinstance(images[0], EncodedImage):
        images = decode_batch(images)
    return ImageBatch(normalize_into_batch(images, padded_size(shapes, size_divisor), mean, std), shapes,
                      [tuple(s.scale_factor) for s in samples], [tuple(s.original_shape) for s in samples])


def collate_train(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> TrainBatch:
    """Samples with masks -> TrainBatch. Semantic maps (all or none of the samples have one, all
    sampled every s = `Sample.semantic_stride` pixels) are padded with 255 to the image batch's
    padded size divided by s (s divides `size_divisor`), as int64: (N, H / s, W / s)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    shapes = [s.image_shape for s in samples]
    ph, pw = padded_size(shapes, size_divisor)
    for s in samples:
        if s.masks is None:
            raise ValueError(f"image {s.image_id} has no instance masks (dataset built with test_mode=True?)")
    has_sem = [s.semantic is not None for s in samples]
    if any(has_sem) and not all(has_sem):
        raise ValueError("some samples of the batch have a semantic map and some do not")
    semantic = None
    if all(has_sem):
        strides = {s.semantic_stride for s in samples}
        stride = strides.pop()
        if strides or size_divisor % stride:
            raise ValueError(f"semantic maps sampled every {sorted(strides | {stride})} pixels cannot be "
                             f"padded to a multiple of size_divisor={size_divisor}")
        semantic = torch.full((len(samples), ph // stride, pw // stride), IGNORE_INDEX, dtype=torch.int64)
        for k, s in enumerate(samples):
            h, w = s.semantic.shape
            semantic[k, :h, :w] = s.semantic
    targets = Targets([s.boxes for s in samples], [s.labels for s in samples],
                      [s.masks for s in samples], semantic)
    return TrainBatch([s.image for s in samples], (ph, pw), shapes, [tuple(s.scale_factor) for s in samples],
                      [tuple(s.original_shape) for s in samples], targets, [s.image_id for s in samples],
                      [s.ignore_boxes for s in samples], tuple(mean), tuple(std))


def collate_test(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> TestBatch:
    return TestBatch(batch_images(samples, mean, std, size_divisor), [s.image_id for s in samples])
