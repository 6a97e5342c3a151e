"""The training loop: schedule, the built-in default end to end (shortened), kill-and-resume giving
the uninterrupted run's result, a diverging loss stopping with the last checkpoint named, and
2-process DDP on CPU (gloo) keeping the ranks' parameters identical."""
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from htc_fast import engine, train
from htc_fast.config import TrainConfig, get_config
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.htc import HTC, build_htc


def test_lr_schedule_warmup_and_steps():
    cfg = TrainConfig(warmup_iters=500, warmup_ratio=0.001, epochs=12, lr_steps=(8, 11))
    assert engine.lr_factor(0, 0, cfg) == pytest.approx(0.001)
    assert engine.lr_factor(250, 0, cfg) == pytest.approx(0.001 + 0.999 * 0.5)
    assert engine.lr_factor(500, 0, cfg) == 1.0
    assert engine.lr_factor(10 ** 5, 7, cfg) == 1.0
    assert engine.lr_factor(10 ** 5, 8, cfg) == pytest.approx(0.1)
    assert engine.lr_factor(10 ** 5, 11, cfg) == pytest.approx(0.01)
    assert TrainConfig(num_gpus=8, images_per_gpu=2).scaled_lr() == pytest.approx(0.02)
    assert TrainConfig().scaled_lr(4) == pytest.approx(0.005)


def test_builtin_default_runs_end_to_end(tmp_path, capsys):
    rc = train.main(["--work-dir", str(tmp_path), "--max-iters", "3", "--eval-limit", "3", "--log-interval", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "built-in run: bbox AP" in out and "no unreadable images" in out
    assert (tmp_path / "predictions.png").is_file()
    ckpt = engine.latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "iter_0000003.pth"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 3  # 3 logged iterations + evaluations
    # A training checkpoint loads back as model weights (torch.load with weights_only=True).
    report = load_checkpoint(build_htc(get_config("htc_tiny")), ckpt)
    assert report.ok and report.source == "htc_fast"


def _final_params(work_dir):
    state = torch.load(engine.latest_checkpoint(work_dir), weights_only=False)
    return state["model"], state["progress"]


def test_kill_and_resume_matches_the_uninterrupted_run(tmp_path):
    common = ["--no-eval", "--log-interval", "100", "--ckpt-interval", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train.main(["--work-dir", str(full), "--max-iters", "4"] + common) == 0
    assert train.main(["--work-dir", str(cut), "--max-iters", "2"] + common) == 0  # "killed" after 2
    (cut / "iter_0000003.pth.tmp").write_bytes(b"a write that was cut short")   # must be ignored
    assert train.main(["--work-dir", str(cut), "--max-iters", "4", "--resume"] + common) == 0
    a, pa = _final_params(full)
    b, pb = _final_params(cut)
    assert pa == pb == {"iteration": 4, "epoch": 0, "step": 4}
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_diverging_loss_stops_with_the_last_checkpoint(tmp_path, monkeypatch):
    real = HTC.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        loss = real(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return loss._replace(roi=loss.roi._replace(semantic=loss.roi.semantic * float("nan")))
        return loss

    monkeypatch.setattr(HTC, "forward", forward)
    # Checkpoints every 2 iterations, log lines every 4: iteration 3's NaN is found at the checkpoint
    # of iteration 4 (the first read of the device after it), which is not written.
    with pytest.raises(train.TrainingDiverged, match=r"between iterations 3 and 4; last good checkpoint: "
                                                     r".*iter_0000002\.pth"):
        train.main(["--work-dir", str(tmp_path), "--max-iters", "8", "--no-eval", "--ckpt-interval", "2",
                    "--log-interval", "4"])
    assert engine.latest_checkpoint(tmp_path).name == "iter_0000002.pth"
    assert not (tmp_path / "iter_0000004.pth").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, work_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    d = engine.init_distributed("cpu")
    from htc_fast.data import build_train_loader, coco_train_dataset
    from htc_fast.data.synthetic import make_synthetic_coco

    cfg = get_config("htc_tiny")
    if rank == 0:
        make_synthetic_coco(Path(work_dir) / "data", num_train=8, num_val=2)
    dist.barrier()
    dataset = coco_train_dataset(Path(work_dir) / "data", cfg, split="train")
    loader = build_train_loader(dataset, cfg, 1, d.rank, d.world_size, seed=0, workers=0)
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
    model = HTC(cfg.model)
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = engine.build_optimizer(model, cfg.train)
    engine.set_lr(opt, 0.01)
    batch = next(iter(loader))
    inputs, targets = batch
    loss = net(inputs, targets).total()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    gathered_grads = [torch.zeros_like(grads) for _ in range(world)]
    dist.all_gather(gathered_grads, grads)
    if rank == 0:
        torch.save({"params": gathered, "grads": gathered_grads, "ids": batch.image_ids, "loss": loss.item()}, out)
    dist.destroy_process_group()


def test_two_process_ddp_on_cpu_keeps_ranks_in_sync(tmp_path):
    out = tmp_path / "ddp.pth"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), str(out)), nprocs=2, join=True)
    result = torch.load(out, weights_only=False)
    p0, p1 = result["params"]
    g0, g1 = result["grads"]
    assert torch.equal(g0, g1)  # gradients all-reduced
    assert torch.equal(p0, p1)  # so the step kept the replicas identical
    assert g0.abs().sum() > 0


@pytest.mark.parametrize("flag, value", [("--keep-checkpoints", "-1"), ("--log-interval", "0"), ("--workers", "-2"),
                                         ("--prefetch-factor", "0"), ("--ckpt-interval", "-5"), ("--max-iters", "-1")])
def test_bad_arguments_are_named(flag, value, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([flag, value])
    assert f"{flag} must be" in capsys.readouterr().err


def test_dataset_and_preset_class_counts_must_agree(tmp_path):
    with pytest.raises(SystemExit, match=r"has 4 categories, the preset htc_tiny 5"):
        train.main(["--work-dir", str(tmp_path), "--no-eval", "--max-iters", "1", "--set", "model.num_classes=5"])
