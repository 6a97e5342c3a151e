"""Feeding the loop: the run's one DataLoader (persistent workers, prefetch, pinned memory on
CUDA), the batch sampler that resumes inside an epoch, and the images the dataset had to skip.

The loader is built once for the whole run so its worker processes live across epochs
(`persistent_workers`); the batch sampler lives in the main process, so `start_epoch` before each
`iter(loader)` selects the epoch and how many of its batches a resumed run already did.
"""
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from htc_fast.engine.distributed import Dist, cores_per_local_rank

# Each worker holds a copy of the dataset's annotation records (copy-on-write pages get copied as
# Python touches reference counts): hundreds of MB for COCO train, so more workers per rank than
# this costs memory for little speed (a worker decodes ~40-70 images/s; a GPU needs ~20-30).
MAX_AUTO_WORKERS = 8


def default_workers(config_workers: int) -> int:
    """Loader processes per rank when --workers is not given: 0 if the preset asks for in-process
    loading (htc_tiny: tiny synthetic images, where starting workers costs more than decoding),
    else every core this rank may use but one (the training process's own), at least 1, at most
    MAX_AUTO_WORKERS."""
    if config_workers == 0:
        return 0
    return min(max(cores_per_local_rank() - 1, 1), MAX_AUTO_WORKERS)


class EpochBatchSampler(Sampler[list]):
    """Wraps the dataset's grouped batch sampler: epoch `epoch`'s batches after the first `skip`,
    and a record of the dataset indices each yielded batch asked for (batches come back in order),
    from which `skipped` tells which images the dataset replaced by another of their group."""

    def __init__(self, batch_sampler):
        self.inner, self.skip = batch_sampler, 0
        self.requested: deque = deque()

    def start_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip
        self.requested.clear()

    def __iter__(self):
        for i, keys in enumerate(self.inner):
            if i >= self.skip:
                self.requested.append([k[0] if isinstance(k, tuple) else k for k in keys])
                yield keys

    def __len__(self) -> int:
        return max(len(self.inner) - self.skip, 0)

    def steps_per_epoch(self) -> int:
        return len(self.inner)


class SkippedImages:
    """Images that failed to load during the run, counted for the run's summary. The dataset
    (`skip_bad=True`) already warned naming the file, in whichever process decoded it, and
    delivered another image instead; each rank's main process sees every batch of its rank, so it
    counts there, and `summary` adds the ranks' counts up (one collective, at the end of the run)."""

    def __init__(self, dataset, sampler: EpochBatchSampler):
        self.dataset, self.sampler = dataset, sampler
        self.ids = dataset.image_ids
        self.files: dict = {}  # file name -> times skipped (this rank)

    def check(self, image_ids: list[int]) -> None:
        """Compares the batch the loader delivered with the one the sampler asked for."""
        if not self.sampler.requested:
            return
        asked = self.sampler.requested.popleft()
        for index, got in zip(asked, image_ids):
            if self.ids[index] != got:
                name = str(self.dataset.records[index].file_name)
                self.files[name] = self.files.get(name, 0) + 1

    @property
    def count(self) -> int:
        """Image loads skipped by this rank."""
        return sum(self.files.values())

    def over_ranks(self, d: Dist) -> dict:
        """File name -> times skipped, summed over the ranks. A collective (one all_gather of the
        small name -> count dicts): every rank must call it, at the same point of the run."""
        if d.world_size == 1:
            return dict(self.files)
        parts: list = [None] * d.world_size
        dist.all_gather_object(parts, self.files)
        total: dict = {}
        for part in parts:
            for name, times in part.items():
                total[name] = total.get(name, 0) + times
        return total

    def summary(self, d: Dist, max_names: int = 5) -> str:
        """For the run's last line: the loads skipped on all ranks and the files (`over_ranks`:
        a collective, every rank calls it; the main process prints the line)."""
        files = self.over_ranks(d)
        if not files:
            return "no unreadable images"
        names = sorted(files)
        shown = ", ".join(names[:max_names]) + (f" and {len(names) - max_names} more" if len(names) > max_names else "")
        return f"{sum(files.values())} unreadable image load(s) skipped ({len(names)} file(s): {shown})"


def build_run_loader(dataset, loader: DataLoader, workers: int, device: torch.device, seed: int,
                     prefetch_factor: Optional[int] = 2) -> DataLoader:
    """The run's DataLoader over `dataset` with `loader`'s batch sampler (wrapped in an
    EpochBatchSampler) and collate function.

    Its own generator: creating an iterator draws the workers' base seed from it, and must not draw
    from the global RNG, whose state the checkpoints carry (the RoI samplers draw from it), or a
    resumed run would diverge. The data itself does not depend on worker seeds (the dataset seeds
    its transform from (seed, epoch, index))."""
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if prefetch_factor is not None and prefetch_factor < 1:
        raise ValueError(f"prefetch_factor must be >= 1, got {prefetch_factor}")
    return DataLoader(dataset, batch_sampler=EpochBatchSampler(loader.batch_sampler), num_workers=workers,
                      collate_fn=loader.collate_fn, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=prefetch_factor if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))
