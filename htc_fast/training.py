"""The plain helpers of the training loop (htc_fast/train.py): learning-rate schedule, atomic
checkpoints with everything needed to resume, process-group setup, metric logging.

Nothing here owns the loop itself; train.py calls these by name.
"""
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from htc_fast.config import TrainConfig
from htc_fast.model.checkpoint import save_checkpoint


# ----------------------------------------------------------------------------- schedule

def lr_factor(iteration: int, epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr: linear warm-up from cfg.warmup_ratio over cfg.warmup_iters
    iterations (mmdetection's LinearLR by iteration), times lr_gamma for every step epoch already
    reached (MultiStepLR by epoch: at epoch 8 of the 1x schedule the lr drops once)."""
    warm = 1.0
    if iteration < cfg.warmup_iters:
        warm = cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * iteration / cfg.warmup_iters
    return warm * cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every trainable parameter (mmdetection's HTC)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


# ----------------------------------------------------------------------------- checkpoints

@dataclass
class Progress:
    """Where training is: `iteration` steps done in total, `epoch` the current epoch, `step` the
    steps done within it (a resumed run skips that many batches of the epoch's fixed order)."""
    iteration: int = 0
    epoch: int = 0
    step: int = 0


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


def write_checkpoint(work_dir: Path, model, optimizer, progress: Progress, config_name: str, overrides,
                     scaler=None, name: Optional[str] = None) -> Path:
    """Atomically writes work_dir/<name or iter_N.pth> (temp file + rename, so a crash mid-write
    never leaves a truncated checkpoint) and points work_dir/latest.txt at it. Holds the model in
    htc_fast's format (loadable by `load_checkpoint`), the optimizer, progress, RNG states and the
    config it was trained with."""
    path = work_dir / (name or f"iter_{progress.iteration:07d}.pth")
    tmp = path.with_name(path.name + ".tmp")
    save_checkpoint(tmp, model, optimizer=optimizer.state_dict(), progress=vars(progress).copy(),
                    rng=rng_state(), config=config_name, overrides=list(overrides),
                    scaler=None if scaler is None else scaler.state_dict())
    os.replace(tmp, path)
    pointer = work_dir / "latest.txt"
    pointer_tmp = work_dir / "latest.txt.tmp"
    pointer_tmp.write_text(path.name)
    os.replace(pointer_tmp, pointer)
    return path


def latest_checkpoint(work_dir: Path) -> Optional[Path]:
    pointer = work_dir / "latest.txt"
    if not pointer.is_file():
        return None
    path = work_dir / pointer.read_text().strip()
    return path if path.is_file() else None


def read_resume_state(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "progress", "rng"):
        if key not in state:
            raise ValueError(f"{path} is not a training checkpoint of htc_fast (no '{key}'); "
                             "use --load-from to start from weights only")
    return state


# ----------------------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: Optional[str] = None) -> Dist:
    """One process, or one of WORLD_SIZE started by torchrun: NCCL on GPUs (one per local rank),
    gloo on CPU."""
    want = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, want)
    if not dist.is_initialized():
        if want.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            want = torch.device("cuda", local)
        dist.init_process_group("nccl" if want.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), want)


def reduce_mean(values: Dict[str, float], d: Dist) -> Dict[str, float]:
    """Losses averaged over the ranks (for logging only)."""
    if d.world_size == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return {k: v / d.world_size for k, v in zip(values, t.tolist())}


# ----------------------------------------------------------------------------- logging

class MetricLog:
    """Progress lines on stdout every `interval` iterations and one JSON line per logged
    iteration in work_dir/metrics.jsonl (appended, so a resumed run continues the file)."""

    def __init__(self, work_dir: Path, interval: int, total_iters: int, images_per_iter: int, tensorboard=False):
        self.path = work_dir / "metrics.jsonl"
        self.interval, self.total, self.images_per_iter = interval, total_iters, images_per_iter
        self.start, self.start_iter = time.time(), None
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(work_dir / "tensorboard"))
            except ImportError as exc:
                print(f"tensorboard logging is off: {exc}")

    def maybe_log(self, progress: Progress, losses: Dict[str, float], lr: float, device) -> None:
        if self.start_iter is None:
            self.start_iter, self.start = progress.iteration - 1, time.time()
        if progress.iteration % self.interval and progress.iteration != self.total:
            return
        done = progress.iteration - self.start_iter
        elapsed = max(time.time() - self.start, 1e-9)
        rate = done * self.images_per_iter / elapsed
        eta = (self.total - progress.iteration) * elapsed / max(done, 1)
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0.0
        total = sum(v for k, v in losses.items() if "loss" in k)
        shown = " ".join(f"{k}={v:.4f}" for k, v in losses.items() if "loss" in k and not k.startswith("s1"))
        print(f"[epoch {progress.epoch} iter {progress.iteration}/{self.total}] loss={total:.4f} {shown} "
              f"lr={lr:.5f} {rate:.2f} img/s eta {_hms(eta)}" + (f" mem {mem:.0f}MB" if mem else ""), flush=True)
        record = dict(iteration=progress.iteration, epoch=progress.epoch, lr=lr, loss=total, images_per_s=rate,
                      time=time.time(), **losses)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("iteration", "time"):
                    self.writer.add_scalar(k, v, progress.iteration)

    def log_eval(self, progress: Progress, metrics: Dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(dict(iteration=progress.iteration, epoch=progress.epoch, **metrics)) + "\n")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
