"""Loader settings (issue 13 item 3): workers per rank from the cores available to the local rank,
persistent workers and prefetch, the resumable epoch sampler, data time in the log line, and a run
whose result does not depend on the number of workers."""
import time

import pytest
import torch

from htc_fast import engine, train
from htc_fast.data.synthetic import make_synthetic_coco
from htc_fast.engine import EpochBatchSampler, build_run_loader, cores_per_local_rank, default_workers
from htc_fast.engine import distributed as distributed_module
from tests.engine.toy import Batch, ToyNet, toy_loop


@pytest.mark.parametrize("cores, local_world, config_workers, expected", [
    (16, 4, 2, 3),    # 4 cores per rank: 3 workers + the training process
    (128, 8, 2, 8),   # 16 cores per rank: capped at MAX_AUTO_WORKERS
    (2, 1, 2, 1),     # this machine: 1 worker
    (4, 8, 2, 1),     # fewer cores than ranks: still 1
    (64, 1, 0, 0),    # a preset that loads in-process keeps doing so
])
def test_default_workers_from_the_cores_of_the_local_rank(monkeypatch, cores, local_world, config_workers, expected):
    monkeypatch.setattr(distributed_module.os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    assert cores_per_local_rank() == max(cores // local_world, 1)
    assert default_workers(config_workers) == expected


class _Grouped:
    def __init__(self, batches):
        self.batches, self.epoch = batches, None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter([[(i, 0, self.epoch) for i in b] for b in self.batches])

    def __len__(self):
        return len(self.batches)


class _Loader:
    def __init__(self, sampler):
        self.batch_sampler, self.collate_fn = sampler, list


def test_epoch_sampler_skips_the_done_batches_and_records_the_requests():
    inner = _Grouped([[4, 1], [0, 3], [2, 5]])
    sampler = EpochBatchSampler(inner)
    sampler.start_epoch(3, skip=1)
    assert list(sampler) == [[(0, 0, 3), (3, 0, 3)], [(2, 0, 3), (5, 0, 3)]]
    assert inner.epoch == 3 and len(sampler) == 2 and sampler.steps_per_epoch() == 3
    assert list(sampler.requested) == [[0, 3], [2, 5]]
    sampler.start_epoch(4)
    assert len(list(sampler)) == 3 and len(sampler.requested) == 3


def test_run_loader_settings():
    dataset = list(range(6))
    with_workers = build_run_loader(dataset, _Loader(_Grouped([[0, 1], [2, 3]])), 2, torch.device("cpu"), 0, 3)
    assert with_workers.persistent_workers and with_workers.prefetch_factor == 3 and with_workers.num_workers == 2
    assert not with_workers.pin_memory  # pinned only when the device is CUDA
    assert build_run_loader(dataset, _Loader(_Grouped([])), 2, torch.device("cuda"), 0).pin_memory
    in_process = build_run_loader(dataset, _Loader(_Grouped([[0, 1]])), 0, torch.device("cpu"), 0)
    assert not in_process.persistent_workers and in_process.prefetch_factor is None
    with pytest.raises(ValueError, match="workers"):
        build_run_loader(dataset, _Loader(_Grouped([])), -1, torch.device("cpu"), 0)
    with pytest.raises(ValueError, match="prefetch_factor"):
        build_run_loader(dataset, _Loader(_Grouped([])), 1, torch.device("cpu"), 0, 0)


def test_log_line_reports_data_time(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    loop = toy_loop(tmp_path, ToyNet(), log_interval=3)

    def slow_batches():
        for _ in range(3):
            time.sleep(0.05)
            yield Batch(gen)

    assert not loop.run_epoch(slow_batches(), steps_per_epoch=10)
    line = next(x for x in capsys.readouterr().out.splitlines() if "iter 3/" in x)
    fields = dict(f.split("=") for f in line.split() if f.startswith(("time=", "data_time=")))
    assert float(fields["data_time"]) >= 0.05  # each batch waited 50 ms for "the loader"
    assert float(fields["time"]) >= float(fields["data_time"])


def test_result_does_not_depend_on_the_number_of_workers(tmp_path):
    """Two epochs with one persistent worker and in-process loading give the same weights (the
    data is keyed by (seed, epoch, index), and iterating the loader draws nothing from the global
    RNG)."""
    runs = {}
    for workers in ("0", "1"):
        work_dir = tmp_path / workers
        make_synthetic_coco(work_dir / "synthetic_coco", num_train=4, num_val=1)
        assert train.main(["--work-dir", str(work_dir), "--no-eval", "--max-iters", "4", "--workers", workers,
                           "--log-interval", "2"]) == 0
        runs[workers] = torch.load(engine.latest_checkpoint(work_dir), weights_only=True)
    assert runs["0"]["progress"] == runs["1"]["progress"] == {"iteration": 4, "epoch": 2, "step": 0}
    for k, v in runs["0"]["model"].items():
        assert torch.equal(v, runs["1"]["model"][k]), k


def test_log_time_leaves_out_the_time_between_epochs(tmp_path, capsys):
    """Evaluation between epochs is not iteration time (mmdetection's `time` is per iteration)."""
    gen = torch.Generator().manual_seed(0)
    loop = toy_loop(tmp_path, ToyNet(), log_interval=4)
    time.sleep(0.5)  # e.g. the untrained model's evaluation
    assert loop.run_epoch([Batch(gen), Batch(gen)], steps_per_epoch=2)
    time.sleep(0.5)  # the epoch-end evaluation
    loop.progress.next_epoch()
    loop.run_epoch([Batch(gen), Batch(gen)], steps_per_epoch=2)
    line = next(x for x in capsys.readouterr().out.splitlines() if "iter 4/" in x)
    seconds = float(next(f for f in line.split() if f.startswith("time=")).split("=")[1])
    assert 0 < seconds < 0.2  # 4 toy iterations; the 1 s of pauses would make it >= 0.25
