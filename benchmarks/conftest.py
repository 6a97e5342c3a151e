"""pytest-benchmark plumbing shared by benchmarks/bench_*.py.

Owns: the ``--bench-devices`` / ``--bench-rounds`` options, turning
each bench's ``@pytest.mark.bench_cases(cases=...)`` into parametrized cases, and the ``bench_case``
fixture (the timing protocol: rounds, CUDA synchronisation, peak memory, ``extra_info``, group).
It does not own which cases exist, their inputs, or which one is a group's baseline: each bench
file says that.

Run (CPU here; CUDA cases too when a GPU is visible)::

    python -m pytest benchmarks/ -q --benchmark-json=results.json
    python benchmarks/summarize.py results.json > benchmarks/results/cpu_$(date +%F).md
"""
import os
import platform

import pytest
import torch

DIRECTIONS = ("fwd", "bwd", "fwdbwd")

# (warmup, timed) rounds per case. CPU calls take 0.1-2 s on 2 cores: 5 timed rounds keep the CPU
# run near 2 minutes, and a median of 5 rides out a noisy neighbour on a shared machine. CUDA calls
# take micro- to milliseconds, so take many more; the CUDA warmup also absorbs Triton's JIT compile
# and the caching allocator's first allocations.
_ROUNDS = {"cpu": (1, 5), "cuda": (5, 50)}


# ----------------------------------------------------------------------------- options

def pytest_addoption(parser):
    group = parser.getgroup("htc_fast benchmarks")
    group.addoption("--bench-devices", default="auto",
                    help="comma-separated devices to benchmark (cpu,cuda); "
                         "'auto' = cpu, plus cuda when torch.cuda.is_available()")
    group.addoption("--bench-rounds", type=int, default=None,
                    help="timed rounds per case (default: 5 on cpu, 50 on cuda)")


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "bench_cases(cases=fn, directions=(...)): fn(device) -> [(dtype_name, impl), ...], "
                   "the cases of a bench test; conftest parametrizes device, dtype, impl and direction "
                   "(all three unless `directions` says which) from it")


def _devices(config):
    value = config.getoption("bench_devices")
    if value == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [d.strip() for d in value.split(",") if d.strip()]
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise pytest.UsageError(f"--bench-devices: unknown device {d!r} (use cpu and/or cuda)")
        if d == "cuda" and not torch.cuda.is_available():
            raise pytest.UsageError("--bench-devices names cuda but torch.cuda.is_available() is False")
    return devices


def pytest_generate_tests(metafunc):
    """Parametrize ``device, dtype, impl, direction`` from the test's bench_cases marker.

    Ids read ``[cpu-fp32-cpp-fwd]`` so that ``-k "cpu and fwd"`` and the backend table's comments
    (``test_roi_align_box[cpu-*]``) select cases. Only valid combinations are generated, so the
    report lists no skips for "torchvision has no bf16" and the like.
    """
    marker = metafunc.definition.get_closest_marker("bench_cases")
    if marker is None:
        return
    cases_for = marker.kwargs["cases"]  # a keyword: pytest.mark.x(fn) would decorate fn instead
    directions = marker.kwargs.get("directions", DIRECTIONS)
    params = []
    for device in _devices(metafunc.config):
        for dtype, impl in cases_for(device):
            for direction in directions:
                params.append(pytest.param(device, dtype, impl, direction,
                                           id=f"{device}-{dtype}-{impl}-{direction}"))
    metafunc.parametrize("device,dtype,impl,direction", params)


# ----------------------------------------------------------------------------- machine info

def device_name(device):
    """A human-readable name for the processor a case ran on."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the software and accelerator next to pytest-benchmark's CPU info in the JSON."""
    from htc_fast import _extension

    machine_info["cpu_name"] = device_name("cpu")
    machine_info["cuda_device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["htc_fast_C"] = _extension.loaded
    machine_info["htc_fast_cuda_archs"] = _extension.compiled_cuda_archs()
    for name in ("torchvision", "triton"):
        try:
            machine_info[name] = __import__(name).__version__
        except Exception:  # a missing optional package is information, not an error
            machine_info[name] = None


# ----------------------------------------------------------------------------- timing protocol

@pytest.fixture
def bench_case(benchmark, pytestconfig):
    """``bench_case(forward=..., inputs=..., direction=..., device=..., group=..., extra_info=...)``
    times one case; see ``run_case``."""
    def run(cpu_rounds=None, **kwargs):
        # --bench-rounds wins; else a bench file may ask for (warmup, timed) CPU rounds of its own
        # for cases that take seconds per call (else the CPU run of the suite takes too long).
        rounds, warmup = pytestconfig.getoption("bench_rounds"), None
        if rounds is None and cpu_rounds is not None and kwargs["device"] == "cpu":
            warmup, rounds = cpu_rounds
        return run_case(benchmark, rounds=rounds, warmup=warmup, **kwargs)

    return run


def run_case(benchmark, *, forward, inputs, direction, device, group, extra_info, rounds=None, warmup=None):
    """Time one case and record what it was.

    Args:
        forward: callable () -> output tensor, reading the tensors in `inputs`.
        inputs: the leaf feature tensors the gradient is taken with respect to.
        direction: "fwd" (under no_grad, as in inference), "bwd" (backward only: each round's
            forward runs untimed in pytest-benchmark's setup), or "fwdbwd" (both, as in training).
        device: "cpu" or "cuda". On CUDA the timed callable synchronises before it returns, so the
            timer sees the kernels' time, not just the launches.
        group: pytest-benchmark group, one shape x direction x device x precision: a group's rows
            are the candidates for one job, and summarize.py divides by the group's baseline.
        extra_info: recorded in the JSON (impl, role, dtype, shape, ...).
        rounds, warmup: timed and warm-up rounds; None takes the per-device default.

    ``torch.autograd.grad`` rather than ``.backward()``: no ``.grad`` accumulates across rounds
    (an extra read-modify-write of the whole feature map that training does not pay per call).
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if direction != "fwd":
        for x in inputs:
            x.requires_grad_(True)
        with torch.no_grad():
            grad_out = torch.randn_like(forward())

    if direction == "fwd":
        setup = None

        def target():
            with torch.no_grad():
                forward()
            sync()
    elif direction == "bwd":
        def setup():
            out = forward()
            sync()
            return (out,), {}

        def target(out):
            _grad(out, inputs, grad_out)
            sync()
    elif direction == "fwdbwd":
        setup = None

        def target():
            _grad(forward(), inputs, grad_out)
            sync()
    else:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")

    default_warmup, default_rounds = _ROUNDS[device]
    warmup = default_warmup if warmup is None else warmup
    benchmark.group = group
    benchmark.extra_info.update(extra_info)
    benchmark.extra_info.update(direction=direction, device=device, device_name=device_name(device),
                                threads=torch.get_num_threads())
    benchmark.pedantic(target, setup=setup, rounds=rounds or default_rounds, warmup_rounds=warmup)
    # Other processes on a shared machine skew CPU timings (the kernels use every core); the load
    # average right after the case lets a reader judge how much.
    benchmark.extra_info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if device == "cuda":
        benchmark.extra_info["peak_mem_bytes"] = _peak_memory(setup, target)


def _grad(out, inputs, grad_out):
    # allow_unused: a per-level loop leaves a level with no RoIs out of the graph entirely.
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


def _peak_memory(setup, target):
    """Bytes the timed callable allocates on top of what was live before it (outputs, grads,
    workspaces), from one extra untimed call."""
    args, kwargs = setup() if setup else ((), {})
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    target(*args, **kwargs)
    return torch.cuda.max_memory_allocated() - before
