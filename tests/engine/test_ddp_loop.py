"""TrainLoop under 2-process DDP on CPU (gloo): the logged values are the mean over both ranks,
read with one collective at the log line, and a NaN on one rank only stops both ranks at the same
log line or checkpoint (no rank left waiting in a collective, no checkpoint of a diverged model)."""
import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from htc_fast.config import TrainConfig
from htc_fast.engine import (
    Checkpoints,
    Dist,
    MetricLog,
    Progress,
    TrainingDiverged,
    TrainLoop,
    build_optimizer,
    latest_checkpoint,
)
from tests.engine.toy import Batch, ToyNet


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(rank, work_dir: Path, *, poison_rank1_at=None, log_interval=100, ckpt_interval=0, iters=4):
    """4 iterations of a DDP toy loop; returns (per-iteration values of this rank, error or None)."""
    d = Dist(rank, 2, torch.device("cpu"))
    torch.manual_seed(0)
    net = ToyNet(poison_at=poison_rank1_at if rank == 1 else None)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    cfg = TrainConfig(warmup_iters=0, epochs=1, lr_steps=(), lr=0.01)
    loop = TrainLoop(ddp, net, build_optimizer(net, cfg), cfg, base_lr=0.01, total_iters=iters, d=d,
                     progress=Progress(), checkpoints=Checkpoints(work_dir, "toy", []),
                     log=MetricLog(work_dir, iters, 8) if rank == 0 else None, log_interval=log_interval,
                     ckpt_interval=ckpt_interval)
    seen, real = [], net.forward

    def recording(inputs, targets):
        loss = real(inputs, targets)
        seen.append({k: float(v.detach()) for k, v in loss.as_dict().items()})
        return loss

    net.forward = recording
    gen = torch.Generator().manual_seed(100 + rank)
    try:
        for _ in range(iters):
            loop.train_step(Batch(gen))
    except TrainingDiverged as exc:
        return seen, str(exc)
    return seen, None


def _worker(rank, port, work_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    work_dir = Path(work_dir)
    out = {}
    out["clean"] = _run(rank, work_dir / "clean", log_interval=4)
    out["at_log"] = _run(rank, work_dir / "at_log", poison_rank1_at=4, log_interval=4)
    out["at_ckpt"] = _run(rank, work_dir / "at_ckpt", poison_rank1_at=4, ckpt_interval=2)
    (work_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def test_ddp_loop_logs_rank_means_and_stops_every_rank_on_one_ranks_nan(tmp_path):
    for sub in ("clean", "at_log", "at_ckpt"):
        (tmp_path / sub).mkdir()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    (seen0, err0), (seen1, err1) = r0["clean"], r1["clean"]
    assert err0 is None and err1 is None
    logged = [json.loads(x) for x in (tmp_path / "clean" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 1 and logged[0]["iteration"] == 4
    for k in ("loss_a", "loss_b", "acc"):
        want = sum(s[k] for s in seen0 + seen1) / 8
        assert logged[0][k] == pytest.approx(want, rel=1e-6), k
    assert seen0[0]["loss_a"] != seen1[0]["loss_a"]  # the ranks saw different data

    for case, window in (("at_log", "between iterations 1 and 4"), ("at_ckpt", "between iterations 3 and 4")):
        (_, err0), (_, err1) = r0[case], r1[case]
        assert err0 is not None and window in err0, (case, err0)
        assert err1 is not None and window in err1, (case, err1)
    # at_ckpt: rank 0's own losses were finite up to the checkpoint at 4; only the all-reduced flag
    # stops it. The checkpoint at 2 was written, the one at 4 (after rank 1's NaN) was not
    assert latest_checkpoint(tmp_path / "at_ckpt").name == "iter_0000002.pth"
    assert not (tmp_path / "at_ckpt" / "iter_0000004.pth").exists()
