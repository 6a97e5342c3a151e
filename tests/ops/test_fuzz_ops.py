"""Fuzzing the public ops with malformed calls (issue 16), one subprocess per backend.

The calls come from ``tests/ops/fuzz_cases.py`` (seeded: the test's seed, printed on failure;
``HTC_FAST_TEST_SEED`` replays it). Each must raise a clean ``OpArgumentError`` / ``OpTypeError``
or return what the reference backend returns for the same call. The worker runs in a subprocess
so that a crash (a segfault, an abort) fails the test with the call that caused it instead of
taking pytest down; the failure message gives the command that replays exactly that call.
Counts per backend: 300 calls per op on the reference and C++ backends, 40 on Triton (its
interpreter is slow); 14 op variants.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from htc_fast import ops
from htc_fast.diagnostics import count_ops
from tests.support import require_backend

ROOT = pathlib.Path(__file__).resolve().parents[2]
COUNT = {"reference": 300, "cpp": 300, "triton": 40}


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_malformed_calls(backend, _fresh_seed):
    require_backend(backend, "cpu")
    seed = _fresh_seed
    cmd = [sys.executable, "-m", "tests.ops.fuzz_cases", "--backend", backend, "--seed", str(seed),
           "--count", str(COUNT[backend])]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = proc.stdout.splitlines()
    calls = [line for line in lines if line.startswith("CALL ")]
    if proc.returncode != 0:
        last = calls[-1] if calls else "(before the first call)"
        op, index = last.split()[1:3] if calls else ("?", "?")
        pytest.fail(f"the worker died (exit {proc.returncode}) during {last}\n"
                    f"replay: {' '.join(cmd[:6])} --op {op} --index {index.rstrip(':')}\n"
                    f"stderr tail: {proc.stderr[-2000:]}", pytrace=False)
    summary = json.loads(lines[-1])
    bad = [lines[i - 1] + "\n" + line for i, line in enumerate(lines) if line.startswith("  BAD")]
    assert not bad, f"{len(bad)} calls neither raised a clean error nor matched the reference:\n" + \
        "\n".join(bad[:20]) + f"\nreplay one: {' '.join(cmd[:6])} --op OP --index I"
    total = sum(sum(c.values()) for c in summary.values())
    assert total == COUNT[backend] * len(summary)
    print(f"{backend}: {total} calls, " + ", ".join(
        f"{op} {c['clean']} clean / {c['ok']} ok" for op, c in summary.items()))


def test_rejected_before_any_allocation():
    """Arguments that would allocate (or loop) without bound are refused before the first op is
    dispatched: no tensor is made, no kernel runs."""
    x, rois = torch.randn(1, 2, 8, 8), torch.tensor([[0.0, 1, 1, 6, 6]])
    boxes, scores, idxs = torch.tensor([[0.0, 0, 4, 4]]), torch.ones(1), torch.zeros(1, dtype=torch.long)
    giant_x = x[..., :1].expand(2 ** 16, 2, 8, 2 ** 16)
    dcn = (torch.randn(1, 4, 1, 1).expand(2, 4, 2 ** 14, 2 ** 14),
           torch.randn(1, 18, 1, 1).expand(2, 18, 2 ** 14, 2 ** 14), torch.randn(2, 4, 3, 3))
    calls = [  # (function, args, kwargs), all built before counting
        (ops.roi_align, (x, rois, 2, 1.0), dict(sampling_ratio=2 ** 40)),
        (ops.roi_align, (x, [boxes], 2 ** 20), {}),
        (ops.roi_align, (giant_x, rois, 2), {}),
        (ops.multilevel_roi_align, ([x], rois, 2), dict(strides=(4,), sampling_ratio=2 ** 40)),
        (ops.nms, (boxes, scores, 0.5), dict(max_output=2 ** 40)),
        (ops.batched_nms, (boxes, scores, idxs, 0.5), dict(max_output=2 ** 40)),
        (ops.deform_conv2d, dcn, dict(padding=1)),
    ]
    for fn, args, kwargs in calls:
        with count_ops() as counts, pytest.raises(ops.OpArgumentError):
            fn(*args, **kwargs)
        assert counts.ops == 0, (fn.__name__, counts.top_ops())
