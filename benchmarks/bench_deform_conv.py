"""Speed of htc_fast's deformable convolution against torchvision's, on HTC's DCN shapes.

Owns the deform_conv2d cases, their inputs and each group's baseline. The timing protocol (rounds,
CUDA synchronisation, peak memory on CUDA) lives in conftest.py; summarize.py turns the JSON into
ratios.

Cases (each a test, parametrized ``[device-dtype-impl-direction]``; directions fwd and bwd --
fwd+bwd adds nothing a reader cannot sum):
HTC's DCN configs replace conv2 (3x3, padding 1) of every bottleneck in ResNet stages c3-c5 by a
DCNv1 layer (deform_groups 1, no bias, no mask). For a 1333x800 image padded to 1344x800 (batch 1):

  ============  ========  ========  ======  ======  ==========================================
  case          channels  input     stride  groups  where
  ============  ========  ========  ======  ======  ==========================================
  r50_c3_s2     128       200x336   2       1       R-50 c3, first block (output 100x168)
  r50_c3        128       100x168   1       1       R-50 c3, other blocks
  r50_c4        256       50x84     1       1       R-50 c4
  r50_c5        512       25x42     1       1       R-50 c5
  x101_c4       1024      50x84     1       64      ResNeXt-101 64x4d c4 (the HTC DCN preset)
  depthwise     256       100x168   1       256     a depthwise DCN (weight (256, 1, 3, 3))
  ============  ========  ========  ======  ======  ==========================================

Gradients are taken with respect to input, offset and weight (training needs all three: the
offset branch learns through the offset gradient).

Groups and baselines: one group per shape x direction x device x precision; the baseline is
``torchvision.ops.deform_conv2d`` in fp32 measured in the same run. torchvision has no bf16 DCN
(its kernels dispatch float/double/half), so in the CUDA "16-bit" groups htc_fast's bf16 is
compared with torchvision's fp32: that row's extra_info says so (``dtype`` "fp32 (bf16 base)",
``note``). htc_fast runs its default backend ("cpp") in fp32, plus bf16 and Triton on CUDA. The
reference backend (pure PyTorch: a full column matrix and an einsum) runs on the smallest map
(r50_c5) on CPU and in fp32 on every shape on CUDA.

Inputs are the same every run (seeded): features N(0, 1), He-initialised weights, offsets N(0, 2^2)
pixels (learned DCN offsets are a few pixels; some samples leave the map at the border).
"""
import pytest
import torch
import torchvision

import htc_fast.ops
from htc_fast.ops import _backend

# name -> (channels, height, width, stride, groups)
SHAPES = {
    "r50_c3_s2": (128, 200, 336, 2, 1),
    "r50_c3": (128, 100, 168, 1, 1),
    "r50_c4": (256, 50, 84, 1, 1),
    "r50_c5": (512, 25, 42, 1, 1),
    "x101_c4": (1024, 50, 84, 1, 64),
    "depthwise": (256, 100, 168, 1, 256),
}
KERNEL, PADDING, DILATION = 3, 1, 1
OFFSET_STD = 2.0
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TV_BF16_BASE = "fp32 (bf16 base)"  # torchvision's fp32 run as the baseline of a bf16 group


# ----------------------------------------------------------------------------- inputs

def inputs(case, device, dtype):
    """(input, offset, weight) of a case: seeded, so every run and device times the same values."""
    c, h, w, stride, groups = SHAPES[case]
    gen = torch.Generator().manual_seed(sum(map(ord, case)))  # fixed per case
    ho = (h + 2 * PADDING - DILATION * (KERNEL - 1) - 1) // stride + 1
    wo = (w + 2 * PADDING - DILATION * (KERNEL - 1) - 1) // stride + 1
    x = torch.randn(1, c, h, w, generator=gen)
    fan_in = c // groups * KERNEL * KERNEL
    weight = torch.randn(c, c // groups, KERNEL, KERNEL, generator=gen) * (2.0 / fan_in) ** 0.5
    offset = torch.randn(1, 2 * KERNEL * KERNEL, ho, wo, generator=gen) * OFFSET_STD
    # Offsets are geometry: fp32 for htc_fast at any feature dtype (torchvision needs them in the
    # features' dtype, which is fp32 wherever it runs here).
    return x.to(device, dtype), offset.to(device), weight.to(device, dtype)


# ----------------------------------------------------------------------------- cases

def _cases(device, reference):
    """[(dtype, impl)]: torchvision fp32 (and, on CUDA, again as the bf16 groups' baseline),
    htc_fast cpp fp32 (+ bf16 and triton on CUDA), the reference in fp32 if asked."""
    cases = [("fp32", "torchvision"), ("fp32", "cpp")]
    if device == "cuda":
        cases += [("bf16", "torchvision"), ("bf16", "cpp"), ("fp32", "triton"), ("bf16", "triton")]
    if reference:
        cases.append(("fp32", "reference"))
    return cases


def small_cases(device):
    return _cases(device, reference=True)


def large_cases(device):
    return _cases(device, reference=device == "cuda")


def _require(impl, device):
    """Skip, with the reason, a backend that cannot run here (e.g. _C built without CUDA)."""
    if impl != "torchvision":
        reason = _backend.unavailable_reason(impl, device)
        if reason is not None:
            pytest.skip(f"backend {impl!r} unavailable on {device}: {reason}")


def _bench(bench_case, case, device, dtype, impl, direction):
    _require(impl, device)
    c, h, w, stride, groups = SHAPES[case]
    run_dtype = torch.float32 if impl == "torchvision" else DTYPES[dtype]
    x, offset, weight = inputs(case, device, run_dtype)
    extra = dict(op="deform_conv2d", case=case, impl=impl, dtype=dtype,
                 role="baseline" if impl == "torchvision" else "candidate",
                 input=list(x.shape), weight=list(weight.shape), offset=list(offset.shape),
                 stride=stride, padding=PADDING, dilation=DILATION, groups=groups, deform_groups=1,
                 bias=False, mask=False, offset_std=OFFSET_STD)
    if impl == "torchvision":
        if dtype != "fp32":
            extra.update(dtype=TV_BF16_BASE,
                         note="torchvision has no bf16 deform_conv2d: its fp32 time is the bf16 baseline")

        def forward():
            return torchvision.ops.deform_conv2d(x, offset, weight, None, stride, PADDING, DILATION)
    else:
        def forward():
            return htc_fast.ops.deform_conv2d(x, offset, weight, None, stride, PADDING, DILATION,
                                              backend=impl)

    precision = "fp32" if dtype == "fp32" else "16-bit"
    # A torchvision backward takes 1-16 s on 2 CPU cores: 2 timed rounds without warm-up keep the
    # CPU run of this file near 3 minutes (CUDA keeps conftest's defaults).
    bench_case(forward=forward, inputs=[x, offset, weight], direction=direction, device=device,
               group=f"deform_conv2d {case} {direction} {device} {precision}", extra_info=extra,
               cpu_rounds=(0, 2))


@pytest.mark.bench_cases(cases=large_cases, directions=("fwd", "bwd"))
def test_deform_conv_r50_c3_s2(bench_case, device, dtype, impl, direction):
    _bench(bench_case, "r50_c3_s2", device, dtype, impl, direction)


@pytest.mark.bench_cases(cases=large_cases, directions=("fwd", "bwd"))
def test_deform_conv_r50_c3(bench_case, device, dtype, impl, direction):
    _bench(bench_case, "r50_c3", device, dtype, impl, direction)


@pytest.mark.bench_cases(cases=large_cases, directions=("fwd", "bwd"))
def test_deform_conv_r50_c4(bench_case, device, dtype, impl, direction):
    _bench(bench_case, "r50_c4", device, dtype, impl, direction)


@pytest.mark.bench_cases(cases=small_cases, directions=("fwd", "bwd"))
def test_deform_conv_r50_c5(bench_case, device, dtype, impl, direction):
    _bench(bench_case, "r50_c5", device, dtype, impl, direction)


@pytest.mark.bench_cases(cases=large_cases, directions=("fwd", "bwd"))
def test_deform_conv_x101_c4(bench_case, device, dtype, impl, direction):
    _bench(bench_case, "x101_c4", device, dtype, impl, direction)


@pytest.mark.bench_cases(cases=large_cases, directions=("fwd", "bwd"))
def test_deform_conv_depthwise(bench_case, device, dtype, impl, direction):
    _bench(bench_case, "depthwise", device, dtype, impl, direction)
