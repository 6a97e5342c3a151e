"""ResNet-50/101 and ResNeXt-101 backbones with frozen BatchNorm and optional DCNv1.

What it owns: the bottleneck network from the image to C2..C5, in MMDetection's "pytorch" style
(the stride-2 convolution of a stage is the 3x3 `conv2`; the stem is 7x7/2 conv, BN, ReLU,
3x3/2 max-pool), with mmdetection's / torchvision's parameter names (`conv1`, `bn1`,
`layer{1..4}.{i}.conv{1,2,3}`, `.bn{1,2,3}`, `layer{k}.0.downsample.{0,1}`), so checkpoints
load without a key map. What it does not own: loading weights (`checkpoint.py`), the FPN.
"""
from __future__ import annotations

import torch
from torch import nn

from htc_fast.config import BackboneConfig
from htc_fast.model.frozen_bn import FrozenBatchNorm2d


def _deform_conv_cls():
    # Imported only when a DCN stage is requested: plain ResNets must not depend on the
    # deformable-conv op being importable.
    from htc_fast.model.deform_conv import DeformConv2dPack
    return DeformConv2dPack


class Bottleneck(nn.Module):
    """1x1 (inplanes -> width), 3x3 (width -> width, stride, groups), 1x1 (width -> 4 planes),
    each followed by frozen BN; ReLU after the first two and after the residual sum.

    `width` = planes for ResNet (groups 1), `floor(planes * base_width / base_channels) * groups`
    for ResNeXt (mmdet's formula; e.g. 32x4d: 128 in layer1, 64x4d: 256).
    Shapes: (N, inplanes, H, W) -> (N, 4 * planes, H / stride, W / stride).
    """
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, groups: int = 1,
                 base_width: int = 4, base_channels: int = 64, dcn: bool = False,
                 deform_groups: int = 1, eps: float = 1e-5):
        super().__init__()
        width = planes if groups == 1 else (planes * base_width // base_channels) * groups
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(width, eps)
        if dcn:
            self.conv2 = _deform_conv_cls()(width, width, 3, stride=stride, padding=1,
                                            groups=groups, deform_groups=deform_groups,
                                            bias=False)
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups,
                                   bias=False)
        self.bn2 = FrozenBatchNorm2d(width, eps)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels, eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out_channels, 1, stride=stride, bias=False),
                FrozenBatchNorm2d(out_channels, eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet / ResNeXt trunk returning C2..C5 (strides 4, 8, 16, 32).

    Args:
        depth: 50 or 101 (blocks per stage (3, 4, 6, 3) or (3, 4, 23, 3)).
        groups, base_width: ResNeXt cardinality and per-group width (1, 4 for ResNet).
        base_channels: stem width and layer1 planes (64 for every released model).
        stage_with_dcn: per stage, whether conv2 of every block is a DCNv1 (DeformConv2dPack).
        deform_groups: offset groups of the DCN layers.
        frozen_stages: -1 none; 0 the stem; k >= 1 the stem and layer1..layerk
            (requires_grad False). BatchNorm statistics are frozen everywhere, always.
        norm_eps: BatchNorm epsilon.
    Forward: images (N, 3, H, W) float -> tuple of 4 tensors,
        C_{i+2}: (N, base_channels * 4 * 2**i, ceil(H / 2**(i+2)), ...) for i = 0..3
        (exact for H, W multiples of 32, which the data pipeline's padding guarantees).
    """

    def __init__(self, depth: int = 50, *, groups: int = 1, base_width: int = 4,
                 base_channels: int = 64,
                 stage_with_dcn: tuple[bool, ...] = (False, False, False, False),
                 deform_groups: int = 1, frozen_stages: int = 1, norm_eps: float = 1e-5):
        super().__init__()
        # The config validates every argument; build through it so direct construction gets
        # the same checks and messages.
        cfg = BackboneConfig(depth=depth, groups=groups, base_width=base_width,
                             base_channels=base_channels, stage_with_dcn=tuple(stage_with_dcn),
                             deform_groups=deform_groups, frozen_stages=frozen_stages,
                             norm_eps=norm_eps)
        self.depth = depth
        self.frozen_stages = frozen_stages
        self.out_channels = cfg.out_channels
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(base_channels, norm_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = base_channels
        for i, num_blocks in enumerate(cfg.stage_blocks):
            planes = base_channels * 2 ** i
            blocks = []
            for b in range(num_blocks):
                # The first block of stages 2..4 halves the resolution (on its 3x3 conv).
                stride = 2 if (b == 0 and i > 0) else 1
                blocks.append(Bottleneck(
                    inplanes, planes, stride, groups=groups, base_width=base_width,
                    base_channels=base_channels, dcn=stage_with_dcn[i],
                    deform_groups=deform_groups, eps=norm_eps))
                inplanes = planes * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.reset_parameters()
        self.freeze()

    @classmethod
    def from_config(cls, cfg: BackboneConfig) -> ResNet:
        return cls(cfg.depth, groups=cfg.groups, base_width=cfg.base_width,
                   base_channels=cfg.base_channels, stage_with_dcn=cfg.stage_with_dcn,
                   deform_groups=cfg.deform_groups, frozen_stages=cfg.frozen_stages,
                   norm_eps=cfg.norm_eps)

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0 (mmdet's ResNet init), and
        the last BN of every bottleneck zero-weighted (mmdet's zero_init_residual, on by default):
        each block starts as the identity, which keeps activations bounded when training from
        scratch with frozen statistics. DCN offset convs keep their own zero init."""
        for name, m in self.named_modules():
            if name.endswith("conv_offset"):
                continue
            if isinstance(m, nn.Conv2d) or (name.endswith("conv2") and hasattr(m, "conv_offset")):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, FrozenBatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def freeze(self) -> None:
        """Turns off requires_grad of the stem and layer1..layer{frozen_stages}."""
        frozen = []
        if self.frozen_stages >= 0:
            frozen += [self.conv1, self.bn1]
        frozen += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return tuple(outs)


def build_backbone(cfg: BackboneConfig) -> ResNet:
    return ResNet.from_config(cfg)
