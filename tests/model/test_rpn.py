"""RPN: head layout, proposals against a naive per-level loop (torchvision NMS), targets, losses."""
import functools
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from htc_fast.config import RPNConfig
from htc_fast.model.anchors import AnchorGenerator, anchor_inside_flags
from htc_fast.model.box_coder import DeltaXYWHBoxCoder, decode_boxes
from htc_fast.model.matching import FirstKSampler, MaxIoUAssigner, RandomSampler
from htc_fast.model.rpn_head import RPNHead, RPNOutput
from htc_fast.model.rpn_loss import RPNTargets, rpn_loss, rpn_targets
from htc_fast.ops import debug_checks

SIZES = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # a 64 x 80 padded batch at strides 4..64
BIG = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]  # 128 x 160: enough anchors for 256 samples


def small_head(**kw):
    """A 4-channel head; kw: RPNConfig fields."""
    return RPNHead(RPNConfig(feat_channels=4, **kw), in_channels=4)


def test_head_rejects_bad_config():
    with pytest.raises(TypeError, match="cfg"):
        RPNHead({"feat_channels": 4})
    with pytest.raises(ValueError, match="feat_channels"):
        RPNHead(RPNConfig(feat_channels=0))
    with pytest.raises(ValueError, match="in_channels"):
        RPNHead(RPNConfig(), in_channels=0)


def random_output(n=2, sizes=SIZES, a=3, spread=3.0, delta_scale=0.3):
    return RPNOutput([torch.randn(n, a, h, w) * spread for h, w in sizes],
                     [torch.randn(n, 4 * a, h, w) * delta_scale for h, w in sizes])


def naive_proposals(output, anchors, image_size, i, nms_pre, max_per_img, iou, min_size):
    """One image: gather (score, delta, anchor) in (y, x, anchor) order with explicit loops, top
    nms_pre per level (ties by index), decode, filter, torchvision NMS level by level, merge."""
    cand_scores, cand_deltas, cand_anchors, cand_levels = [], [], [], []
    for level, (logits, deltas) in enumerate(zip(output.cls_logits, output.bbox_deltas)):
        num_a, h, w = logits.shape[1:]
        # The sigmoid is evaluated on mmdet's (H, W, A) layout: PyTorch's CPU sigmoid may differ by
        # one ulp between its vectorised body and its scalar tail, i.e. with the memory layout.
        probs = torch.sigmoid(logits[i].permute(1, 2, 0).reshape(-1))
        rows = []
        for y in range(h):
            for x in range(w):
                for a in range(num_a):
                    idx = (y * w + x) * num_a + a
                    assert math.isclose(float(probs[idx]), 1 / (1 + math.exp(-float(logits[i, a, y, x]))),
                                        rel_tol=1e-6)
                    delta = deltas[i, 4 * a:4 * a + 4, y, x]
                    rows.append((float(probs[idx]), idx, delta, anchors[level][idx]))
        rows.sort(key=lambda r: (-r[0], r[1]))
        rows = rows[:nms_pre]
        cand_scores += [r[0] for r in rows]
        cand_deltas += [r[2] for r in rows]
        cand_anchors += [r[3] for r in rows]
        cand_levels += [level] * len(rows)
    scores = torch.tensor(cand_scores, dtype=torch.float32)
    levels = torch.tensor(cand_levels)
    boxes = decode_boxes(torch.stack(cand_anchors), torch.stack(cand_deltas), max_shape=image_size)
    ok = (boxes[:, 2] - boxes[:, 0] > min_size) & (boxes[:, 3] - boxes[:, 1] > min_size)
    boxes, scores, levels = boxes[ok], scores[ok], levels[ok]
    kept = []
    for level in levels.unique().tolist():
        members = (levels == level).nonzero().squeeze(1)
        kept += members[torchvision.ops.nms(boxes[members], scores[members], iou)].tolist()
    kept.sort(key=lambda k: (-float(scores[k]), k))
    kept = torch.tensor(kept[:max_per_img], dtype=torch.long)
    return boxes[kept], scores[kept], levels[kept]


def test_head_keys_shapes_and_init():
    head = RPNHead()
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"rpn_conv.weight": (256, 256, 3, 3), "rpn_conv.bias": (256,),
                      "rpn_cls.weight": (3, 256, 1, 1), "rpn_cls.bias": (3,),
                      "rpn_reg.weight": (12, 256, 1, 1), "rpn_reg.bias": (12,)}
    w = head.rpn_conv.weight
    w = w.detach()
    assert abs(float(w.std()) - 0.01) < 5e-4 and abs(float(w.mean())) < 5e-4
    for bias in (head.rpn_conv.bias, head.rpn_cls.bias, head.rpn_reg.bias):
        assert float(bias.detach().abs().max()) == 0
    feats = [torch.randn(2, 256, h, w) for h, w in SIZES]
    out = head(feats)
    assert [tuple(c.shape) for c in out.cls_logits] == [(2, 3, h, w) for h, w in SIZES]
    assert [tuple(d.shape) for d in out.bbox_deltas] == [(2, 12, h, w) for h, w in SIZES]
    with pytest.raises(ValueError, match="feature levels"):
        head(feats[:4])


@pytest.mark.parametrize("training", [False, True])
def test_proposals_match_naive_loop(training):
    head = small_head(nms_pre_test=60, max_per_img_test=150, nms_pre_train=200, max_per_img_train=400)
    output = random_output()
    image_sizes = [(61, 77), (40, 80)]  # different per image, both inside the 64 x 80 batch
    props = head.proposals(output, image_sizes, training=training)
    anchors = head.anchors(output)
    nms_pre, max_per_img = (200, 400) if training else (60, 150)
    for i, (p, size) in enumerate(zip(props, image_sizes)):
        boxes, scores, levels = naive_proposals(output, anchors, size, i, nms_pre, max_per_img, 0.7, 0.0)
        assert 0 < len(p.boxes) <= max_per_img
        assert torch.equal(p.boxes, boxes) and torch.equal(p.scores, scores) and torch.equal(p.levels, levels)
        assert (p.boxes[:, 0::2] <= size[1]).all() and (p.boxes[:, 1::2] <= size[0]).all()
        assert (p.boxes >= 0).all() and not p.scores.requires_grad


def test_proposals_follow_module_mode_and_stop_gradients():
    head = small_head(nms_pre_test=5, max_per_img_test=7, nms_pre_train=10, max_per_img_train=30)
    output = head([torch.randn(1, 4, h, w) for h, w in SIZES])
    head.eval()
    assert len(head.proposals(output, [(64, 80)])[0].boxes) <= 7
    head.train()
    n_train = len(head.proposals(output, [(64, 80)])[0].boxes)
    assert 7 < n_train <= 30
    assert not head.proposals(output, [(64, 80)])[0].boxes.requires_grad


def test_proposals_empty_when_all_boxes_degenerate():
    head = small_head()
    output = random_output(n=2)
    # Every box moved far past the bottom-right corner: clipping makes it zero-sized.
    output = RPNOutput(output.cls_logits, [torch.full_like(d, 100.0) for d in output.bbox_deltas])
    for p in head.proposals(output, [(64, 80), (50, 60)]):
        assert p.boxes.shape == (0, 4) and p.scores.shape == (0,) and p.levels.shape == (0,)
    # min_bbox_size filters the same way.
    head = small_head(min_bbox_size=1000.0)
    assert all(len(p.boxes) == 0 for p in head.proposals(random_output(n=1), [(64, 80)]))


def test_low_precision_outputs_give_float32_geometry_and_losses():
    head = small_head()
    output = random_output(n=1)
    half = RPNOutput([c.bfloat16() for c in output.cls_logits], [d.bfloat16() for d in output.bbox_deltas])
    props = head.proposals(half, [(64, 80)])[0]
    assert props.boxes.dtype == torch.float32 and props.scores.dtype == torch.float32 and len(props.boxes) > 0
    gt = [torch.tensor([[4.0, 6.0, 40.0, 50.0]])]
    loss = head.loss(half, gt, [(64, 80)])
    assert all(x.dtype == torch.float32 and torch.isfinite(x) for x in loss.cls + loss.bbox)


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


@pytest.mark.cuda
def test_cuda_matches_cpu():
    head = small_head()
    output = random_output(n=2)
    cuda_output = RPNOutput([c.cuda() for c in output.cls_logits], [d.cuda() for d in output.bbox_deltas])
    sizes = [(61, 77), (40, 80)]
    for cpu, gpu in zip(head.proposals(output, sizes), head.proposals(cuda_output, sizes)):
        assert gpu.boxes.is_cuda and gpu.boxes.dtype == torch.float32
        # sigmoid/exp may differ by an ulp between devices, which can reorder near-ties: compare
        # the counts and the best proposals, not the whole ordered list.
        assert abs(len(gpu.boxes) - len(cpu.boxes)) <= 0.02 * len(cpu.boxes)
        torch.testing.assert_close(gpu.scores[:10].cpu(), cpu.scores[:10], rtol=0, atol=1e-6)
    gt = [torch.tensor([[4.0, 6.0, 40.0, 50.0]]), torch.tensor([[10.0, 10.0, 30.0, 35.0]])]
    sampler = FirstKSampler(256, 0.5, add_gt_as_proposals=False)
    cpu_loss = head.loss(output, gt, sizes, sampler=sampler)
    gpu_loss = head.cuda().loss(cuda_output, [g.cuda() for g in gt], sizes, sampler=sampler)
    for a, b in zip(cpu_loss.cls + cpu_loss.bbox, gpu_loss.cls + gpu_loss.bbox):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-4, atol=1e-7)


def test_errors_name_the_argument():
    head = small_head()
    output = random_output(n=2)
    with pytest.raises(ValueError, match="image_sizes"):
        head.proposals(output, [(64, 80)])
    with pytest.raises(ValueError, match="pad_shapes"):
        rpn_targets(head.anchor_generator, SIZES, [torch.zeros(0, 4)], [(64, 80)], [], head.coder,
                    head.assigner, head.sampler)
    # Reading whether any anchor is inside needs a sync: checked under the debug switch only.
    with debug_checks(True), pytest.raises(ValueError, match="no anchor inside"):
        head.targets(output, [torch.zeros(0, 4)] * 2, [(8, 8), (8, 8)])
    targets = head.targets(output, [torch.zeros(0, 4)] * 2, [(8, 8), (8, 8)])
    assert targets.objectness_weights.sum() == 0  # nothing sampled, nothing to learn


# --- Parity with mmdetection 3.3.0 (../shared/oracle/export_reference.py outputs) -------------
# Runs when the oracle's OUT_DIR exists: $HTC_FAST_ORACLE_OUT, else ../oracle_out beside the repo.
ORACLE_OUT = Path(os.environ.get("HTC_FAST_ORACLE_OUT", Path(__file__).resolve().parents[3] / "oracle_out"))
needs_oracle = pytest.mark.skipif(not (ORACLE_OUT / "train_check.pth").exists(),
                                  reason=f"mmdet oracle outputs not found at {ORACLE_OUT} "
                                         "(set HTC_FAST_ORACLE_OUT)")


@functools.cache
def load_oracle(name):
    return torch.load(ORACLE_OUT / f"{name}.pth", weights_only=False)


@needs_oracle
@pytest.mark.parametrize("name", ["test_img0", "test_img1"])
def test_proposals_bit_identical_to_mmdet(name):
    ref = load_oracle(name)
    head = RPNHead().eval()
    output = RPNOutput(ref["rpn_cls"], ref["rpn_reg"])
    props = head.proposals(output, [tuple(ref["metainfo"]["img_shape"][:2])])[0]
    assert torch.equal(props.boxes, ref["rpn_proposals"]["bboxes"])
    assert torch.equal(props.scores, ref["rpn_proposals"]["scores"])


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


@pytest.mark.parametrize("training", [False, True])
def test_padded_proposals_equal_compact_and_sync_free(training):
    from htc_fast.diagnostics import count_ops

    head = small_head(nms_pre_test=60, max_per_img_test=150, nms_pre_train=200, max_per_img_train=400)
    output = random_output()
    sizes = [(61, 77), (40, 80)]
    compact = head.proposals(output, sizes, training=training)
    with count_ops() as c:
        padded = head.proposals(output, sizes, training=training, padded=True)
    assert c.syncs == 0, c.report()
    for p, q in zip(compact, padded):
        k = len(p.boxes)
        assert q.boxes.shape == (150 if not training else 400, 4) and q.valid[:k].all() and not q.valid[k:].any()
        assert torch.equal(q.boxes[:k], p.boxes) and torch.equal(q.scores[:k], p.scores)
        assert torch.equal(q.levels[:k], p.levels)
        assert (q.boxes[k:] == 0).all() and (q.levels[k:] == -1).all()
