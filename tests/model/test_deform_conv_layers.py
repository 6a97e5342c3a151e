"""DeformConv2dPack (DCNv1) and ModulatedDeformConv2dPack (DCNv2): mmcv's parameter layout, the
zero-initialised offset branch, legacy checkpoint keys, and the layer against torchvision's op.

The expected layouts are written out from mmcv 2.x's ``DeformConv2dPack`` /
``ModulatedDeformConv2dPack``: ``weight`` (Co, C/groups, kh, kw); ``conv_offset`` an nn.Conv2d
from C to dg*2*K (v1) or dg*3*K (v2) channels with the layer's kernel, stride, padding and
dilation, always with a bias; the layer's own ``bias`` only where asked (mmcv's v1 has none by
default, v2 has one).
"""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from htc_fast import ops
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.deform_conv import DeformConv2dPack, ModulatedDeformConv2dPack
from tests.support import TOL

# (in, out, kernel, stride, padding, dilation, groups, deform_groups)
CONFIGS = {
    "htc_c3": (8, 8, 3, 2, 1, 1, 1, 1),
    "x101_grouped": (8, 8, 3, 1, 1, 1, 4, 1),
    "dg2_dil2": (4, 6, 3, 1, 2, 2, 2, 2),
    "kernel_3x1": (4, 4, (3, 1), (1, 2), (1, 0), 1, 1, 4),
}


def make(version, config, **kwargs):
    cin, cout, k, s, p, d, g, dg = CONFIGS[config]
    cls = DeformConv2dPack if version == "v1" else ModulatedDeformConv2dPack
    return cls(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, deform_groups=dg, **kwargs)


def mmcv_layout(version, config, bias):
    cin, cout, k, _, _, _, g, dg = CONFIGS[config]
    kh, kw = (k, k) if isinstance(k, int) else k
    per_tap = 2 if version == "v1" else 3
    keys = {"weight": (cout, cin // g, kh, kw), "conv_offset.weight": (dg * per_tap * kh * kw, cin, kh, kw),
            "conv_offset.bias": (dg * per_tap * kh * kw,)}
    if bias:
        keys["bias"] = (cout,)
    return keys


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("version, bias", [("v1", None), ("v1", True), ("v2", None), ("v2", False)])
def test_state_dict_matches_mmcv(version, bias, config):
    layer = make(version, config) if bias is None else make(version, config, bias=bias)
    has_bias = (version == "v2") if bias is None else bias  # mmcv's defaults: v1 none, v2 one
    got = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert got == mmcv_layout(version, config, has_bias)
    assert (layer.conv_offset.weight == 0).all() and (layer.conv_offset.bias == 0).all()
    cin, _, k, _, _, _, _, _ = CONFIGS[config]
    fan_in = cin * (k * k if isinstance(k, int) else k[0] * k[1])
    assert layer.weight.abs().max() <= 1 / math.sqrt(fan_in)  # mmcv's uniform(-1/sqrt(fan_in), ...)


def _input(config, n=2, h=7, w=6, dtype=torch.float32):
    return torch.randn(n, CONFIGS[config][0], h, w, dtype=dtype)


def _conv2d(layer, x, weight=None):
    return F.conv2d(x, layer.weight if weight is None else weight, None, layer.stride, layer.padding,
                    layer.dilation, layer.groups)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fresh_layer_is_a_convolution(backend, config):
    """Zero offsets sample the regular grid (taps on the padding read 0, like zero padding); a fresh
    v2 layer's mask is sigmoid(0) = 0.5 everywhere."""
    x = _input(config)
    v1 = make("v1", config, bias=True)
    nn.init.normal_(v1.bias)
    v2 = make("v2", config)
    nn.init.normal_(v2.bias)
    with ops.use_backend(backend):
        got1, got2 = v1(x), v2(x)
    torch.testing.assert_close(got1, _conv2d(v1, x) + v1.bias.view(1, -1, 1, 1), **TOL[torch.float32])
    torch.testing.assert_close(got2, 0.5 * _conv2d(v2, x) + v2.bias.view(1, -1, 1, 1), **TOL[torch.float32])


class _Block(nn.Module):
    """A parent with a DCN layer at ``conv2``, like a ResNet bottleneck."""

    def __init__(self, layer):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = layer


def test_loads_mmdet_v1_offset_keys():
    """mmdetection v1 checkpoints keep the v1 offset conv beside the layer: ``conv2_offset.*`` for a
    layer at ``conv2.``; load_checkpoint must land them in ``conv2.conv_offset`` (mmcv's
    DeformConv2dPack renames them)."""
    block = _Block(DeformConv2dPack(4, 4, 3, padding=1))
    state = {k: torch.randn_like(v) for k, v in block.state_dict().items()}
    old = {k.replace("conv2.conv_offset.", "conv2_offset."): v for k, v in state.items()}
    assert "conv2_offset.weight" in old and "conv2.conv_offset.weight" not in old
    fresh = _Block(DeformConv2dPack(4, 4, 3, padding=1))
    load_checkpoint(fresh, {"state_dict": old, "meta": {}})
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_loads_old_mmcv_v2_offset_mask_keys():
    """mmcv's older DCNv2 layout named the branch ``conv_offset_mask``."""
    block = _Block(ModulatedDeformConv2dPack(4, 4, 3, padding=1))
    state = {k: torch.randn_like(v) for k, v in block.state_dict().items()}
    old = {k.replace("conv2.conv_offset.", "conv2.conv_offset_mask."): v for k, v in state.items()}
    assert "conv2.conv_offset_mask.weight" in old
    fresh = _Block(ModulatedDeformConv2dPack(4, 4, 3, padding=1))
    fresh.load_state_dict(old, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_layer_matches_torchvision(backend, version, config):
    """With a trained-looking offset branch: the offsets are the branch's first dg*2*K channels
    and, for v2, the mask is the sigmoid of the last dg*K ((dy, dx) interleaved per tap)."""
    layer = make(version, config, bias=True)
    for p in (layer.conv_offset.weight, layer.conv_offset.bias, layer.bias):
        nn.init.normal_(p, std=0.5)
    x = _input(config)
    with ops.use_backend(backend):
        got = layer(x)
    raw = layer.conv_offset(x)
    taps2 = 2 * layer.deform_groups * layer.kernel_size[0] * layer.kernel_size[1]
    mask = torch.sigmoid(raw[:, taps2:]) if version == "v2" else None
    expected = torchvision.ops.deform_conv2d(x, raw[:, :taps2], layer.weight, layer.bias, layer.stride,
                                             layer.padding, layer.dilation, mask)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_gradients_reach_every_parameter(version):
    """From the zero-initialised start (the offset branch must learn) and with a bias."""
    layer = make(version, "dg2_dil2", bias=True)
    x = _input("dg2_dil2").requires_grad_()
    out = layer(x)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), [x, *layer.parameters()])
    names = ["input"] + [name for name, _ in layer.named_parameters()]
    assert set(names) == {"input", "weight", "bias", "conv_offset.weight", "conv_offset.bias"}
    for name, g in zip(names, grads):
        assert g is not None and torch.isfinite(g).all() and (g != 0).any(), name


def test_channel_checks():
    with pytest.raises(ValueError, match="groups"):
        DeformConv2dPack(6, 4, 3, groups=4)
    with pytest.raises(ValueError, match="deform_groups"):
        ModulatedDeformConv2dPack(6, 6, 3, deform_groups=4)
