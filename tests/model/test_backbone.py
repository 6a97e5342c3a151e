"""ResNet / ResNeXt backbone: shapes, frozen BatchNorm, frozen stages, mmdetection key layout.

`read_keys`/`layout` are also used by test_fpn.py."""
import importlib.util
import os

import pytest
import torch
import torchvision
from torch import nn

from htc_fast.config import htc_r50_fpn_1x, htc_r101_fpn_20e, htc_tiny
from htc_fast.config import htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e as dcn_cfg
from htc_fast.model.backbone import ResNet
from htc_fast.model.frozen_bn import FrozenBatchNorm2d

DATA = os.path.join(os.path.dirname(__file__), "data")


def read_keys(prefix: str = "") -> dict[str, tuple[tuple[int, ...], str, str]]:
    """mmdetection 3.3.0 HTC R-50 state-dict layout (exported by the oracle):
    key -> (shape, dtype, "param" | "buffer"), restricted to keys starting with `prefix`."""
    out = {}
    with open(os.path.join(DATA, "htc_r50_keys.txt")) as f:
        for line in f:
            key, shape, dtype, kind = line.rstrip("\n").split("\t")
            if key.startswith(prefix):
                out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()),
                            dtype, kind)
    return out


def layout(module: nn.Module, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str, str]]:
    """The same description for a module, keys prefixed with `prefix`."""
    params = {name for name, _ in module.named_parameters()}
    return {prefix + k: (tuple(v.shape), str(v.dtype).replace("torch.", ""),
                         "param" if k in params else "buffer")
            for k, v in module.state_dict().items()}


def _randomize_bn(module):
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)


@pytest.mark.parametrize("groups, channels", [(1, (256, 512, 1024, 2048)),
                                              (32, (256, 512, 1024, 2048))])
def test_output_shapes_and_strides(groups, channels):
    depth = 50 if groups == 1 else 101
    model = ResNet(depth, groups=groups, base_width=4)
    h, w = 32 * torch.randint(1, 3, (2,)).tolist()[0], 64
    with torch.no_grad():
        outs = model(torch.randn(1, 3, h, w))
    assert [tuple(o.shape) for o in outs] == [
        (1, c, h // s, w // s) for c, s in zip(channels, (4, 8, 16, 32))]


def test_odd_input_sizes_round_up():
    model = ResNet.from_config(htc_tiny().model.backbone)
    h, w = torch.randint(33, 97, (2,)).tolist()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, h, w))
    for o, s in zip(outs, (4, 8, 16, 32)):
        assert o.shape[-2:] == (-(-h // s), -(-w // s))


def test_frozen_batchnorm_matches_eval_batchnorm_and_ignores_train_mode():
    c = int(torch.randint(1, 9, ()).item())
    ref = nn.BatchNorm2d(c).eval()
    _randomize_bn(ref)
    frozen = FrozenBatchNorm2d(c)
    frozen.load_state_dict(ref.state_dict())
    x = torch.randn(3, c, 5, 4)
    frozen.train()
    stats = [frozen.running_mean.clone(), frozen.running_var.clone()]
    torch.testing.assert_close(frozen(x), ref(x), rtol=0, atol=0)
    assert torch.equal(frozen.running_mean, stats[0]) and torch.equal(frozen.running_var, stats[1])
    assert frozen.num_batches_tracked.item() == 0
    assert list(frozen.state_dict()) == list(ref.state_dict())


def test_train_mode_does_not_change_statistics_or_outputs():
    model = ResNet.from_config(htc_tiny().model.backbone)
    _randomize_bn(model)
    x = torch.randn(2, 3, 64, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        ref = model(x)
    model.train()
    out = model(x)
    sum(o.sum() for o in out).backward()
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_stages():
    model = ResNet.from_config(htc_tiny().model.backbone)  # frozen_stages=1
    for name, p in model.named_parameters():
        frozen = name.startswith(("conv1.", "bn1.", "layer1."))
        assert p.requires_grad != frozen, name
    assert model.layer2[0].bn1.weight.requires_grad  # affine BN params still train in stage 2+
    out = model(torch.randn(1, 3, 32, 32))
    out[-1].sum().backward()
    assert model.conv1.weight.grad is None and model.layer1[0].conv1.weight.grad is None
    assert model.layer2[0].conv1.weight.grad is not None
    none = ResNet(50, base_channels=8, frozen_stages=-1)
    assert all(p.requires_grad for p in none.parameters())


def test_r50_layout_matches_mmdetection():
    expected = read_keys("backbone.")
    assert len(expected) == 318
    with torch.device("meta"):
        model = ResNet.from_config(htc_r50_fpn_1x().model.backbone)
    assert layout(model, "backbone.") == expected
    assert list(layout(model, "backbone.")) == list(expected)  # same order too


def _expected_key_count(blocks):
    convs = 1 + 3 * sum(blocks) + 4  # stem, 3 per bottleneck, one downsample per stage
    return convs * (1 + 5)  # conv weight + BN weight, bias, mean, var, num_batches_tracked


@pytest.mark.parametrize("name, tv_builder", [
    ("r101", torchvision.models.resnet101),
    # torchvision's 64x4d has mmdet's widths (4 * planes); its 32x8d equals nothing in mmdet.
    ("x101_64x4d", torchvision.models.resnext101_64x4d),
    ("x101_32x4d", None),
])
def test_101_layouts(name, tv_builder):
    kwargs = {"r101": {}, "x101_64x4d": dict(groups=64), "x101_32x4d": dict(groups=32)}[name]
    with torch.device("meta"):
        model = ResNet(101, **kwargs)
    state = model.state_dict()
    assert len(state) == _expected_key_count((3, 4, 23, 3)) == 624
    if tv_builder is not None:
        with torch.device("meta"):
            tv = tv_builder().state_dict()
        tv = {k: tuple(v.shape) for k, v in tv.items() if not k.startswith("fc.")}
        assert {k: tuple(v.shape) for k, v in state.items()} == tv
    else:  # ResNeXt 32x4d: grouped width floor(planes * 4 / 64) * 32 = 2 * planes
        for i, planes in enumerate((64, 128, 256, 512)):
            layer = f"layer{i + 1}.0."
            assert state[layer + "conv2.weight"].shape == (2 * planes, 2 * planes // 32, 3, 3)
            assert state[layer + "conv3.weight"].shape == (4 * planes, 2 * planes, 1, 1)
    assert htc_r101_fpn_20e().model.backbone.depth == 101


@pytest.mark.skipif(importlib.util.find_spec("htc_fast.model.deform_conv") is None,
                    reason="htc_fast.model.deform_conv (DeformConv2dPack) not yet in the tree")
def test_dcn_layout():
    with torch.device("meta"):
        model = ResNet.from_config(dcn_cfg().model.backbone)
    state = model.state_dict()
    offsets = {k: tuple(v.shape) for k, v in state.items() if "conv_offset" in k}
    assert len(offsets) == 2 * (4 + 23 + 3)  # weight + bias per block of layer2..4
    assert not any(k.startswith("layer1.") for k in offsets)
    assert offsets["layer2.0.conv2.conv_offset.weight"] == (18, 512, 3, 3)
    assert offsets["layer4.2.conv2.conv_offset.bias"] == (18,)
    assert tuple(state["layer3.0.conv2.weight"].shape) == (1024, 16, 3, 3)
    assert len(state) == _expected_key_count((3, 4, 23, 3)) + len(offsets)


@pytest.mark.skipif(importlib.util.find_spec("htc_fast.model.deform_conv") is None,
                    reason="htc_fast.model.deform_conv (DeformConv2dPack) not yet in the tree")
def test_dcn_starts_as_regular_conv():
    """Zero-initialised offsets: a DCN backbone computes what the plain backbone computes."""
    plain = ResNet(50, base_channels=8)
    dcn = ResNet(50, base_channels=8, stage_with_dcn=(False, True, True, True))
    dcn.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(plain(x), dcn(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
