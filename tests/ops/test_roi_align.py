"""Single-level RoIAlign: every backend against torchvision's C++ op and the naive float64 loop.

Oracles: ``torchvision.ops.roi_align`` (its C++/CUDA op, not the pure-Python ``_roi_align``, which
is wrong for RoIs more than 1 px off the map) and ``naive_roi_align``. torchvision's CPU op crashes
("cannot create std::vector larger than max_size()") on an aligned RoI with exactly one negative
side and an adaptive grid, so such RoIs are compared with the naive loop only (``tv_safe``).
API errors, backend selection and autocast: test_roi_align_api.py. Multi-level:
test_multilevel_roi_align.py.
"""
import random
import time

import pytest
import torch
import torchvision

from htc_fast import ops
from htc_fast.ops.reference import roi_align as reference
from tests.ops.naive_roi_align import naive_roi_align, random_rois
from tests.support import LOW_PRECISION_FACTOR, TOL, require_backend

ALL_KINDS = ("inside", "border", "outside", "zero", "flipped", "point")


def problem(backend):
    """(N, C, H, W, K, (PH, PW)), random; tiny under Triton (the interpreter is ~30 ms a program)."""
    if backend == "triton":
        return 2, random.choice([1, 3, 5]), random.randint(4, 9), random.randint(4, 9), 6, (2, 2)
    return (3, random.choice([1, 3, 13, 37]), random.randint(4, 20), random.randint(4, 20), 18,
            (random.randint(1, 4), random.randint(1, 4)))


def with_layout(x, layout):
    """The same values as contiguous NCHW, channels-last, or a strided non-contiguous view."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(x.shape[0], x.shape[1] + 1, x.shape[2], 2 * x.shape[3], dtype=x.dtype, device=x.device)
    big[:, 1:, :, ::2] = x
    view = big[:, 1:, :, ::2]
    assert not view.is_contiguous()
    return view


def tv_safe(rois, aligned, sampling_ratio):
    """(K,) bool: RoIs torchvision's CPU op can evaluate (see the module docstring)."""
    if not aligned or sampling_ratio > 0:
        return torch.ones(rois.shape[0], dtype=torch.bool, device=rois.device)
    return (rois[:, 3] >= rois[:, 1]) & (rois[:, 4] >= rois[:, 2])


def raw_op(backend):
    """The backend's operator with the positional signature (input, rois, scale, PH, PW, sr, aligned)."""
    if backend == "reference":
        return reference.roi_align
    if backend == "cpp":
        return torch.ops.htc_fast.roi_align
    from htc_fast.ops.roi_align import _triton  # the kernels, with their autograd registered

    return _triton().roi_align_triton


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("sampling_ratio", [0, -1, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_forward_matches_oracles(backend, device, aligned, sampling_ratio, layout):
    n, c, h, w, k, out = problem(backend)
    scale = random.choice([1.0, 0.5, 0.25])
    x = with_layout(torch.randn(n, c, h, w, device=device), layout)
    rois = random_rois(k, n, h, w, scale, kinds=ALL_KINDS, device=device)
    rois[0, 0] = n - 1  # a batch index > 0 at least once

    got = ops.roi_align(x, rois, out, scale, sampling_ratio, aligned, backend=backend)
    assert got.shape == (k, c, *out) and got.dtype == x.dtype and got.is_contiguous()
    naive = naive_roi_align(x, rois, out, scale, sampling_ratio, aligned)
    torch.testing.assert_close(got.double().cpu(), naive, **TOL[torch.float32])
    keep = tv_safe(rois, aligned, sampling_ratio)
    expected = torchvision.ops.roi_align(x, rois[keep], out, scale, sampling_ratio, aligned)
    torch.testing.assert_close(got[keep], expected, **TOL[torch.float32])
    outside = got[ALL_KINDS.index("outside")::len(ALL_KINDS)]
    assert (outside == 0).all()  # every sample more than 1 px off the map: exact zeros


@pytest.mark.parametrize("sampling_ratio", [0, 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_float64_is_exact(backend, device, aligned, sampling_ratio):
    n, c, h, w, k, out = problem(backend)
    x = torch.randn(n, c, h, w, dtype=torch.float64, device=device)
    rois = random_rois(k, n, h, w, 0.5, kinds=ALL_KINDS, dtype=torch.float64, device=device)
    got = ops.roi_align(x, rois, out, 0.5, sampling_ratio, aligned, backend=backend)
    assert got.dtype == torch.float64
    naive = naive_roi_align(x, rois, out, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(got.cpu(), naive, **TOL[torch.float64])
    keep = tv_safe(rois, aligned, sampling_ratio)
    expected = torchvision.ops.roi_align(x, rois[keep], out, 0.5, sampling_ratio, aligned)
    torch.testing.assert_close(got[keep], expected, **TOL[torch.float64])


@pytest.mark.parametrize("channels", [1, 7, 37, 130])
def test_channel_counts(backend, device, channels):
    """C off every power of two, and above one 128-channel block (Triton's largest BLOCK_C)."""
    x = torch.randn(2, channels, 7, 9, device=device)
    rois = random_rois(3, 2, 7, 9, 0.5, device=device)
    got = ops.roi_align(x, rois, (2, 1), 0.5, 0, True, backend=backend)
    expected = torchvision.ops.roi_align(x, rois, (2, 1), 0.5, 0, True)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_samples_on_the_validity_edges(backend, device):
    """One sample per RoI (1x1 output, sampling_ratio 1, not aligned) at its centre, placed exactly
    on -1 or H / W (kept, clamped to the border) or just beyond (dropped)."""
    x = torch.randn(2, 3, 6, 8, device=device)
    h, w = 6, 8
    centres = [(-1.0, 3.0), (h, 3.0), (2.0, -1.0), (2.0, w), (-1.0, w), (-1.25, 3.0), (h + 0.25, 3.0),
               (2.0, w + 0.25)]
    rois = torch.tensor([[1, cx - 1, cy - 1, cx + 1, cy + 1] for cy, cx in centres], device=device)
    got = ops.roi_align(x, rois, 1, 1.0, 1, False, backend=backend)[:, :, 0, 0]
    f = x[1]
    expected = torch.stack([f[:, 0, 3], f[:, h - 1, 3], f[:, 2, 0], f[:, 2, w - 1], f[:, 0, w - 1]])
    torch.testing.assert_close(got[:5], expected, rtol=0, atol=0)
    assert (got[5:] == 0).all()
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, rois, 1, 1.0, 1, False)[:, :, 0, 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_is_rounding(backend, device, dtype):
    """fp16/bf16 features, fp32 accumulation: the error vs float64 is the final rounding, about."""
    n, c, h, w, k, out = problem(backend)
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    rois = random_rois(k, n, h, w, 0.5, device=device)
    got = ops.roi_align(x, rois, out, 0.5, 0, True, backend=backend)
    assert got.dtype == dtype
    exact = torchvision.ops.roi_align(x.double(), rois.double(), out, 0.5, 0, True)
    err = (got.double() - exact).abs().max()
    own = (exact.to(dtype).double() - exact).abs().max()  # rounding the exact result to `dtype`
    assert err <= LOW_PRECISION_FACTOR * own, f"error {err:.3g} vs rounding error {own:.3g}"
    upcast = torchvision.ops.roi_align(x.float(), rois, out, 0.5, 0, True).to(dtype)
    torch.testing.assert_close(got, upcast, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_rois(backend, device, dtype):
    x = torch.randn(2, 5, 6, 7, device=device, dtype=dtype, requires_grad=True)
    empty_list = [torch.zeros(0, 4, device=device), torch.zeros(0, 4, device=device)]
    for rois in (torch.zeros(0, 5, device=device), empty_list, []):
        y = ops.roi_align(x, rois, (3, 4), 0.5, 0, True, backend=backend)
        assert y.shape == (0, 5, 3, 4) and y.dtype == dtype
    y.sum().backward()  # an image batch without RoIs must not break training
    assert x.grad is not None and (x.grad == 0).all()


def test_box_list_and_output_size_forms(backend, device):
    x = torch.randn(3, 4, 10, 12, device=device)
    rois = random_rois(5, 3, 10, 12, 1.0, device=device)
    rois[:, 0] = torch.tensor([0.0, 2, 2, 2, 0], device=device)
    boxes = [rois[rois[:, 0] == i, 1:] for i in range(3)]  # image 1 has no boxes
    by_list = ops.roi_align(x, boxes, 2, 1.0, 2, False, backend=backend)
    by_rois = ops.roi_align(x, rois[torch.argsort(rois[:, 0], stable=True)], (2, 2), 1.0, 2, False,
                            backend=backend)
    torch.testing.assert_close(by_list, by_rois, **TOL[torch.float32])
    torch.testing.assert_close(by_list, torchvision.ops.roi_align(x, boxes, 2, 1.0, 2, False),
                               **TOL[torch.float32])
    assert ops.roi_align(x, rois, [1, 3], 1.0, 2, False, backend=backend).shape == (5, 4, 1, 3)


@pytest.mark.parametrize("aligned, sampling_ratio", [(True, 0), (False, 2)])
def test_gradcheck(backend, device, aligned, sampling_ratio):
    x = torch.randn(2, 1, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    rois = random_rois(4, 2, 4, 5, 0.5, kinds=("inside", "border", "flipped"), dtype=torch.float64,
                       device=device)
    fn = lambda x: ops.roi_align(x, rois, (2, 2), 0.5, sampling_ratio, aligned, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), fast_mode=backend == "triton")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [True, False])
def test_backward_matches_torchvision(backend, device, aligned, layout):
    n, c, h, w, k, out = problem(backend)
    x = with_layout(torch.randn(n, c, h, w, device=device), layout).requires_grad_()
    rois = random_rois(k, n, h, w, 0.5, device=device)
    grad_out = torch.randn(k, c, *out, device=device)
    (got,) = torch.autograd.grad(ops.roi_align(x, rois, out, 0.5, 0, aligned, backend=backend), x, grad_out)
    x_tv = x.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(torchvision.ops.roi_align(x_tv, rois, out, 0.5, 0, aligned), x_tv,
                                      grad_out)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


def test_invalid_rois_give_zeros(backend, device):
    """Non-finite coordinates through the public API; non-finite or out-of-range batch indices
    straight into the operator (the API rejects those; kernels must still not read out of bounds)."""
    x = torch.randn(2, 3, 8, 9, device=device)
    rois = random_rois(8, 2, 8, 9, 1.0, device=device)
    bad = [float("nan"), float("inf"), -float("inf")]
    for i in range(4):
        rois[i, 1 + i] = bad[i % 3]
    got = ops.roi_align(x, rois, 2, 1.0, 0, True, backend=backend)
    assert (got[:4] == 0).all()
    torch.testing.assert_close(got[4:], torchvision.ops.roi_align(x, rois[4:], 2, 1.0, 0, True),
                               **TOL[torch.float32])
    rois[:4, 1:] = rois[4:, 1:]
    rois[:4, 0] = torch.tensor([float("nan"), float("inf"), -1.0, 2.0])
    rois[4, 0] = 1.75  # converted like int(): image 1
    got = raw_op(backend)(x, rois, 1.0, 2, 2, 0, True)
    assert (got[:4] == 0).all()
    truncated = torch.cat([torch.ones(1, 1, device=device), rois[4:5, 1:]], 1)
    torch.testing.assert_close(got[4:5], torchvision.ops.roi_align(x, truncated, 2, 1.0, 0, True),
                               **TOL[torch.float32])


@pytest.mark.parametrize("aligned", [True, False])
def test_huge_roi_is_bounded(backend, device, aligned):
    """A 1e7-pixel RoI has ~1e12 samples per bin; only those near the map may be visited."""
    x = torch.randn(2, 3, 12, 10, device=device)
    rois = torch.tensor([[0, -1e7, -1e7, 1e7, 1e7], [1, -1e7, 2, 5, 9], [0, 3, -2e6, 4, 8e6]],
                        device=device)
    start = time.perf_counter()
    got = ops.roi_align(x, rois, (2, 1), 1.0, 0, aligned, backend=backend)
    assert time.perf_counter() - start < 30
    expected = reference.roi_align(x, rois, 1.0, 2, 1, 0, aligned)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-12)


def test_large_roi_matches_torchvision(backend, device):
    """Millions of samples per bin, most off the map: the bounded enumeration must not lose any."""
    x = torch.randn(1, 2, 10, 12, device=device)
    rois = torch.tensor([[0, -2000.0, -1500.0, 2000.0, 1500.0], [0, -700.0, 3.3, 900.0, 7.9]],
                        device=device)
    got = ops.roi_align(x, rois, (2, 3), 1.0, 0, True, backend=backend)
    expected = torchvision.ops.roi_align(x, rois, (2, 3), 1.0, 0, True)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_opcheck(fast_backend, device):
    """Schema, fake kernel (contiguous output from channels-last input), autograd registration and
    AOT dispatch of the registered operators."""
    x = torch.randn(2, 3, 6, 7, device=device).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    rois = random_rois(2, 2, 6, 7, 0.5, device=device)  # few programs: opcheck runs the op a dozen times
    if fast_backend == "cpp":
        forward, backward = torch.ops.htc_fast.roi_align, torch.ops.htc_fast.roi_align_backward
    else:
        from htc_fast.ops.roi_align import _triton  # the kernels, with their autograd registered

        kernels = _triton()
        forward, backward = kernels.roi_align_triton, kernels.roi_align_backward_triton
    torch.library.opcheck(forward, (x, rois, 0.5, 1, 2, 0, True))
    grad = torch.randn(2, 3, 1, 2, device=device)
    torch.library.opcheck(backward, (grad, rois, 0.5, 1, 2, 2, 3, 6, 7, 0, True))
    assert backward(grad, rois, 0.5, 1, 2, 2, 3, 6, 7, 0, True).is_contiguous()


def test_compile_fullgraph_cpp(device):
    require_backend("cpp", device.type)
    x = torch.randn(2, 5, 9, 11, device=device, requires_grad=True)
    rois = random_rois(6, 2, 9, 11, 0.5, device=device)

    def fn(x, rois):
        return ops.roi_align(x, rois, (3, 2), 0.5, 0, True, backend="cpp")

    got = torch.compile(fn, fullgraph=True)(x, rois)
    expected = fn(x, rois)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(expected, x, g)[0])


def test_compile_reference(device):
    """The reference sizes its work from the data (sample counts, chunks), so it compiles with graph
    breaks, not fullgraph; what matters is that a compiled model falling back to it still runs."""
    x = torch.randn(2, 5, 9, 11, device=device, requires_grad=True)
    rois = random_rois(6, 2, 9, 11, 0.5, device=device)

    def fn(x, rois):
        return ops.roi_align(x, rois, (3, 2), 0.5, 0, True, backend="reference")

    got = torch.compile(fn, backend="aot_eager")(x, rois)
    torch.testing.assert_close(got, torchvision.ops.roi_align(x, rois, (3, 2), 0.5, 0, True),
                               **TOL[torch.float32])
    got.sum().backward()
    assert x.grad is not None
