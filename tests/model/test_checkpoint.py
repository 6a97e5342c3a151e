"""load_checkpoint / save_checkpoint: the three formats, strict-mode errors, round trips."""
import pytest
import torch
import torchvision
from torch import nn

from htc_fast.config import BackboneConfig, FPNConfig, htc_r50_fpn_1x, htc_tiny
from htc_fast.model.backbone import ResNet
from htc_fast.model.checkpoint import CheckpointMismatchError, load_checkpoint, save_checkpoint
from htc_fast.model.fpn import FPN


class BackboneNeck(nn.Module):
    """The first part of HTC with mmdetection's top-level names."""

    def __init__(self, backbone: BackboneConfig, fpn: FPNConfig):
        super().__init__()
        self.backbone = ResNet.from_config(backbone)
        self.neck = FPN.from_config(fpn, self.backbone.out_channels)

    def forward(self, images):
        return self.neck(self.backbone(images))


def _tiny():
    cfg = htc_tiny().model
    return BackboneNeck(cfg.backbone, cfg.fpn)


def _randomized_state(model):
    """A state dict with every float tensor (BN statistics included) drawn afresh."""
    return {k: (torch.rand_like(v) + 0.5 if v.is_floating_point() else v.clone())
            for k, v in model.state_dict().items()}


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def test_htc_fast_round_trip(tmp_path):
    src, dst = _tiny(), _tiny()
    src.load_state_dict(_randomized_state(src))
    path = tmp_path / "ckpt.pth"
    save_checkpoint(path, src, iteration=7)
    report = load_checkpoint(dst, path)
    assert report.source == "htc_fast" and report.ok and report.loaded == len(src.state_dict())
    assert torch.load(path, weights_only=True)["iteration"] == 7
    x = torch.randn(1, 3, 64, 96)
    for a, b in zip(_outputs(src, x), _outputs(dst, x)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("ddp", [False, True])
def test_mmdet_format(tmp_path, ddp):
    src, dst = _tiny(), _tiny()
    state = _randomized_state(src)
    if ddp:
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "mmdet.pth"
    torch.save({"state_dict": state, "meta": {"epoch": 12, "CLASSES": ("person",)}}, path)
    report = load_checkpoint(dst, path)
    assert report.source == "mmdet" and report.ok
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[("module." if ddp else "") + k]), k
    # A bare state dict with mmdet keys is recognised as well.
    assert load_checkpoint(_tiny(), dst.state_dict()).source == "mmdet"


def test_torchvision_format_into_backbone_neck():
    tv = torchvision.models.resnet50().eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    cfg = htc_r50_fpn_1x().model
    model = BackboneNeck(cfg.backbone, cfg.fpn)
    neck_before = {k: v.clone() for k, v in model.neck.state_dict().items()}
    report = load_checkpoint(model, tv.state_dict())
    assert report.source == "torchvision" and report.ok
    assert report.skipped == ["fc.bias", "fc.weight"]
    assert report.loaded == len(model.backbone.state_dict()) == 318
    for k, v in model.neck.state_dict().items():  # the neck is not expected, not touched
        assert torch.equal(v, neck_before[k])
    # BN statistics went into the frozen BN, and the backbone computes torchvision's C5.
    assert torch.equal(model.backbone.layer3[2].bn2.running_var, tv.layer3[2].bn2.running_var)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(model.backbone(x)[-1], ref, rtol=1e-5, atol=1e-5)
    # open-mmlab's ImageNet files wrap the same keys in "state_dict"; a bare backbone takes
    # them without the "backbone." prefix.
    bare = ResNet(50)
    report = load_checkpoint(bare, {"state_dict": tv.state_dict()})
    assert report.source == "torchvision" and report.ok
    assert torch.equal(bare.conv1.weight, tv.conv1.weight)


def test_strict_errors_list_every_difference():
    src, dst = _tiny(), _tiny()
    state = _randomized_state(src)
    del state["backbone.layer2.1.conv2.weight"]
    state["roi_head.bbox_head.0.fc_cls.weight"] = torch.zeros(5, 3)
    state["neck.fpn_convs.3.conv.weight"] = torch.zeros(16, 16, 1, 1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(dst, {"state_dict": state})
    message = str(info.value)
    assert "1 missing key(s):\n    backbone.layer2.1.conv2.weight" in message
    assert "1 unexpected key(s):\n    roi_head.bbox_head.0.fc_cls.weight" in message
    assert ("neck.fpn_convs.3.conv.weight: checkpoint (16, 16, 1, 1) vs model (16, 16, 3, 3)"
            in message)
    for k, v in dst.state_dict().items():  # strict failure leaves the model untouched
        assert torch.equal(v, before[k]), k

    report = load_checkpoint(dst, {"state_dict": state}, strict=False)
    assert report.missing == ["backbone.layer2.1.conv2.weight"]
    assert report.unexpected == ["roi_head.bbox_head.0.fc_cls.weight"]
    assert report.shape_mismatches == [("neck.fpn_convs.3.conv.weight", (16, 16, 1, 1),
                                        (16, 16, 3, 3))]
    assert report.loaded == len(before) - 2
    assert torch.equal(dst.state_dict()["backbone.layer3.0.conv1.weight"],
                       state["backbone.layer3.0.conv1.weight"])
    assert torch.equal(dst.state_dict()["backbone.layer2.1.conv2.weight"],
                       before["backbone.layer2.1.conv2.weight"])


def test_missing_bn_counter_is_filled_not_missing():
    src, dst = _tiny(), _tiny()
    state = {k: v for k, v in _randomized_state(src).items()
             if not k.endswith("num_batches_tracked")}
    report = load_checkpoint(dst, {"state_dict": state})
    assert report.ok and len(report.kept_init) == 53
    assert dst.backbone.bn1.num_batches_tracked.item() == 0


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        load_checkpoint(_tiny(), {}, source="detectron2")
    with pytest.raises(ValueError, match="no state dict found"):
        load_checkpoint(_tiny(), {"meta": {}, "optimizer": {}})
    with pytest.raises(ValueError, match="htc_fast checkpoint needs a 'model' entry"):
        load_checkpoint(_tiny(), {"state_dict": {}}, source="htc_fast")
    path = tmp_path / "pickled.pth"
    torch.save({"state_dict": _tiny().state_dict(), "meta": {"obj": object.__new__(Exotic)}},
               path)
    with pytest.raises(ValueError, match="weights_only=False"):
        load_checkpoint(_tiny(), path)
    assert load_checkpoint(_tiny(), path, weights_only=False).ok


class Exotic:
    """Stands for the mmengine objects that mmdetection 3.x pickles into its checkpoints."""


def test_mmdet_v1_dcn_offset_keys_are_renamed():
    src = ResNet(50, base_channels=8, stage_with_dcn=(False, True, True, True))
    dst = ResNet(50, base_channels=8, stage_with_dcn=(False, True, True, True))
    state = _randomized_state(src)
    legacy = {k.replace(".conv2.conv_offset.", ".conv2_offset."): v for k, v in state.items()}
    assert "layer2.0.conv2_offset.weight" in legacy
    report = load_checkpoint(dst, {"state_dict": legacy})
    assert report.ok and len(report.renamed) == 2 * (4 + 6 + 3)
    assert ("layer3.1.conv2_offset.bias", "layer3.1.conv2.conv_offset.bias") in report.renamed
    for k, v in dst.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_imagenet_weights_into_dcn_backbone_keep_zero_offsets():
    plain = ResNet(50, base_channels=8)
    dcn = ResNet(50, base_channels=8, stage_with_dcn=(False, True, True, True))
    fc = {"fc.weight": torch.zeros(10, 256), "fc.bias": torch.zeros(10)}
    report = load_checkpoint(dcn, {**_randomized_state(plain), **fc}, source="torchvision")
    assert report.ok and report.skipped == ["fc.bias", "fc.weight"]
    assert len(report.kept_init) == 2 * (4 + 6 + 3)
    assert all(".conv_offset." in k for k in report.kept_init)
    assert not dcn.layer4[0].conv2.conv_offset.weight.any()
