"""The fixed-capacity samplers (htc_fast/model/sampling.py): the random one is uniform without
replacement within each pool (a chi-square test that can fail), the first-k one takes each pool
in index order, the slot layout is mmdetection's rois order, and sampling syncs nothing."""
import math

import pytest
import torch

from htc_fast.diagnostics import count_ops
from htc_fast.model.matching import AssignResult, FirstKSampler, MaxIoUAssigner, RandomSampler


def assignment(kinds):
    """AssignResult from (N,) kinds: 1 positive (for gt 0), 0 negative, -1 ignored."""
    kinds = torch.as_tensor(kinds)
    labels = torch.where(kinds > 0, 7, -1)
    return AssignResult(1, kinds.long(), torch.rand(len(kinds)), labels)


def boxes_for(n):
    xy = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    return torch.cat([xy, xy + 5], dim=1)


def chi_square_pvalue_upper(stat, dof):
    """P(X >= stat) for X ~ chi2(dof), Wilson-Hilferty normal approximation (dof >= 10)."""
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_random_sampler_is_uniform_without_replacement():
    # 30 positives with room for 8, 50 negatives with room for 20 - 8 = 12; 20 ignored.
    kinds = torch.tensor([1] * 30 + [0] * 50 + [-1] * 20)[torch.randperm(100)]
    assign, boxes = assignment(kinds), boxes_for(100)
    sampler = RandomSampler(20, 0.4, add_gt_as_proposals=False)
    trials = 3000
    hits = torch.zeros(100)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(trials):
        res = sampler.sample(assign, boxes, boxes[:1], generator=gen)
        pos, neg = res.pos_inds, res.neg_inds
        assert len(pos) == 8 and len(neg) == 12
        chosen = torch.cat([pos, neg])
        assert len(chosen.unique()) == 20  # without replacement
        assert (kinds[pos] == 1).all() and (kinds[neg] == 0).all()
        hits[chosen] += 1
    # Each positive is chosen with probability 8/30, each negative with 12/50, never an ignored one.
    assert hits[kinds == -1].sum() == 0
    for kind, p in ((1, 8 / 30), (0, 12 / 50)):
        observed = hits[kinds == kind]
        expected = trials * p
        stat = float(((observed - expected) ** 2 / expected).sum())
        dof = len(observed) - 1
        # Fails for a biased sampler (e.g. one favouring low indices) far more often than 1e-4.
        assert chi_square_pvalue_upper(stat, dof) > 1e-4, (kind, stat, dof)


def test_random_sampler_pairs_are_uniform():
    # Choosing 2 of 5: each of the 10 pairs equally likely (a per-element test misses pair bias).
    assign, boxes = assignment([0] * 5), boxes_for(5)
    sampler = RandomSampler(2, 0.0, add_gt_as_proposals=False)
    counts = {}
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    trials = 4000
    for _ in range(trials):
        key = tuple(sampler.sample(assign, boxes, boxes[:0], generator=gen).neg_inds.tolist())
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 10 and all(a < b for a, b in counts)
    expected = trials / 10
    stat = sum((c - expected) ** 2 / expected for c in counts.values())
    assert stat < 33.7  # chi2(9) upper 1e-4 quantile


def test_first_k_takes_each_pool_in_index_order():
    kinds = torch.tensor([1, 0, 1, -1, 0, 0, 1, 1, 0, 1] * 10)
    assign, boxes = assignment(kinds), boxes_for(100)
    res = FirstKSampler(30, 0.1, add_gt_as_proposals=False).sample(assign, boxes, boxes[:1])
    pos_pool = (kinds == 1).nonzero().squeeze(1)
    neg_pool = (kinds == 0).nonzero().squeeze(1)
    assert torch.equal(res.pos_inds, pos_pool[:3]) and torch.equal(res.neg_inds, neg_pool[:27])
    assert res.inds.shape == (30,) and res.valid.all()


def test_short_pools_leave_unused_slots():
    kinds = torch.tensor([1, 0, -1, -1, 0, -1])
    res = RandomSampler(5, 0.5, add_gt_as_proposals=False).sample(assignment(kinds), boxes_for(6), boxes_for(1))
    assert res.inds.shape == (5,)
    assert res.is_pos.tolist() == [True, False, False, False, False]
    assert res.is_neg.tolist() == [False, True, True, False, False]
    assert res.inds[:3].tolist() == [0, 1, 4]
    assert int(res.num_pos) == 1 and int(res.num_neg) == 2 and int(res.avg_factor) == 3
    assert (res.labels[1:] == -1).all() and res.labels[0] == 7


def test_assign_and_sample_sync_free():
    gts = boxes_for(4) * 3
    boxes = torch.rand(500, 4) * 40
    boxes[:, 2:] += boxes[:, :2]
    valid = torch.rand(500) > 0.2
    assigner = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False)
    with count_ops() as c:
        assign = assigner.assign(boxes, gts, torch.arange(4), valid=valid)
        res = RandomSampler(512, 0.25).sample(assign, boxes, gts, torch.arange(4))
        FirstKSampler(512, 0.25).sample(assign, boxes, gts, torch.arange(4))
    assert c.syncs == 0, c.report()
    # Invalid candidates are never sampled (indices are shifted by the 4 prepended ground truths).
    assert valid[res.inds[res.valid & ~res.is_gt] - 4].all()


@pytest.mark.parametrize("ub", [0, 1, 3])
def test_neg_pos_upper_bound_matches_formula(ub):
    n_pos = int(torch.randint(0, 6, ()))
    kinds = torch.tensor([1] * n_pos + [0] * 100)[torch.randperm(100 + n_pos)]
    res = RandomSampler(64, 0.25, neg_pos_ub=ub, add_gt_as_proposals=False).sample(
        assignment(kinds), boxes_for(len(kinds)), boxes_for(1))
    assert res.num_pos == n_pos and res.num_neg == min(64 - n_pos, ub * max(1, n_pos))
