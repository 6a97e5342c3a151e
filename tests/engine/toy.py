"""A sync-free toy 'detector' and batches with the interfaces TrainLoop uses (HTCLoss's as_dict()
and total(), TrainBatch's to() and image_ids), so that every sync or op counted is the loop's."""
from pathlib import Path

import torch
from torch import nn

from htc_fast.config import TrainConfig
from htc_fast.engine import Checkpoints, Dist, MetricLog, Progress, TrainLoop, build_optimizer


class Loss:
    """HTCLoss's interface: as_dict() and total()."""

    def __init__(self, values):
        self.values = values

    def as_dict(self):
        return self.values

    def total(self):
        return sum(v for k, v in self.values.items() if "loss" in k)


class ToyNet(nn.Module):
    """A sync-free 'detector': two losses and an accuracy-like value from a few linear layers."""

    def __init__(self, layers=3, poison_at=None):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
        self.calls, self.poison_at = 0, poison_at

    def forward(self, inputs, targets):
        self.calls += 1
        y = self.layers(inputs)
        first = (y - targets).pow(2).mean()
        if self.calls == self.poison_at:
            first = first * float("nan")
        return Loss({"loss_a": first, "loss_b": y.abs().mean(), "acc": (y > 0).float().mean() * 100})


class Batch:
    def __init__(self, gen):
        self.inputs, self.targets = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
        self.image_ids = [0, 1, 2, 3]

    def to(self, device, non_blocking=False):
        return self.inputs.to(device, non_blocking=non_blocking), self.targets.to(device, non_blocking=non_blocking)


def toy_loop(tmp_path: Path, net, log_interval=5, ckpt_interval=0, clip_grad=None, total_iters=100, amp=None):
    d = Dist(0, 1, torch.device("cpu"))
    cfg = TrainConfig(warmup_iters=3, epochs=2, lr_steps=(1,), lr=0.01)
    return TrainLoop(net, net, build_optimizer(net, cfg), cfg, base_lr=0.01, total_iters=total_iters, d=d,
                     progress=Progress(), checkpoints=Checkpoints(tmp_path, "toy", []),
                     log=MetricLog(tmp_path, total_iters, 4), log_interval=log_interval,
                     ckpt_interval=ckpt_interval, clip_grad=clip_grad, amp=amp,
                     scaler=torch.amp.GradScaler("cpu") if amp == torch.float16 else None)
