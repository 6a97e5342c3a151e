"""Batches for inference: prepared uint8 images -> one batch (padded and normalised into the
model's ``ImageBatch`` on the device), and the DataLoader that builds them in worker processes
while the model runs on the previous batch.

Padding is mmdetection's: every image of a batch is zero-padded bottom/right to the batch's
largest size, rounded up to a multiple of 32. An image therefore sees a different amount of padding
in a batch than alone, which changes the features near its bottom/right border slightly (see
tests/inference/test_batched.py for how much).
"""
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import Optional, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from htc_fast.data.collate import normalize_into_batch, padded_size
from htc_fast.data.preprocess import MEAN, STD, ImageLike
from htc_fast.data.samplers import InferenceSampler
from htc_fast.inference.images import ImageFiles, PreparedImage, Unreadable
from htc_fast.model.inputs import ImageBatch


@dataclass(frozen=True)
class InferenceBatch:
    """pixels: per readable image its (3, h, w) uint8 RGB at the test scale; images: the readable
    images' records, in the same order (their own pixels dropped); unreadable: the others;
    padded_shape: (H, W), the batch's padded size (None when no image was readable); mean / std:
    the normalisation. ``inputs``, the model's ImageBatch, is padded and normalised where the
    pixels are when first read: after ``to("cuda")`` on the GPU, so workers do no float work and a
    quarter of the bytes move."""
    pixels: list[Tensor]
    images: list[PreparedImage]
    unreadable: list[Unreadable] = field(default_factory=list)
    padded_shape: Optional[tuple[int, int]] = None
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @cached_property
    def inputs(self) -> Optional[ImageBatch]:
        if not self.pixels:
            return None
        return ImageBatch(normalize_into_batch(self.pixels, self.padded_shape, self.mean, self.std),
                          [im.image_shape for im in self.images], [im.scale_factor for im in self.images],
                          [im.original_shape for im in self.images])

    def _with_pixels(self, pixels: list[Tensor]) -> "InferenceBatch":
        return replace(self, pixels=pixels)

    def to(self, device, non_blocking: bool = False) -> "InferenceBatch":
        return self._with_pixels([p.to(device, non_blocking=non_blocking) for p in self.pixels])

    def pin_memory(self) -> "InferenceBatch":
        """Called by the DataLoader's pin thread (CUDA only) so that ``to`` can copy asynchronously."""
        return self._with_pixels([p.pin_memory() for p in self.pixels])


def collate_images(items: Sequence[Union[PreparedImage, Unreadable]], mean=MEAN, std=STD,
                   size_divisor: int = 32) -> InferenceBatch:
    """Gather the readable items' pixels and the batch's padded size; set the unreadable ones aside."""
    readable = [x for x in items if isinstance(x, PreparedImage)]
    unreadable = [x for x in items if isinstance(x, Unreadable)]
    padded = padded_size([x.image_shape for x in readable], size_divisor) if readable else None
    return InferenceBatch([x.image for x in readable], [replace(x, image=None) for x in readable], unreadable,
                          padded, tuple(mean), tuple(std))


def build_inference_loader(items: Sequence[tuple[ImageLike, Hashable]], scale: tuple[int, int], *,
                           batch_size: int = 1, workers: int = 0, rank: int = 0, world_size: int = 1,
                           keep_original: bool = False, mean=MEAN, std=STD, size_divisor: int = 32) -> DataLoader:
    """DataLoader of InferenceBatches over ``items`` ((source, key) pairs, see ImageFiles), in order.

    Rank r of world_size reads its contiguous shard (htc_fast.data.InferenceSampler: no padding, no
    repeats). workers: decoding processes (0 decodes in this process); with workers, each keeps up
    to two batches decoded ahead. Memory is pinned when CUDA is available.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an integer >= 0, got {workers!r}")
    dataset = ImageFiles(items, scale, keep_original=keep_original)
    return DataLoader(dataset, batch_size=batch_size, sampler=InferenceSampler(len(dataset), rank, world_size),
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      collate_fn=partial(collate_images, mean=mean, std=std, size_divisor=size_divisor))
