"""The independent oracle for max-IoU assignment tests: mmdetection's ``MaxIoUAssigner`` by loops.

``naive_max_iou_assign`` is written from the algorithm (htc_fast/ops/reference/assign.py module
docstring, mmdetection's ``MaxIoUAssigner.assign_wrt_overlaps``), one image and one threshold set at
a time, in Python float64: the IoU of every pair by the textbook formula, each box's largest IoU by
a scan, then mmdet's steps in order (negatives, positives, then a loop over the ground truth that
overwrites the low-quality matches, a later ground truth winning). Nothing is vectorised and no
code is shared with the reference. Small inputs only, and without IoUs tied at a threshold: the
IoU here is not rounded like the reference's, so a tie may fall on the other side.

``make_case`` / ``random_thresholds`` draw the random inputs the tests feed every backend (fresh
each run: boxes jittered around the ground truth plus random ones, with ties, padding, invalid
boxes, images without ground truth and NaN coordinates on request).
"""
import math
import random

import torch

EPS = 1e-6  # mmdet's floor on the union


def iou(a, b):
    """IoU of two xyxy boxes (Python floats), the union floored at EPS as in mmdet."""
    inter_w = max(min(a[2], b[2]) - max(a[0], b[0]), 0.0)
    inter_h = max(min(a[3], b[3]) - max(a[1], b[1]), 0.0)
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / max(union, EPS)


def assign_image(boxes, gts, labels, valid, gt_valid, threshold_set, match_low_quality, gt_max_assign_all):
    """One image, one threshold set.

    Args:
        boxes: N boxes, gts: G ground-truth rows (padding rows included), each [x1, y1, x2, y2].
        labels: G ints; valid: N bools; gt_valid: G bools.
        threshold_set: (pos_iou_thr, neg_iou_lo, neg_iou_hi, min_pos_iou).

    Returns:
        (gt_inds, max_overlaps, labels), each a list of N numbers.
    """
    pos, neg_lo, neg_hi, min_pos = threshold_set
    n_boxes, n_gts = len(boxes), len(gts)
    if not any(gt_valid):  # no ground truth: every candidate is background
        inds = [0 if valid[n] else -1 for n in range(n_boxes)]
        return inds, [0.0] * n_boxes, [-1] * n_boxes
    overlaps = [[iou(gts[k], boxes[n]) for n in range(n_boxes)] for k in range(n_gts)]
    inds, max_overlaps = [-1] * n_boxes, [-1.0] * n_boxes
    argmax = [0] * n_boxes
    for n in range(n_boxes):
        if not valid[n]:
            continue
        best, best_k = overlaps[0][n], 0
        for k in range(1, n_gts):
            if overlaps[k][n] > best:
                best, best_k = overlaps[k][n], k
        max_overlaps[n], argmax[n] = best, best_k
        # mmdet: negatives first, then positives over them.
        if neg_lo <= best < neg_hi:
            inds[n] = 0
        if best >= pos:
            inds[n] = best_k + 1
    if match_low_quality:
        for k in range(n_gts):
            if not gt_valid[k]:
                continue
            candidates = [n for n in range(n_boxes) if valid[n]]
            if not candidates:
                continue
            gt_max = max(overlaps[k][n] for n in candidates)
            if gt_max < min_pos:
                continue
            for n in candidates:
                if overlaps[k][n] == gt_max:
                    inds[n] = k + 1
                    if not gt_max_assign_all:
                        break  # only the first box reaching the maximum
    out_labels = [labels[i - 1] if i > 0 else -1 for i in inds]
    return inds, max_overlaps, out_labels


def naive_max_iou_assign(boxes, gt_boxes, gt_labels, valid, gt_valid, thresholds, match_low_quality,
                         gt_max_assign_all):
    """The op's contract by loops: boxes (B or 1, N, 4), gt_boxes (B, G, 4), gt_labels (B, G) or None,
    valid (B, N) / gt_valid (B, G) or None, thresholds: A (pos, neg_lo, neg_hi, min_pos) tuples.

    Returns:
        (gt_inds (A, B, N), max_overlaps (B, N), labels (A, B, N)) as nested Python lists.
    """
    batch, n_gts = gt_boxes.shape[0], gt_boxes.shape[1]
    n_boxes = boxes.shape[1]
    gt_inds, max_overlaps, labels = [[] for _ in thresholds], [], [[] for _ in thresholds]
    for b in range(batch):
        image_boxes = boxes[b if boxes.shape[0] == batch else 0].double().tolist()
        gts = gt_boxes[b].double().tolist()
        image_labels = gt_labels[b].tolist() if gt_labels is not None else [0] * n_gts
        image_valid = valid[b].tolist() if valid is not None else [True] * n_boxes
        image_gt_valid = gt_valid[b].tolist() if gt_valid is not None else [True] * n_gts
        for a, threshold_set in enumerate(thresholds):
            inds, overlaps, lab = assign_image(image_boxes, gts, image_labels, image_valid, image_gt_valid,
                                               threshold_set, match_low_quality, gt_max_assign_all)
            gt_inds[a].append(inds)
            labels[a].append(lab)
        max_overlaps.append(overlaps)
    return gt_inds, max_overlaps, labels


# ----------------------------------------------------------------------------- inputs

# mmdet's RPN, the three HTC stages, a tuple-like negative range (neg_lo > 0), and min_pos 0.
PRESETS = [(0.7, 0.0, 0.3, 0.3), (0.5, 0.0, 0.5, 0.5), (0.6, 0.0, 0.6, 0.6), (0.7, 0.0, 0.7, 0.7),
           (0.5, 0.1, 0.5, 0.5), (0.5, 0.0, 0.4, 0.0)]


def _around(gts, count):
    """(count, 4) float64 boxes jittered around random rows of gts (K, 4), so that IoUs spread."""
    g = gts[torch.randint(0, gts.shape[0], (count,))]
    centre, wh = (g[:, :2] + g[:, 2:]) / 2, (g[:, 2:] - g[:, :2]).clamp(min=1)
    centre = centre + 0.25 * wh * torch.randn(count, 2, dtype=torch.float64)
    wh = wh * torch.exp(0.3 * torch.randn(count, 2, dtype=torch.float64))
    return torch.cat([centre - wh / 2, centre + wh / 2], 1)


def _random_boxes(shape, scale=100.0):
    xy = torch.rand(*shape, 2, dtype=torch.float64) * scale
    return torch.cat([xy, xy + 2 + torch.rand(*shape, 2, dtype=torch.float64) * scale / 2], -1)


def make_case(batch, num_boxes, num_gts, *, dtype=torch.float32, shared=False, ties=False, grid=False,
              padded=False, invalid=False, no_gt_image=False, nan=False):
    """The op's tensor arguments as a dict (CPU). ``ties``: duplicate ground truth, duplicate boxes
    and boxes equal to a ground truth; ``grid``: whole-pixel coordinates on a small grid (many equal
    IoUs, IoUs exactly 0.5, zero-area boxes); ``padded``: gt_valid with trailing zero rows (as
    ``pad_ground_truth`` makes) and now and then a False row in the middle; ``no_gt_image``: image
    0 has no real ground truth; ``nan``: NaN coordinates in a few boxes and ground truth."""
    gt = _random_boxes((batch, num_gts))
    n_boxes = 1 if shared else batch
    boxes = _random_boxes((n_boxes, num_boxes))
    if num_gts and batch:
        for b in range(n_boxes):
            near = _around(gt.reshape(-1, 4) if shared else gt[b], num_boxes - num_boxes // 4)  # rest: random
            boxes[b, torch.randperm(num_boxes)[:near.shape[0]]] = near
    if grid:
        gt, boxes = (t.div(4).round().mul(2) for t in (gt, boxes))  # 2-px steps; keeps x2 >= x1
    if ties and num_gts > 1:
        for b in range(batch):
            i, j = random.sample(range(num_gts), 2)
            gt[b, j] = gt[b, i]
    if ties and num_boxes > 1 and num_gts and batch:
        for _ in range(max(1, num_boxes // 10)):
            i, j = random.sample(range(num_boxes), 2)
            boxes[:, j] = boxes[:, i]
            b = random.randrange(batch)
            boxes[b % n_boxes, random.randrange(num_boxes)] = gt[b, random.randrange(num_gts)]
    gt_valid = None
    if padded or no_gt_image:
        gt_valid = torch.ones(batch, num_gts, dtype=torch.bool)
        if padded:
            real = torch.randint(0, num_gts + 1, (batch,))
            gt_valid = torch.arange(num_gts) < real[:, None]
            gt[~gt_valid] = 0  # padding rows are zero boxes
            if num_gts > 1 and batch and random.random() < 0.5:
                gt_valid[random.randrange(batch), random.randrange(num_gts)] = False  # not zeroed
        if no_gt_image and batch:
            gt_valid[0] = False
    if nan:
        boxes.view(-1)[torch.randint(0, boxes.numel(), (max(1, boxes.numel() // 40),))] = math.nan
        if num_gts:
            gt.view(-1)[torch.randint(0, gt.numel(), (1,))] = math.nan
    return dict(boxes=boxes.to(dtype), gt_boxes=gt.to(dtype),
                gt_labels=torch.randint(0, 80, (batch, num_gts)) if random.random() < 0.8 else None,
                valid=torch.rand(batch, num_boxes) > 0.25 if invalid else None, gt_valid=gt_valid)


def random_thresholds(count=None):
    """1-4 (pos, neg_lo, neg_hi, min_pos) sets: presets, and random ones with neg_hi <= pos."""
    sets = []
    for _ in range(count or random.randint(1, 4)):
        if random.random() < 0.6:
            sets.append(random.choice(PRESETS))
        else:
            pos = random.uniform(0.3, 0.8)
            sets.append((pos, random.choice((0.0, random.uniform(0.0, 0.2))), random.uniform(0.2, pos),
                         random.choice((0.0, pos, random.uniform(0.0, pos)))))
    return sets
