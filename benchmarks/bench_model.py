"""End-to-end HTC inference: htc_fast's default backends against the same model on the reference
(pure PyTorch) ops -- what the custom kernels buy in the whole model.

800x1216 inputs (HTC's test size for a 4:3 photo, padded to a multiple of 32), R-50 HTC with
random weights (zero-initialised residual branches, as mmdetection initialises them): the heads
still produce 1000 proposals and 100 detections with masks per image, which is what the kernels'
cost depends on. Timed: ``model.predict`` with bitmap masks pasted at the original size.
``test_htc_inference``: one image, the group's baseline is the reference ops;
``test_htc_inference_batch``: batches of 1, 2 and 4 images on the default backends (issue 11's
images/s at batch 1, 2, 4). ``extra_info`` records images/s and the dispatched ops and host syncs
of one call (``htc_fast.diagnostics.count_ops``, in an extra untimed call). CPU: 1 round (a call
takes ~40-60 s per image on 2 cores); CUDA: fp32 and bf16 autocast, 5 rounds after 2 warm-up
rounds, synchronised. Peak memory recorded on CUDA.
"""
import contextlib

import pytest
import torch

from benchmarks.conftest import device_name
from htc_fast.config import get_config
from htc_fast.diagnostics import count_ops
from htc_fast.model.htc import build_htc
from htc_fast.model.inputs import ImageBatch
from htc_fast.ops import use_backend

HEIGHT, WIDTH = 800, 1216
ROUNDS = {"cpu": (0, 1), "cuda": (2, 5)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_htc(get_config("htc_r50_fpn_1x")).eval()


def model_cases(device):
    """[(dtype, impl)]: the reference ops (the baseline) and the default backends, in fp32 and,
    on CUDA, bf16 autocast."""
    return [(dtype, impl) for dtype in (["fp32", "bf16"] if device == "cuda" else ["fp32"])
            for impl in ("reference", "default")]


@pytest.mark.bench_cases(cases=model_cases, directions=("fwd",))
def test_htc_inference(benchmark, model, device, dtype, impl, direction):
    _bench_predict(benchmark, model, device, dtype, impl, 1, group=f"htc_inference r50 {HEIGHT}x{WIDTH}")


def batch_cases(device):
    """[(dtype, impl)]: the default backends only (the batch sizes are the comparison)."""
    return [(dtype, "default") for dtype in (["fp32", "bf16"] if device == "cuda" else ["fp32"])]


@pytest.mark.parametrize("images", [1, 2, 4])
@pytest.mark.bench_cases(cases=batch_cases, directions=("fwd",))
def test_htc_inference_batch(benchmark, model, device, dtype, impl, direction, images):
    # No baseline: the comparison is images/s (extra_info), not the time of a call.
    _bench_predict(benchmark, model, device, dtype, impl, images,
                   group=f"htc_inference_batch r50 {HEIGHT}x{WIDTH}", role="candidate", op="htc_inference_batch")


def _bench_predict(benchmark, model, device, dtype, impl, images, group, role=None, op="htc_inference"):
    net = model.to(device)
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(images, 3, HEIGHT, WIDTH, generator=gen).to(device)
    batch = ImageBatch(data, [(HEIGHT, WIDTH)] * images, [(1.0, 1.0)] * images, [(HEIGHT, WIDTH)] * images)
    # Factories, not context objects: the step runs many times (rounds, then once under count_ops),
    # and use_backend's context manager is single-use.
    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def backends():
        return use_backend("reference") if impl == "reference" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def target():
        with backends(), autocast():
            dets = net.predict(batch, masks="bitmap")
        sync()
        return dets

    benchmark.group = f"{group} {device} {dtype}"
    role = role or ("baseline" if impl == "reference" else "candidate")
    benchmark.extra_info.update(impl=impl if images == 1 else f"{impl} batch {images}", role=role, dtype=dtype,
                                device=device, device_name=device_name(device), direction="fwd",
                                op=op, case=f"r50 {images}x{HEIGHT}x{WIDTH}", batch=images,
                                threads=torch.get_num_threads())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup, rounds = ROUNDS[device]
    dets = benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup)
    benchmark.extra_info["detections"] = len(dets[0].scores)
    benchmark.extra_info["images_per_s"] = images / benchmark.stats.stats.median
    if device == "cuda":
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    with count_ops() as counts:
        target()
    benchmark.extra_info.update(ops=counts.ops, kernel_ops=counts.kernel_ops, syncs=counts.syncs,
                                sync_breakdown=counts.sync_breakdown)
