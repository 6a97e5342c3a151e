"""Batching: a list of transformed `Sample`s -> the model's `ImageBatch` (+ `Targets`).

What this module owns: normalisation ((x - mean) / std on uint8 RGB), zero padding of images and
255 padding of semantic maps bottom/right to a common multiple of `size_divisor`. Instance masks
stay unpadded at each image's resized size (`Targets` requires it). Batches are small dataclasses
with `pin_memory()` (called by the DataLoader's pin thread) and `to(device)`; they unpack like the
pair they carry: `inputs, targets = batch`.
"""
from dataclasses import dataclass
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import Tensor

from htc_fast.data.coco import Sample
from htc_fast.data.semantic import IGNORE_INDEX
from htc_fast.model.inputs import ImageBatch, Targets
from htc_fast.preprocess import MEAN, STD


def _pin(t: Tensor) -> Tensor:
    return t.pin_memory() if torch.cuda.is_available() else t


@dataclass(frozen=True)
class TrainBatch:
    """inputs, targets for the model; image_ids; ignore_boxes: per image (K, 4) crowd boxes."""
    inputs: ImageBatch
    targets: Targets
    image_ids: List[int]
    ignore_boxes: List[Tensor]

    def __iter__(self) -> Iterator:
        return iter((self.inputs, self.targets))

    def to(self, device, non_blocking: bool = False) -> "TrainBatch":
        t = self.targets
        mv = lambda x: x.to(device, non_blocking=non_blocking)  # noqa: E731
        inputs = ImageBatch(mv(self.inputs.images), self.inputs.image_shapes, self.inputs.scale_factors,
                            self.inputs.original_shapes)
        targets = Targets([mv(b) for b in t.boxes], [mv(x) for x in t.labels], [mv(m) for m in t.masks],
                          None if t.semantic is None else mv(t.semantic))
        return TrainBatch(inputs, targets, self.image_ids, [mv(b) for b in self.ignore_boxes])

    def pin_memory(self) -> "TrainBatch":
        t, i = self.targets, self.inputs
        return TrainBatch(ImageBatch(_pin(i.images), i.image_shapes, i.scale_factors, i.original_shapes),
                          Targets([_pin(b) for b in t.boxes], [_pin(x) for x in t.labels],
                                  [_pin(m) for m in t.masks], None if t.semantic is None else _pin(t.semantic)),
                          self.image_ids, [_pin(b) for b in self.ignore_boxes])


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


def collate_train(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> TrainBatch:
    """Samples with masks -> TrainBatch. Semantic maps (all or none of the samples have one, all
    sampled every s = `Sample.semantic_stride` pixels) are padded with 255 to the image batch's
    padded size divided by s (s divides `size_divisor`), as int64: (N, H / s, W / s)."""
    inputs = batch_images(samples, mean, std, size_divisor)
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
        ph, pw = inputs.images.shape[2:]
        semantic = torch.full((len(samples), ph // stride, pw // stride), IGNORE_INDEX, dtype=torch.int64)
        for k, s in enumerate(samples):
            h, w = s.semantic.shape
            semantic[k, :h, :w] = s.semantic
    targets = Targets([s.boxes for s in samples], [s.labels for s in samples],
                      [s.masks for s in samples], semantic)
    return TrainBatch(inputs, targets, [s.image_id for s in samples], [s.ignore_boxes for s in samples])


def collate_test(samples: Sequence[Sample], mean=MEAN, std=STD, size_divisor: int = 32) -> TestBatch:
    return TestBatch(batch_images(samples, mean, std, size_divisor), [s.image_id for s in samples])
