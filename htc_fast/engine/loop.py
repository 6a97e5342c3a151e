"""The training iteration and the epoch: data -> forward -> backward -> step, with the loop's
bookkeeping (loss window, log lines, periodic checkpoints) kept off the device's critical path.

Between two log lines the loop itself never waits for the device: the lr is a host float, the
losses go into `LossWindow` on the device, the optimizer is fused. Host syncs happen at log lines
(one read of the window, one collective with several processes) and before checkpoints (one
read of the non-finite flag). tests/engine/test_loop_syncs.py counts them.
"""
import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Optional

import torch

from htc_fast.config import TrainConfig
from htc_fast.engine.checkpoints import Checkpoints, Progress
from htc_fast.engine.distributed import Dist
from htc_fast.engine.feed import SkippedImages
from htc_fast.engine.metrics import LossWindow, MetricLog
from htc_fast.engine.optim import optimizer_step
from htc_fast.engine.schedule import lr_factor, set_lr


class TrainLoop:
    """Runs training iterations on `net` (the model, DDP-wrapped or compiled), updating `progress`.

    Args:
        net: called as net(inputs, targets) -> HTCLoss (anything with as_dict() and total()).
        model: the plain module whose state the checkpoints hold.
        cfg: the schedule (warm-up, lr steps); `base_lr` is the lr for the run's total batch.
        total_iters: stop after this many iterations in total.
        log: MetricLog on the main process, None elsewhere (the window is still read on every
            rank: the read is a collective).
        log_interval, ckpt_interval: a log line / a checkpoint every N iterations (0: no
            periodic checkpoints); a log line also at the last iteration.
        amp: autocast dtype or None; scaler: GradScaler for fp16; clip_grad: max gradient norm.
        skipped: counts the images the dataset could not read (optional).
    """

    def __init__(self, net, model, optimizer, cfg: TrainConfig, *, base_lr: float, total_iters: int, d: Dist,
                 progress: Progress, checkpoints: Checkpoints, log: Optional[MetricLog], log_interval: int = 20,
                 ckpt_interval: int = 0, amp: Optional[torch.dtype] = None,
                 scaler: Optional[torch.amp.GradScaler] = None, clip_grad: Optional[float] = None,
                 skipped: Optional[SkippedImages] = None):
        if log_interval < 1:
            raise ValueError(f"log_interval must be >= 1, got {log_interval}")
        if ckpt_interval < 0:
            raise ValueError(f"ckpt_interval must be >= 0, got {ckpt_interval}")
        self.net, self.model, self.optimizer, self.cfg = net, model, optimizer, cfg
        self.base_lr, self.total_iters, self.d, self.progress = base_lr, total_iters, d, progress
        self.checkpoints, self.log = checkpoints, log
        self.log_interval, self.ckpt_interval = log_interval, ckpt_interval
        self.amp, self.scaler, self.clip_grad, self.skipped = amp, scaler, clip_grad, skipped
        self.window = LossWindow(d.device, progress.iteration)
        self.lr = base_lr
        self.checkpointed_at: Optional[int] = None  # iteration of this run's last checkpoint

    @property
    def finished(self) -> bool:
        return self.progress.iteration >= self.total_iters or self.progress.epoch >= self.cfg.epochs

    def run_epoch(self, batches: Iterable, steps_per_epoch: int) -> bool:
        """Trains on `batches` (the rest of the current epoch) until they run out or total_iters is
        reached. Returns True when the epoch ran to its end (progress.step == steps_per_epoch)."""
        self.window.resume()
        try:
            for batch in self._timed(batches):
                if self.skipped is not None:
                    self.skipped.check(batch.image_ids)
                self.train_step(batch)
                if self.progress.iteration >= self.total_iters:
                    break
        finally:
            self.window.pause()
        return self.progress.step >= steps_per_epoch

    def _timed(self, batches: Iterable) -> Iterator:
        """The batches, adding the time spent waiting for each to the window's data_time."""
        it = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                return
            self.window.data_time += time.perf_counter() - start
            yield batch

    def train_step(self, batch) -> None:
        """One iteration on a TrainBatch: forward, backward, step, bookkeeping."""
        p = self.progress
        inputs, targets = batch.to(self.d.device, non_blocking=True)
        self.lr = self.base_lr * lr_factor(p.iteration, p.epoch, self.cfg)
        set_lr(self.optimizer, self.lr)
        autocast = torch.autocast(self.d.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext()
        with autocast:
            loss = self.net(inputs, targets)
        optimizer_step(loss.total(), self.optimizer, self.scaler, self.clip_grad)
        self.after_step(loss.as_dict())

    def after_step(self, values) -> None:
        """The bookkeeping of one iteration: values into the window, a log line and a checkpoint
        when due (the only places that read from the device)."""
        p = self.progress
        self.window.add(values)
        p.iteration += 1
        p.step += 1
        if p.iteration % self.log_interval == 0 or p.iteration == self.total_iters:
            self.log_line()
        if self.ckpt_interval and p.iteration % self.ckpt_interval == 0:
            self.checkpoint()

    def log_line(self) -> None:
        """Reads the window (every rank: a collective) and logs it (main process)."""
        p = self.progress
        window = self.window.count
        means = self.window.read(self.d, p.iteration, self.checkpoints.last)
        if self.log is not None and window:
            self.log.log(p.iteration, p.epoch, means, self.lr, self.d.device, window)

    def checkpoint(self):
        """Checks that the losses since the last check were finite (every rank), then writes a
        checkpoint (main process). Returns its path (None off the main process)."""
        self.window.check_finite(self.d, self.progress.iteration, self.checkpoints.last)
        self.checkpointed_at = self.progress.iteration
        if not self.d.main:
            return None
        return self.checkpoints.write(self.model, self.optimizer, self.progress, self.scaler)
