"""Hybrid Task Cascade: backbone -> FPN -> RPN -> cascade RoI heads, composed by direct calls.

Module names are mmdetection's (``backbone``, ``neck``, ``rpn_head``, ``roi_head``), so an
mmdetection HTC state dict loads with ``load_checkpoint`` as it is.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from htc_fast.config import HTCConfig, ModelConfig
from htc_fast.model.backbone import build_backbone
from htc_fast.model.cascade import CascadeLoss, HTCRoIHead
from htc_fast.model.fpn import build_fpn
from htc_fast.model.inputs import Detections, ImageBatch, Targets
from htc_fast.model.matching import FirstKSampler
from htc_fast.model.rpn_head import RPNHead
from htc_fast.model.rpn_loss import RPNLoss


class HTCLoss(NamedTuple):
    rpn: RPNLoss
    roi: CascadeLoss

    def as_dict(self) -> dict[str, Tensor]:
        """mmdetection's loss names (RPN losses summed over levels), for logging and comparison."""
        out = {"loss_rpn_cls": self.rpn.cls_levels.sum(), "loss_rpn_bbox": self.rpn.bbox_levels.sum()}
        if self.roi.semantic is not None:
            out["loss_semantic_seg"] = self.roi.semantic
        for i, s in enumerate(self.roi.stages):
            out.update({f"s{i}.loss_cls": s.cls, f"s{i}.acc": s.accuracy, f"s{i}.loss_bbox": s.box,
                        f"s{i}.loss_mask": s.mask})
        return out

    def total(self) -> Tensor:
        """The optimised loss: every entry whose name contains "loss" (mmdetection's rule)."""
        return sum(v for k, v in self.as_dict().items() if "loss" in k)


class HTC(nn.Module):
    """The model for one ModelConfig. forward(batch, targets) -> HTCLoss; predict(batch) -> detections."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.neck = build_fpn(cfg.fpn, cfg.backbone.out_channels)
        self.rpn_head = RPNHead(cfg.rpn, cfg.fpn.out_channels)
        self.roi_head = HTCRoIHead(cfg.roi, cfg.semantic, cfg.test, cfg.num_classes, cfg.fpn.out_channels)

    def features(self, images: Tensor):
        """(N, 3, H, W) -> FPN levels P2..P6."""
        return self.neck(self.backbone(images))

    def forward(self, batch: ImageBatch, targets: Targets, *, sampler: str = "random",
                generator: Optional[torch.Generator] = None) -> HTCLoss:
        """Training losses, without host synchronisation off the CPU (fixed-capacity proposals,
        samples and mask rois; on CPU the mask branch reads its positive counts, see
        ``HTCRoIHead.static_shapes``). sampler: "random" (mmdetection's distribution, other draws)
        or "first-k" (deterministic, mmdetection's exact samples)."""
        feats = self.features(batch.images)
        rpn_out = self.rpn_head(feats)
        pad = tuple(batch.images.shape[-2:])
        rpn_sampler = None
        if sampler == "first-k":
            rpn_sampler = FirstKSampler(self.cfg.rpn.sampler_num, self.cfg.rpn.sampler_pos_fraction, -1, False)
        rpn_loss = self.rpn_head.loss(rpn_out, targets.boxes, batch.image_shapes, [pad] * len(targets.boxes),
                                      sampler=rpn_sampler, generator=generator)
        proposals = self.rpn_head.proposals(rpn_out, batch.image_shapes, training=True, padded=True)
        semantic = None
        if targets.semantic is not None and self.roi_head.semantic_head is not None:
            semantic = targets.semantic
            if tuple(semantic.shape[-2:]) == pad:  # full resolution; else already at the head's stride
                semantic = _downscale_labels(semantic, self.cfg.semantic.stride)
        roi_loss = self.roi_head.loss(feats, [p.boxes for p in proposals], targets.boxes, targets.labels,
                                      targets.masks, batch.image_shapes, semantic, sampler=sampler,
                                      generator=generator, proposal_valid=[p.valid for p in proposals])
        return HTCLoss(rpn_loss, roi_loss)

    @torch.no_grad()
    def predict(self, batch: ImageBatch, *, masks: Optional[str] = "bitmap") -> list[Detections]:
        """Detections per image in original-image pixels. masks: "bitmap" (bool (D, H, W)),
        "rle" (COCO RLE dicts, without building dense masks on the host) or None."""
        if masks not in ("bitmap", "rle", None):
            raise ValueError(f"masks must be 'bitmap', 'rle' or None, got {masks!r}")
        feats = self.features(batch.images)
        proposals = self.rpn_head.proposals(self.rpn_head(feats), batch.image_shapes, training=False, padded=True)
        # Fixed capacity up to here; the cascade reads the detection counts once (the only sync).
        dets = self.roi_head.predict(feats, [p.boxes for p in proposals], batch.image_shapes, batch.scale_factors,
                                     with_masks=masks is not None, proposal_valid=[p.valid for p in proposals])
        out = []
        for d, shape in zip(dets, batch.original_shapes):
            pasted = None if masks is None else _paste(d.mask_probs, d.boxes, shape, self.cfg.test.mask_thr, masks)
            out.append(Detections(d.boxes, d.scores, d.labels, pasted))
        return out


def _downscale_labels(labels: Tensor, stride: int) -> Tensor:
    """(N, H, W) label map -> (N, H/stride, W/stride) by nearest sampling (mmdetection's
    interpolate(scale_factor=1/stride, mode="nearest"))."""
    small = torch.nn.functional.interpolate(labels[:, None].float(), scale_factor=1.0 / stride, mode="nearest")
    return small[:, 0].long()


def _paste(mask_probs, boxes, shape, threshold, kind):
    from htc_fast.ops import paste_masks, paste_masks_rle

    if kind == "rle":
        return paste_masks_rle(mask_probs, boxes, shape, threshold)
    return paste_masks(mask_probs, boxes, shape, threshold)


def build_htc(cfg) -> HTC:
    """The HTC model for an HTCConfig (or its ModelConfig)."""
    return HTC(cfg.model if isinstance(cfg, HTCConfig) else cfg)
