"""The loop's own bookkeeping never waits for the device between two log lines (issue 11): counted
with htc_fast.diagnostics.count_ops around single iterations of TrainLoop on a sync-free toy model,
so every sync counted is the loop's (lr schedule, loss window, fused SGD step, log/checkpoint
checks). Also: the fused optimizer's op count does not grow with the number of parameters."""
import pytest
import torch

from htc_fast.config import TrainConfig
from htc_fast.diagnostics import count_ops
from htc_fast.engine import TrainingDiverged, build_optimizer, optimizer_step
from tests.engine.toy import Batch, ToyNet, toy_loop


@pytest.mark.parametrize("clip_grad", [None, 1.0])
def test_iterations_between_log_lines_do_not_sync(tmp_path, clip_grad, capsys):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    loop = toy_loop(tmp_path, ToyNet(), log_interval=5, ckpt_interval=10, clip_grad=clip_grad)
    per_iteration = []
    for _ in range(10):
        with count_ops() as c:
            loop.train_step(Batch(gen))
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
    net = ToyNet()
    loop = toy_loop(tmp_path, net, log_interval=4)
    seen = []
    real = net.forward

    def recording(inputs, targets):
        loss = real(inputs, targets)
        seen.append({k: float(v.detach()) for k, v in loss.as_dict().items()})
        return loss

    net.forward = recording
    for _ in range(3):
        loop.train_step(Batch(gen))
    means = loop.window.read(loop.d, 3, None)
    for k in ("loss_a", "loss_b", "acc"):
        assert means[k] == pytest.approx(sum(s[k] for s in seen) / 3, rel=1e-6)
    assert loop.window.count == 0 and float(loop.window.sums.abs().sum()) == 0


def test_nan_is_found_at_the_next_log_line_naming_the_window(tmp_path):
    gen = torch.Generator().manual_seed(0)
    loop = toy_loop(tmp_path, ToyNet(poison_at=7), log_interval=5)
    with pytest.raises(TrainingDiverged, match=r"between iterations 6 and 10; last good checkpoint: none"):
        for _ in range(10):
            loop.train_step(Batch(gen))
    assert loop.progress.iteration == 10


def test_fused_sgd_op_count_does_not_grow_with_the_parameters():
    counts = []
    for layers in (2, 12):
        net = ToyNet(layers)
        opt = build_optimizer(net, TrainConfig())
        assert opt.defaults["fused"]
        x = torch.randn(4, 8)
        optimizer_step(net(x, x).total(), opt)  # momentum buffers exist from the second step on
        with count_ops() as c:
            opt.step()
        counts.append(c.ops)
        assert c.syncs == 0
    assert counts[0] == counts[1], counts
