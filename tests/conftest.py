"""Shared test setup: tolerances per dtype, devices, backend availability, fresh random seeds.

Backend policy (a build regression must be visible, never silently skipped):
  "reference"  always runs.
  "cpp"        must be available; only HTC_FAST_SKIP_EXTENSION=1 (a deliberate pure-Python
               install) turns its tests into skips. Otherwise a missing _C fails them.
  "triton"     runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (set below when
               there is no GPU); skipped only when triton is not installed at all.
Markers (declared in pyproject.toml): ``cuda`` tests are skipped without a GPU, ``triton`` marks
tests that run a Triton kernel, ``slow`` long ones.

Every test gets a fresh seed; a failing test's report prints it, and HTC_FAST_TEST_SEED=<seed>
replays it.
"""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    # triton.jit picks the interpreter when the kernel is decorated, i.e. when htc_fast.kernels is
    # imported: this must happen before the first import of htc_fast.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.support import BACKENDS, DEVICES, OPERATOR_BACKENDS, require_backend  # noqa: E402


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    """A backend name that is runnable on `device` (or the test is skipped/failed by the policy)."""
    require_backend(request.param, device.type)
    return request.param


@pytest.fixture(params=OPERATOR_BACKENDS)
def fast_backend(request, device):
    """Like `backend`, restricted to the backends that are registered torch operators."""
    require_backend(request.param, device.type)
    return request.param


@pytest.fixture
def deterministic():
    """torch.use_deterministic_algorithms(True) for the test, restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Seeds torch (CPU and CUDA) and Python's random with a new seed per test, or the replay seed."""
    seed = int(os.environ.get("HTC_FAST_TEST_SEED") or random.SystemRandom().randrange(2 ** 31))
    request.node.htc_fast_seed = seed
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seed = getattr(item, "htc_fast_seed", None)
    if report.failed and seed is not None:
        report.sections.append(("random seed", f"replay with HTC_FAST_TEST_SEED={seed}"))
    return report
