"""Training checkpoints: everything needed to resume exactly, written atomically, the last N kept.

A checkpoint is `work_dir/iter_NNNNNNN.pth` (the model in htc_fast's format, loadable by
`load_checkpoint`, plus optimizer, GradScaler, progress, RNG states and the config) and
`work_dir/latest.txt` names the one `--resume` uses. Both are written to a temporary file and
renamed, so a crash or a full disk mid-write never leaves a truncated checkpoint or a pointer to
one: the previous checkpoint and pointer stay as they were and `CheckpointWriteError` names the
path that could not be written.
"""
import os
import pickle
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from htc_fast.model.checkpoint import save_checkpoint

POINTER = "latest.txt"
_ITER_NAME = re.compile(r"iter_(\d+)\.pth")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (e.g. the disk is full); the message names the path."""


@dataclass
class Progress:
    """Where training is: `iteration` steps done in total, `epoch` the current epoch, `step` the
    steps done within it (a resumed run skips that many batches of the epoch's fixed order)."""
    iteration: int = 0
    epoch: int = 0
    step: int = 0

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0


def rng_state() -> dict:
    """Every generator the run draws from, as tensors and plain Python values (so that the
    checkpoint loads with torch.load(weights_only=True), e.g. through load_checkpoint)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _replace_atomically(tmp: Path, path: Path, write) -> None:
    """write(tmp), then rename tmp over path; on any failure tmp is removed and path untouched."""
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checkpoint(work_dir: Path, model, optimizer, progress: Progress, config_name: str, overrides,
                     scaler=None, name: Optional[str] = None) -> Path:
    """Atomically writes work_dir/<name or iter_N.pth> and then points work_dir/latest.txt at it.
    On an OSError (full disk, permissions) raises CheckpointWriteError naming the path; the
    previous checkpoint and latest.txt are left as they were."""
    work_dir = Path(work_dir)
    path = work_dir / (name or f"iter_{progress.iteration:07d}.pth")

    def save(tmp):
        save_checkpoint(tmp, model, optimizer=optimizer.state_dict(), progress=vars(progress).copy(),
                        rng=rng_state(), config=config_name, overrides=list(overrides),
                        scaler=None if scaler is None else scaler.state_dict())

    previous = latest_checkpoint(work_dir)
    try:
        _replace_atomically(path.with_name(path.name + ".tmp"), path, save)
        pointer = work_dir / POINTER
        _replace_atomically(pointer.with_name(POINTER + ".tmp"), pointer, lambda tmp: tmp.write_text(path.name))
    except OSError as exc:
        raise CheckpointWriteError(
            f"could not write the checkpoint {path}: {exc}; the run stops. The previous checkpoint "
            f"({previous or 'none'}) and {work_dir / POINTER} are unchanged") from exc
    return path


def latest_checkpoint(work_dir: Path) -> Optional[Path]:
    """The checkpoint latest.txt names (the one --resume uses), or None."""
    pointer = Path(work_dir) / POINTER
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if path.is_file() else None


def iteration_checkpoints(work_dir: Path) -> list[Path]:
    """work_dir's iter_N.pth files, oldest (smallest N) first."""
    found = [(int(m.group(1)), p) for p in Path(work_dir).iterdir() if (m := _ITER_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(work_dir: Path, keep: int, protect: Sequence[Path] = ()) -> list[Path]:
    """Deletes all but the newest `keep` iter_N.pth files of work_dir, never the one latest.txt
    names nor those in `protect`. keep <= 0 keeps everything. Returns the deleted paths."""
    if keep <= 0:
        return []
    spared = {p.resolve() for p in protect}
    latest = latest_checkpoint(work_dir)
    if latest is not None:
        spared.add(latest.resolve())
    deleted = []
    for path in iteration_checkpoints(work_dir)[:-keep]:
        if path.resolve() not in spared:
            path.unlink(missing_ok=True)
            deleted.append(path)
    return deleted


def read_resume_state(path: Path) -> dict:
    """The resume state of a training checkpoint; ValueError naming the file if it is unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # torch's own message for a corrupt file suggests weights_only=False, which would not help.
        why = "empty file" if Path(path).stat().st_size == 0 else \
            "truncated or corrupt" if isinstance(exc, (EOFError, pickle.UnpicklingError, RuntimeError)) else str(exc)
        older = [p.name for p in iteration_checkpoints(Path(path).parent) if p.name != Path(path).name]
        raise ValueError(f"cannot read the training checkpoint {path} ({why}); "
                         f"to resume from an older one, write its name into {Path(path).parent / POINTER}"
                         + (f" (there: {', '.join(older)})" if older else "")) from exc
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a training checkpoint of htc_fast (a {type(state).__name__})")
    for key in ("model", "optimizer", "progress", "rng"):
        if key not in state:
            raise ValueError(f"{path} is not a training checkpoint of htc_fast (no '{key}'); "
                             "use --load-from to start from weights only")
    return state


class Checkpoints:
    """The run's checkpoints: `write` saves one (main process only) and keeps the last `keep`.

    `last` is the newest checkpoint this run wrote or resumed from (named when the run stops)."""

    def __init__(self, work_dir: Path, config_name: str, overrides: Sequence[str], keep: int = 3,
                 last: Optional[Path] = None):
        if keep < 0:
            raise ValueError(f"keep_checkpoints must be >= 0 (0 keeps all), got {keep}")
        self.work_dir, self.config_name, self.overrides = Path(work_dir), config_name, list(overrides)
        self.keep, self.last = keep, last

    def write(self, model, optimizer, progress: Progress, scaler=None) -> Path:
        self.last = write_checkpoint(self.work_dir, model, optimizer, progress, self.config_name, self.overrides,
                                     scaler)
        prune_checkpoints(self.work_dir, self.keep, protect=[self.last])
        return self.last
