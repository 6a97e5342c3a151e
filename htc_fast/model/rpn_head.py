"""The RPN head of HTC: network, anchors, proposals and training loss, in one module.

Parameters (mounted as ``rpn_head``, mmdetection's keys): ``rpn_conv`` 3x3 (in -> feat) + ReLU,
shared by the levels; ``rpn_cls`` 1x1 (feat -> A: one sigmoid objectness logit per anchor);
``rpn_reg`` 1x1 (feat -> 4A). Initialised normal(std 0.01), bias 0 (mmdet's RPNHead init).

The post-processing lives in ``rpn_proposals.py`` and the targets/losses in ``rpn_loss.py``;
the head keeps its ``RPNConfig`` (HTC's values by default) so callers pass only data.
"""
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from htc_fast.config import RPNConfig
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

    cls_logits: list[Tensor]
    bbox_deltas: list[Tensor]


class RPNHead(nn.Module):
    """Region proposal network head, built from its config section (HTC R-50-FPN defaults).

    Args:
        cfg: the ``rpn`` section of the model config: anchors, box coder, proposal limits for
            training and test, assigner, sampler and loss weights (None: ``RPNConfig()``).
        in_channels: channels of the FPN maps it reads (the FPN's ``out_channels``, 256).
    """

    def __init__(self, cfg: Optional[RPNConfig] = None, in_channels: int = 256):
        super().__init__()
        cfg = RPNConfig() if cfg is None else cfg
        if not isinstance(cfg, RPNConfig):
            raise TypeError(f"RPNHead: cfg must be an RPNConfig, got {type(cfg).__name__}")
        if in_channels <= 0 or cfg.feat_channels <= 0:
            raise ValueError(f"RPNHead: in_channels and cfg.feat_channels must be positive, got "
                             f"{in_channels}, {cfg.feat_channels}")
        self.cfg = cfg
        self.anchor_generator = AnchorGenerator(cfg.anchor_strides, cfg.anchor_ratios, cfg.anchor_scales)
        num_anchors = self.anchor_generator.num_base_anchors
        self.coder = DeltaXYWHBoxCoder(cfg.target_means, cfg.target_stds)
        self.rpn_conv = nn.Conv2d(in_channels, cfg.feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(cfg.feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(cfg.feat_channels, num_anchors * 4, 1)
        self.assigner = MaxIoUAssigner(cfg.pos_iou_thr, cfg.neg_iou_thr, min_pos_iou=cfg.min_pos_iou,
                                       match_low_quality=cfg.match_low_quality)
        self.sampler = RandomSampler(cfg.sampler_num, cfg.sampler_pos_fraction, neg_pos_ub=-1,
                                     add_gt_as_proposals=False)
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

    def anchors(self, output: RPNOutput) -> list[Tensor]:
        """Per level (H_l * W_l * A, 4) float32 anchors matching ``output``'s maps."""
        sizes = [tuple(c.shape[-2:]) for c in output.cls_logits]
        return self.anchor_generator.grid_anchors(sizes, device=output.cls_logits[0].device)

    def proposals(self, output: RPNOutput, image_sizes: Sequence[tuple[int, int]],
                  training: Optional[bool] = None, nms_backend: Optional[str] = None,
                  padded: bool = False) -> list[Proposals]:
        """Proposals per image (no gradient).

        Args:
            output: this head's output for the batch.
            image_sizes: (h, w) of each image after resizing, before padding.
            training: use the training limits (``cfg.nms_pre_train``, ``cfg.max_per_img_train``)
                instead of the test ones;
                None follows ``self.training``.
            nms_backend: forwarded to ``htc_fast.ops.batched_nms``.
            padded: fixed-capacity proposals with ``valid`` flags and no host sync (see
                ``rpn_proposals``); the model's own training and inference use this.
        """
        training = self.training if training is None else training
        c = self.cfg
        nms_pre = c.nms_pre_train if training else c.nms_pre_test
        max_per_img = c.max_per_img_train if training else c.max_per_img_test
        return rpn_proposals(output.cls_logits, output.bbox_deltas, self.anchors(output), image_sizes,
                             self.coder, int(nms_pre), int(max_per_img), float(c.nms_iou),
                             float(c.min_bbox_size), nms_backend=nms_backend, padded=padded)

    def targets(self, output: RPNOutput, gt_boxes: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                pad_shapes: Optional[Sequence[tuple[int, int]]] = None,
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
                           float(self.cfg.allowed_border), gt_boxes_ignore, generator,
                           device=output.cls_logits[0].device)

    def loss(self, output: RPNOutput, gt_boxes: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
             pad_shapes: Optional[Sequence[tuple[int, int]]] = None,
             gt_boxes_ignore: Optional[Sequence[Optional[Tensor]]] = None,
             sampler: Optional[RandomSampler] = None,
             generator: Optional[torch.Generator] = None) -> RPNLoss:
        """Per-level RPN losses for a batch (arguments as in ``targets``)."""
        targets = self.targets(output, gt_boxes, image_sizes, pad_shapes, gt_boxes_ignore, sampler, generator)
        c = self.cfg
        return rpn_loss(output.cls_logits, output.bbox_deltas, targets, float(c.smooth_l1_beta),
                        float(c.loss_cls_weight), float(c.loss_bbox_weight))
