"""Deformable convolution (DCNv1 / modulated DCNv2) forward: every backend against torchvision's op,
the naive float64 loop and the reference; sampling edges, non-finite offsets, low precision,
argument errors.

Oracles: ``torchvision.ops.deform_conv2d`` (its C++ op; it needs offsets and mask in the features'
dtype, which they are here), ``naive_deform_conv2d`` (tests/ops/naive_deform_conv.py) and, for the
compiled backends, the reference backend in the same dtype. Gradients, gradcheck, opcheck,
torch.compile and autocast: test_deform_conv_grad.py. Layers: tests/model/test_deform_conv_layers.py.
"""
import math

import pytest
import torch
import torchvision

from htc_fast import ops
from tests.ops.naive_deform_conv import naive_deform_conv2d, out_size, random_offsets, with_layout
from tests.support import BACKENDS, LOW_PRECISION_FACTOR, TOL

DEFAULTS = dict(n=2, c=4, h=5, w=6, co=4, k=(3, 3), stride=1, padding=1, dilation=1, groups=1, dg=1,
                v2=False, bias=True, offsets="normal", scale=1.5, layout="contiguous")

# Each case is small enough for the naive loop (a few thousand products per output image).
CASES = {
    "v1": dict(),
    "v2_pad0_batch3": dict(v2=True, n=3, h=4, w=7, padding=0, bias=False),
    "stride2_pad2_dg2": dict(stride=2, padding=2, h=7, w=6, v2=True, dg=2),
    "stride_pad_dil_hw": dict(stride=(2, 1), padding=(0, 2), dilation=(1, 2), h=7, w=5, v2=True),
    "dilation2_groups2_dg2": dict(dilation=2, padding=2, h=6, w=7, groups=2, dg=2),
    "groups2_dg4": dict(c=8, co=6, groups=2, dg=4, v2=True, n=3, h=4, w=5),
    "dg2_no_bias": dict(dg=2, bias=False, n=1),
    "kernel1x1": dict(k=(1, 1), padding=0, dg=2, v2=True, co=3),
    "kernel3x1": dict(k=(3, 1), padding=(1, 0), stride=(1, 2), dilation=(2, 1), h=6, w=5),
    "depthwise": dict(c=6, co=6, groups=6, dg=3, v2=True),
    "depthwise_multiplier2": dict(c=4, co=8, groups=4),
    "far_offsets": dict(offsets="far", scale=8.0, v2=True, dg=2),
    "integer_offsets": dict(offsets="integer", scale=3.0, v2=True),
    "batch1_nonsquare": dict(n=1, h=3, w=9, co=5),
    "input_1x2": dict(h=1, w=2, padding=1, v2=True),
    "channels_last": dict(layout="channels_last", v2=True, dg=2),
    "transposed_views": dict(layout="transposed", v2=True, groups=2),
    "strided_views": dict(layout="strided", groups=2, dg=2),
}


def make_problem(case, dtype=torch.float32, device="cpu", **override):
    """The inputs of a case: dict(input, offset, weight, bias, mask, stride, padding, dilation)."""
    p = {**DEFAULTS, **CASES.get(case, {}), **override}
    kh, kw = p["k"]
    ho, wo = out_size(p["h"], p["w"], kh, kw, p["stride"], p["padding"], p["dilation"])
    cg = p["c"] // p["groups"]
    x = torch.randn(p["n"], p["c"], p["h"], p["w"], dtype=dtype, device=device)
    weight = torch.randn(p["co"], cg, kh, kw, dtype=dtype, device=device) / math.sqrt(cg * kh * kw)
    offset = random_offsets(p["n"], p["dg"], kh, kw, ho, wo, p["offsets"], p["scale"], dtype, device)
    mask = (torch.rand(p["n"], p["dg"] * kh * kw, ho, wo, dtype=dtype, device=device)
            if p["v2"] else None)
    bias = torch.randn(p["co"], dtype=dtype, device=device) if p["bias"] else None
    lay = p["layout"]
    return dict(input=with_layout(x, lay), offset=with_layout(offset, lay),
                weight=with_layout(weight, lay), bias=bias, mask=with_layout(mask, lay),
                stride=p["stride"], padding=p["padding"], dilation=p["dilation"])


def run(problem, backend=None, fn=None):
    """The problem through htc_fast's API (or `fn`, e.g. torchvision's op, with the same signature)."""
    p = problem
    if fn is None:
        return ops.deform_conv2d(p["input"], p["offset"], p["weight"], p["bias"], p["stride"],
                                 p["padding"], p["dilation"], p["mask"], backend=backend)
    return fn(p["input"], p["offset"], p["weight"], p["bias"], p["stride"], p["padding"],
              p["dilation"], p["mask"])


def torchvision_op(problem):
    return run(problem, fn=torchvision.ops.deform_conv2d)


def naive(problem):
    return run(problem, fn=naive_deform_conv2d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_oracles(backend, device, dtype, case):
    p = make_problem(case, dtype, device)
    got = run(p, backend)
    n, co = p["input"].shape[0], p["weight"].shape[0]
    assert got.shape == (n, co, *p["offset"].shape[2:]) and got.dtype == dtype
    # The operators' fake kernel promises a contiguous result (the reference's einsum does not).
    assert got.is_contiguous() or backend == "reference"
    torch.testing.assert_close(got.double().cpu(), naive(p), **TOL[dtype])
    torch.testing.assert_close(got, torchvision_op(p), **TOL[dtype])
    if backend != "reference":
        torch.testing.assert_close(got, run(p, "reference"), **TOL[dtype])


def test_far_offsets_read_zero(backend, device):
    """Every sample more than one pixel off the map: the output is exactly the bias."""
    p = make_problem("v1", torch.float32, device, v2=True)
    p["offset"] = torch.full_like(p["offset"], 1e4)
    p["offset"][:, 1::4] = -7.0  # some x offsets only just outside, with y far off
    got = run(p, backend)
    assert torch.equal(got, p["bias"].view(1, -1, 1, 1).expand_as(got))


def test_samples_on_the_validity_edges(backend, device):
    """A 1x1 identity kernel (stride 1, no padding) samples input[y, x] at (ho + dy, wo + dx):
    positions exactly -1 or H / W read 0 (the open interval (-1, H)); exactly 0 or H - 1 read the
    border pixel; half a pixel outside reads half of it; non-integers just inside the open
    interval read a sliver of the border pixel."""
    h, w = 4, 5
    x = torch.randn(1, 2, h, w, dtype=torch.float64, device=device)
    weight = torch.eye(2, dtype=torch.float64, device=device).view(2, 2, 1, 1)
    targets = {  # output position (ho, wo) -> sampled (y, x), and the expected value of channel c
        (0, 0): ((-1.0, 2.0), lambda c: 0.0),
        (0, 1): ((h, 2.0), lambda c: 0.0),
        (0, 2): ((1.0, -1.0), lambda c: 0.0),
        (0, 3): ((1.0, w), lambda c: 0.0),
        (0, 4): ((-1.0, w), lambda c: 0.0),
        (1, 0): ((0.0, 0.0), lambda c: x[0, c, 0, 0]),
        (1, 1): ((h - 1.0, w - 1.0), lambda c: x[0, c, h - 1, w - 1]),
        (1, 2): ((-0.5, 3.0), lambda c: 0.5 * x[0, c, 0, 3]),
        (1, 3): ((h - 0.5, 3.0), lambda c: 0.5 * x[0, c, h - 1, 3]),
        (1, 4): ((2.0, w - 0.25), lambda c: 0.25 * x[0, c, 2, w - 1]),
        (2, 0): ((-0.75, -0.75), lambda c: 0.0625 * x[0, c, 0, 0]),
        (2, 1): ((2.0, -1.25), lambda c: 0.0),
        (2, 2): ((h + 0.25, 1.0), lambda c: 0.0),
    }
    offset = torch.zeros(1, 2, h, w, dtype=torch.float64, device=device)
    expected = x.clone()
    for (ho, wo), ((y, xx), value) in targets.items():
        offset[0, 0, ho, wo], offset[0, 1, ho, wo] = y - ho, xx - wo
        for c in range(2):
            expected[0, c, ho, wo] = value(c)
    got = ops.deform_conv2d(x, offset, weight, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got, torchvision.ops.deform_conv2d(x, offset, weight), rtol=0, atol=0)
    torch.testing.assert_close(got.cpu(), naive_deform_conv2d(x, offset, weight), rtol=0, atol=0)


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_non_finite_offsets_read_zero(backend, device, v2):
    """NaN / +-inf offsets: those samples read 0 (their tap contributes nothing), everything else as
    usual; the output and every gradient stay finite."""
    p = make_problem("stride2_pad2_dg2", torch.float32, device, v2=v2)
    off = p["offset"]
    bad = [(0, 0, 0, 0), (0, 5, 1, 1), (1, 12, 2, 0), (1, 1, 0, 2), (1, 35, 4, 3), (0, 19, 2, 2)]
    for i, idx in enumerate(bad):
        off[idx] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    leaves = [t.requires_grad_() for t in (p["input"], off, p["weight"], p["bias"], p["mask"])
              if t is not None]
    got = run(p, backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.detach().double().cpu(), naive(p), **TOL[torch.float32])
    # The same result as the finite problem whose non-finite taps are masked out (v2) or, for v1,
    # the reference with zero mask on them.
    finite = dict(p, offset=torch.nan_to_num(off.detach(), 0.0, 0.0, 0.0))
    keep = torch.ones(off.shape[0], off.shape[1] // 2, *off.shape[2:], device=device)
    for b, ch, y, x in bad:
        keep[b, ch // 2, y, x] = 0
    finite["mask"] = keep if p["mask"] is None else p["mask"].detach() * keep
    torch.testing.assert_close(got, torchvision_op(finite), **TOL[torch.float32])
    grads = torch.autograd.grad(got, leaves, torch.randn_like(got))
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_empty_batch(backend, device, v2):
    """N = 0 (a batch without images): an empty output of the right shape, zero gradients."""
    p = make_problem("groups2_dg4", torch.float32, device, n=0, v2=v2)
    leaves = [t.requires_grad_() for t in (p["input"], p["offset"], p["weight"], p["bias"], p["mask"])
              if t is not None]
    got = run(p, backend)
    assert got.shape == (0, 6, 4, 5) and got.dtype == torch.float32
    assert torchvision_op(p).shape == got.shape
    grads = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
    for leaf, g in zip(leaves, grads):
        assert g is None or (g.shape == leaf.shape and (g == 0).all())


# ----------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("case", ["v1", "groups2_dg4", "depthwise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_is_rounding(backend, device, dtype, case):
    """fp16/bf16 features and weights, fp32 offsets/mask and accumulation. Yardstick (as for
    RoIAlign): the float64 result on the same rounded inputs, rounded once to `dtype`, is PyTorch's
    own best in that dtype; the backend's largest error may be LOW_PRECISION_FACTOR times that.
    The reference and cpp backends sample and accumulate in fp32 and round once, so they must also
    match torchvision's fp32 result rounded to `dtype` element by element (one ulp apart at most).
    The Triton kernel, by design (kernels/deform_conv.py header), rounds the sampled column tile to
    `dtype` to feed the tensor cores: per element it is not "fp32 rounded once", and only the
    max-error yardstick applies to it."""
    p = make_problem(case, torch.float32, device)
    for name in ("input", "weight", "bias"):
        if p[name] is not None:
            p[name] = p[name].to(dtype)
    got = run(p, backend)
    assert got.dtype == dtype and got.shape[1] == p["weight"].shape[0]
    exact = run({**p, **{k: v.double() for k, v in p.items() if isinstance(v, torch.Tensor)}},
                fn=torchvision.ops.deform_conv2d)
    err = (got.double() - exact).abs().max()
    own = (exact.to(dtype).double() - exact).abs().max()
    assert err <= LOW_PRECISION_FACTOR * own, f"error {err:.3g} vs rounding error {own:.3g}"
    if backend != "triton":
        upcast = {**p, **{k: p[k].float() for k in ("input", "weight", "bias") if p[k] is not None}}
        torch.testing.assert_close(got, torchvision_op(upcast).to(dtype), **TOL[dtype])


# ----------------------------------------------------------------------------- argument errors

def _good(device="cpu"):
    """A valid v2 call with groups 2 and offset groups 2: input 4 channels, 5x6, 3x3, padding 1."""
    return dict(input=torch.randn(2, 4, 5, 6, device=device), offset=torch.randn(2, 36, 5, 6, device=device),
                weight=torch.randn(6, 2, 3, 3, device=device), bias=torch.randn(6, device=device),
                stride=1, padding=1, dilation=1, mask=torch.rand(2, 18, 5, 6, device=device))


def _with(**changes):
    return lambda: {**_good(), **changes}


BAD_ARGUMENTS = {
    # name: (changes to a good call, exception type, a regex the message must match)
    "offset_channels": (_with(offset=torch.randn(2, 35, 5, 6)), ValueError, r"offset.*2 \* offset_groups"),
    "input_channels_vs_weight": (_with(input=torch.randn(2, 5, 5, 6)), ValueError, r"input has 5 channels.*weight"),
    "out_channels_vs_groups": (_with(weight=torch.randn(5, 2, 3, 3)), ValueError,
                               r"weight has 5 output channels.*groups"),
    "channels_vs_offset_groups": (_with(offset=torch.randn(2, 54, 5, 6), mask=None), ValueError, r"offset groups"),
    "offset_spatial": (_with(offset=torch.randn(2, 36, 5, 5)), ValueError, r"offset must have shape"),
    "offset_batch": (_with(offset=torch.randn(1, 36, 5, 6)), ValueError, r"offset must have shape"),
    "mask_spatial": (_with(mask=torch.rand(2, 18, 4, 6)), ValueError, r"mask must have shape"),
    "mask_channels": (_with(mask=torch.rand(2, 9, 5, 6)), ValueError, r"mask must have shape"),
    "mask_batch": (_with(mask=torch.rand(3, 18, 5, 6)), ValueError, r"mask must have shape"),
    "bias_shape": (_with(bias=torch.randn(5)), ValueError, r"bias must have shape"),
    "weight_dtype": (_with(weight=torch.randn(6, 2, 3, 3, dtype=torch.float64)), TypeError, r"weight is torch.float64"),
    "bias_dtype": (_with(bias=torch.randn(6, dtype=torch.float64)), TypeError, r"bias is torch.float64"),
    "integer_input": (_with(input=torch.ones(2, 4, 5, 6, dtype=torch.int64)), TypeError,
                      r"input must be floating point"),
    "input_3d": (_with(input=torch.randn(4, 5, 6)), ValueError, r"input must be 4-D"),
    "offset_not_tensor": (_with(offset=[[0.0]]), TypeError, r"offset must be a Tensor"),
    "offset_device": (_with(offset=torch.randn(2, 36, 5, 6, device="meta")), ValueError, r"offset is on meta"),
    "mask_device": (_with(mask=torch.rand(2, 18, 5, 6, device="meta")), ValueError, r"mask is on meta"),
    "weight_device": (_with(weight=torch.randn(6, 2, 3, 3, device="meta")), ValueError, r"weight is on meta"),
    "stride_zero": (_with(stride=0), ValueError, r"stride must be an int >= 1"),
    "stride_triple": (_with(stride=(1, 1, 1)), ValueError, r"stride must be an int >= 1 or a pair"),
    "stride_float": (_with(stride=1.5), TypeError, r"stride must be an int or a pair of ints"),
    "stride_none": (_with(stride=None), TypeError, r"stride must be an int or a pair of ints"),
    # sizes before dtypes (torchvision's order): the offset's size is reported, not the weight's dtype
    "size_before_dtype": (_with(offset=torch.randn(2, 35, 5, 6), weight=torch.randn(6, 2, 3, 3).double()),
                          ValueError, r"offset must have 2 \* offset_groups"),
    "expanded_giant_input": (_with(input=torch.randn(1, 4, 1, 1).expand(2, 4, 2 ** 13, 2 ** 13 + 1),
                                   offset=torch.randn(1, 36, 1, 1).expand(2, 36, 2 ** 13, 2 ** 13 + 1)),
                             ValueError, r"input is an expanded view .* 2.0 GiB"),
    "padding_negative": (_with(padding=(1, -1)), ValueError, r"padding must be an int >= 0"),
    "dilation_zero": (_with(dilation=(0, 1)), ValueError, r"dilation"),
    "empty_output": (_with(padding=0, input=torch.randn(2, 4, 2, 6)), ValueError, r"output would be empty"),
}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("bad", list(BAD_ARGUMENTS))
def test_bad_arguments_raise(bad, backend_name):
    make, exc, pattern = BAD_ARGUMENTS[bad]
    args = make()
    with pytest.raises(exc, match=pattern):
        ops.deform_conv2d(args["input"], args["offset"], args["weight"], args["bias"], args["stride"],
                          args["padding"], args["dilation"], args["mask"], backend=backend_name)


def test_unknown_backend_raises():
    args = _good()
    with pytest.raises(ValueError, match=r"backend must be one of"):
        ops.deform_conv2d(args["input"], args["offset"], args["weight"], padding=1, backend="cudnn")


def test_reference_is_good_call():
    """The calls above differ from this one only in what they break."""
    args = _good()
    out = ops.deform_conv2d(args["input"], args["offset"], args["weight"], args["bias"], 1, 1, 1,
                            args["mask"], backend="reference")
    assert out.shape == (2, 6, 5, 6)
