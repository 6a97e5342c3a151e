"""One HTC training iteration: images/s and peak memory, htc_fast's default backends against the
same model on the reference (pure PyTorch) ops.

R-50 HTC (random weights, mmdetection's initialisation), 2 images of 1333x800 padded to 1344x800
with 5 ground-truth objects each (boxes, masks at the image size, a semantic map), the random
sampler: what one GPU processes per iteration in the 1x schedule. Timed: forward, loss, backward
and the SGD step. The group's baseline is the reference ops. CPU: fp32, 1 round (about a minute per
call on 2 cores); CUDA: fp32 and bf16 autocast, 5 rounds after 2 warm-up rounds, synchronised.
``extra_info`` records images/s, the dispatched ops and host syncs of one iteration (forward,
backward and SGD step; ``htc_fast.diagnostics.count_ops``, counted in an extra untimed iteration)
and, on CUDA, the peak memory.
"""
import contextlib

import pytest
import torch

from benchmarks.bench_model import model_cases
from benchmarks.conftest import device_name
from htc_fast.config import get_config
from htc_fast.diagnostics import count_ops
from htc_fast.model.htc import build_htc
from htc_fast.model.inputs import ImageBatch, Targets
from htc_fast.ops import use_backend

HEIGHT, WIDTH, PADDED_W = 800, 1333, 1344
IMAGES, OBJECTS = 2, 5
ROUNDS = {"cpu": (0, 1), "cuda": (2, 5)}


def batch(device):
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(IMAGES, 3, HEIGHT, PADDED_W, generator=gen)
    boxes, labels, masks = [], [], []
    for _ in range(IMAGES):
        xy = torch.rand(OBJECTS, 2, generator=gen) * torch.tensor([WIDTH * 0.7, HEIGHT * 0.7])
        wh = 40 + torch.rand(OBJECTS, 2, generator=gen) * 300
        b = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([WIDTH - 1.0, HEIGHT - 1.0]))], dim=1)
        m = torch.zeros(OBJECTS, HEIGHT, WIDTH, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            m[j, y1:y2, x1:x2] = True
        boxes.append(b.to(device))
        labels.append(torch.randint(0, 80, (OBJECTS,), generator=gen).to(device))
        masks.append(m.to(device))
    semantic = torch.randint(0, 183, (IMAGES, HEIGHT, PADDED_W), generator=gen).to(device)
    inputs = ImageBatch(images.to(device), [(HEIGHT, WIDTH)] * IMAGES, [(1.0, 1.0)] * IMAGES,
                        [(HEIGHT, WIDTH)] * IMAGES)
    return inputs, Targets(boxes, labels, masks, semantic)


@pytest.mark.bench_cases(cases=model_cases, directions=("fwdbwd",))
def test_htc_train_iteration(benchmark, device, dtype, impl, direction):
    torch.manual_seed(0)
    model = build_htc(get_config("htc_r50_fpn_1x")).to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    inputs, targets = batch(device)
    # Factories, not context objects: the step runs many times (rounds, then once under count_ops),
    # and use_backend's context manager is single-use.
    def autocast():
        return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def backends():
        return use_backend("reference") if impl == "reference" else contextlib.nullcontext()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with backends():
            with autocast():
                loss = model(inputs, targets).total()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()

    benchmark.group = f"htc_train_iteration r50 {IMAGES}x{HEIGHT}x{WIDTH} {device} {dtype}"
    benchmark.extra_info.update(impl=impl, role="baseline" if impl == "reference" else "candidate", dtype=dtype,
                                device=device, device_name=device_name(device), direction="fwdbwd",
                                op="htc_train_iteration", case=f"r50 {IMAGES}x{HEIGHT}x{WIDTH}",
                                threads=torch.get_num_threads())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warmup, rounds = ROUNDS[device]
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup)
    benchmark.extra_info["images_per_s"] = IMAGES / benchmark.stats.stats.median
    with count_ops() as counts:
        step()
    benchmark.extra_info.update(ops=counts.ops, kernel_ops=counts.kernel_ops, syncs=counts.syncs,
                                sync_breakdown=counts.sync_breakdown)
    if device == "cuda":
        benchmark.extra_info["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
