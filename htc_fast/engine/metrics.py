"""What the loop logs: the loss values accumulated on the device between two log lines, the
non-finite check, timing (data time vs iteration time), and the log's outputs (stdout,
work_dir/metrics.jsonl, optionally TensorBoard).

Between two log lines nothing here reads a device value: `LossWindow.add` adds the iteration's
values to a device tensor. A NaN or inf in any loss makes that running sum non-finite, so one
read at the log line (or before a checkpoint) tells whether some iteration of the window went
bad; `TrainingDiverged` then names the window and the last good checkpoint. With several
processes the window's sums are all-reduced at the log line only, in one collective.
"""
import json
import math
import time
from pathlib import Path
from typing import Optional

import torch

from htc_fast.engine.distributed import Dist, all_reduce


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class LossWindow:
    """Loss values summed on the device since the last log line, and the host-side timing.

    `add(values)` per iteration (no sync); `read(d)` at a log line: the window's means, averaged over
    ranks (one collective, one device-to-host copy), then a new window starts. `check_finite(d)`
    before a checkpoint: one collective and one read of a flag."""

    def __init__(self, device: torch.device, first_iteration: int = 0):
        self.device = device
        self.names: list[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.count = 0
        self.checked_until = first_iteration  # iterations <= this are known finite
        self.data_time = 0.0
        # Wall clock of the window's iterations only: paused outside the epochs (evaluation, the
        # epoch-end checkpoint), like mmdetection's per-iteration timer.
        self.start_time = self.paused_at = time.perf_counter()

    def pause(self) -> None:
        self.paused_at = time.perf_counter()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.start_time += time.perf_counter() - self.paused_at
            self.paused_at = None

    def add(self, values: dict[str, torch.Tensor]) -> None:
        """Adds one iteration's values ({name: 0-dim tensor}); two device ops, no sync."""
        with torch.no_grad():
            stacked = torch.stack([v.float() for v in values.values()])
            if self.sums is None:
                self.names, self.sums = list(values), torch.zeros_like(stacked)
            self.sums.add_(stacked)
        self.count += 1

    def _loss_sum(self) -> torch.Tensor:
        return self.sums[[i for i, k in enumerate(self.names) if "loss" in k]].sum()

    def check_finite(self, d: Dist, iteration: int, last_checkpoint) -> None:
        """Raises TrainingDiverged if some iteration since the last check had a non-finite loss (on
        any rank). A sync: called at log lines and before checkpoints only."""
        if self.sums is None:
            return
        bad = all_reduce((~torch.isfinite(self._loss_sum())).to(torch.int32), d, torch.distributed.ReduceOp.MAX)
        if bool(bad):
            self._diverged(iteration, last_checkpoint)
        self.checked_until = iteration

    def read(self, d: Dist, iteration: int, last_checkpoint) -> dict[str, float]:
        """The window's mean values (over iterations and ranks) plus `time` (seconds per
        iteration, wall clock: the read waits for the device) and `data_time` (seconds per
        iteration waiting for the loader); starts the next window. One collective and one
        device-to-host copy; raises TrainingDiverged like check_finite."""
        n = max(self.count, 1)
        means = {}
        if self.sums is not None:
            values = all_reduce(self.sums.clone(), d).tolist()
            if not math.isfinite(sum(v for k, v in zip(self.names, values) if "loss" in k)):
                self._diverged(iteration, last_checkpoint)
            means = {k: v / (n * d.world_size) for k, v in zip(self.names, values)}
            self.sums.zero_()
        self.checked_until = iteration
        now = time.perf_counter()
        means.update(time=(now - self.start_time) / n, data_time=self.data_time / n)
        self.count, self.data_time, self.start_time = 0, 0.0, now
        if self.paused_at is not None:
            self.paused_at = now
        return means

    def _diverged(self, iteration: int, last_checkpoint):
        raise TrainingDiverged(
            f"the loss became NaN or infinite between iterations {self.checked_until + 1} and {iteration}; "
            f"last good checkpoint: {last_checkpoint or 'none written yet'}")


class MetricLog:
    """Progress lines on stdout and one JSON line per log line in work_dir/metrics.jsonl (appended,
    so a resumed run continues the file); TensorBoard scalars when asked (main process only)."""

    def __init__(self, work_dir: Path, total_iters: int, images_per_iter: int, tensorboard: bool = False):
        self.path = Path(work_dir) / "metrics.jsonl"
        self.total, self.images_per_iter = total_iters, images_per_iter
        self.seconds, self.iterations = 0.0, 0  # for the ETA
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(work_dir) / "tensorboard"))
            except ImportError as exc:
                print(f"tensorboard logging is off: {exc}")

    def log(self, iteration: int, epoch: int, means: dict[str, float], lr: float, device: torch.device,
            window: int) -> None:
        """One progress line for the `window` iterations ending at `iteration` (mmdetection's
        fields: time and data_time in seconds per iteration)."""
        self.seconds += means["time"] * window
        self.iterations += window
        eta = (self.total - iteration) * self.seconds / max(self.iterations, 1)
        rate = self.images_per_iter / max(means["time"], 1e-9)
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else 0.0
        losses = {k: v for k, v in means.items() if "loss" in k}
        total = sum(losses.values())
        shown = " ".join(f"{k}={v:.4f}" for k, v in losses.items() if not k.startswith("s1"))
        print(f"[epoch {epoch} iter {iteration}/{self.total}] loss={total:.4f} {shown} lr={lr:.5f} "
              f"time={means['time']:.3f} data_time={means['data_time']:.3f} {rate:.2f} img/s eta {_hms(eta)}"
              + (f" mem {mem:.0f}MB" if mem else ""), flush=True)
        record = dict(iteration=iteration, epoch=epoch, lr=lr, loss=total, images_per_s=rate, time_stamp=time.time(),
                      **means)
        self._append(record)
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("iteration", "time_stamp"):
                    self.writer.add_scalar(k, v, iteration)

    def log_eval(self, iteration: int, epoch: int, metrics: dict[str, float]) -> None:
        self._append(dict(iteration=iteration, epoch=epoch, **metrics))

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
