"""Speed of htc_fast's RoIAlign against torchvision's, on HTC's shapes.

Owns the RoIAlign cases, their inputs and each group's baseline. The timing protocol (rounds,
CUDA synchronisation, peak memory) lives in conftest.py; summarize.py turns the JSON into ratios.

Cases (each a test, parametrized ``[device-dtype-impl-direction]``; directions fwd, bwd, fwdbwd):
  * ``test_roi_align_box``: HTC's box branch on one level: P2 of a 1344x800 image
    (1x256x200x336, stride 4), 512 RoIs, 7x7, sampling_ratio 0, aligned.
  * ``test_roi_align_mask``: the mask branch: 128 positive RoIs at 14x14 on the same map.
  * ``test_multilevel_roi_align_box``: the FPN box extractor over P2..P5 (256 channels), 512 RoIs
    spread over the four levels, 7x7 -- htc_fast's one-call ``multilevel_roi_align`` against
    mmdetection's ``SingleRoIExtractor`` way: a Python loop over levels with boolean masks around
    ``torchvision.ops.roi_align``.

Groups and baselines: one group per shape x direction x device x precision. In "fp32" groups the
baseline is torchvision in fp32 (the per-level loop for the multi-level case). In CUDA "16-bit"
groups it is torchvision in fp16, the only half type torchvision has: its kernels dispatch
float/double/half only ("not implemented for 'BFloat16'", checked by ``_torchvision_dtypes``), and
it needs the rois in the features' dtype, so its fp16 runs get fp16 boxes (the AMP trap htc_fast
avoids; htc_fast keeps rois fp32). htc_fast runs fp32 everywhere and fp16/bf16 on CUDA.

The reference backend (pure PyTorch) is slow on CPU (1.5-6 s a call on the box shapes on 2 cores),
so on CPU it runs on the mask shape only; on CUDA it runs in fp32 on every shape. Triton runs on
CUDA only (never under TRITON_INTERPRET=1 here: interpreter timings mean nothing).

Inputs are the same every run (seeded) and HTC-like: see ``p2_rois`` and ``fpn_rois`` for the box
size distributions and why the single-level cases keep to boxes that FPN would pool from P2.
"""
import functools

import pytest
import torch
import torchvision

import htc_fast.ops
from htc_fast.diagnostics.baselines import mmdet_levels, per_level_torchvision
from htc_fast.ops import _backend

IMAGE_H, IMAGE_W = 800, 1344  # HTC's 1333x800, padded to a multiple of 32
CHANNELS = 256
FPN_STRIDES = (4, 8, 16, 32)  # P2..P5, the levels HTC's RoI extractors pool from
FINEST_SCALE = 56  # mmdetection's SingleRoIExtractor default, used by HTC
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

BOX = dict(name="box", num_rois=512, output_size=7)
MASK = dict(name="mask", num_rois=128, output_size=14)


# ----------------------------------------------------------------------------- inputs

def _generator(seed):
    # Fixed seeds: every run times the same RoIs, so runs and devices are comparable.
    return torch.Generator().manual_seed(seed)


def _rois_from_scales(scales, gen):
    """(K, 5) rois, batch 0, of sqrt(area) ~ `scales` and aspect ratio in [1/2, 2], centred anywhere
    in the image and clipped to it (clipping shrinks border boxes, as it does real proposals)."""
    k = scales.shape[0]
    log_ratio = torch.empty(k).uniform_(-0.6931, 0.6931, generator=gen)
    w, h = scales * torch.exp(-0.5 * log_ratio), scales * torch.exp(0.5 * log_ratio)
    cx, cy = torch.rand(k, generator=gen) * IMAGE_W, torch.rand(k, generator=gen) * IMAGE_H
    return torch.stack([torch.zeros(k),
                        (cx - w / 2).clamp(0, IMAGE_W), (cy - h / 2).clamp(0, IMAGE_H),
                        (cx + w / 2).clamp(0, IMAGE_W), (cy + h / 2).clamp(0, IMAGE_H)], dim=1)


def p2_rois(num_rois, seed=0):
    """RoIs HTC pools from P2: sqrt(area) log-uniform in [16, 112) px.

    mmdetection sends a RoI to P2 when sqrt(w*h) < 2 * finest_scale = 112 px. Larger boxes on a
    stride-4 map would, with sampling_ratio 0, take up to ~19x19 samples per bin: a workload HTC
    never runs (with sizes up to 512 px, one torchvision call took 4 s on 2 cores).
    """
    gen = _generator(seed)
    log_scales = torch.empty(num_rois).uniform_(2.7726, 4.7185, generator=gen)  # ln 16 .. ln 112
    return _rois_from_scales(torch.exp(log_scales), gen)


def fpn_rois(num_rois, seed=1):
    """RoIs spread evenly over P2..P5 by mmdetection's level rule: each draws a level, then
    sqrt(area) log-uniform in that level's range ([32, 112), [112, 224), [224, 448), [448, 896))."""
    gen = _generator(seed)
    level = torch.randint(0, len(FPN_STRIDES), (num_rois,), generator=gen)
    lo = torch.tensor([32.0, 112.0, 224.0, 448.0])[level]
    hi = torch.tensor([112.0, 224.0, 448.0, 896.0])[level]
    scales = lo * torch.exp(torch.rand(num_rois, generator=gen) * torch.log(hi / lo))
    return _rois_from_scales(scales, gen)


_MASTER = []  # P2..P5 in fp32 on the CPU, generated once: randn of P2 alone takes ~0.3 s
_CONVERTED = {}  # (num_levels, device, dtype) -> the master maps converted; one entry kept


def feature_maps(num_levels, device, dtype):
    """The first `num_levels` of P2..P5, (1, 256, 800/s, 1344/s) each, on `device` in `dtype`.

    Every case sees the same values (one seeded draw). Returns fresh leaf tensors sharing the cached
    storage, so a case's requires_grad never leaks into the next one. One converted set is kept
    alive at a time (P2..P5 in fp32 is 91 MB).
    """
    if not _MASTER:
        gen = _generator(2)
        _MASTER.extend(torch.randn(1, CHANNELS, IMAGE_H // s, IMAGE_W // s, generator=gen)
                       for s in FPN_STRIDES)
    key = (num_levels, device, dtype)
    if key not in _CONVERTED:
        _CONVERTED.clear()
        _CONVERTED[key] = [f.to(device, dtype) for f in _MASTER[:num_levels]]
    return [f.detach() for f in _CONVERTED[key]]


# ----------------------------------------------------------------------------- baselines

@functools.cache
def _torchvision_dtypes(device):
    """The dtypes torchvision's roi_align runs in on `device` (fp32, fp16; not bf16 as of 0.29)."""
    ok = []
    for name, dtype in DTYPES.items():
        x = torch.ones(1, 1, 4, 4, device=device, dtype=dtype)
        rois = torch.tensor([[0.0, 0.0, 0.0, 3.0, 3.0]], device=device, dtype=dtype)
        try:
            torchvision.ops.roi_align(x, rois, 2, 1.0, 0, True)
            ok.append(name)
        except RuntimeError:  # "roi_align_forward_kernel" not implemented for 'BFloat16'
            pass
    return tuple(ok)


# The per-level baseline is the test suite's oracle (htc_fast.diagnostics.baselines), mmdetection's
# SingleRoIExtractor loop: one boolean mask per level (a host sync on CUDA), torchvision on that
# level's RoIs, a scatter into the output; rois go to the features' dtype per call because
# torchvision requires it (fp16 boxes under AMP, the trap htc_fast avoids).


# ----------------------------------------------------------------------------- cases

def _precision(dtype):
    return "fp32" if dtype == "fp32" else "16-bit"


def _cases(device, baseline, reference):
    """[(dtype, impl)] on `device`: the baseline in the dtypes torchvision has, htc_fast cpp
    (+ triton on CUDA) in fp32 and, on CUDA, fp16/bf16, and the reference in fp32 if asked."""
    cases = [(d, baseline) for d in _torchvision_dtypes(device) if device == "cuda" or d == "fp32"]
    ours = ["fp32", "fp16", "bf16"] if device == "cuda" else ["fp32"]
    cases += [(d, "cpp") for d in ours]
    if device == "cuda":
        cases += [(d, "triton") for d in ours]
    if reference:
        cases.append(("fp32", "reference"))
    return cases


def box_cases(device):
    return _cases(device, "torchvision", reference=device == "cuda")


def mask_cases(device):
    return _cases(device, "torchvision", reference=True)  # the smallest shape: cheap enough on CPU


def multilevel_cases(device):
    return _cases(device, "torchvision-loop", reference=device == "cuda")


def _role(impl, dtype):
    """The baseline of a group: torchvision (or its per-level loop) in fp32, or in fp16 for 16-bit."""
    is_baseline = impl.startswith("torchvision") and dtype in ("fp32", "fp16")
    return "baseline" if is_baseline else "candidate"


def _require(impl, device):
    """Skip, with the reason, a backend that cannot run here (e.g. _C built without CUDA)."""
    if not impl.startswith("torchvision"):
        reason = _backend.unavailable_reason(impl, device)
        if reason is not None:
            pytest.skip(f"backend {impl!r} unavailable on {device}: {reason}")


# ----------------------------------------------------------------------------- benchmarks

def _single_level(bench_case, shape, device, dtype, impl, direction):
    _require(impl, device)
    (feat,) = feature_maps(1, device, DTYPES[dtype])
    rois = p2_rois(shape["num_rois"]).to(device)
    size, scale = shape["output_size"], 1.0 / FPN_STRIDES[0]
    if impl == "torchvision":
        rois = rois.to(DTYPES[dtype])  # torchvision requires rois in the features' dtype

        def forward():
            return torchvision.ops.roi_align(feat, rois, size, scale, 0, True)
    else:
        def forward():
            return htc_fast.ops.roi_align(feat, rois, size, scale, 0, True, backend=impl)

    bench_case(
        forward=forward, inputs=[feat], direction=direction, device=device,
        group=f"roi_align {shape['name']} {direction} {device} {_precision(dtype)}",
        extra_info=dict(op="roi_align", case=shape["name"], impl=impl, dtype=dtype,
                        role=_role(impl, dtype), features=list(feat.shape),
                        num_rois=shape["num_rois"], output_size=size, sampling_ratio=0,
                        aligned=True))


@pytest.mark.bench_cases(cases=box_cases)
def test_roi_align_box(bench_case, device, dtype, impl, direction):
    _single_level(bench_case, BOX, device, dtype, impl, direction)


@pytest.mark.bench_cases(cases=mask_cases)
def test_roi_align_mask(bench_case, device, dtype, impl, direction):
    _single_level(bench_case, MASK, device, dtype, impl, direction)


@pytest.mark.bench_cases(cases=multilevel_cases)
def test_multilevel_roi_align_box(bench_case, device, dtype, impl, direction):
    _require(impl, device)
    feats = feature_maps(len(FPN_STRIDES), device, DTYPES[dtype])
    rois = fpn_rois(BOX["num_rois"]).to(device)
    size = BOX["output_size"]
    if impl == "torchvision-loop":
        def forward():
            return per_level_torchvision(feats, rois, (size, size), FPN_STRIDES, 0, True,
                                         FINEST_SCALE)
    else:
        def forward():
            return htc_fast.ops.multilevel_roi_align(feats, rois, size, strides=FPN_STRIDES,
                                                     finest_scale=FINEST_SCALE, sampling_ratio=0,
                                                     aligned=True, backend=impl)

    bench_case(
        forward=forward, inputs=feats, direction=direction, device=device,
        group=f"multilevel_roi_align box {direction} {device} {_precision(dtype)}",
        extra_info=dict(op="multilevel_roi_align", case="fpn box", impl=impl, dtype=dtype,
                        role=_role(impl, dtype), features=[list(f.shape) for f in feats],
                        num_rois=BOX["num_rois"], output_size=size, sampling_ratio=0, aligned=True,
                        rois_per_level=torch.bincount(mmdet_levels(rois, 4, FINEST_SCALE).long(),
                                                       minlength=4).tolist()))
