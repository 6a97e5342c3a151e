"""The loop's own bookkeeping never waits for the device between two log lines (issue 11): counted
with htc_fast.diagnostics.count_ops around single iterations of TrainLoop on a sync-free toy model,
so every sync counted is the loop's (lr schedule, loss window, fused SGD step, log/checkpoint
checks). Also: the fused optimizer's op count does not grow with the number of parameters."""
from pathlib import Path

import pytest
import torch
from torch import nn

from htc_fast.config import TrainConfig
from htc_fast.diagnostics import count_ops
from htc_fast.engine import (Checkpoints, Dist, MetricLog, Progress, TrainingDiverged, TrainLoop, build_optimizer,
                             optimizer_step)


class _Loss:
    """HTCLoss's interface: as_dict() and total()."""

    def __init__(self, values):
        self.values = values

    def as_dict(self):
        return self.values

    def total(self):
        return sum(v for k, v in self.values.items() if "loss" in k)


class _ToyNet(nn.Module):
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
        return _Loss({"loss_a": first, "loss_b": y.abs().mean(), "acc": (y > 0).float().mean() * 100})


class _Batch:
    def __init__(self, gen):
        self.inputs, self.targets = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
        self.image_ids = [0, 1, 2, 3]

    def to(self, device, non_blocking=False):
        return self.inputs.to(device, non_blocking=non_blocking), self.targets.to(device, non_blocking=non_blocking)


def _loop(tmp_path: Path, net, log_interval=5, ckpt_interval=0, clip_grad=None, total_iters=100):
    d = Dist(0, 1, torch.device("cpu"))
    cfg = TrainConfig(warmup_iters=3, epochs=2, lr_steps=(1,), lr=0.01)
    return TrainLoop(net, net, build_optimizer(net, cfg), cfg, base_lr=0.01, total_iters=total_iters, d=d,
                     progress=Progress(), checkpoints=Checkpoints(tmp_path, "toy", []),
                     log=MetricLog(tmp_path, total_iters, 4), log_interval=log_interval,
                     ckpt_interval=ckpt_interval, clip_grad=clip_grad)


@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_iterations_between_log_lines_do_not_sync(tmp_path, clip_grad, capsys):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    loop = _loop(tmp_path, _ToyNet(), log_interval=5, ckpt_interval=10, clip_grad=clip_grad)
    per_iteration = []
    for _ in range(10):
        with count_ops() as c:
            loop.train_step(_Batch(gen))
        per_iteration.append((loop.progress.iteration, c.syncs, c.report()))
    for iteration, syncs, report in per_iteration:
        if iteration % 5:
            assert syncs == 0, f"iteration {iteration}: {report}"
    # A log line reads the window once (one device-to-host read); the checkpoint at 10 adds the
    # read of its non-finite flag (writing the file reads CPU copies, not counted here).
    assert [s for i, s, _ in per_iteration if i == 5] == [1], per_iteration[4][2]
    assert per_iteration[9][1] == 2, per_iteration[9][2]
    out = capsys.readouterr().out
    assert "[epoch 0 iter 5/100]" in out and "time=" in out and "data_time=" in out
    assert (tmp_path / "iter_0000010.pth").is_file()


def test_window_means_equal_the_per_iteration_values(tmp_path):
    """The log line's means are the means of the values each iteration produced (read eagerly
    here, outside the loop, as the reference)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    net = _ToyNet()
    loop = _loop(tmp_path, net, log_interval=4)
    seen = []
    real = net.forward

    def recording(inputs, targets):
        loss = real(inputs, targets)
        seen.append({k: float(v.detach()) for k, v in loss.as_dict().items()})
        return loss

    net.forward = recording
    for _ in range(3):
        loop.train_step(_Batch(gen))
    means = loop.window.read(loop.d, 3, None)
    for k in ("loss_a", "loss_b", "acc"):
        assert means[k] == pytest.approx(sum(s[k] for s in seen) / 3, rel=1e-6)
    assert loop.window.count == 0 and float(loop.window.sums.abs().sum()) == 0


def test_nan_is_found_at_the_next_log_line_naming_the_window(tmp_path):
    gen = torch.Generator().manual_seed(0)
    loop = _loop(tmp_path, _ToyNet(poison_at=7), log_interval=5)
    with pytest.raises(TrainingDiverged, match=r"between iterations 6 and 10; last good checkpoint: none"):
        for _ in range(10):
            loop.train_step(_Batch(gen))
    assert loop.progress.iteration == 10


def test_fused_sgd_op_count_does_not_grow_with_the_parameters():
    counts = []
    for layers in (2, 12):
        net = _ToyNet(layers)
        opt = build_optimizer(net, TrainConfig())
        assert opt.defaults["fused"]
        x = torch.randn(4, 8)
        optimizer_step(net(x, x).total(), opt)  # momentum buffers exist from the second step on
        with count_ops() as c:
            opt.step()
        counts.append(c.ops)
        assert c.syncs == 0
    assert counts[0] == counts[1], counts
