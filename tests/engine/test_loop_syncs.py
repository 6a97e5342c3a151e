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


@pytest.mark.parametrize("clip_grad, amp", [(None, None), (1.0, None), (1.0, torch.bfloat16), (None, torch.float16)])
def test_iterations_between_log_lines_do_not_sync(tmp_path, clip_grad, amp, capsys):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, ())))
    loop = toy_loop(tmp_path, ToyNet(), log_interval=5, ckpt_interval=10, clip_grad=clip_grad, amp=amp)
    per_iteration = []
    for _ in range(10):
        with count_ops() as c:
            loop.train_step(Batch(gen))
        per_iteration.append((loop.progress.iteration, c.syncs, c.report()))
    for iteration, syncs, report in per_iteration:
        if iteration % 5:
            assert syncs == 0, f"iteration {iteration}: {report}"
    # A log line reads the window once (one device-to-host read); the checkpoint at 10 adds the
    # read of its non-finite flag.
    assert [s for i, s, _ in per_iteration if i == 5] == [1], per_iteration[4][2]
    # (with fp16, saving GradScaler.state_dict() reads its scale and growth tracker: 2 more)
    assert per_iteration[9][1] == 2 + 2 * (amp == torch.float16), per_iteration[9][2]
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


@pytest.mark.parametrize("amp", [None, torch.float16])
def test_fused_sgd_matches_plain_sgd_also_when_fp16_skips_the_first_step(amp):
    """build_optimizer's fused SGD against torch's per-parameter SGD, same GradScaler schedule. In
    fp16 the initial scale (65536) overflows this toy's gradients, so step 1 is skipped and the
    later ones are not: the fused kernel used to leave its momentum buffers uninitialised then."""
    cfg = TrainConfig(lr=0.01, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(int(torch.randint(0, 2 ** 31, ())))
    nets = [ToyNet(), ToyNet()]
    nets[1].load_state_dict(nets[0].state_dict())
    initial = [p.detach().clone() for p in nets[0].parameters()]
    opts = [build_optimizer(nets[0], cfg),
            torch.optim.SGD(nets[1].parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4, foreach=False)]
    scalers = [torch.amp.GradScaler("cpu") if amp else None for _ in nets]
    x = torch.randn(4, 8)
    # Freed NaN-filled blocks of the parameters' sizes, which uninitialised buffers would reuse.
    junk = [torch.full_like(p, float("nan")) for p in nets[0].parameters()]
    del junk
    scales = []
    for _ in range(6):
        for net, opt, scaler in zip(nets, opts, scalers):
            with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = net(x, x).total()
            optimizer_step(loss, opt, scaler)
        scales.append(scalers[0].get_scale() if amp else None)
    if amp:  # some steps were skipped (the scale halved), the last ones were taken
        assert scales[0] < 2.0 ** 16 and scales[-1] == scales[-2], scales
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(a, a0) for a, a0 in zip(nets[0].parameters(), initial))


def test_bookkeeping_of_a_non_log_iteration_is_two_ops(tmp_path):
    """The loss window's stack + add_ and nothing else (a launch budget the loop adds per step)."""
    loop = toy_loop(tmp_path, ToyNet(), log_interval=5)
    values = {"loss_a": torch.rand(()), "loss_b": torch.rand(()), "acc": torch.rand(()) * 100}
    loop.after_step(values)  # the first call allocates the window's sums
    with count_ops() as c:
        loop.after_step(values)
    assert (c.ops, c.syncs) == (2, 0), c.report()
