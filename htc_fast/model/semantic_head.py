"""HTC's fused semantic segmentation head (Chen et al. 2019, section 3.3).

What it owns: fusing the FPN levels at P3's resolution, the 4-conv trunk, the stuff-class
logits (training only) and the semantic feature that the box and mask branches add to their RoI
features; the segmentation loss. Keys follow mmdetection's ``FusedSemanticHead``:
``lateral_convs.{i}.conv``, ``convs.{i}.conv``, ``conv_embedding.conv``, ``conv_logits``.
"""
from collections.abc import Sequence
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from htc_fast.model.fpn import ConvLayer


class SemanticOutput(NamedTuple):
    logits: Tensor  # (N, num_classes, H/8, W/8) stuff-class logits
    feat: Tensor    # (N, C, H/8, W/8) semantic feature for RoI fusion (after ReLU)


class SemanticHead(nn.Module):
    """Args:
        num_levels: FPN levels fed in (5: P2..P6).
        fusion_level: the level whose resolution the others are resized to (1: P3, stride 8).
        in_channels, channels: FPN channels and the head's width (256, 256).
        num_convs: 3x3 conv + ReLU layers after the fusion (4).
        num_classes: stuff + thing classes of the segmentation (183 for COCO-stuff).
        ignore_index, loss_weight: of the cross-entropy loss (255, 0.2).
        loss_average: "all" divides the summed loss by every pixel, ignored ones included
            (mmdetection >= 2.22 and 3.x: its CrossEntropyLoss with avg_non_ignore=False);
            "valid" by the non-ignored pixels only (torch's nn.CrossEntropyLoss, which the first
            mmdetection 2.x releases used).
    """

    def __init__(self, num_levels=5, fusion_level=1, in_channels=256, channels=256, num_convs=4,
                 num_classes=183, ignore_index=255, loss_weight=0.2, loss_average="all"):
        super().__init__()
        if not 0 <= fusion_level < num_levels:
            raise ValueError(f"fusion_level must be in [0, {num_levels}), got {fusion_level}")
        self.fusion_level = fusion_level
        if loss_average not in ("all", "valid"):
            raise ValueError(f"loss_average must be 'all' or 'valid', got {loss_average!r}")
        self.ignore_index, self.loss_weight, self.loss_average = ignore_index, loss_weight, loss_average
        self.lateral_convs = nn.ModuleList(ConvLayer(in_channels, channels, 1, relu=True)
                                           for _ in range(num_levels))
        self.convs = nn.ModuleList(ConvLayer(channels, channels, 3, padding=1, relu=True)
                                   for _ in range(num_convs))
        self.conv_embedding = ConvLayer(channels, channels, 1, relu=True)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        self.reset_parameters()

    def reset_parameters(self):
        # mmcv's ConvModule default: Kaiming normal (fan_out, ReLU), zero bias; the logits conv
        # keeps the same rule in mmdetection's head.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, feats: Sequence[Tensor]) -> SemanticOutput:
        """feats: the FPN outputs (P2..P6), each (N, C, H_l, W_l)."""
        if len(feats) != len(self.lateral_convs):
            raise ValueError(f"SemanticHead expects {len(self.lateral_convs)} levels, got {len(feats)}")
        x = self.lateral_convs[self.fusion_level](feats[self.fusion_level])
        size = x.shape[-2:]
        for i, feat in enumerate(feats):
            if i == self.fusion_level:
                continue
            # Resize first, then the 1x1 conv (mmdetection's order; the two do not commute with ReLU).
            feat = F.interpolate(feat, size=size, mode="bilinear", align_corners=True)
            x = x + self.lateral_convs[i](feat)
        for conv in self.convs:
            x = conv(x)
        return SemanticOutput(self.conv_logits(x), self.conv_embedding(x))

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Weighted cross-entropy of (N, K, h, w) logits against (N, h, w) int64 labels at the
        logits' resolution (already downscaled with nearest, see the data pipeline); pixels equal
        to ignore_index add 0. Averaged as `loss_average` says (0 if no pixel counts)."""
        if labels.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"semantic labels must be (N, h, w) = {(logits.shape[0], *logits.shape[2:])}, "
                             f"got {tuple(labels.shape)}")
        loss = F.cross_entropy(logits, labels.long(), ignore_index=self.ignore_index, reduction="sum")
        if self.loss_average == "all":
            count = max(labels.numel(), 1)
        else:
            count = (labels != self.ignore_index).sum().clamp(min=1)
        return self.loss_weight * loss / count
