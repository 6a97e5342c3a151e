"""RPN head and proposals: head layout and config, proposals against a naive per-level loop
(torchvision NMS), modes, edge cases, dtypes, devices, mmdetection parity, the padded form.
Targets and losses: test_rpn_loss.py."""
import math

import pytest
import torch
import torchvision

from htc_fast.config import RPNConfig
from htc_fast.model.box_coder import decode_boxes
from htc_fast.model.matching import FirstKSampler
from htc_fast.model.rpn_head import RPNHead, RPNOutput
from htc_fast.model.rpn_loss import rpn_targets
from htc_fast.ops import debug_checks
from tests.model.rpn_support import SIZES, load_oracle, needs_oracle, random_output, small_head


def test_head_rejects_bad_config():
    with pytest.raises(TypeError, match="cfg"):
        RPNHead({"feat_channels": 4})
    with pytest.raises(ValueError, match="feat_channels"):
        RPNHead(RPNConfig(feat_channels=0))
    with pytest.raises(ValueError, match="in_channels"):
        RPNHead(RPNConfig(), in_channels=0)


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


@needs_oracle
@pytest.mark.parametrize("name", ["test_img0", "test_img1"])
def test_proposals_bit_identical_to_mmdet(name):
    ref = load_oracle(name)
    head = RPNHead().eval()
    output = RPNOutput(ref["rpn_cls"], ref["rpn_reg"])
    props = head.proposals(output, [tuple(ref["metainfo"]["img_shape"][:2])])[0]
    assert torch.equal(props.boxes, ref["rpn_proposals"]["bboxes"])
    assert torch.equal(props.scores, ref["rpn_proposals"]["scores"])


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
