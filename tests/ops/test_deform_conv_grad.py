"""Deformable convolution backward and integration: the five gradients (input, offset, mask, weight,
bias) of every backend against torchvision's and the reference's, float64 gradcheck,
``torch.library.opcheck`` of the registered operators, ``torch.compile(fullgraph=True)``,
low-precision backward and autocast. Forward parity and argument errors: test_deform_conv.py.
"""
import pytest
import torch
import torchvision

from htc_fast import ops
from htc_fast.ops.reference import deform_conv as reference
from tests.ops.naive_deform_conv import random_offsets
from tests.ops.test_deform_conv import make_problem, run
from tests.support import LOW_PRECISION_FACTOR, TOL, require_backend

NAMES = ("input", "offset", "mask", "weight", "bias")


def leaves_of(problem):
    """The problem's differentiable tensors, in NAMES order (absent mask / bias skipped)."""
    return {name: problem[name].requires_grad_() for name in NAMES if problem[name] is not None}


def gradients(problem, grad_out, backend=None, fn=None):
    """{name: gradient} of the problem run through a backend (or `fn`), on fresh leaves."""
    p = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in problem.items()}
    leaves = leaves_of(p)
    out = run(p, backend, fn)
    return dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out)))


def outside_taps(problem):
    """(N, 2 * dg * K, Ho, Wo) bool: the offset entries whose sample lies outside (-1, H) x (-1, W)."""
    p = problem
    _, _, kh, kw = p["weight"].shape
    h, w = p["input"].shape[2:]
    y, x = reference.sample_positions(p["offset"].detach(), kh, kw, _pair(p["stride"]),
                                      _pair(p["padding"]), _pair(p["dilation"]))
    out = ~((y > -1) & (y < h) & (x > -1) & (x < w))
    return out.reshape(p["offset"].shape[0], -1, *p["offset"].shape[2:]).repeat_interleave(2, dim=1)


def torchvision_gradients(problem, grad_out):
    """torchvision's gradients under the mmcv convention htc_fast follows: a sample exactly on
    y = -1 or x = -1 is outside (it reads 0, forward and backward). torchvision's forward agrees,
    but its offset gradient there is the one-sided derivative towards the map (its
    ``get_coordinate_weight`` has no validity test; mmcv's ``dmcn_get_coordinate_weight`` returns
    0). Only integer offsets hit this; it matters for zero offsets with padding 1."""
    expected = gradients(problem, grad_out, fn=torchvision.ops.deform_conv2d)
    expected["offset"] = expected["offset"].masked_fill(outside_taps(problem), 0)
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("case", ["v1", "v2_pad0_batch3", "stride2_pad2_dg2", "stride_pad_dil_hw",
                                  "groups2_dg4", "kernel3x1", "depthwise", "far_offsets",
                                  "integer_offsets", "channels_last", "transposed_views"])
def test_backward_matches_oracles(backend, device, dtype, case):
    """Integer offsets included: on a pixel the derivative of the interpolation is one-sided, and
    every implementation must take the same side (floor: the difference towards the next pixel)."""
    p = make_problem(case, dtype, device)
    n, co = p["input"].shape[0], p["weight"].shape[0]
    grad_out = torch.randn(n, co, *p["offset"].shape[2:], dtype=dtype, device=device)
    got = gradients(p, grad_out, backend)
    expected = torchvision_gradients(p, grad_out)
    assert got.keys() == expected.keys()
    for name in got:
        assert got[name].shape == p[name].shape and got[name].dtype == dtype, name
        torch.testing.assert_close(got[name], expected[name], **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")
    if backend != "reference":
        expected = gradients(p, grad_out, "reference")
        for name in got:
            torch.testing.assert_close(got[name], expected[name], **TOL[dtype],
                                       msg=lambda m, name=name: f"{name}: {m}")


def test_offset_gradient_on_the_border_is_zero(backend, device):
    """A 1x1 identity kernel sampling exactly on y = -1 / x = -1 (outside: reads 0) gets a zero
    offset gradient, as in mmcv; exactly on y = 0 it gets the difference towards the next row,
    like every interior integer position. torchvision differs only in the first (see
    torchvision_gradients)."""
    x = torch.randn(1, 1, 4, 5, dtype=torch.float64, device=device)
    weight = torch.ones(1, 1, 1, 1, dtype=torch.float64, device=device)
    offset = torch.zeros(1, 2, 4, 5, dtype=torch.float64, device=device)
    offset[0, 0, 0, 2] = -1.0  # samples (-1, 2)
    offset[0, 1, 2, 0] = -1.0  # samples (2, -1)
    offset.requires_grad_()
    (g,) = torch.autograd.grad(ops.deform_conv2d(x, offset, weight, backend=backend).sum(), offset)
    assert g[0, 0, 0, 2] == 0 and g[0, 1, 0, 2] == 0 and g[0, 0, 2, 0] == 0 and g[0, 1, 2, 0] == 0
    f = x[0, 0]
    assert g[0, 0, 0, 3] == f[1, 3] - f[0, 3] and g[0, 1, 1, 0] == f[1, 1] - f[1, 0]
    tv = torch.autograd.grad(torchvision.ops.deform_conv2d(x, offset, weight).sum(), offset)[0]
    assert tv[0, 0, 0, 2] == f[0, 2] and tv[0, 1, 2, 0] == f[2, 0]  # the one-sided derivative


@pytest.fixture
def one_thread():
    """gradcheck / opcheck call the op hundreds of times on a few dozen values: intra-op threads
    only add fork/join cost there (tens of ms per call on a loaded 2-core machine vs ~0.2 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GRADCHECK = {
    # (problem overrides, deform_conv2d arguments); offsets "fractional" with integer parts in
    # [-2, 2): never on an integer sample position, often partly (or wholly) outside the map.
    "v2_groups2_dg2": dict(n=1, c=4, h=4, w=4, co=2, groups=2, dg=2, v2=True, padding=1),
    "v1_stride2_dil2": dict(n=2, c=2, h=5, w=4, co=3, stride=2, dilation=(2, 1), padding=(2, 1)),
}


@pytest.mark.parametrize("variant", list(GRADCHECK))
def test_gradcheck(backend, device, variant, one_thread):
    p = make_problem("v1", torch.float64, device, offsets="fractional", scale=2.0, **GRADCHECK[variant])
    y, x = reference.sample_positions(p["offset"], 3, 3, _pair(p["stride"]), _pair(p["padding"]),
                                      _pair(p["dilation"]))
    h, w = p["input"].shape[2:]
    partly = ((y > -1) & (y < 0)) | ((y > h - 1) & (y < h)) | ((x > -1) & (x < 0)) | ((x > w - 1) & (x < w))
    assert partly.any() and ((y - y.floor()).min() >= 0.09)  # the sample set covers both regimes
    leaves = leaves_of(p)

    def fn(*tensors):
        q = dict(p, **dict(zip(leaves, tensors)))
        return run(q, backend)

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), fast_mode=backend == "triton")


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _operators(fast_backend):
    if fast_backend == "cpp":
        return torch.ops.htc_fast.deform_conv2d, torch.ops.htc_fast.deform_conv2d_backward
    from htc_fast.ops.deform_conv import _triton

    _triton()  # defines htc_fast::deform_conv2d_triton and registers its autograd

    return torch.ops.htc_fast.deform_conv2d_triton, None


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["v1", "v2"])
def test_opcheck(fast_backend, device, with_mask, with_bias, one_thread):
    """Schema, fake kernel, autograd registration and AOT dispatch of the registered operators
    (arguments: input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    groups, offset_groups). Channels-last input: the fake kernel must still describe the result."""
    forward, backward = _operators(fast_backend)
    p = make_problem("v1", torch.float32, device, n=2, c=4, h=4, w=5, co=2, groups=2, dg=2,
                     stride=(1, 2), v2=with_mask, bias=with_bias)
    p["input"] = p["input"].contiguous(memory_format=torch.channels_last)
    leaves_of(p)  # requires_grad: opcheck's autograd-registration test needs it
    args = (p["input"], p["weight"], p["offset"], p["mask"], p["bias"], 1, 2, 1, 1, 1, 1, 2, 2)
    torch.library.opcheck(forward, args)
    if backward is not None:
        grad = torch.randn(2, 2, 4, 3, device=device)
        detached = [None if t is None else t.detach() for t in args[1:4]]
        bargs = (grad, p["input"].detach(), *detached, 1, 2, 1, 1, 1, 1, 2, 2)
        torch.library.opcheck(backward, bargs)


def test_compile_fullgraph_cpp(device):
    require_backend("cpp", device.type)
    p = make_problem("groups2_dg4", torch.float32, device)
    leaves = leaves_of(p)

    def fn(x, offset, mask, weight, bias):
        return ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask, backend="cpp")

    args = tuple(leaves.values())
    got = torch.compile(fn, fullgraph=True)(*args)
    expected = fn(*args)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, args, g), torch.autograd.grad(expected, args, g)):
        torch.testing.assert_close(a, b, **TOL[torch.float32])  # the bias gradient's sum order differs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_backward(fast_backend, device, dtype):
    """fp16/bf16 input, weight, bias and output gradient; fp32 offsets and mask. The input and
    weight gradients (in `dtype`) may err by LOW_PRECISION_FACTOR x the rounding of the float64
    gradients to `dtype`; the offset / mask gradients are fp32 sums of exact products, held to the
    fp32 tolerance."""
    p = make_problem("groups2_dg4", torch.float32, device)
    for name in ("input", "weight", "bias"):
        p[name] = p[name].to(dtype)
    grad_out = torch.randn(3, 6, 4, 5, device=device).to(dtype)
    got = gradients(p, grad_out, fast_backend)
    exact_problem = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    exact = gradients(exact_problem, grad_out.double(), fn=torchvision.ops.deform_conv2d)
    for name in ("input", "weight", "bias"):
        assert got[name].dtype == dtype, name
        err = (got[name].double() - exact[name]).abs().max()
        own = (exact[name].to(dtype).double() - exact[name]).abs().max()
        assert err <= LOW_PRECISION_FACTOR * own, f"{name}: error {err:.3g} vs rounding error {own:.3g}"
    for name in ("offset", "mask"):
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name].double(), exact[name], **TOL[torch.float32])


@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
def test_autocast_cpu_bf16(v2):
    """Under CPU autocast (bf16) the cpp op runs like a convolution: bf16 result from bf16 input /
    weight / bias, while offsets and mask stay fp32 (geometry is never rounded to bf16)."""
    require_backend("cpp", "cpu")
    p = make_problem("stride2_pad2_dg2", torch.float32, "cpu", v2=v2)
    p["offset"] = p["offset"] + 1.0 / 3.0  # not representable in bf16: a cast would show
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(p, "cpp")
    assert got.dtype == torch.bfloat16
    low = {**p, **{k: p[k].to(torch.bfloat16) for k in ("input", "weight", "bias")}}
    torch.testing.assert_close(got, run(low, "cpp"), rtol=0, atol=0)
    rounded = {**low, "offset": p["offset"].to(torch.bfloat16).float()}
    if p["mask"] is not None:
        rounded["mask"] = p["mask"].to(torch.bfloat16).float()
    assert not torch.equal(got, run(rounded, "cpp")), "offsets (or mask) were rounded to bf16"
    leaves = leaves_of(p)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(p, "cpp")
    grads = dict(zip(leaves, torch.autograd.grad(out.float().sum(), list(leaves.values()))))
    for name, g in grads.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name


def test_random_offsets_kinds():
    """The input generator does what the tests above rely on."""
    frac = random_offsets(2, 2, 3, 3, 4, 5, "fractional", 2.0)
    part = frac - frac.floor()
    assert part.min() >= 0.1 - 1e-6 and part.max() <= 0.9 + 1e-6
    ints = random_offsets(2, 1, 3, 3, 4, 5, "integer", 3.0)
    assert torch.equal(ints, ints.round()) and ints.abs().max() <= 3
