"""The ops under CPU bf16 autocast, on every backend (Triton under TRITON_INTERPRET=1).

Rules (htc_fast/ops/deform_conv.py and roi_align.py docstrings): deform_conv2d runs like a
convolution, input / weight / bias in the autocast dtype, offsets and masks in float32; RoIAlign
keeps its features' dtype, rois are float32 geometry. The oracle of an autocast call is the same
backend called outside autocast with the casts written out: results must be identical. The
operators called directly (torch.ops.htc_fast.*, C++ and Triton) follow the same rules.
"""
import pytest
import torch
from torch import nn

from htc_fast import ops
from htc_fast.model.deform_conv import DeformConv2dPack, ModulatedDeformConv2dPack
from tests.ops.test_deform_conv import make_problem, run
from tests.support import require_backend

BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]
BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", [DeformConv2dPack, ModulatedDeformConv2dPack])
def test_dcn_layer_after_bf16_activations(backend, layer):
    """Issue 11's reproducer: a DCN layer fed by autocast bf16 activations (its weights fp32)."""
    require_backend(backend, "cpu")
    x = torch.randn(2, 8, 9, 10)
    conv, dcn = nn.Conv2d(8, 8, 1), layer(8, 8, 3, padding=1)
    nn.init.normal_(dcn.conv_offset.weight, std=0.1)  # mmcv zero-inits it: make the offsets matter
    with autocast(), ops.use_backend(backend):
        h = torch.relu(conv(x))
        assert h.dtype == BF16
        got = dcn(h)
    assert got.dtype == BF16
    # The same computation outside autocast, casts written out: the offset branch is a conv,
    # which autocast runs in bf16, then the offsets / mask are used in fp32.
    with autocast():
        raw = dcn.conv_offset(h)
    if layer is DeformConv2dPack:
        offset, mask = raw.float(), None
    else:
        o1, o2, m = torch.chunk(raw, 3, dim=1)
        offset, mask = torch.cat((o1, o2), 1).float(), torch.sigmoid(m).float()
    bias = None if dcn.bias is None else dcn.bias.to(BF16)
    expected = ops.deform_conv2d(h, offset, dcn.weight.to(BF16), bias, dcn.stride, dcn.padding,
                                 dcn.dilation, mask, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deform_conv2d_casts_features_not_geometry(backend):
    require_backend(backend, "cpu")
    p = make_problem("stride2_pad2_dg2", torch.float32, "cpu", v2=True)
    p["offset"] = p["offset"] + 1.0 / 3.0  # not representable in bf16: a cast would show
    with autocast():
        got = run(p, backend)
    assert got.dtype == BF16
    low = {**p, **{k: p[k].to(BF16) for k in ("input", "weight", "bias")}}
    torch.testing.assert_close(got, run(low, backend), rtol=0, atol=0)
    rounded = {**low, "offset": p["offset"].to(BF16).float(), "mask": p["mask"].to(BF16).float()}
    assert not torch.equal(got, run(rounded, backend)), "offsets/mask were rounded to bf16"
    double = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in p.items()}
    with autocast():
        assert run(double, backend).dtype == torch.float64  # autocast leaves float64 alone


@pytest.mark.parametrize("backend", BACKENDS)
def test_dcn_gradients_under_autocast(backend):
    require_backend(backend, "cpu")
    p = make_problem("v1", torch.float32, "cpu", v2=True)
    leaves = {k: p[k].requires_grad_() for k in ("input", "offset", "mask", "weight", "bias")}
    with autocast():
        out = run(p, backend)
    grads = torch.autograd.grad(out.float().sum(), list(leaves.values()))
    for name, g in zip(leaves, grads):
        assert g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_align_keeps_feature_dtype(backend):
    require_backend(backend, "cpu")
    x = torch.randn(2, 3, 10, 12)
    rois = torch.tensor([[0, 1.0, 2, 30, 25], [1, 5, 5, 19.5, 33]])
    levels = [x, x[..., ::2, ::2].contiguous()]
    for features in (x, x.to(BF16)):
        with autocast():
            got = ops.roi_align(features, rois.double(), 3, 0.25, 2, True, backend=backend)
            got_ml = ops.multilevel_roi_align([f.to(features.dtype) for f in levels], rois, 3,
                                              strides=(4, 8), finest_scale=8, backend=backend)
        assert got.dtype == got_ml.dtype == features.dtype
        torch.testing.assert_close(got, ops.roi_align(features, rois, 3, 0.25, 2, True, backend=backend),
                                   rtol=0, atol=0)
        expected_ml = ops.multilevel_roi_align([f.to(features.dtype) for f in levels], rois, 3, strides=(4, 8),
                                               finest_scale=8, backend=backend)
        torch.testing.assert_close(got_ml, expected_ml, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_operators_called_directly(backend):
    """torch.ops.htc_fast.* under autocast: the same rules as the public functions (the autocast
    kernels registered in htc_fast/ops for the C++ and the Triton operators)."""
    require_backend(backend, "cpu")
    suffix = "" if backend == "cpp" else "_triton"
    if backend == "triton":
        import htc_fast.kernels  # noqa: F401  (defines the Triton operators)
    roi_op = getattr(torch.ops.htc_fast, "roi_align" + suffix)
    ml_op = getattr(torch.ops.htc_fast, "multilevel_roi_align" + suffix)
    dcn_op = getattr(torch.ops.htc_fast, "deform_conv2d" + suffix)
    x = torch.randn(2, 3, 10, 12, dtype=BF16)
    rois = torch.tensor([[0, 1.0, 2, 30, 25], [1, 5, 5, 19.5, 33]], dtype=torch.float64)
    with autocast():
        got = roi_op(x, rois, 0.25, 3, 3, 2, True)  # fp64 rois: cast to fp32 geometry
        got_ml = ml_op([x], rois, [0.25], 3, 3, 2, True, 56.0)
    assert torch.equal(got, roi_op(x, rois.float(), 0.25, 3, 3, 2, True))
    assert torch.equal(got_ml, ml_op([x], rois.float(), [0.25], 3, 3, 2, True, 56.0))
    p = make_problem("v1", torch.float32, "cpu", v2=True)
    args = (1, 1, 1, 1, 1, 1, 1, 1)  # stride, padding (the default problem pads 1), dilation, groups
    with autocast():
        out = dcn_op(p["input"], p["weight"], p["offset"], p["mask"], p["bias"], *args)
    assert out.dtype == BF16
    expected = dcn_op(p["input"].to(BF16), p["weight"].to(BF16), p["offset"], p["mask"], p["bias"].to(BF16),
                      *args)
    assert torch.equal(out, expected)
