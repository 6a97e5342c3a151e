"""The training engine behind ``python -m htc_fast.train``, one concept per module:

  schedule.py     lr warm-up and step decay (functions of iteration and epoch)
  optim.py        fused SGD, one optimisation step (backward, fp16 scaling, clipping)
  checkpoints.py  atomic checkpoints with the resume state, the last N kept
  distributed.py  process-group setup, all-reduce, cores per local rank
  feed.py         the run's DataLoader (persistent workers), resumable epochs, skipped images
  metrics.py      the loss window on the device, non-finite detection, log lines
  loop.py         the iteration and the epoch

The loop itself (what happens in which order) is read in htc_fast/train.py.
"""
from htc_fast.engine.checkpoints import (
    Checkpoints,
    CheckpointWriteError,
    Progress,
    iteration_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    read_resume_state,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from htc_fast.engine.distributed import Dist, all_reduce, cores_per_local_rank, init_distributed
from htc_fast.engine.feed import EpochBatchSampler, SkippedImages, build_run_loader, default_workers
from htc_fast.engine.loop import TrainLoop
from htc_fast.engine.metrics import LossWindow, MetricLog, TrainingDiverged
from htc_fast.engine.optim import build_optimizer, optimizer_step
from htc_fast.engine.schedule import lr_factor, set_lr

__all__ = [
    "CheckpointWriteError", "Checkpoints", "Progress", "iteration_checkpoints", "latest_checkpoint",
    "prune_checkpoints", "read_resume_state", "rng_state", "set_rng_state", "write_checkpoint",
    "Dist", "all_reduce", "cores_per_local_rank", "init_distributed",
    "EpochBatchSampler", "SkippedImages", "build_run_loader", "default_workers",
    "TrainLoop", "LossWindow", "MetricLog", "TrainingDiverged", "build_optimizer", "optimizer_step",
    "lr_factor", "set_lr",
]
