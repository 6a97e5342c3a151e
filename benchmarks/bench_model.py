"""End-to-end HTC inference: htc_fast's default backends against the same model on the reference
(pure PyTorch) ops -- what the custom kernels buy in the whole model.

One 800x1216 input (HTC's test size for a 4:3 photo, padded to a multiple of 32), R-50 HTC with
random weights (zero-initialised residual branches, as mmdetection initialises them): the heads
still produce 1000 proposals and 100 detections with masks, which is what the kernels' cost depends
on. Timed: ``model.predict`` with bitmap masks pasted at the original size. The group's baseline is
the reference ops. CPU: 1 round (a call takes ~40-60 s on 2 cores); CUDA: fp32 and bf16 autocast,
5 rounds after 2 warm-up rounds, synchronised. Peak memory recorded on CUDA.
"""
import contextlib

import pytest
import torch

from benchmarks.conftest import device_name
from htc_fast.config import get_config
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
    net = model.to(device)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(1, 3, HEIGHT, WIDTH, generator=gen).to(device)
    batch = ImageBatch(images, [(HEIGHT, WIDTH)], [(1.0, 1.0)], [(HEIGHT, WIDTH)])
    autocast = torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    backends = use_backend("reference") if impl == "reference" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def target():
        with backends, autocast:
            dets = net.predict(batch, masks="bitmap")
        sync()
        return dets

    benchmark.group = f"htc_inference r50 {HEIGHT}x{WIDTH} {device} {dtype}"
    benchmark.extra_info.update(impl=impl, role="baseline" if impl == "reference" else "candidate",
                                dtype=dtype, device=device, device_name=device_name(device), direction="fwd",
                                op="htc_inference", case=f"r50 {HEIGHT}x{WIDTH}", threads=torch.get_num_threads())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup, rounds = ROUNDS[device]
    dets = benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup)
    benchmark.extra_info["detections"] = len(dets[0].scores)
    if device == "cuda":
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
