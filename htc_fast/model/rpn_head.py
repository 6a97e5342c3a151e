"""The RPN head of HTC: network, anchors, proposals and training loss, in one module.

Parameters (mounted as ``rpn_head``, mmdetection's keys): ``rpn_conv`` 3x3 (in -> feat) + ReLU,
shared by the levels; ``rpn_cls`` 1x1 (feat -> A: one sigmoid objectness logit per anchor);
``rpn_reg`` 1x1 (feat -> 4A). Initialised normal(std 0.01), bias 0 (mmdet's RPNHead init).

The post-processing lives in ``rpn_proposals.py`` and the targets/losses in ``rpn_loss.py``;
this module stores their hyper-parameters (HTC's as defaults) so callers pass only data.
"""
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from htc_fast.model.anchors import AnchorGenerator
from htc_fast.model.box_coder import DeltaXYWHBoxCoder
from htc_fast.model.matching import MaxIoUAssigner, RandomSampler
from htc_fast.model.rpn_loss import RPNLoss, RPNTargets, rpn_loss, rpn_targets
from htc_fast.model.rpn_proposals import Proposals, rpn_proposals

__all__ = ["RPNOutput", "RPNHead"]


class RPNOutput(NamedTuple):
    """Raw RPN maps, one entry per FPN level.

    cls_logits: (N, A, H_l, W_l) objectness logits.
    bbox_deltas: (N, 4A, H_l, W_l) deltas, channel 4a + (dx, dy, dw, dh) for anchor a.
    """

    cls_logits: List[Tensor]
    bbox_deltas: List[Tensor]


class RPNHead(nn.Module):
    """Region proposal network head (HTC R-50-FPN defaults).

    Args:
        in_channels, feat_channels: 256, 256.
        strides, ratios, scales: the anchors (see ``AnchorGenerator``).
        target_means, target_stds: the box coder's normalisation (0s and 1s).
        test_nms_pre, test_max_per_img: proposals at inference (1000, 1000).
        train_nms_pre, train_max_per_img: proposals during training (2000, 2000).
        nms_iou_threshold, min_bbox_size: 0.7, 0 (both modes).
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality: the anchor assigner (0.7, 0.3,
            0.3, True: each ground truth's best anchors are positive).
        num_samples, pos_fraction: the anchor sampler (256, 0.5).
        allowed_border: anchors inside the image with this border are candidates (0; < 0: all).
        smooth_l1_beta, cls_loss_weight, bbox_loss_weight: 1/9, 1, 1.
    """

    def __init__(self, in_channels: int = 256, feat_channels: int = 256,
                 strides: Sequence[int] = (4, 8, 16, 32, 64), ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 scales: Sequence[float] = (8.0,),
                 target_means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
                 target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 test_nms_pre: int = 1000, test_max_per_img: int = 1000,
                 train_nms_pre: int = 2000, train_max_per_img: int = 2000,
                 nms_iou_threshold: float = 0.7, min_bbox_size: float = 0.0,
                 pos_iou_thr: float = 0.7, neg_iou_thr: float = 0.3, min_pos_iou: float = 0.3,
                 match_low_quality: bool = True, num_samples: int = 256, pos_fraction: float = 0.5,
                 allowed_border: float = 0.0,
                 smooth_l1_beta: float = 1.0 / 9.0, cls_loss_weight: float = 1.0,
                 bbox_loss_weight: float = 1.0):
        super().__init__()
        if in_channels <= 0 or feat_channels <= 0:
            raise ValueError(f"RPNHead: in_channels and feat_channels must be positive, got "
                             f"{in_channels}, {feat_channels}")
        self.anchor_generator = AnchorGenerator(strides, ratios, scales)
        num_anchors = self.anchor_generator.num_base_anchors
        self.coder = DeltaXYWHBoxCoder(target_means, target_stds)
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.test_nms_pre, self.test_max_per_img = int(test_nms_pre), int(test_max_per_img)
        self.train_nms_pre, self.train_max_per_img = int(train_nms_pre), int(train_max_per_img)
        self.nms_iou_threshold = float(nms_iou_threshold)
        self.min_bbox_size = float(min_bbox_size)
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou=min_pos_iou,
                                       match_low_quality=match_low_quality)
        self.sampler = RandomSampler(num_samples, pos_fraction, neg_pos_ub=-1, add_gt_as_proposals=False)
        self.allowed_border = float(allowed_border)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.cls_loss_weight = float(cls_loss_weight)
        self.bbox_loss_weight = float(bbox_loss_weight)
        self.init_weights()

    @property
    def num_anchors(self) -> int:
        """Anchors per location (A)."""
        return self.anchor_generator.num_base_anchors

    def init_weights(self) -> None:
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, features: Sequence[Tensor]) -> RPNOutput:
        """features: FPN maps P2..P6, each (N, in_channels, H_l, W_l) -> RPNOutput."""
        if len(features) != self.anchor_generator.num_levels:
            raise ValueError(f"RPNHead: got {len(features)} feature levels, the anchors have "
                             f"{self.anchor_generator.num_levels}")
        cls_logits, bbox_deltas = [], []
        for x in features:
            x = F.relu(self.rpn_conv(x))
            cls_logits.append(self.rpn_cls(x))
            bbox_deltas.append(self.rpn_reg(x))
        return RPNOutput(cls_logits, bbox_deltas)

    def anchors(self, output: RPNOutput) -> List[Tensor]:
        """Per level (H_l * W_l * A, 4) float32 anchors matching ``output``'s maps."""
        sizes = [tuple(c.shape[-2:]) for c in output.cls_logits]
        return self.anchor_generator.grid_anchors(sizes, device=output.cls_logits[0].device)

    def proposals(self, output: RPNOutput, image_sizes: Sequence[Tuple[int, int]],
                  training: Optional[bool] = None, nms_backend: Optional[str] = None,
                  padded: bool = False) -> List[Proposals]:
        """Proposals per image (no gradient).

        Args:
            output: this head's output for the batch.
            image_sizes: (h, w) of each image after resizing, before padding.
            training: use the training limits (2000/2000) instead of the test ones (1000/1000);
                None follows ``self.training``.
            nms_backend: forwarded to ``htc_fast.ops.batched_nms``.
            padded: fixed-capacity proposals with ``valid`` flags and no host sync (see
                ``rpn_proposals``); the model's own training and inference use this.
        """
        training = self.training if training is None else training
        nms_pre = self.train_nms_pre if training else self.test_nms_pre
        max_per_img = self.train_max_per_img if training else self.test_max_per_img
        return rpn_proposals(output.cls_logits, output.bbox_deltas, self.anchors(output), image_sizes,
                             self.coder, nms_pre, max_per_img, self.nms_iou_threshold,
                             self.min_bbox_size, nms_backend=nms_backend, padded=padded)

    def targets(self, output: RPNOutput, gt_boxes: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]],
                pad_shapes: Optional[Sequence[Tuple[int, int]]] = None,
                gt_boxes_ignore: Optional[Sequence[Optional[Tensor]]] = None,
                sampler: Optional[RandomSampler] = None,
                generator: Optional[torch.Generator] = None) -> RPNTargets:
        """Anchor targets for ``output``'s maps; see ``rpn_targets``. ``pad_shapes`` defaults to the
        image sizes rounded up to a multiple of 32 (HTC's size divisor); ``sampler`` to this
        head's ``RandomSampler`` (pass a ``FirstKSampler`` for deterministic sampling)."""
        if pad_shapes is None:
            pad_shapes = [(-(-int(h) // 32) * 32, -(-int(w) // 32) * 32) for h, w in image_sizes]
        sizes = [tuple(c.shape[-2:]) for c in output.cls_logits]
        return rpn_targets(self.anchor_generator, sizes, gt_boxes, image_sizes, pad_shapes, self.coder,
                           self.assigner, self.sampler if sampler is None else sampler,
                           self.allowed_border, gt_boxes_ignore, generator,
                           device=output.cls_logits[0].device)

    def loss(self, output: RPNOutput, gt_boxes: Sequence[Tensor], image_sizes: Sequence[Tuple[int, int]],
             pad_shapes: Optional[Sequence[Tuple[int, int]]] = None,
             gt_boxes_ignore: Optional[Sequence[Optional[Tensor]]] = None,
             sampler: Optional[RandomSampler] = None,
             generator: Optional[torch.Generator] = None) -> RPNLoss:
        """Per-level RPN losses for a batch (arguments as in ``targets``)."""
        targets = self.targets(output, gt_boxes, image_sizes, pad_shapes, gt_boxes_ignore, sampler, generator)
        return rpn_loss(output.cls_logits, output.bbox_deltas, targets, self.smooth_l1_beta,
                        self.cls_loss_weight, self.bbox_loss_weight)
