"""The HTC cascade (Chen et al. 2019): three box stages and three mask stages, interleaved, with
mask information flow and semantic feature fusion. Training and inference are written out here,
top to bottom; the heads, RoI extraction and matching live in their own files.

Module layout = mmdetection's ``roi_head``: ``bbox_head.{i}``, ``mask_head.{i}``,
``semantic_head`` (absent in HTC-without-semantic).
"""
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from htc_fast.config import RoIConfig, SemanticConfig, TestConfig
from htc_fast.model.box_coder import decode_boxes, encode_boxes
from htc_fast.model.box_head import BoxHead, box_head_loss
from htc_fast.model.constants import host_constant, row_layout
from htc_fast.model.mask_head import MaskHead, mask_head_loss
from htc_fast.model.matching import (
    FirstKSampler,
    MaxIoUAssigner,
    RandomSampler,
    SamplingResult,
    pad_boxes,
    pad_ground_truth,
    stack_assigners,
)
from htc_fast.model.roi_features import RoIFeatureExtractor
from htc_fast.model.semantic_head import SemanticHead
from htc_fast.ops import htc_mask_probs, multiclass_nms, roi_align


class StageLoss(NamedTuple):
    """One stage's losses, already multiplied by the stage's weight (1, 0.5, 0.25)."""
    cls: Tensor
    box: Tensor
    mask: Tensor
    accuracy: Tensor  # percent, for logging


class CascadeLoss(NamedTuple):
    stages: tuple[StageLoss, ...]
    semantic: Optional[Tensor]  # None without a semantic head or labels


class CascadeDetections(NamedTuple):
    """Detections of one image, best first (at most test.max_per_img).

    boxes: (D, 4) float32 in original-image pixels; input_boxes: the same in network-input pixels
    (what the mask branch pooled); scores: (D,); labels: (D,) int64 in [0, num_classes);
    mask_probs: (D, M, M) merged mask probabilities at each detection's label (None if not asked).
    """
    boxes: Tensor
    input_boxes: Tensor
    scores: Tensor
    labels: Tensor
    mask_probs: Optional[Tensor]


def _batch_rois(boxes: Tensor, image_shapes) -> Tensor:
    """(B, K, 4) boxes of B images -> (B * K, 5) rois [batch_index, x1, y1, x2, y2]."""
    index_column = row_layout(image_shapes, [boxes.shape[1]] * boxes.shape[0], boxes.device)[1]
    return torch.cat([index_column.to(boxes.dtype), boxes.reshape(-1, 4)], dim=1)


def _stack_proposals(proposals: Sequence[Tensor], valid: Optional[Sequence[Tensor]]):
    """Per-image (K_i, 4) proposals -> (B, K, 4) detached boxes and (B, K) bool validity (None:
    all real), K = max K_i; shorter lists are padded with invalid zero boxes."""
    boxes, real = pad_boxes([p.detach() for p in proposals])
    if valid is None:
        return boxes, real
    if real is None:
        return boxes, torch.stack(list(valid))
    return boxes, real & torch.nn.utils.rnn.pad_sequence(list(valid), batch_first=True)


def rois_from(boxes: Sequence[Tensor]) -> Tensor:
    """Per-image (K_i, 4) boxes -> (sum K_i, 5) rois [batch_index, x1, y1, x2, y2]."""
    parts = [torch.cat([b.new_full((len(b), 1), i), b], dim=1) for i, b in enumerate(boxes)]
    return torch.cat(parts) if parts else torch.zeros(0, 5)


class HTCRoIHead(nn.Module):
    """Args: roi, semantic, test: the model config's sections; num_classes (80); in_channels (256)."""

    def __init__(self, roi: RoIConfig, semantic: SemanticConfig, test: TestConfig, num_classes=80,
                 in_channels=256):
        super().__init__()
        self.roi, self.test, self.num_classes = roi, test, num_classes
        self.semantic_head = SemanticHead(
            fusion_level=semantic.fusion_level, in_channels=in_channels, channels=semantic.conv_channels,
            num_convs=semantic.num_convs, num_classes=semantic.num_classes, ignore_index=semantic.ignore_index,
            loss_weight=semantic.loss_weight) if semantic.enabled else None
        self.bbox_head = nn.ModuleList(BoxHead(in_channels, roi.box_roi_size, roi.fc_out_channels, num_classes)
                                       for _ in roi.stages)
        self.mask_head = nn.ModuleList(
            MaskHead(in_channels, roi.mask_conv_channels, roi.mask_num_convs, num_classes,
                     with_conv_res=roi.mask_info_flow and i > 0) for i in range(roi.num_stages))
        self.extract = RoIFeatureExtractor(tuple(roi.featmap_strides), roi.finest_scale, roi.sampling_ratio,
                                           roi.aligned, semantic.stride, semantic.roi_size)
        # Each stage's assigner: positive and negative thresholds equal (0.5, 0.6, 0.7).
        self.assigners = [MaxIoUAssigner(s.iou_threshold, s.iou_threshold, s.iou_threshold,
                                         match_low_quality=roi.match_low_quality) for s in roi.stages]
        # Training mask branch at a fixed capacity (no host sync; True), on the positives read
        # back (False), or by device (None: fixed except on CPU). See _mask_loss.
        self.static_shapes: Optional[bool] = None

    # ------------------------------------------------------------------------------- training

    def loss(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor],
             gt_labels: Sequence[Tensor], gt_masks: Sequence[Tensor], image_shapes: Sequence[tuple[int, int]],
             semantic_labels: Optional[Tensor] = None, *, sampler: str = "random",
             generator: Optional[torch.Generator] = None,
             proposal_valid: Optional[Sequence[Tensor]] = None) -> CascadeLoss:
        """The HTC training step of the RoI heads, without host synchronisation.

        feats: FPN outputs P2..P5; proposals: per image (K_i, 4) RPN boxes (network-input pixels);
        gt_boxes (G_i, 4), gt_labels (G_i,) int64, gt_masks (G_i, H, W) bool/uint8 at network-input
        resolution; image_shapes: per image (h, w) before padding (boxes are clipped to it);
        semantic_labels: (N, H/8, W/8) int64 stuff labels or None; sampler: "random" or
        "first-k" (deterministic: positives then negatives in index order); proposal_valid: per
        image (K_i,) bool, False for padding (None: all proposals are real).

        Every stage works on fixed-size slot lists (see sampling.py): the box head runs on each
        image's min(512, candidates) slots, the mask head on the first ``max_pos`` slots (where
        the sampled positives are), and unused slots get zero loss weight.
        """
        semantic_feat, semantic_loss = None, None
        if self.semantic_head is not None:
            logits, semantic_feat = self.semantic_head(feats)
            if semantic_labels is not None:
                semantic_loss = self.semantic_head.loss(logits, semantic_labels)
        pick = self._sampler(sampler)
        # Every image at once: proposals and ground truth padded to the batch's largest count.
        boxes, valid = _stack_proposals(proposals, proposal_valid)
        gt = pad_ground_truth(gt_boxes, gt_labels, dtype=boxes.dtype, device=boxes.device)
        stages, ahead = [], None
        for i, stage in enumerate(self.roi.stages):
            # Box branch on RoIs sampled from this stage's input boxes (interleaved: already
            # sampled, together with the previous stage's mask branch).
            samples = ahead if ahead is not None else self._sample((i,), pick, boxes, valid, gt, generator)[0]
            rois = _batch_rois(samples.boxes, image_shapes)
            out = self.bbox_head[i](self.extract(feats, semantic_feat, rois, self.roi.box_roi_size))
            labels, weights, targets = self._box_targets(i, samples)
            box_loss = box_head_loss(out, labels, targets, weights=weights, smooth_l1_beta=self.roi.smooth_l1_beta,
                                     cls_weight=self.roi.loss_cls_weight, box_weight=self.roi.loss_bbox_weight)
            # Refine: the stage's regression moves its sampled RoIs (ground truth dropped); they
            # are the next stage's input and, interleaved, what the mask branch samples from now.
            with torch.no_grad():
                boxes, valid = self._refine(i, samples, rois, out.deltas, image_shapes)
            ahead = None
            if self.roi.interleaved:
                # This stage's mask branch and the next stage's box branch sample the same boxes
                # with their own thresholds and draws: one call for both.
                samples, *rest = self._sample(tuple(range(i, min(i + 2, len(self.roi.stages)))), pick, boxes,
                                              valid, gt, generator)
                ahead = rest[0] if rest else None
            mask_loss = self._mask_loss(i, feats, semantic_feat, samples, gt_masks, pick.max_pos, image_shapes)
            w = stage.loss_weight
            if w != 1:  # (a weight of 1 costs two ops per loss, forward and backward, for nothing)
                box_loss, mask_loss = box_loss._replace(cls=w * box_loss.cls, box=w * box_loss.box), w * mask_loss
            stages.append(StageLoss(box_loss.cls, box_loss.box, mask_loss, box_loss.accuracy))
        return CascadeLoss(tuple(stages), semantic_loss)

    def _sampler(self, name):
        cls = {"random": RandomSampler, "first-k": FirstKSampler}.get(name)
        if cls is None:
            raise ValueError(f"sampler must be 'random' or 'first-k', got {name!r}")
        return cls(self.roi.sampler_num, self.roi.sampler_pos_fraction, -1, self.roi.add_gt_as_proposals)

    def _sample(self, stages, sampler, boxes, valid, gt, generator) -> list[SamplingResult]:
        """Assign and sample (B, K, 4) boxes of all images in one pass, once per stage of
        ``stages`` (each with its assigner's thresholds and its own random keys; several stages
        in one call along a leading dim, sharing the IoU); gt from pad_ground_truth."""
        gt_boxes, gt_labels, gt_valid = gt
        if len(stages) == 1:
            assigned = self.assigners[stages[0]].assign(boxes, gt_boxes, gt_labels, valid=valid, gt_valid=gt_valid)
            return [sampler.sample(assigned, boxes, gt_boxes, gt_labels, generator=generator, gt_valid=gt_valid)]

        def per_stage(t):
            return None if t is None else t.expand(len(stages), *t.shape)

        assigned = stack_assigners([self.assigners[s] for s in stages]).assign(boxes, gt_boxes, gt_labels, valid=valid,
                                                                                gt_valid=gt_valid)
        gt_boxes, gt_labels, gt_valid = per_stage(gt_boxes), per_stage(gt_labels), per_stage(gt_valid)
        together = sampler.sample(assigned, boxes, gt_boxes, gt_labels, generator=generator, gt_valid=gt_valid)
        return list(together)

    def _box_targets(self, stage, samples: SamplingResult):
        """All images' slots, flattened: (R,) labels (background for negatives and unused slots),
        (R,) float weights (1 on sampled slots) and (R, 4) encoded targets."""
        st = self.roi.stages[stage]
        is_pos = samples.is_pos.reshape(-1)
        labels = samples.labels.reshape(-1).masked_fill(~is_pos, self.num_classes)
        boxes = samples.boxes.reshape(-1, 4)
        # Slots that are not positive encode against themselves (finite zeros; weight 0 anyway).
        gt = torch.where(is_pos[:, None], samples.gt_boxes.reshape(-1, 4), boxes)
        weights = samples.valid.reshape(-1).to(boxes.dtype)
        return labels, weights, encode_boxes(boxes, gt, st.target_means, st.target_stds)

    def _refine(self, stage, samples, rois, deltas, image_shapes) -> tuple[Tensor, Tensor]:
        """Decode every slot in one pass; per image, the non-ground-truth sampled slots first
        (in slot order, as mmdet's list without the ground truth) and the rest marked invalid.
        Returns (B, S, 4) boxes and (B, S) bool validity."""
        st = self.roi.stages[stage]
        batch, slots = samples.inds.shape
        bounds = row_layout(image_shapes, [slots] * batch, rois.device)[0]
        decoded = decode_boxes(rois[:, 1:], deltas.detach(), st.target_means, st.target_stds, max_shape=bounds)
        keep = samples.valid & ~samples.is_gt
        order = (~keep).to(torch.uint8).argsort(dim=-1, stable=True)  # a stable compaction, no sync
        boxes = decoded.view(batch, slots, 4).gather(1, order[..., None].expand(batch, slots, 4))
        return boxes, keep.gather(1, order)

    def _mask_loss(self, stage, feats, semantic_feat, samples, gt_masks, capacity, image_shapes) -> Tensor:
        """The mask loss on each image's first ``capacity`` slots, where the sampled positives are.

        With ``static_shapes`` off (the default on CPU, where reading a count costs no waiting)
        the largest number of positives of an image is read and only that many slots run
        through the mask head: a fixed capacity would cost max_pos / P times the mask head's
        compute."""
        static = self.static_shapes if self.static_shapes is not None else feats[0].device.type != "cpu"
        if not static:
            capacity = int(samples.num_pos.max())
        boxes = samples.boxes[:, :capacity]
        x = self.extract(feats, semantic_feat, _batch_rois(boxes, image_shapes), self.roi.mask_roi_size)
        logits = self.mask_head[stage].logits(self._trunk(stage, x))
        targets = self._mask_targets(boxes, samples.gt_inds[:, :capacity], gt_masks)
        labels = samples.labels[:, :capacity].reshape(-1).clamp(min=0)
        weights = samples.is_pos[:, :capacity].reshape(-1)
        return mask_head_loss(logits, labels, targets, weight=self.roi.loss_mask_weight, roi_weights=weights)

    def _trunk(self, stage, x):
        """Stage `stage`'s trunk feature with the information flow of the stages before it
        (eq. 5: each earlier trunk runs on the same RoI features, feeding the next)."""
        prev = None
        if self.roi.mask_info_flow:
            for j in range(stage):
                prev = self.mask_head[j].trunk(x, prev)
        return self.mask_head[stage].trunk(x, prev)

    def _mask_targets(self, boxes: Tensor, gt_inds: Tensor, masks: Sequence[Tensor]) -> Tensor:
        """(B * C, M, M) binary targets for the slots' (B, C, 4) boxes, ``gt_inds`` (B, C) their
        0-based ground truth: each slot's ground-truth mask RoI-aligned to its box (aligned,
        sampling_ratio 0) and thresholded at 0.5, as mmdetection's BitmapMasks do. Slots of
        images without ground truth (and non-positive slots, whose loss weight is 0) get whatever
        their index points at; all images' masks go through one RoIAlign call."""
        size = self.roi.mask_size
        batch, capacity = gt_inds.shape
        counts = [len(m) for m in masks]
        if batch * capacity == 0 or sum(counts) == 0:
            return boxes.new_zeros((batch * capacity, size, size), dtype=torch.float32)
        shapes = {tuple(m.shape[-2:]) for m in masks if len(m)}
        if len(shapes) > 1:
            # Masks at each image's own size: one RoIAlign per image (padding them to a common
            # size would change the border samples).
            return torch.cat([self._mask_targets(b[None], g[None], [m]) if len(m) else
                              b.new_zeros((capacity, size, size), dtype=torch.float32)
                              for b, g, m in zip(boxes, gt_inds, masks)])
        # Row r of image i takes mask offsets[i] + gt_inds[r] of the concatenated masks.
        offsets = host_constant(("mask offsets", tuple(counts), capacity, str(boxes.device)), lambda: (
            torch.tensor([sum(counts[:i]) for i in range(batch)]).repeat_interleave(capacity).to(boxes.device),))[0]
        index = (gt_inds.reshape(-1) + offsets).clamp(max=sum(counts) - 1)
        rois = torch.cat([index[:, None].to(torch.float32), boxes.reshape(-1, 4).float()], dim=1)
        stacked = torch.cat([m for m in masks if len(m)])[:, None].float()
        crops = roi_align(stacked, rois, size, 1.0, 0, True)
        return (crops[:, 0] >= 0.5).float()

    # ------------------------------------------------------------------------------ inference

    @torch.no_grad()
    def predict(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], image_shapes, scale_factors,
                *, with_masks=True, proposal_valid: Optional[Sequence[Tensor]] = None) -> list[CascadeDetections]:
        """Cascade inference; detections sized to each image (one host sync reads all counts).

        proposals: per image (K_i, 4) (network-input pixels); proposal_valid: per image (K_i,)
        bool, False for padding (None: all real); image_shapes: per image (h, w) before padding;
        scale_factors: per image (w_scale, h_scale) from the original image to the network input.
        Class scores are the softmax of the mean of the three stages' logits, each on its own
        stage's RoIs; boxes are the last stage's regression; masks merge the stages' sigmoids by
        `roi.mask_merge`.
        """
        padded, counts = self.predict_padded(feats, proposals, image_shapes, scale_factors, with_masks=with_masks,
                                             proposal_valid=proposal_valid)
        counts = counts.tolist()  # the one sync: detections leave fixed capacity here
        return [CascadeDetections(*(None if t is None else t[:k] for t in d)) for d, k in zip(padded, counts)]

    @torch.no_grad()
    def predict_padded(self, feats: Sequence[Tensor], proposals: Sequence[Tensor], image_shapes, scale_factors,
                       *, with_masks=True, proposal_valid: Optional[Sequence[Tensor]] = None):
        """``predict`` at a fixed capacity without host synchronisation: per image
        ``CascadeDetections`` of test.max_per_img rows (the first num_dets real, padding after:
        zeros, labels -1, mask probabilities 0) and an (N,) int64 device tensor of num_dets."""
        semantic_feat = self.semantic_head(feats).feat if self.semantic_head is not None else None
        counts = [len(p) for p in proposals]
        device = feats[0].device
        boxes = torch.cat([p.float() for p in proposals]).to(device)
        bounds, index_column = row_layout(image_shapes, counts, device)
        rois = torch.cat([index_column, boxes], dim=1)
        logits_sum = None
        for i, stage in enumerate(self.roi.stages):
            out = self.bbox_head[i](self.extract(feats, semantic_feat, rois, self.roi.box_roi_size))
            logits_sum = out.cls_logits if logits_sum is None else logits_sum + out.cls_logits
            boxes = decode_boxes(rois[:, 1:], out.deltas.float(), stage.target_means, stage.target_stds,
                                 max_shape=bounds)
            if i + 1 < len(self.roi.stages):
                rois = torch.cat([index_column, boxes], dim=1)
        scores = torch.softmax(logits_sum.float() / float(len(self.roi.stages)), dim=1)
        if proposal_valid is not None:
            # Padding proposals score 0 for every class: never above the score threshold.
            scores = scores * torch.cat(list(proposal_valid)).to(device=device, dtype=scores.dtype)[:, None]
        results, nums = [], []
        for b, sc, scale in zip(boxes.split(counts), scores.split(counts), scale_factors):
            if len(b) == 0:  # no proposals (a host-known shape): pad one row that cannot score
                b, sc = b.new_zeros(1, 4), sc.new_zeros(1, sc.shape[1])
            nms = multiclass_nms(b, sc, self.test.score_thr, self.test.nms_iou, self.test.max_per_img, padded=True)
            original = nms.boxes / nms.boxes.new_tensor([scale[0], scale[1], scale[0], scale[1]])
            results.append(CascadeDetections(original, nms.boxes, nms.scores, nms.labels, None))
            nums.append(nms.num_dets)
        if with_masks:
            results = self._predict_masks(feats, semantic_feat, results)
        return results, torch.stack(nums) if nums else torch.zeros(0, dtype=torch.long, device=device)

    def _predict_masks(self, feats, semantic_feat, dets: list[CascadeDetections]) -> list[CascadeDetections]:
        """Merged mask probabilities for every detection row (padding rows have label -1, which
        ``htc_mask_probs`` turns into zero masks)."""
        rois = rois_from([d.input_boxes for d in dets]).to(feats[0].device)
        labels = torch.cat([d.labels for d in dets])
        x = self.extract(feats, semantic_feat, rois, self.roi.mask_roi_size)
        logits, prev = [], None
        for i, head in enumerate(self.mask_head):
            prev = head.trunk(x, prev if self.roi.mask_info_flow else None)
            if self.roi.mask_merge == "mean" or i == len(self.mask_head) - 1:
                logits.append(head.logits(prev))
        merged = htc_mask_probs(logits, labels)
        parts = merged.split([len(d.labels) for d in dets])
        return [d._replace(mask_probs=p) for d, p in zip(dets, parts)]
