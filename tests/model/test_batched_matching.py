"""Assigning and sampling a batch of images at once (ground truth padded by pad_ground_truth)
gives each image exactly what assigning and sampling it alone gives: the same assignment, and
the same slots (boxes, flags, matched ground truth, labels) for the same random keys."""
import dataclasses

import pytest
import torch

from htc_fast.model.matching import (
    FirstKSampler,
    MaxIoUAssigner,
    RandomSampler,
    pad_boxes,
    pad_ground_truth,
    stack_assigners,
)
from tests.model.test_matching import grid_boxes

ASSIGNERS = [MaxIoUAssigner(0.7, 0.3, min_pos_iou=0.3),  # the RPN's
             MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5, match_low_quality=False),  # a cascade stage's
             MaxIoUAssigner(0.6, (0.1, 0.4), min_pos_iou=0.0, gt_max_assign_all=False),
             MaxIoUAssigner(0.5, 0.4, min_pos_iou=0.5, ignore_iof_thr=0.5)]


def random_batch(n_boxes, gt_counts, dtype=torch.float64):
    boxes = torch.stack([grid_boxes(n_boxes, dtype=dtype) for _ in gt_counts])
    valid = torch.rand(len(gt_counts), n_boxes) > 0.2
    gts = [grid_boxes(g, dtype=dtype) for g in gt_counts]
    labels = [torch.randint(0, 80, (g,)) for g in gt_counts]
    ignore = [grid_boxes(int(torch.randint(0, 3, ())), dtype=dtype) for _ in gt_counts]
    return boxes, valid, gts, labels, ignore


@pytest.mark.parametrize("assigner", ASSIGNERS, ids=["rpn", "stage", "pair-neg", "ignore"])
@pytest.mark.parametrize("gt_counts", [(3, 0, 5), (4, 4), (0, 0), (1, 6, 2, 0)])
def test_batched_assign_equals_per_image(assigner, gt_counts):
    boxes, valid, gts, labels, ignore = random_batch(int(torch.randint(1, 50, ())), gt_counts)
    gt, gt_labels, gt_valid = pad_ground_truth(gts, labels)
    padded_ignore = pad_ground_truth(ignore)[0]
    got = assigner.assign(boxes, gt, gt_labels, gt_boxes_ignore=padded_ignore, valid=valid, gt_valid=gt_valid)
    for i in range(len(gt_counts)):
        want = assigner.assign(boxes[i], gts[i], labels[i], gt_boxes_ignore=ignore[i], valid=valid[i])
        assert torch.equal(got.gt_inds[i], want.gt_inds), i
        assert torch.equal(got.labels[i], want.labels), i
        # Overlaps of the candidates (the non-candidates' are -1 or 0 depending on the path).
        assert torch.equal(got.max_overlaps[i][valid[i]], want.max_overlaps[valid[i]]), i


def test_shared_boxes_broadcast_over_the_batch():
    anchors = grid_boxes(40)
    gts = [grid_boxes(2), grid_boxes(5)]
    gt, _, gt_valid = pad_ground_truth(gts)
    assigner = ASSIGNERS[0]
    got = assigner.assign(anchors, gt, gt_valid=gt_valid)
    for i in range(2):
        assert torch.equal(got.gt_inds[i], assigner.assign(anchors, gts[i]).gt_inds)


class FixedKeys(RandomSampler):
    """A RandomSampler whose keys are given (per image, or for the padded batch)."""

    def __init__(self, keys, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys = keys

    def _keys(self, shape, device, generator):
        assert self.keys.shape == shape
        return self.keys


def batch_keys(per_image, gt_counts, size):
    """Place each image's keys (its G_i ground-truth keys, then its boxes') in the padded layout."""
    out = torch.rand(len(per_image), size + per_image[0].shape[0] - gt_counts[0], dtype=torch.float64)
    for i, (k, g) in enumerate(zip(per_image, gt_counts)):
        out[i, :g] = k[:g]
        out[i, size:] = k[g:]
    return out


def slots(res, used):
    """The content of the used slots (candidate indices differ with padding, and unused slots
    point at any candidate)."""
    count = len(used)
    return [t[:count][used] for t in (res.boxes, res.is_pos, res.is_neg, res.is_gt, res.gt_boxes, res.labels,
                                      res.gt_inds)]


@pytest.mark.parametrize("add_gt", [True, False])
@pytest.mark.parametrize("num,pos_fraction,ub", [(32, 0.25, -1), (16, 0.5, 1), (200, 0.25, -1)])
@pytest.mark.parametrize("first_k", [True, False])
def test_batched_sampling_equals_per_image(add_gt, num, pos_fraction, ub, first_k):
    gt_counts = (4, 0, 7)
    boxes, valid, gts, labels, _ = random_batch(60, gt_counts)
    assigner = MaxIoUAssigner(0.5, 0.5, min_pos_iou=0.5, match_low_quality=False)
    gt, gt_labels, gt_valid = pad_ground_truth(gts, labels)
    assigned = assigner.assign(boxes, gt, gt_labels, valid=valid, gt_valid=gt_valid)
    extra = [g if add_gt else 0 for g in gt_counts]
    keys = [torch.rand(60 + e, dtype=torch.float64) for e in extra]
    if first_k:
        batched = FirstKSampler(num, pos_fraction, ub, add_gt)
        singles = [FirstKSampler(num, pos_fraction, ub, add_gt) for _ in gt_counts]
    else:
        size = max(gt_counts) if add_gt else 0
        batched = FixedKeys(batch_keys(keys, extra, size), num, pos_fraction, ub, add_gt)
        singles = [FixedKeys(k, num, pos_fraction, ub, add_gt) for k in keys]
    got = batched.sample(assigned, boxes, gt, gt_labels, gt_valid=gt_valid)
    assert len(got) == 3
    for i, sampler in enumerate(singles):
        alone = assigner.assign(boxes[i], gts[i], labels[i], valid=valid[i])
        want = sampler.sample(alone, boxes[i], gts[i], labels[i])
        mine = got[i]
        count = len(want.inds)
        assert torch.equal(mine.valid[:count], want.valid), i
        for a, b in zip(slots(mine, want.valid), slots(want, want.valid)):
            assert torch.equal(a, b), i
        assert not mine.valid[count:].any()  # the batch's extra slots (padding candidates) are unused
        assert torch.equal(mine.num_pos, want.num_pos) and torch.equal(mine.num_neg, want.num_neg)
        assert torch.equal(got.avg_factor[i], want.avg_factor)


def test_random_batched_sampling_never_picks_padding():
    gt_counts = (1, 6)
    boxes, valid, gts, labels, _ = random_batch(30, gt_counts)
    gt, gt_labels, gt_valid = pad_ground_truth(gts, labels)
    assigned = ASSIGNERS[1].assign(boxes, gt, gt_labels, valid=valid, gt_valid=gt_valid)
    for _ in range(50):
        got = RandomSampler(20, 0.5).sample(assigned, boxes, gt, gt_labels, gt_valid=gt_valid)
        chosen_gt = got.inds.clamp(max=gt.shape[1] - 1)
        picked_padding = got.valid & (got.inds < gt.shape[1]) & ~gt_valid.gather(1, chosen_gt)
        assert not picked_padding.any()
        assert torch.equal(got.is_gt & got.valid, (got.inds < gt.shape[1]) & got.valid)


@pytest.mark.parametrize("assigners", [
    [MaxIoUAssigner(0.5, 0.5, 0.5), MaxIoUAssigner(0.6, 0.6, 0.6)],  # HTC's stages 1 and 2
    [MaxIoUAssigner(0.6, (0.1, 0.4), 0.2, gt_max_assign_all=False), MaxIoUAssigner(0.7, (0.0, 0.3), 0.0,
                                                                                     gt_max_assign_all=False),
     MaxIoUAssigner(0.4, (0.2, 0.4), 0.4, gt_max_assign_all=False)],
], ids=["htc", "pair-neg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stacked_assigners_equal_each_assigner(assigners, dtype):
    # Several assigners on the same boxes in one call (cascade stage i's mask branch and stage
    # i + 1's box branch): each slice of the leading dim is that assigner's own result, and the
    # first-k samples of each slice are its own samples.
    gt_counts = (3, 0, 6)
    boxes, valid, gts, labels, _ = random_batch(40, gt_counts, dtype=dtype)
    gt, gt_labels, gt_valid = pad_ground_truth(gts, labels)
    n = len(assigners)

    def per(t):
        return t.expand(n, *t.shape)

    got = stack_assigners(assigners).assign(boxes, gt, gt_labels, valid=valid, gt_valid=gt_valid)
    assert got.gt_inds.shape == (n, 3, 40) and got.max_overlaps.shape == (3, 40)
    sampler = FirstKSampler(24, 0.25)
    samples = sampler.sample(got, boxes, per(gt), per(gt_labels), gt_valid=per(gt_valid))
    assert len(samples) == n
    iterated = list(samples)  # how the cascade splits the stages: iteration equals indexing
    assert len(iterated) == n and all(r.num_gts == samples.num_gts for r in iterated)
    for a, assigner in enumerate(assigners):
        for f in dataclasses.fields(iterated[a]):
            if f.name != "num_gts":
                assert torch.equal(getattr(iterated[a], f.name), getattr(samples[a], f.name)), (a, f.name)
        want = assigner.assign(boxes, gt, gt_labels, valid=valid, gt_valid=gt_valid)
        assert torch.equal(got.gt_inds[a], want.gt_inds) and torch.equal(got.labels[a], want.labels), a
        alone = sampler.sample(want, boxes, gt, gt_labels, gt_valid=gt_valid)
        for name in ("inds", "is_pos", "is_neg", "boxes", "is_gt", "gt_inds", "gt_boxes", "labels", "num_pos"):
            assert torch.equal(getattr(samples[a], name), getattr(alone, name)), (a, name)


def test_stack_assigners_refuses_other_rules():
    with pytest.raises(ValueError, match="thresholds only"):
        stack_assigners([MaxIoUAssigner(0.5, 0.5), MaxIoUAssigner(0.5, 0.5, match_low_quality=False)])


def test_pad_boxes_pads_with_zero_rows_and_masks_them():
    counts = [int(c) for c in torch.randint(0, 5, (3,))] + [5]
    boxes = [grid_boxes(c) for c in counts]
    padded, real = pad_boxes(boxes)
    assert padded.shape == (4, 5, 4) and real.tolist() == [[j < c for j in range(5)] for c in counts]
    for i, c in enumerate(counts):
        assert torch.equal(padded[i, :c], boxes[i]) and not padded[i, c:].any()
    same, none = pad_boxes([boxes[-1], boxes[-1]])
    assert none is None and torch.equal(same, torch.stack([boxes[-1], boxes[-1]]))
