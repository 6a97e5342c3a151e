"""The cascade's box head (mmdetection's ``Shared2FCBBoxHead``): two shared FCs, a classifier and
a class-agnostic regressor; and its losses.

Keys: ``shared_fcs.{0,1}``, ``fc_cls`` (num_classes + 1 outputs, background LAST), ``fc_reg`` (4).
What it does not own: RoI extraction, target assignment, box decoding (model/box_coder.py).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from htc_fast.model.losses import smooth_l1_loss


class BoxHeadOutput(NamedTuple):
    cls_logits: Tensor  # (R, num_classes + 1), background last
    deltas: Tensor      # (R, 4) class-agnostic (dx, dy, dw, dh), normalised by the stage's stds


class BoxHead(nn.Module):
    """Args:
        in_channels, roi_size: RoI features (256, 7): the input is (R, in_channels, roi_size, roi_size).
        fc_channels: width of the two shared FCs (1024).
        num_classes: object classes without background (80).
    """

    def __init__(self, in_channels=256, roi_size=7, fc_channels=1024, num_classes=80):
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi_size * roi_size, fc_channels),
                                         nn.Linear(fc_channels, fc_channels)])
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4)
        self.reset_parameters()

    def reset_parameters(self):
        # mmdetection: Xavier-uniform shared FCs, N(0, 0.01) classifier, N(0, 0.001) regressor, zero biases.
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, roi_feats: Tensor) -> BoxHeadOutput:
        """roi_feats: (R, C, 7, 7) -> logits (R, num_classes + 1), deltas (R, 4)."""
        x = roi_feats.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return BoxHeadOutput(self.fc_cls(x), self.fc_reg(x))


class BoxLoss(NamedTuple):
    cls: Tensor
    box: Tensor
    accuracy: Tensor  # percent of sampled RoIs classified correctly (logged, not optimised)


def box_head_loss(out: BoxHeadOutput, labels: Tensor, delta_targets: Tensor, *, weights: Optional[Tensor] = None,
                  smooth_l1_beta=1.0, cls_weight=1.0, box_weight=1.0) -> BoxLoss:
    """mmdetection's bbox head loss for one stage over all sampled RoIs of the batch.

    Args:
        out: the head's output for R RoIs.
        labels: (R,) int64 in [0, num_classes]; num_classes is background.
        delta_targets: (R, 4) encoded targets (rows of negatives are ignored).
        weights: (R,) 1 for sampled RoIs, 0 for unused slots (None: all sampled).
    Returns cross-entropy averaged over the sampled RoIs and smooth L1 summed over the positives'
    coordinates divided by the number of sampled RoIs (mmdetection's avg_factor for the box loss
    is the number of sampled RoIs, and unit weights for every RoI). The normaliser stays on the
    device (no host sync).
    """
    num_rois = labels.shape[0]
    if num_rois == 0:
        zero = out.cls_logits.sum() * 0 + out.deltas.sum() * 0
        return BoxLoss(zero, zero, zero.detach())
    w = torch.ones_like(labels, dtype=torch.float32) if weights is None else weights.float()
    count = w.sum().clamp(min=1)
    ce = F.cross_entropy(out.cls_logits, labels, reduction="none")
    cls = torch.dot(ce, w.to(ce.dtype)) / count  # (a weighted sum in one op, forward and backward)
    background = out.cls_logits.shape[1] - 1
    pos = (labels < background).to(w.dtype) * w  # labels are >= 0 (cross_entropy checks them)
    box = smooth_l1_loss(out.deltas, delta_targets, smooth_l1_beta, pos[:, None], reduction="sum") / count
    if cls_weight != 1 or box_weight != 1:  # (HTC's are 1: no op spent on them)
        cls, box = cls_weight * cls, box_weight * box
    correct = (out.cls_logits.argmax(1) == labels).to(w.dtype)
    accuracy = torch.dot(correct, w) / count * 100
    return BoxLoss(cls, box, accuracy.detach())
