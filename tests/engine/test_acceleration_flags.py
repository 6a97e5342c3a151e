"""`train --compile` and `--channels-last` (issue 11 item 4) on htc_tiny for a few iterations on CPU
(inductor): the same data and initial weights give the eager run's losses within tolerance. And
`--data-device` (issue 13 item 2): images decoded in the training process give the same losses."""
import json

import pytest
import torch

from htc_fast import train
from htc_fast.data.synthetic import make_synthetic_coco


def _run(work_dir, *flags):
    make_synthetic_coco(work_dir / "synthetic_coco", num_train=4, num_val=1)
    assert train.main(["--work-dir", str(work_dir), "--no-eval", "--max-iters", "2", "--log-interval", "1",
                       *flags]) == 0
    lines = [json.loads(x) for x in (work_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


def _assert_close(got, want):
    assert [x["iteration"] for x in got] == [x["iteration"] for x in want] == [1, 2]
    for g, w in zip(got, want):
        for k in w:
            if "loss" in k:
                # Iteration 1: same weights, same data, reassociated sums only; iteration 2 follows
                # one SGD step on gradients that differ at the same level.
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (g["iteration"], k)


def test_channels_last_matches_eager(tmp_path):
    _assert_close(_run(tmp_path / "nhwc", "--channels-last"), _run(tmp_path / "eager"))


def test_compile_and_channels_last_match_eager(tmp_path):
    torch._dynamo.reset()
    try:
        _assert_close(_run(tmp_path / "compiled", "--compile", "--channels-last"), _run(tmp_path / "eager"))
    finally:
        torch._dynamo.reset()


def test_data_device_gives_the_workers_path_losses(tmp_path):
    # On the CPU the device path runs the same uint8 resize as the workers' path: same batches.
    got, want = _run(tmp_path / "device", "--data-device", "cpu"), _run(tmp_path / "workers")
    assert [x["iteration"] for x in got] == [x["iteration"] for x in want] == [1, 2]
    for g, w in zip(got, want):
        for k in w:
            if "loss" in k:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (g["iteration"], k)
