"""Batching: a list of transformed `Sample`s -> the model's `ImageBatch` (+ `Targets`).

What this module owns: normalisation ((x - mean) / std on uint8 RGB), zero padding of images and
255 padding of semantic maps bottom/right to a common multiple of `size_divisor`. Instance masks
stay unpadded at each image's resized size (`Targets` requires it). Batches are small dataclasses
with `pin_memory()` (called by the DataLoader's pin thread) and `to(device)`; they unpack like the
pair they carry: `inputs, targets = batch`.

Training batches carry the images as zero-padded uint8 (`TrainBatch.pixels`) and normalise them
where they are when `inputs` is first read: after `batch.to("cuda")` that is on the GPU, as
mmdetection's data preprocessor does, so the workers do no float work and copy 4x fewer bytes.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from htc_fast.data.coco import Sample
from htc_fast.data.semantic import IGNORE_INDEX
from htc_fast.model.inputs import ImageBatch, Targets
from htc_fast.preprocess import MEAN, STD


def _pin(t: Tensor) -> Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


def normalize_padded(pixels: Tensor, image_shapes: Sequence[Tuple[int, int]], mean=MEAN, std=STD) -> Tensor:
    """(N, 3, H, W) uint8 zero-padded -> (N, 3, H, W) float32 on the same device: (x - mean) / std
    inside each image's (h, w), 0 in the padding (what `batch_images` gives). The statistics are
    Python floats: no host-to-device copy, no synchronisation."""
    out = torch.zeros(pixels.shape, dtype=torch.float32, device=pixels.device)
    for k, (h, w) in enumerate(image_shapes):
        for c in range(3):
            out[k, c, :h, :w].copy_(pixels[k, c, :h, :w]).sub_(mean[c]).div_(std[c])
    return out


@dataclass(frozen=True)
class TrainBatch:
    """A training batch. pixels: (N, 3, H, W) uint8 RGB zero-padded to a multiple of the size
    divisor; image_shapes / scale_factors / original_shapes as in `ImageBatch`; targets for the
    model; image_ids; ignore_boxes: per image (K, 4) crowd boxes; mean / std: the normalisation.
    `inputs` is the model's ImageBatch, normalised on the pixels' device when first read."""
    pixels: Tensor
    image_shapes: List[Tuple[int, int]]
    scale_factors: List[Tuple[float, float]]
    original_shapes: List[Tuple[int, int]]
    targets: Targets
    image_ids: List[int]
    ignore_boxes: List[Tensor]
    mean: Tuple[float, float, float] = MEAN
    std: Tuple[float, float, float] = STD

    @cached_property
    def inputs(self) -> ImageBatch:
        return ImageBatch(normalize_padded(self.pixels, self.image_shapes, self.mean, self.std), self.image_shapes,
                          self.scale_factors, self.original_shapes)

    def __iter__(self) -> Iterator:
        return iter((self.inputs, self.targets))

    def _map(self, fn) -> "TrainBatch":
        t = self.targets
        targets = Targets([fn(b) for b in t.boxes], [fn(x) for x in t.labels], [fn(m) for m in t.masks],
                          None if t.semantic is None else fn(t.semantic))
        return TrainBatch(fn(self.pixels), self.image_shapes, self.scale_factors, self.original_shapes, targets,
                          self.image_ids, [fn(b) for b in self.ignore_boxes], self.mean, self.std)

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        return self._map(lambda x: x.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainBatch":
        return self._map(_pin)


@dataclass(frozen=True)
class TestBatch:
    """inputs for the model and the COCO image ids of its images (for evaluation)."""
    __test__ = False  # not a pytest class
    inputs: ImageBatch
    image_ids: List[int]

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


def padded_size(shapes: Sequence[Tuple[int, int]], size_divisor: int) -> Tuple[int, int]:
    ph = -(-max(s[0] for s in shapes) // size_divisor) * size_divisor
    pw = -(-max(s[1] for s in shapes) // size_divisor) * size_divisor
    return ph, pw


def batch_images(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> ImageBatch:
    """Normalise each uint8 image and zero-pad all to a common multiple of `size_divisor`."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    shapes = [s.image_shape for s in samples]
    ph, pw = padded_size(shapes, size_divisor)
    images = torch.zeros(len(samples), 3, ph, pw)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    for k, s in enumerate(samples):
        h, w = s.image_shape
        region = images[k, :, :h, :w]  # in place: no float temporaries of the image
        region.copy_(s.image).sub_(m).div_(sd)
    return ImageBatch(images, shapes, [tuple(s.scale_factor) for s in samples],
                      [tuple(s.original_shape) for s in samples])


def pad_images(images: Sequence[Tensor], size_divisor: int = 32) -> Tensor:
    """(3, h_i, w_i) uint8 images -> (N, 3, H, W) uint8, zero-padded bottom/right to a common
    multiple of `size_divisor` (only the padding is zeroed: each pixel is written once). Channels-
    last memory, the layout of decoded and resized images (the copy moves whole rows)."""
    ph, pw = padded_size([tuple(x.shape[1:]) for x in images], size_divisor)
    out = torch.empty(len(images), 3, ph, pw, dtype=torch.uint8, memory_format=torch.channels_last)
    for k, image in enumerate(images):
        h, w = image.shape[1:]
        out[k, :, :h, :w] = image
        out[k, :, h:].zero_()
        out[k, :, :h, w:].zero_()
    return out


def collate_train(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> TrainBatch:
    """Samples with masks -> TrainBatch. Semantic maps (all or none of the samples have one, all
    sampled every s = `Sample.semantic_stride` pixels) are padded with 255 to the image batch's
    padded size divided by s (s divides `size_divisor`), as int64: (N, H / s, W / s)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    pixels = pad_images([s.image for s in samples], size_divisor)
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
        ph, pw = pixels.shape[2:]
        semantic = torch.full((len(samples), ph // stride, pw // stride), IGNORE_INDEX, dtype=torch.int64)
        for k, s in enumerate(samples):
            h, w = s.semantic.shape
            semantic[k, :h, :w] = s.semantic
    targets = Targets([s.boxes for s in samples], [s.labels for s in samples],
                      [s.masks for s in samples], semantic)
    return TrainBatch(pixels, [s.image_shape for s in samples], [tuple(s.scale_factor) for s in samples],
                      [tuple(s.original_shape) for s in samples], targets, [s.image_id for s in samples],
                      [s.ignore_boxes for s in samples], tuple(mean), tuple(std))


def collate_test(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> TestBatch:
    return TestBatch(batch_images(samples, mean, std, size_divisor), [s.image_id for s in samples])
