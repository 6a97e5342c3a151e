"""Configuration of the Hybrid Task Cascade: frozen dataclasses, one preset function per model.

What this module owns: every number that selects a model, its training targets, its test-time
post-processing, its data pipeline and its optimisation schedule, with the values of
MMDetection's `configs/htc/*` (the configs that produced the released checkpoints).
What it does not own: building modules (see `htc_fast.model`), reading files, command-line parsing
beyond `apply_overrides`.

Conventions:
  * Everything is a frozen dataclass; derive a variant with `dataclasses.replace` or
    `apply_overrides(cfg, ["train.lr=0.01"])`. No inheritance chains between configs.
  * The three cascade stages are one tuple of `StageConfig` records, not parallel lists.
  * Sizes are in pixels of the network input; "stride" means feature-map stride.
  * `htc_tiny()` keeps the exact module structure of R-50 HTC (same depth, same key names) with
    narrow channels, so that tests exercise the real code paths quickly. Its weights are not
    compatible with any released checkpoint (shapes differ); key names are.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from htc_fast.config_overrides import apply_overrides

# ---------------------------------------------------------------------------------------------
# Model


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


@dataclass(frozen=True)
class BackboneConfig:
    """ResNet / ResNeXt in MMDetection's "pytorch" style (stride on the 3x3 conv).

    `base_channels` is the stem width and the planes of layer1 (64 for every real model). ResNeXt's
    grouped width per stage is `floor(planes * base_width / base_channels) * groups`, as in mmdet.
    `stage_with_dcn[i]` replaces conv2 of every block of layer{i+1} by a deformable conv (DCNv1).
    `frozen_stages=1` freezes the stem and layer1 (requires_grad False); BatchNorm is always
    frozen (eval-mode statistics) regardless.
    """
    depth: int = 50
    groups: int = 1
    base_width: int = 4
    base_channels: int = 64
    stage_with_dcn: tuple[bool, bool, bool, bool] = (False, False, False, False)
    deform_groups: int = 1
    frozen_stages: int = 1
    norm_eps: float = 1e-5
    # Path of ImageNet weights (torchvision naming, e.g. torchvision's resnet50 file or
    # open-mmlab's resnext101_64x4d) loaded before training; "" = random init.
    pretrained: str = ""

    def __post_init__(self):
        if self.depth not in (50, 101):
            raise ValueError(f"backbone.depth must be 50 or 101, got {self.depth}")
        if self.groups < 1 or self.base_width < 1 or self.base_channels < 1:
            raise ValueError("backbone.groups, backbone.base_width and backbone.base_channels "
                             f"must be >= 1, got {self.groups}, {self.base_width}, "
                             f"{self.base_channels}")
        if len(self.stage_with_dcn) != 4:
            raise ValueError(f"backbone.stage_with_dcn needs 4 entries, got {self.stage_with_dcn}")
        if not -1 <= self.frozen_stages <= 4:
            raise ValueError(f"backbone.frozen_stages must be in [-1, 4], got {self.frozen_stages}")

    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[self.depth]

    @property
    def out_channels(self) -> tuple[int, int, int, int]:
        """Channels of C2..C5 (bottleneck expansion 4): (256, 512, 1024, 2048) for real models."""
        return tuple(self.base_channels * 4 * 2 ** i for i in range(4))


@dataclass(frozen=True)
class FPNConfig:
    """FPN on C2..C5 giving P2..P6; P6 is a stride-2 subsampling of P5 (no extra conv)."""
    out_channels: int = 256
    num_outs: int = 5

    def __post_init__(self):
        if self.num_outs != 5:
            raise ValueError(f"fpn.num_outs must be 5 (P2..P6) for HTC, got {self.num_outs}")


@dataclass(frozen=True)
class RPNConfig:
    """RPN head, anchors, proposal generation (train/test) and its training targets."""
    feat_channels: int = 256
    anchor_strides: tuple[int, ...] = (4, 8, 16, 32, 64)
    anchor_scales: tuple[float, ...] = (8.0,)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # Proposals: top nms_pre per level, NMS per level, keep max_per_img over all levels.
    nms_pre_train: int = 2000
    max_per_img_train: int = 2000
    nms_pre_test: int = 1000
    max_per_img_test: int = 1000
    nms_iou: float = 0.7
    min_bbox_size: float = 0.0
    # Max-IoU assigner; match_low_quality makes each gt's best anchor positive (if >= min_pos_iou).
    pos_iou_thr: float = 0.7
    neg_iou_thr: float = 0.3
    min_pos_iou: float = 0.3
    match_low_quality: bool = True
    # Anchors crossing the image border by more than this many pixels are ignored (-1: keep all).
    allowed_border: int = 0
    sampler_num: int = 256
    sampler_pos_fraction: float = 0.5
    loss_cls_weight: float = 1.0
    smooth_l1_beta: float = 1.0 / 9.0
    loss_bbox_weight: float = 1.0

    def __post_init__(self):
        if len(self.anchor_strides) == 0 or len(self.anchor_scales) == 0 or \
                len(self.anchor_ratios) == 0:
            raise ValueError("rpn.anchor_strides, rpn.anchor_scales and rpn.anchor_ratios "
                             "must not be empty")
        _check_fraction("rpn.sampler_pos_fraction", self.sampler_pos_fraction)

    @property
    def num_anchors(self) -> int:
        """Anchors per location (3 for HTC): rpn_cls has this many channels, rpn_reg 4x."""
        return len(self.anchor_scales) * len(self.anchor_ratios)


@dataclass(frozen=True)
class StageConfig:
    """One cascade stage: its assigner threshold (pos = neg = min_pos), coder and loss weight."""
    iou_threshold: float
    target_stds: tuple[float, float, float, float]
    loss_weight: float
    target_means: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def __post_init__(self):
        _check_fraction("StageConfig.iou_threshold", self.iou_threshold)


HTC_STAGES = (
    StageConfig(0.5, (0.1, 0.1, 0.2, 0.2), 1.0),
    StageConfig(0.6, (0.05, 0.05, 0.1, 0.1), 0.5),
    StageConfig(0.7, (0.033, 0.033, 0.067, 0.067), 0.25),
)


@dataclass(frozen=True)
class RoIConfig:
    """Cascade RoI heads: RoI extraction, box heads (Shared2FC), HTC mask heads, sampling."""
    stages: tuple[StageConfig, ...] = HTC_STAGES
    featmap_strides: tuple[int, ...] = (4, 8, 16, 32)
    # Level of a RoI: clamp(floor(log2(sqrt(w*h) / finest_scale + 1e-6)), 0, levels-1).
    finest_scale: int = 56
    box_roi_size: int = 7
    mask_roi_size: int = 14
    sampling_ratio: int = 0
    aligned: bool = True
    fc_out_channels: int = 1024
    num_shared_fcs: int = 2
    reg_class_agnostic: bool = True
    mask_num_convs: int = 4
    mask_conv_channels: int = 256
    mask_size: int = 28  # training target size = 2 x mask_roi_size (one 2x deconv)
    interleaved: bool = True
    mask_info_flow: bool = True
    # How the stages' mask probabilities are merged at test time: "mean" of the three sigmoids
    # (paper, mmdetection 2.x, released AP) or "last" stage only (mmdetection 3.3.0, issue 10210).
    mask_merge: Literal["mean", "last"] = "mean"
    sampler_num: int = 512
    sampler_pos_fraction: float = 0.25
    add_gt_as_proposals: bool = True
    match_low_quality: bool = True
    loss_cls_weight: float = 1.0
    smooth_l1_beta: float = 1.0
    loss_bbox_weight: float = 1.0
    loss_mask_weight: float = 1.0

    def __post_init__(self):
        if len(self.stages) == 0:
            raise ValueError("roi.stages must hold at least one StageConfig")
        if not all(isinstance(s, StageConfig) for s in self.stages):
            raise ValueError("roi.stages must be a tuple of StageConfig")
        if self.mask_size != 2 * self.mask_roi_size:
            raise ValueError(f"roi.mask_size ({self.mask_size}) must be 2 * roi.mask_roi_size "
                             f"({self.mask_roi_size}): the mask head upsamples once by 2")
        _check_fraction("roi.sampler_pos_fraction", self.sampler_pos_fraction)

    @property
    def num_stages(self) -> int:
        return len(self.stages)


@dataclass(frozen=True)
class SemanticConfig:
    """Fused semantic head (COCO-stuff), fused at P3 (stride 8), and its RoI feature fusion."""
    enabled: bool = True
    num_classes: int = 183
    ignore_index: int = 255
    loss_weight: float = 0.2
    num_convs: int = 4
    conv_channels: int = 256
    fusion_level: int = 1  # index into P2..P6: P3
    stride: int = 8  # 1 / seg_scale_factor: the label map is downscaled by this with nearest
    roi_size: int = 14  # RoIAlign of semantic_feat; pooled to 7x7 for the box branch


@dataclass(frozen=True)
class TestConfig:
    """Test-time post-processing of the cascade (RPN's test settings live in RPNConfig)."""
    score_thr: float = 0.001
    nms_iou: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5


@dataclass(frozen=True)
class ModelConfig:
    num_classes: int = 80
    backbone: BackboneConfig = BackboneConfig()
    fpn: FPNConfig = FPNConfig()
    rpn: RPNConfig = RPNConfig()
    roi: RoIConfig = RoIConfig()
    semantic: SemanticConfig = SemanticConfig()
    test: TestConfig = TestConfig()


# ---------------------------------------------------------------------------------------------
# Data and training


@dataclass(frozen=True)
class DataConfig:
    """Image pipeline. Scales are (long side max, short side) keeping the aspect ratio.

    Multi-scale training ("range" mode): the short side is drawn uniformly from
    `train_short_range` each image, the long side capped at `train_scale[0]`.
    An empty `train_short_range` means the fixed `train_scale`.
    """
    train_scale: tuple[int, int] = (1333, 800)
    train_short_range: tuple[int, ...] = ()
    flip_prob: float = 0.5
    test_scale: tuple[int, int] = (1333, 800)
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    pad_size_divisor: int = 32
    with_semantic: bool = True
    workers_per_gpu: int = 2

    def __post_init__(self):
        if self.train_short_range and (len(self.train_short_range) != 2
                                       or self.train_short_range[0] > self.train_short_range[1]):
            raise ValueError("data.train_short_range must be () or (low, high) with low <= high, "
                             f"got {self.train_short_range}")
        _check_fraction("data.flip_prob", self.flip_prob)


@dataclass(frozen=True)
class TrainConfig:
    """SGD with linear warm-up and step decay. `lr` is for `lr_batch_size` images per iteration;
    `scaled_lr` applies the linear scaling rule to the actual total batch."""
    lr: float = 0.02
    lr_batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 500
    warmup_ratio: float = 0.001
    epochs: int = 12
    lr_steps: tuple[int, ...] = (8, 11)  # epochs after which lr is multiplied by lr_gamma
    lr_gamma: float = 0.1
    num_gpus: int = 8
    images_per_gpu: int = 2
    seed: int = 0

    def __post_init__(self):
        if any(s > self.epochs for s in self.lr_steps):
            raise ValueError(f"train.lr_steps {self.lr_steps} exceed train.epochs {self.epochs}")

    def scaled_lr(self, total_batch: int | None = None) -> float:
        total = self.num_gpus * self.images_per_gpu if total_batch is None else total_batch
        return self.lr * total / self.lr_batch_size


@dataclass(frozen=True)
class HTCConfig:
    name: str = "htc_r50_fpn_1x"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()


# ---------------------------------------------------------------------------------------------
# Presets: one per row of the model table in docs/model.md


def htc_r50_fpn_1x() -> HTCConfig:
    """ResNet-50, 12 epochs (steps 8, 11), 8 GPUs x 2 images. Released 42.3 box / 37.4 mask AP."""
    return HTCConfig(name="htc_r50_fpn_1x")


def htc_without_semantic_r50_fpn_1x() -> HTCConfig:
    cfg = htc_r50_fpn_1x()
    return dataclasses.replace(
        cfg, name="htc_without_semantic_r50_fpn_1x",
        model=dataclasses.replace(cfg.model, semantic=SemanticConfig(enabled=False)),
        data=dataclasses.replace(cfg.data, with_semantic=False))


def _schedule_20e(cfg: HTCConfig, name: str, **train) -> HTCConfig:
    return dataclasses.replace(cfg, name=name, train=dataclasses.replace(
        cfg.train, epochs=20, lr_steps=(16, 19), **train))


def _with_backbone(cfg: HTCConfig, **backbone) -> HTCConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, backbone=dataclasses.replace(cfg.model.backbone, **backbone)))


def htc_r50_fpn_20e() -> HTCConfig:
    return _schedule_20e(htc_r50_fpn_1x(), "htc_r50_fpn_20e")


def htc_r101_fpn_20e() -> HTCConfig:
    return _with_backbone(_schedule_20e(htc_r50_fpn_1x(), "htc_r101_fpn_20e"), depth=101)


def htc_x101_32x4d_fpn_16x1_20e() -> HTCConfig:
    cfg = _schedule_20e(htc_r50_fpn_1x(), "htc_x101_32x4d_fpn_16x1_20e",
                        num_gpus=16, images_per_gpu=1)
    return _with_backbone(cfg, depth=101, groups=32, base_width=4)


def htc_x101_64x4d_fpn_16x1_20e() -> HTCConfig:
    cfg = _schedule_20e(htc_r50_fpn_1x(), "htc_x101_64x4d_fpn_16x1_20e",
                        num_gpus=16, images_per_gpu=1)
    return _with_backbone(cfg, depth=101, groups=64, base_width=4)


def htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e() -> HTCConfig:
    """X-101 64x4d with DCNv1 in c3..c5, short side 400..1400 (long <= 1600). 50.4 / 43.8 AP."""
    cfg = htc_x101_64x4d_fpn_16x1_20e()
    cfg = _with_backbone(cfg, stage_with_dcn=(False, True, True, True))
    return dataclasses.replace(
        cfg, name="htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e",
        data=dataclasses.replace(cfg.data, train_scale=(1600, 1400),
                                 train_short_range=(400, 1400)))


def htc_tiny() -> HTCConfig:
    """For tests: R-50's module structure (same depth and key names) at 1/8 of the widths,
    FPN/heads at 16 channels, 4 thing + 5 stuff classes, small images and proposal counts.
    Not loadable from released checkpoints (shapes differ)."""
    return HTCConfig(
        name="htc_tiny",
        model=ModelConfig(
            num_classes=4,
            backbone=BackboneConfig(base_channels=8),
            fpn=FPNConfig(out_channels=16),
            rpn=RPNConfig(feat_channels=16, nms_pre_train=200, max_per_img_train=100,
                          nms_pre_test=100, max_per_img_test=50, sampler_num=64),
            roi=RoIConfig(fc_out_channels=32, mask_conv_channels=16, sampler_num=32),
            semantic=SemanticConfig(num_classes=5, conv_channels=16),
            test=TestConfig(max_per_img=20)),
        data=DataConfig(train_scale=(128, 96), test_scale=(128, 96), workers_per_gpu=0),
        train=TrainConfig(epochs=2, lr_steps=(1,), warmup_iters=2, num_gpus=1, images_per_gpu=2))


PRESETS: dict[str, Callable[[], HTCConfig]] = {
    fn.__name__: fn for fn in (
        htc_r50_fpn_1x, htc_without_semantic_r50_fpn_1x, htc_r50_fpn_20e, htc_r101_fpn_20e,
        htc_x101_32x4d_fpn_16x1_20e, htc_x101_64x4d_fpn_16x1_20e,
        htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e, htc_tiny)
}


def get_config(name: str, overrides: typing.Sequence[str] = ()) -> HTCConfig:
    """The preset `name` (a key of PRESETS), with `overrides` applied (see `apply_overrides`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config name {name!r}; known: {', '.join(sorted(PRESETS))}")
    return apply_overrides(PRESETS[name](), overrides)
