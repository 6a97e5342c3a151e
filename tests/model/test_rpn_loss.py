"""RPN targets and losses: a hand-checked case, the loss layout against a naive loop, anchor
assignment and sampling, images without objects, gradients, reproducible random sampling, and
mmdetection parity of every assignment and sampling. Head and proposals: test_rpn.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from htc_fast.model.anchors import AnchorGenerator, anchor_inside_flags
from htc_fast.model.box_coder import DeltaXYWHBoxCoder
from htc_fast.model.matching import FirstKSampler, MaxIoUAssigner, RandomSampler
from htc_fast.model.rpn_head import RPNHead
from htc_fast.model.rpn_loss import RPNTargets, rpn_loss, rpn_targets
from tests.model.rpn_support import BIG, SIZES, load_oracle, needs_oracle, random_output, small_head


def test_loss_hand_checked_case():
    # One level, one anchor shape (32 x 32), a 2 x 2 map; all anchors are candidates.
    gen = AnchorGenerator([16], [1.0], [2.0])
    gt = [torch.tensor([[0.0, 0.0, 32.0, 32.0]])]
    # anchors [-16,-16,16,16] IoU 1/7 (negative), [0,-16,32,16] and [-16,0,16,32] IoU 1/3
    # (between the thresholds: ignored), [0,0,32,32] IoU 1 (positive).
    targets = rpn_targets(gen, [(2, 2)], gt, [(32, 32)], [(32, 32)], DeltaXYWHBoxCoder(),
                          MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3),
                          RandomSampler(256, 0.5, add_gt_as_proposals=False),
                          allowed_border=-1)
    assert targets.objectness.tolist() == [[0.0, 0.0, 0.0, 1.0]]
    assert targets.objectness_weights.tolist() == [[1.0, 0.0, 0.0, 1.0]]
    assert targets.avg_factor == 2 and targets.deltas.abs().sum() == 0
    a, b, c, d = 0.3, -1.2, 2.0, 0.8
    pred = [0.05, -0.2, 0.0, 1.0]
    logits = torch.tensor([[[[a, b], [c, d]]]], requires_grad=True)
    deltas = torch.zeros(1, 4, 2, 2)
    deltas[0, :, 1, 1] = torch.tensor(pred)
    deltas.requires_grad_(True)
    loss = rpn_loss([logits], [deltas], targets)
    softplus = lambda x: math.log1p(math.exp(x))  # noqa: E731
    want_cls = (softplus(-d) + softplus(a)) / 2
    beta = 1 / 9
    want_bbox = sum(0.5 * p * p / beta if abs(p) < beta else abs(p) - 0.5 * beta for p in pred) / 2
    assert len(loss.cls) == len(loss.bbox) == 1
    assert math.isclose(float(loss.cls[0].detach()), want_cls, rel_tol=1e-6)
    assert math.isclose(float(loss.bbox[0].detach()), want_bbox, rel_tol=1e-6)
    loss.total().backward()
    # Only the sampled anchors get gradient: logits of the ignored ones (b, c) get none.
    assert logits.grad[0, 0, 0, 1] == 0 and logits.grad[0, 0, 1, 0] == 0
    want_grad = (1 / (1 + math.exp(-d)) - 1) / 2  # d/dx BCE(x, 1) / avg_factor
    assert math.isclose(float(logits.grad[0, 0, 1, 1]), want_grad, rel_tol=1e-5)
    assert deltas.grad[0, :, 0, 0].abs().sum() == 0 and deltas.grad[0, :, 1, 1].abs().sum() > 0


def test_loss_layout_matches_naive_loop():
    n, a = 2, 3
    output = random_output(n=n, a=a)
    total = sum(h * w * a for h, w in SIZES)
    targets = RPNTargets(objectness=(torch.rand(n, total) > 0.5).float(),
                         objectness_weights=(torch.rand(n, total) > 0.7).float(),
                         deltas=torch.randn(n, total, 4) * 0.2,
                         delta_weights=(torch.rand(n, total, 1) > 0.9).float().expand(-1, -1, 4),
                         avg_factor=37, sampling=(), inside=torch.ones(n, total, dtype=torch.bool))
    loss = rpn_loss(output.cls_logits, output.bbox_deltas, targets, smooth_l1_beta=0.25, cls_weight=2.0,
                    bbox_weight=0.5)
    offset = 0
    for level, (h, w) in enumerate(SIZES):
        cls_sum, box_sum = 0.0, 0.0
        for i in range(n):
            for y in range(h):
                for x in range(w):
                    for k in range(a):
                        idx = offset + (y * w + x) * a + k
                        logit = output.cls_logits[level][i, k, y, x:x + 1].double()
                        t = targets.objectness[i, idx:idx + 1].double()
                        bce = float(F.binary_cross_entropy_with_logits(logit, t))
                        cls_sum += bce * float(targets.objectness_weights[i, idx])
                        pred = output.bbox_deltas[level][i, 4 * k:4 * k + 4, y, x]
                        diff = (pred - targets.deltas[i, idx]).abs().double()
                        sl1 = torch.where(diff < 0.25, 0.5 * diff * diff / 0.25, diff - 0.125)
                        box_sum += float((sl1 * targets.delta_weights[i, idx].double()).sum())
        offset += h * w * a
        assert math.isclose(float(loss.cls[level]), 2.0 * cls_sum / 37, rel_tol=1e-5, abs_tol=1e-7)
        assert math.isclose(float(loss.bbox[level]), 0.5 * box_sum / 37, rel_tol=1e-5, abs_tol=1e-7)


def make_batch():
    gt = [torch.tensor([[4.0, 6.0, 80.0, 100.0], [60.0, 20.0, 140.0, 60.0], [100.0, 60.0, 120.0, 88.0]]),
          torch.tensor([[20.0, 20.0, 68.0, 80.0]])]
    return gt, [(128, 160), (100, 120)]


def test_targets_sampling_and_deltas():
    head = small_head()
    output = head([torch.randn(2, 4, h, w) for h, w in BIG])
    gt, sizes = make_batch()
    targets = head.targets(output, gt, sizes, sampler=FirstKSampler(256, 0.5, add_gt_as_proposals=False))
    anchors = torch.cat(head.anchors(output))
    assert targets.avg_factor == sum(max(r.num_pos, 1) + max(r.num_neg, 1) for r in targets.sampling)
    for i, (res, (h, w)) in enumerate(zip(targets.sampling, sizes)):
        # Indices are anchor indices; only anchors inside the image are sampled.
        pos, neg = res.pos_inds, res.neg_inds
        assert targets.inside[i, pos].all() and targets.inside[i, neg].all()
        assert res.num_pos > 0 and res.num_pos + res.num_neg == 256
        torch.testing.assert_close(targets.deltas[i, pos], head.coder.encode(anchors[pos], res.pos_gt_boxes))
        assert targets.objectness[i].nonzero().squeeze(1).tolist() == pos.tolist()
        sampled = targets.objectness_weights[i].nonzero().squeeze(1).tolist()
        assert sorted(sampled) == sorted(pos.tolist() + neg.tolist())
        # allowed_border 0: every candidate lies inside the (unpadded) image.
        used = anchors[targets.objectness_weights[i] > 0]
        assert (used[:, :2] >= 0).all() and (used[:, 2] < w).all() and (used[:, 3] < h).all()


def test_image_without_gt_gives_only_classification_loss():
    head = small_head()
    output = head([torch.randn(2, 4, h, w) for h, w in BIG])
    gt, sizes = make_batch()
    gt[1] = torch.zeros(0, 4)
    targets = head.targets(output, gt, sizes)
    assert targets.sampling[1].num_pos == 0 and targets.sampling[1].num_neg == 256
    assert targets.objectness[1].sum() == 0 and targets.delta_weights[1].sum() == 0
    loss = head.loss(output, [torch.zeros(0, 4), torch.zeros(0, 4)], sizes)
    assert all(float(x.detach()) == 0 for x in loss.bbox)
    assert float(sum(loss.cls).detach()) > 0 and torch.isfinite(loss.total())
    loss.total().backward()
    assert torch.isfinite(head.rpn_cls.weight.grad).all() and head.rpn_cls.weight.grad.abs().sum() > 0


def test_gradient_flows_to_every_layer():
    head = small_head()
    output = head([torch.randn(2, 4, h, w) for h, w in BIG])
    gt, sizes = make_batch()
    loss = head.loss(output, gt, sizes)
    assert len(loss.cls) == len(loss.bbox) == 5
    assert all(torch.isfinite(x) for x in loss.cls + loss.bbox) and float(sum(loss.bbox).detach()) > 0
    loss.total().backward()
    for layer in (head.rpn_conv, head.rpn_cls, head.rpn_reg):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_random_sampling_reproducible_with_generator():
    head = small_head()
    output = head([torch.randn(2, 4, h, w) for h, w in BIG])
    gt, sizes = make_batch()
    runs = [head.loss(output, gt, sizes, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(runs[0].cls + runs[0].bbox, runs[1].cls + runs[1].bbox))
    first_k = [head.loss(output, gt, sizes, sampler=FirstKSampler(256, 0.5, add_gt_as_proposals=False))
               for _ in range(2)]
    assert torch.equal(first_k[0].total(), first_k[1].total())


@needs_oracle
@pytest.mark.parametrize("mode", ["first_k_sampler", "random_sampler_seed0"])
def test_rpn_and_stage_sampling_identical_to_mmdet(mode):
    """Every assignment and sampling of mmdet's training step (RPN, then the three stages' box and
    mask re-sampling), in its order. First-k: the same indices. Random: the same assignments and
    counts (our sampler draws random keys instead of mmdet's randperm, so the chosen indices
    differ under the same seed; test_sampling.py checks the distribution)."""
    exact = mode == "first_k_sampler"
    ref = load_oracle("train_check")
    batch, records = ref["batch"], ref[mode]["sampling"]
    sampler_cls = FirstKSampler if mode == "first_k_sampler" else RandomSampler
    head = RPNHead()
    batch_h, batch_w = batch["inputs"].shape[-2:]
    sizes = [(math.ceil(batch_h / s), math.ceil(batch_w / s)) for s in (4, 8, 16, 32, 64)]
    anchors = torch.cat(head.anchor_generator.grid_anchors(sizes))
    torch.manual_seed(0)
    for i, rec in enumerate(records[:2]):
        meta = batch["metainfo"][i]
        valid = torch.cat(head.anchor_generator.valid_flags(sizes, meta["pad_shape"][:2]))
        cand = anchors[anchor_inside_flags(anchors, valid, meta["img_shape"][:2], 0)]
        assign = head.assigner.assign(cand, batch["gt_bboxes"][i])
        res = sampler_cls(256, 0.5, add_gt_as_proposals=False).sample(assign, cand, batch["gt_bboxes"][i])
        assert rec["sampler"] == "rpn" and torch.equal(assign.gt_inds, rec["assign_gt_inds"])
        assert res.num_pos == len(rec["pos_inds"]) and res.num_neg == len(rec["neg_inds"])
        if exact:
            assert torch.equal(res.pos_inds, rec["pos_inds"]) and torch.equal(res.neg_inds, rec["neg_inds"])
    iou = {"rcnn_stage0": 0.5, "rcnn_stage1": 0.6, "rcnn_stage2": 0.7}
    for k, rec in enumerate(records[2:]):
        i, t = k % 2, iou[rec["sampler"]]
        gts, labels = batch["gt_bboxes"][i], batch["gt_labels"][i]
        assigner = MaxIoUAssigner(t, t, min_pos_iou=t, match_low_quality=False)
        assign = assigner.assign(rec["priors_in"], gts, labels)
        res = sampler_cls(512, 0.25, add_gt_as_proposals=True).sample(assign, rec["priors_in"], gts, labels)
        assert torch.equal(assign.with_gts_prepended(labels).gt_inds, rec["assign_gt_inds"])
        # The counts follow from the assignment of the oracle's recorded priors in both modes.
        assert res.num_pos == len(rec["pos_inds"]) and res.num_neg == len(rec["neg_inds"])
        if not exact:
            continue
        assert torch.equal(res.pos_inds, rec["pos_inds"]) and torch.equal(res.neg_inds, rec["neg_inds"])
        assert torch.equal(res.pos_is_gt, rec["pos_is_gt"].bool())
        assert torch.equal(res.pos_boxes, rec["pos_priors"]) and torch.equal(res.neg_boxes, rec["neg_priors"])
