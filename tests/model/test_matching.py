"""IoU, the max-IoU assigner (against a naive float64 loop of mmdet's steps) and the samplers."""
import pytest
import torch

from htc_fast.model.matching import AssignResult, FirstKSampler, MaxIoUAssigner, RandomSampler, bbox_overlaps
from tests.ops.naive_assign import assign_image


def grid_boxes(n, cells=8, step=4.0, dtype=torch.float64):
    """Boxes on a coarse integer grid: exact IoU ties are common (several anchors with a gt's best
    IoU, several gts best for one box), which is what the low-quality matching rules are about."""
    xy = torch.randint(0, cells, (n, 2)).to(dtype) * step
    wh = torch.randint(1, cells // 2 + 1, (n, 2)).to(dtype) * step
    return torch.cat([xy, xy + wh], dim=1)


def naive_iou(a, b, mode="iou", eps=1e-6):
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    for i, p in enumerate(a.tolist()):
        for j, q in enumerate(b.tolist()):
            iw = max(min(p[2], q[2]) - max(p[0], q[0]), 0.0)
            ih = max(min(p[3], q[3]) - max(p[1], q[1]), 0.0)
            inter = iw * ih
            area_p = (p[2] - p[0]) * (p[3] - p[1])
            area_q = (q[2] - q[0]) * (q[3] - q[1])
            union = area_p + area_q - inter if mode == "iou" else area_p
            out[i, j] = inter / max(union, eps)
    return out


def naive_assign(boxes, gts, labels, pos_thr, neg_thr, min_pos, assign_all, low_quality,
                 ignore=None, ignore_thr=-1.0):
    """mmdet's MaxIoUAssigner for one image by loops: tests/ops/naive_assign.py's ``assign_image``,
    with the boxes an ignore box covers by more than ``ignore_thr`` (IoF) out of the candidates
    (mmdet's -1 overlaps: ignored, max overlap -1, never the best box of a ground truth)."""
    g, n = len(gts), len(boxes)
    if g == 0 or n == 0:
        return [0 if g == 0 else -1] * n, [0.0] * n, [-1] * n
    valid = [True] * n
    if ignore is not None and ignore_thr > 0 and len(ignore) > 0:
        valid = (naive_iou(boxes, ignore, mode="iof").max(dim=1).values <= ignore_thr).tolist()
    lo, hi = neg_thr if isinstance(neg_thr, tuple) else (0.0, neg_thr)
    return assign_image(boxes.double().tolist(), gts.double().tolist(), labels.tolist(), valid, [True] * g,
                        (pos_thr, lo, hi, min_pos), low_quality, assign_all)


def test_bbox_overlaps_matches_naive_and_handles_degenerate_boxes():
    a, b = grid_boxes(20), grid_boxes(15)
    a[0, 2] = a[0, 0]  # zero width
    b[:2] = torch.tensor([[5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 10.0]], dtype=torch.float64)
    for mode in ("iou", "iof"):
        got = bbox_overlaps(a, b, mode=mode)
        assert not got.isnan().any()
        torch.testing.assert_close(got, naive_iou(a, b, mode), rtol=0, atol=1e-12)
    got32 = bbox_overlaps(a.float(), b.float())
    torch.testing.assert_close(got32.double(), naive_iou(a, b), rtol=0, atol=1e-6)
    assert bbox_overlaps(a[:0], b).shape == (0, 15) and bbox_overlaps(a, b[:0]).shape == (20, 0)


@pytest.mark.parametrize("assign_all", [True, False])
@pytest.mark.parametrize("low_quality,thrs", [(True, (0.7, 0.3, 0.3)), (True, (0.5, 0.5, 0.0)),
                                              (False, (0.5, 0.5, 0.5)), (True, (0.6, (0.1, 0.4), 0.2))])
def test_assigner_matches_naive_loop(assign_all, low_quality, thrs):
    pos, neg, min_pos = thrs
    for _ in range(5):
        boxes, gts = grid_boxes(int(torch.randint(1, 60, ()))), grid_boxes(int(torch.randint(1, 6, ())))
        labels = torch.randint(0, 80, (len(gts),))
        assigner = MaxIoUAssigner(pos, neg, min_pos_iou=min_pos, gt_max_assign_all=assign_all,
                                  match_low_quality=low_quality)
        res = assigner.assign(boxes, gts, labels)
        inds, maxes, want_labels = naive_assign(boxes, gts, labels, pos, neg, min_pos, assign_all,
                                                low_quality)
        assert isinstance(res, AssignResult) and res.num_gts == len(gts)
        assert res.gt_inds.tolist() == inds
        assert res.labels.tolist() == want_labels
        torch.testing.assert_close(res.max_overlaps, torch.tensor(maxes, dtype=torch.float64), rtol=0, atol=0)


def test_low_quality_match_overrides_and_assigns_all_ties():
    # gt 0 = [0,0,10,10]: boxes 0 and 1 both have its best IoU 0.5 -> both positive for gt 0 even
    # though 0.5 < pos_iou_thr; box 2 has IoU 0.1 -> negative.
    gts = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 20.0, 10.0], [0.0, 0.0, 10.0, 1.0]])
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3).assign(boxes, gts)
    assert res.gt_inds.tolist() == [1, 1, 0]
    assert res.labels.tolist() == [0, 0, -1]
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3, gt_max_assign_all=False).assign(boxes, gts)
    assert res.gt_inds.tolist() == [1, -1, 0]
    res = MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.6).assign(boxes, gts)
    assert res.gt_inds.tolist() == [-1, -1, 0]


def test_ignore_boxes():
    gts = grid_boxes(3)
    boxes = grid_boxes(40)
    ignore = grid_boxes(2)
    assigner = MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.5, ignore_iof_thr=0.5)
    res = assigner.assign(boxes, gts, torch.arange(3), gt_boxes_ignore=ignore)
    inds, maxes, _ = naive_assign(boxes, gts, torch.arange(3), 0.5, 0.4, 0.5, True, True, ignore, 0.5)
    assert res.gt_inds.tolist() == inds
    torch.testing.assert_close(res.max_overlaps, torch.tensor(maxes, dtype=torch.float64), rtol=0, atol=0)
    covered = naive_iou(boxes, ignore, "iof").max(dim=1).values > 0.5
    assert (res.gt_inds[covered] != 0).all()  # never negative: ignored unless matched in step 4


def test_zero_gts_and_zero_boxes():
    boxes = grid_boxes(10)
    res = MaxIoUAssigner(0.7, 0.3).assign(boxes, boxes[:0], torch.zeros(0, dtype=torch.long))
    assert res.gt_inds.tolist() == [0] * 10 and res.labels.tolist() == [-1] * 10
    assert res.max_overlaps.tolist() == [0.0] * 10 and res.num_gts == 0
    res = MaxIoUAssigner(0.7, 0.3).assign(boxes[:0], grid_boxes(3), torch.zeros(3, dtype=torch.long))
    assert res.gt_inds.shape == (0,) and res.labels.shape == (0,) and res.num_gts == 3


def make_assignment(n_pos, n_neg, n_ign, num_gts=3):
    n = n_pos + n_neg + n_ign
    kinds = torch.tensor([1] * n_pos + [0] * n_neg + [-1] * n_ign)[torch.randperm(n)]
    gt_inds = torch.where(kinds > 0, torch.randint(1, num_gts + 1, (n,)), kinds)
    labels = torch.where(gt_inds > 0, gt_inds + 10, torch.full_like(gt_inds, -1))
    return AssignResult(num_gts, gt_inds, torch.rand(n), labels), grid_boxes(n, dtype=torch.float32)


@pytest.mark.parametrize("n_pos,n_neg", [(500, 900), (10, 900), (0, 300), (200, 20)])
def test_random_sampler_counts(n_pos, n_neg):
    assign, boxes = make_assignment(n_pos, n_neg, 50)
    gts = grid_boxes(3, dtype=torch.float32)
    res = RandomSampler(256, 0.5, add_gt_as_proposals=False).sample(assign, boxes, gts)
    assert res.num_pos == min(n_pos, 128)
    assert res.num_neg == min(n_neg, 256 - res.num_pos)
    assert res.avg_factor == max(res.num_pos, 1) + max(res.num_neg, 1)
    assert (assign.gt_inds[res.pos_inds] > 0).all() and (assign.gt_inds[res.neg_inds] == 0).all()
    for inds in (res.pos_inds, res.neg_inds):
        assert torch.equal(inds, inds.unique())  # sorted, no duplicates
    assert torch.equal(res.pos_boxes, boxes[res.pos_inds]) and torch.equal(res.neg_boxes, boxes[res.neg_inds])
    assert torch.equal(res.pos_assigned_gt_inds, assign.gt_inds[res.pos_inds] - 1)
    assert torch.equal(res.pos_gt_boxes, gts[res.pos_assigned_gt_inds])
    assert torch.equal(res.pos_gt_labels, assign.labels[res.pos_inds])
    assert not res.pos_is_gt.any()
    # Fixed capacity: min(num, N) slots, positives then negatives then unused, counts on the device.
    assert res.boxes.shape == (min(256, n_pos + n_neg + 50), 4) and res.inds.shape == (len(res.boxes),)
    assert torch.equal(res.inds[:res.num_pos], res.pos_inds)
    assert torch.equal(res.inds[res.num_pos:res.num_pos + res.num_neg], res.neg_inds)
    assert not (res.is_pos & res.is_neg).any() and not res.valid[res.num_pos + res.num_neg:].any()
    assert len(res.inds.unique()) == len(res.inds)  # slots never repeat a candidate


def test_neg_pos_upper_bound():
    sampler = RandomSampler(512, 0.25, neg_pos_ub=3, add_gt_as_proposals=False)
    assign, boxes = make_assignment(5, 900, 0)
    res = sampler.sample(assign, boxes, grid_boxes(3))
    assert res.num_pos == 5 and res.num_neg == 15
    assign, boxes = make_assignment(0, 900, 0)
    res = sampler.sample(assign, boxes, grid_boxes(3))
    assert res.num_pos == 0 and res.num_neg == 3  # upper bound uses max(1, P)


def test_gt_added_as_proposals():
    gts = grid_boxes(4, dtype=torch.float32)
    gt_labels = torch.tensor([3, 1, 4, 1])
    boxes = grid_boxes(300, dtype=torch.float32)
    assign = MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5, match_low_quality=False).assign(boxes, gts, gt_labels)
    res = FirstKSampler(512, 0.25, add_gt_as_proposals=True).sample(assign, boxes, gts, gt_labels)
    assert res.pos_inds[:4].tolist() == [0, 1, 2, 3] and res.pos_is_gt[:4].all()
    assert not res.pos_is_gt[4:].any()
    assert res.pos_assigned_gt_inds[:4].tolist() == [0, 1, 2, 3]
    assert torch.equal(res.pos_boxes[:4], gts) and torch.equal(res.pos_gt_boxes[:4], gts)
    assert res.pos_gt_labels[:4].tolist() == gt_labels.tolist()
    # Indices refer to cat([gts, boxes]): box k is candidate k + 4.
    assert torch.equal(res.neg_boxes, boxes[res.neg_inds - 4])
    assert res.num_gts == 4


def test_first_k_sampler_is_deterministic_and_takes_index_order():
    assign, boxes = make_assignment(300, 900, 20)
    gts = grid_boxes(3, dtype=torch.float32)
    a = FirstKSampler(256, 0.5, add_gt_as_proposals=False).sample(assign, boxes, gts)
    b = FirstKSampler(256, 0.5, add_gt_as_proposals=False).sample(assign, boxes, gts)
    pos_pool = (assign.gt_inds > 0).nonzero().squeeze(1)
    neg_pool = (assign.gt_inds == 0).nonzero().squeeze(1)
    assert torch.equal(a.pos_inds, pos_pool[:128]) and torch.equal(a.neg_inds, neg_pool[:128])
    assert torch.equal(a.pos_inds, b.pos_inds) and torch.equal(a.neg_inds, b.neg_inds)


def test_generator_reproducibility():
    assign, boxes = make_assignment(300, 900, 20)
    gts = grid_boxes(3, dtype=torch.float32)
    sampler = RandomSampler(256, 0.5, add_gt_as_proposals=False)
    draws = []
    for seed in (7, 7, 8):
        g = torch.Generator().manual_seed(seed)
        draws.append(sampler.sample(assign, boxes, gts, generator=g))
    assert torch.equal(draws[0].pos_inds, draws[1].pos_inds)
    assert torch.equal(draws[0].neg_inds, draws[1].neg_inds)
    assert not torch.equal(draws[0].neg_inds, draws[2].neg_inds)
    # generator=None draws from the global generator (seeded runs repeat).
    torch.manual_seed(1234)
    a = sampler.sample(assign, boxes, gts)
    torch.manual_seed(1234)
    b = sampler.sample(assign, boxes, gts)
    assert torch.equal(a.inds, b.inds)


def test_no_gt_gives_only_negatives():
    boxes = grid_boxes(100, dtype=torch.float32)
    gts = boxes[:0]
    assign = MaxIoUAssigner(0.5, 0.5).assign(boxes, gts)
    res = RandomSampler(64, 0.25, add_gt_as_proposals=True).sample(assign, boxes, gts)
    assert res.num_pos == 0 and res.num_neg == 64 and res.pos_gt_boxes.shape == (0, 4)
    assert res.avg_factor == 65


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="neg_iou_thr"):
        MaxIoUAssigner(0.5, (0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="pos_fraction"):
        RandomSampler(10, 1.5)
    with pytest.raises(ValueError, match="boxes"):
        RandomSampler(10, 0.5).sample(make_assignment(3, 3, 0)[0], torch.zeros(5, 4), torch.zeros(0, 4))
