"""Samplers, DataLoader builders, and builders of COCO datasets in mmdetection's folder layout.

What this module owns: which images go into which batch on which rank. Training batches are
aspect-ratio pure (all w >= h or all w < h, like mmdetection's GroupSampler /
AspectRatioBatchSampler: less padding) and distributed: every epoch, each group is shuffled with
a generator seeded by `seed + epoch` (identical on all ranks), padded by repeating its own images
to a multiple of `batch_size * world_size`, cut into global batches, and the global batches are
shuffled; rank r takes slice [r * batch_size, (r + 1) * batch_size) of each. Within an epoch the
ranks' images are disjoint apart from that padding, and all ranks run the same number of steps.
Keys are `(index, seed, epoch)` so the dataset's random transform is reproducible whatever the
number of workers (see `CocoDetection.__getitem__`). Call `loader.batch_sampler.set_epoch(epoch)`
before each epoch.
Evaluation: `InferenceSampler` gives rank r a contiguous shard, no padding, no duplicates.

Folder layout (mmdetection's): `root/annotations/instances_{train,val}2017.json`,
`root/{train,val}2017/*.jpg`, `root/stuffthingmaps/train2017/*.png` (COCO-stuff, for the semantic
branch).
"""
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from torch.utils.data import DataLoader, Sampler

from htc_fast.config import DataConfig, HTCConfig
from htc_fast.data.coco import CocoDetection
from htc_fast.data.collate import collate_test, collate_train
from htc_fast.data.transforms import TestTransform, TrainTransform


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


class GroupedBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Aspect-ratio-grouped, distributed, epoch-seeded batches of `(index, seed, epoch)` keys.

    Args:
        group_flags: group id of each dataset index (`CocoDetection.group_flags`).
        batch_size: images per rank per step.
        rank, world_size: this process's place (1 process: 0, 1).
        seed: same on all ranks; the epoch is added to it.
        shuffle: False keeps each group in index order (still grouped, padded and sharded).
    """

    def __init__(self, group_flags: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True):
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(group_flags) == 0:
            raise ValueError("GroupedBatchSampler needs a non-empty dataset")
        self.flags = torch.as_tensor(list(group_flags), dtype=torch.int64)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _global_batches(self) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        span = self.batch_size * self.world_size
        batches = []
        for group in torch.unique(self.flags).tolist():
            idx = torch.nonzero(self.flags == group).flatten()
            if self.shuffle:
                idx = idx[torch.randperm(len(idx), generator=g)]
            pad = -len(idx) % span
            if pad:
                idx = torch.cat([idx, idx.repeat(pad // len(idx) + 1)[:pad]])
            batches.extend(idx.split(span))
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        lo = self.rank * self.batch_size
        for batch in self._global_batches():
            yield [(i, self.seed, self.epoch) for i in batch[lo:lo + self.batch_size].tolist()]

    def __len__(self) -> int:
        span = self.batch_size * self.world_size
        return sum(-(-int((self.flags == g).sum()) // span) for g in torch.unique(self.flags).tolist())


class InferenceSampler(Sampler[int]):
    """Rank r's contiguous shard of range(size): shards differ by at most one image."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        _check_rank(rank, world_size)
        per, extra = divmod(size, world_size)
        start = rank * per + min(rank, extra)
        self.indices = range(start, start + per + (rank < extra))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _data_cfg(cfg: Union[DataConfig, HTCConfig]) -> DataConfig:
    return cfg.data if isinstance(cfg, HTCConfig) else cfg


def build_train_loader(dataset, cfg: Union[DataConfig, HTCConfig], batch_size: int, rank: int = 0,
                       world_size: int = 1, seed: int = 0, workers: Optional[int] = None,
                       pin_memory: bool = True) -> DataLoader:
    """DataLoader of `TrainBatch`es over a training `CocoDetection` (built with
    `transform=TrainTransform(cfg)`): grouped distributed batches, `workers` processes
    (default `cfg.workers_per_gpu`), pinned memory when CUDA is available."""
    data = _data_cfg(cfg)
    workers = data.workers_per_gpu if workers is None else workers
    sampler = GroupedBatchSampler(dataset.group_flags, batch_size, rank, world_size, seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                      collate_fn=partial(collate_train, mean=data.mean, std=data.std,
                                         size_divisor=data.pad_size_divisor),
                      pin_memory=pin_memory and torch.cuda.is_available())


def build_test_loader(dataset, cfg: Union[DataConfig, HTCConfig], batch_size: int = 1, rank: int = 0,
                      world_size: int = 1, workers: Optional[int] = None, pin_memory: bool = True) -> DataLoader:
    """DataLoader of `TestBatch`es (inputs + image ids) over a `CocoDetection` built with
    `test_mode=True, transform=TestTransform(cfg)`: rank r's contiguous shard, in order."""
    data = _data_cfg(cfg)
    workers = data.workers_per_gpu if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, sampler=InferenceSampler(len(dataset), rank, world_size),
                      num_workers=workers, collate_fn=partial(collate_test, mean=data.mean, std=data.std,
                                                              size_divisor=data.pad_size_divisor),
                      pin_memory=pin_memory and torch.cuda.is_available())


def coco_train_dataset(root: Union[str, Path], cfg: HTCConfig, split: str = "train2017",
                       semantic: Optional[Literal["stuff_maps", "from_instances", "off"]] = None,
                       skip_bad: bool = True, data_device=None) -> CocoDetection:
    """The training set under `root` with `TrainTransform(cfg.data)`.

    `semantic` None: "off" when `cfg.data.with_semantic` is False, else "stuff_maps" from
    `root/stuffthingmaps/<split>`; if that folder is missing, a FileNotFoundError says so (pass
    semantic="from_instances" to train the semantic branch on instance-derived maps instead, or
    "off"). Derived maps use COCO-stuff ids (category id - 1) when the semantic head has >= 182
    classes, else the contiguous labels. `data_device` ("cuda"): the workers only read the image
    files and parse annotations; each batch decodes, resizes, flips, normalises and pads its images
    on that device when its `inputs` are read (see `CocoDetection`)."""
    root = Path(root)
    stuff_dir = root / "stuffthingmaps" / split
    if semantic is None:
        semantic = "off" if not cfg.data.with_semantic else "stuff_maps"
        if semantic == "stuff_maps" and not stuff_dir.is_dir():
            raise FileNotFoundError(
                f"{cfg.name} trains a semantic head but {stuff_dir} does not exist: get COCO-stuff's "
                "stuffthingmaps_trainval2017.zip, or pass semantic='from_instances' (thing pixels from "
                "the instance masks, the rest ignored) or semantic='off'")
    thing_ids = "stuff_id" if cfg.model.semantic.num_classes >= 182 else "label"
    return CocoDetection(root / "annotations" / f"instances_{split}.json", root / split,
                         transform=TrainTransform(cfg.data), stuff_dir=stuff_dir if semantic == "stuff_maps" else None,
                         semantic=semantic, thing_ids=thing_ids, skip_bad=skip_bad,
                         semantic_stride=cfg.model.semantic.stride, data_device=data_device)


def coco_test_dataset(root: Union[str, Path], cfg: Union[DataConfig, HTCConfig],
                      split: str = "val2017") -> CocoDetection:
    """Every image of `split` under `root` with `TestTransform` (no masks decoded)."""
    root = Path(root)
    return CocoDetection(root / "annotations" / f"instances_{split}.json", root / split, test_mode=True,
                         transform=TestTransform(_data_cfg(cfg)))
