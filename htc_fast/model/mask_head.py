"""HTC's mask head (mmdetection's ``HTCMaskHead``): a 4-conv trunk, the mask information flow
(Chen et al. 2019, eq. 5), a 2x deconvolution and per-class mask logits; and the mask loss.

Keys: ``convs.{0..3}.conv``, ``upsample`` (ConvTranspose2d 2x2/2), ``conv_logits`` (num_classes),
and ``conv_res.conv`` (1x1) on every stage after the first.
The information flow is split into two calls so the cascade can write it out plainly:
``feat_i = head_i.trunk(x, feat_{i-1})`` and ``logits_i = head_i.logits(feat_i)``.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from htc_fast.model.fpn import ConvLayer


class MaskHead(nn.Module):
    """Args:
        in_channels, channels: RoI feature channels and trunk width (256, 256).
        num_convs: 3x3 conv + ReLU layers in the trunk (4).
        num_classes: mask classes (80); one 2*S x 2*S mask logit map each for S x S RoI features.
        with_conv_res: whether this stage receives the previous stage's trunk feature.
    """

    def __init__(self, in_channels=256, channels=256, num_convs=4, num_classes=80, with_conv_res=False):
        super().__init__()
        if with_conv_res and in_channels != channels:
            raise ValueError(f"with_conv_res adds the previous trunk feature ({channels} channels) to the "
                             f"RoI features ({in_channels} channels): they must be equal")
        self.convs = nn.ModuleList(ConvLayer(in_channels if i == 0 else channels, channels, 3, padding=1,
                                             relu=True) for i in range(num_convs))
        self.upsample = nn.ConvTranspose2d(channels, channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(channels, num_classes, 1)
        self.conv_res = ConvLayer(channels, channels, 1, relu=True) if with_conv_res else None
        self.reset_parameters()

    def reset_parameters(self):
        # mmdetection: Kaiming normal (fan_out, ReLU) and zero bias for every conv and the deconv.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def trunk(self, x: Tensor, prev_feat: Optional[Tensor] = None) -> Tensor:
        """x: (R, C, S, S) RoI features; prev_feat: the previous stage's trunk output (R, C', S, S)
        or None. Returns this stage's trunk feature (R, channels, S, S)."""
        if prev_feat is not None:
            if self.conv_res is None:
                raise ValueError("this mask head has no conv_res: it is the first stage and takes no prev_feat")
            x = x + self.conv_res(prev_feat)
        for conv in self.convs:
            x = conv(x)
        return x

    def logits(self, feat: Tensor) -> Tensor:
        """(R, channels, S, S) trunk feature -> (R, num_classes, 2S, 2S) mask logits."""
        return self.conv_logits(F.relu(self.upsample(feat)))


def mask_head_loss(logits: Tensor, labels: Tensor, targets: Tensor, *, weight=1.0,
                   roi_weights: Optional[Tensor] = None) -> Tensor:
    """Binary cross-entropy of each positive RoI's mask logits at its class.

    logits: (R, num_classes, M, M); labels: (R,) int64 class of each RoI; targets: (R, M, M)
    in [0, 1]; roi_weights: (R,) 1 for positives, 0 for unused slots (None: all positives).
    Averaged over the positives' P * M * M pixels (mmdetection's mask loss), 0 when P == 0; the
    normaliser stays on the device.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0
    picked = logits[torch.arange(logits.shape[0], device=logits.device), labels]
    per_pixel = F.binary_cross_entropy_with_logits(picked, targets.to(picked.dtype), reduction="none")
    per_roi = per_pixel.flatten(1).mean(dim=1)
    if roi_weights is None:
        loss = per_roi.mean()
    else:
        w = roi_weights.to(per_roi.dtype)
        loss = torch.dot(per_roi, w) / w.sum().clamp(min=1)
    return loss if weight == 1 else weight * loss
