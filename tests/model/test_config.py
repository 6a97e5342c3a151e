"""Config presets and typed command-line overrides."""
import dataclasses

import pytest

from htc_fast import config as C


def test_every_preset_builds_and_is_frozen():
    for name, fn in C.PRESETS.items():
        cfg = fn()
        assert cfg.name == name
        assert C.get_config(name) == cfg
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.train.lr = 1.0


def test_presets_follow_the_model_table():
    r50 = C.htc_r50_fpn_1x()
    assert (r50.model.backbone.depth, r50.model.backbone.groups) == (50, 1)
    assert (r50.train.epochs, r50.train.lr_steps) == (12, (8, 11))
    assert (r50.train.num_gpus, r50.train.images_per_gpu) == (8, 2)
    assert r50.train.scaled_lr() == pytest.approx(0.02)
    assert [s.iou_threshold for s in r50.model.roi.stages] == [0.5, 0.6, 0.7]
    assert [s.loss_weight for s in r50.model.roi.stages] == [1.0, 0.5, 0.25]
    assert r50.model.roi.stages[2].target_stds == (0.033, 0.033, 0.067, 0.067)
    assert r50.model.semantic.enabled and r50.model.semantic.num_classes == 183
    assert (r50.model.rpn.nms_pre_train, r50.model.rpn.nms_pre_test) == (2000, 1000)
    assert r50.model.rpn.num_anchors == 3
    assert r50.model.backbone.out_channels == (256, 512, 1024, 2048)

    assert not C.htc_without_semantic_r50_fpn_1x().model.semantic.enabled
    e20 = C.htc_r50_fpn_20e()
    assert (e20.train.epochs, e20.train.lr_steps) == (20, (16, 19))
    assert e20.model == r50.model
    assert C.htc_r101_fpn_20e().model.backbone.depth == 101
    x32 = C.htc_x101_32x4d_fpn_16x1_20e()
    assert (x32.model.backbone.depth, x32.model.backbone.groups, x32.model.backbone.base_width) \
        == (101, 32, 4)
    assert (x32.train.num_gpus, x32.train.images_per_gpu) == (16, 1)
    assert x32.train.scaled_lr() == pytest.approx(0.02)
    x64 = C.htc_x101_64x4d_fpn_16x1_20e()
    assert x64.model.backbone.groups == 64 and not any(x64.model.backbone.stage_with_dcn)
    dcn = C.htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e()
    assert dcn.model.backbone.stage_with_dcn == (False, True, True, True)
    assert dcn.data.train_short_range == (400, 1400) and dcn.data.train_scale[0] == 1600
    assert dcn.model.roi == x64.model.roi and x64.data.train_short_range == ()
    names = [fn().name for fn in C.PRESETS.values()]
    assert len(set(C.PRESETS[n]() for n in names)) == len(names)  # all distinct


def test_tiny_keeps_the_structure():
    tiny, r50 = C.htc_tiny().model, C.htc_r50_fpn_1x().model
    assert tiny.backbone.depth == r50.backbone.depth
    assert tiny.backbone.stage_blocks == r50.backbone.stage_blocks
    assert tiny.roi.num_stages == 3 and tiny.fpn.num_outs == 5
    assert tiny.backbone.out_channels == (32, 64, 128, 256)


def test_get_config_unknown_name():
    with pytest.raises(ValueError, match="unknown config name 'htc_r18'"):
        C.get_config("htc_r18")


def test_overrides_valid():
    cfg = C.get_config("htc_r50_fpn_1x", [
        "train.lr=0.01", "model.rpn.nms_pre_test=500", "train.weight_decay=1",
        "model.roi.stages.1.iou_threshold=0.65", "model.roi.mask_merge=last",
        "train.lr_steps=(3, 5)", "model.backbone.stage_with_dcn=(False, True, True, True)",
        "model.semantic.enabled=false", "model.backbone.pretrained=/x/r50.pth",
        "name='custom'", "data.train_short_range=[400, 800]"])
    assert cfg.train.lr == 0.01 and cfg.model.rpn.nms_pre_test == 500
    assert isinstance(cfg.train.weight_decay, float) and cfg.train.weight_decay == 1.0
    assert cfg.model.roi.stages[1].iou_threshold == 0.65
    assert cfg.model.roi.stages[0] == C.HTC_STAGES[0]  # siblings untouched
    assert cfg.model.roi.mask_merge == "last"
    assert cfg.train.lr_steps == (3, 5)
    assert cfg.model.backbone.stage_with_dcn == (False, True, True, True)
    assert cfg.model.semantic.enabled is False
    assert cfg.model.backbone.pretrained == "/x/r50.pth" and cfg.name == "custom"
    assert cfg.data.train_short_range == (400, 800)
    assert C.htc_r50_fpn_1x().train.lr == 0.02  # the preset is not mutated


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", r"'train.lr': cannot parse 'abc' as float"),
    ("train.epochs=1.5", r"'train.epochs': expected int, got 1.5"),
    ("train.epochs=True", r"'train.epochs': expected int"),
    ("model.semantic.enabled=1", r"'model.semantic.enabled': expected bool"),
    ("name=3", r"'name': expected str"),
    ("train.lr_steps=8", r"'train.lr_steps': expected tuple"),
    ("train.lr_steps=(8, 'a')", r"'train.lr_steps': expected int"),
    ("data.train_scale=(1, 2, 3)", r"'data.train_scale': expected 2 values, got 3"),
    ("model.roi.mask_merge=max", r"'model.roi.mask_merge': expected one of \['mean', 'last'\]"),
    ("train.nope=1", r"TrainConfig has no field 'nope'"),
    ("model.rpn=3", r"'rpn' is a config section"),
    ("model.roi.stages.7.iou_threshold=0.5", r"cannot descend into '7'"),
    ("train.lr", r"not of the form dotted.path=value"),
    ("model.backbone.depth=34", r"backbone.depth must be 50 or 101"),
    ("train.lr_steps=(8, 30)", r"exceed train.epochs"),
])
def test_overrides_type_errors(override, message):
    with pytest.raises(ValueError, match=message):
        C.apply_overrides(C.htc_r50_fpn_1x(), [override])
