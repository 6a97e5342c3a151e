"""Batches for inference: prepared images -> one padded, normalised ``ImageBatch`` per batch, and
the DataLoader that builds them in worker processes while the model runs on the previous batch.

Padding is mmdetection's: every image of a batch is zero-padded bottom/right to the batch's
largest size, rounded up to a multiple of 32. An image therefore sees a different amount of padding
in a batch than alone, which changes the features near its bottom/right border slightly (see
tests/inference/test_batched.py for how much).
"""
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Union

import torch
from torch.utils.data import DataLoader

from htc_fast.data.collate import batch_images
from htc_fast.data.samplers import InferenceSampler
from htc_fast.inference.images import ImageFiles, PreparedImage, Unreadable
from htc_fast.model.inputs import ImageBatch
from htc_fast.preprocess import MEAN, STD, ImageLike


@dataclass(frozen=True)
class InferenceBatch:
    """inputs: the model's input for ``images`` (None when every image of the batch was unreadable);
    images: the readable ones, in order (inputs' image i is images[i]); unreadable: the others."""
    inputs: Optional[ImageBatch]
    images: list[PreparedImage]
    unreadable: list[Unreadable] = field(default_factory=list)

    def to(self, device, non_blocking: bool = False) -> "InferenceBatch":
        if self.inputs is None:
            return self
        i = self.inputs
        inputs = ImageBatch(i.images.to(device, non_blocking=non_blocking), i.image_shapes, i.scale_factors,
                            i.original_shapes)
        return InferenceBatch(inputs, self.images, self.unreadable)

    def pin_memory(self) -> "InferenceBatch":
        """Called by the DataLoader's pin thread (CUDA only) so that ``to`` can copy asynchronously."""
        if self.inputs is None:
            return self
        i = self.inputs
        return InferenceBatch(ImageBatch(i.images.pin_memory(), i.image_shapes, i.scale_factors, i.original_shapes),
                              self.images, self.unreadable)


def collate_images(items: Sequence[Union[PreparedImage, Unreadable]], mean=MEAN, std=STD,
                   size_divisor: int = 32) -> InferenceBatch:
    """Normalise and pad the readable items into one ImageBatch; set the unreadable ones aside."""
    images = [x for x in items if isinstance(x, PreparedImage)]
    unreadable = [x for x in items if isinstance(x, Unreadable)]
    inputs = batch_images(images, mean, std, size_divisor) if images else None
    return InferenceBatch(inputs, images, unreadable)


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
