"""Positive/negative sampling at a fixed capacity, without host synchronisation.

mmdetection's ``RandomSampler`` takes ``nonzero`` of the positive and negative masks, a
``randperm`` of each pool and ``unique`` of the choice: three data-dependent sizes per pool, each a
device->host sync on a GPU. Here a sampler returns a fixed number of *slots*,
``S = min(num, N)`` for N candidates, laid out as mmdetection's rois are::

    [ sampled positives, ascending index | sampled negatives, ascending index | unused slots ]

with ``is_pos`` / ``is_neg`` flags per slot (an unused slot is neither and points at some
candidate, so every gather stays in range). The counts are device tensors.

How the choice is made: every candidate gets a key ``u`` in [0, 1) (float64), the positives whose
``u`` is among the ``int(num * pos_fraction)`` smallest of the positive pool are chosen (top-k over
the keys restricted to the pool), then the ``num - P`` negatives with the smallest keys fill the
rest (optionally capped at ``neg_pos_ub * max(P, 1)``). With i.i.d. uniform keys (``RandomSampler``)
each pool's choice is a uniform random subset of its size, without replacement, as mmdetection's;
with keys ``index / N`` (``FirstKSampler``) it is the first k of each pool in index order, exactly
as before. The random draws differ from mmdetection's under the same seed (keys instead of
``randperm``); the distribution is the same (tests/model/test_sampling.py checks it).
"""
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

__all__ = ["SamplingResult", "RandomSampler", "FirstKSampler"]

_POS, _NEG, _UNUSED = 0.0, 1.0, 2.0  # slot classes; keys are class + u with u in [0, 1)


@dataclass(frozen=True, eq=False)
class SamplingResult:
    """The sampled slots of one image (S slots; see the module docstring for the layout), or of
    a batch of B images sampled together (every field with a leading (B,) dim).

    Indices refer to the sampler's candidate list: ``cat([gt_boxes, boxes])`` when ground truth
    was added as proposals, else ``boxes`` (for a batch: the padded ground truth, G rows each).

    inds: (S,) int64 candidate index of each slot. is_pos, is_neg: (S,) bool.
    boxes: (S, 4) the slot's candidate box (the rois a cascade stage runs on).
    is_gt: (S,) bool, the slot's candidate is a ground-truth box added as a proposal.
    gt_inds: (S,) int64 0-based matched ground truth of positives (0 elsewhere).
    gt_boxes: (S, 4) that ground truth's box (positives; zeros when there is no ground truth).
    labels: (S,) int64 its label for positives, -1 elsewhere.
    num_pos, num_neg: 0-dim int64 device tensors ((B,) for a batch). num_gts: G.

    A batch indexes like a sequence of per-image results (``len``, ``result[i]``, iteration):
    for tests and diagnostics; the training path uses the batched fields.
    """

    inds: Tensor
    is_pos: Tensor
    is_neg: Tensor
    boxes: Tensor
    is_gt: Tensor
    gt_inds: Tensor
    gt_boxes: Tensor
    labels: Tensor
    num_pos: Tensor
    num_neg: Tensor
    num_gts: int

    @property
    def valid(self) -> Tensor:
        """(S,) bool: the slot holds a sampled positive or negative."""
        return self.is_pos | self.is_neg

    @property
    def avg_factor(self) -> Tensor:
        """mmdet's loss normaliser for sampled heads, max(P, 1) + max(Q, 1), a device tensor
        (0-dim; (B,) for a batch)."""
        return self.num_pos.clamp(min=1) + self.num_neg.clamp(min=1)

    def __len__(self) -> int:
        if self.inds.dim() < 2:
            raise TypeError("len() of a SamplingResult: only a batch (inds of 2 dims or more) has images")
        return self.inds.shape[0]

    def __getitem__(self, i: int) -> "SamplingResult":
        """Image i of a batch, as if it had been sampled alone (its padding ground-truth
        candidates included in the candidate indices); with more leading dims, the i-th batch."""
        if self.inds.dim() < 2:
            raise TypeError("indexing a SamplingResult: only a batch (inds of 2 dims or more) has images")
        return SamplingResult(**{f.name: getattr(self, f.name)[i] for f in fields(self) if f.name != "num_gts"},
                              num_gts=self.num_gts)

    def __iter__(self):
        # One unbind per field (one op each) rather than one select per field and image.
        names = [f.name for f in fields(self) if f.name != "num_gts"]
        parts = [getattr(self, name).unbind(0) for name in names]
        return (SamplingResult(**dict(zip(names, row)), num_gts=self.num_gts) for row in zip(*parts))

    # Compact views (mmdet's SamplingResult fields). They read sizes from the device: for tests,
    # the oracle comparison and diagnostics, never on the training path.
    @property
    def pos_inds(self) -> Tensor:
        return self.inds[self.is_pos]

    @property
    def neg_inds(self) -> Tensor:
        return self.inds[self.is_neg]

    @property
    def pos_boxes(self) -> Tensor:
        return self.boxes[self.is_pos]

    @property
    def neg_boxes(self) -> Tensor:
        return self.boxes[self.is_neg]

    @property
    def pos_is_gt(self) -> Tensor:
        return self.is_gt[self.is_pos]

    @property
    def pos_assigned_gt_inds(self) -> Tensor:
        return self.gt_inds[self.is_pos]

    @property
    def pos_gt_boxes(self) -> Tensor:
        return self.gt_boxes[self.is_pos]

    @property
    def pos_gt_labels(self) -> Tensor:
        return self.labels[self.is_pos]


class RandomSampler:
    """mmdet's ``RandomSampler`` at a fixed capacity: up to ``int(num * pos_fraction)`` random
    positives, the rest of ``num`` random negatives (at most ``neg_pos_ub * max(P, 1)`` when
    ``neg_pos_ub >= 0``), uniform without replacement within each pool.

    ``add_gt_as_proposals`` prepends the ground truth to the candidates (each positive for
    itself). HTC: RPN (256, 0.5, -1, False), cascade stages (512, 0.25, -1, True). Candidates the
    assignment ignores (``gt_inds == -1``, e.g. padding or anchors outside the image) are never
    sampled.

    Random keys come from ``generator`` (its device; None: the global generator of the boxes'
    device) as one ``torch.rand`` of the candidates' shape per call ((B, N) for a batch: the draws
    differ from sampling the images one by one), so a seeded run is reproducible.
    """

    def __init__(self, num: int, pos_fraction: float, neg_pos_ub: float = -1,
                 add_gt_as_proposals: bool = True):
        if num <= 0:
            raise ValueError(f"{type(self).__name__}: num must be positive, got {num}")
        if not 0.0 <= pos_fraction <= 1.0:
            raise ValueError(f"{type(self).__name__}: pos_fraction must be in [0, 1], got {pos_fraction}")
        self.num = int(num)
        self.pos_fraction = float(pos_fraction)
        self.neg_pos_ub = neg_pos_ub
        self.add_gt_as_proposals = bool(add_gt_as_proposals)

    @property
    def max_pos(self) -> int:
        """The positive capacity: slots [0, max_pos) hold every sampled positive."""
        return int(self.num * self.pos_fraction)

    def _keys(self, shape: tuple[int, ...], device, generator: Optional[torch.Generator]) -> Tensor:
        """float64 keys in [0, 1) of the given shape (..., n): i.i.d. uniform."""
        if generator is None:
            return torch.rand(shape, dtype=torch.float64, device=device)
        return torch.rand(shape, dtype=torch.float64, generator=generator, device=generator.device).to(device)

    def sample(self, assign_result, boxes: Tensor, gt_boxes: Tensor, gt_labels: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, gt_valid: Optional[Tensor] = None) -> SamplingResult:
        """Sample one image, or a batch of images in one pass (leading batch dims on everything).

        Args:
            assign_result: the ``AssignResult`` of ``boxes`` (not including the ground truth).
            boxes: (..., N, 4) candidate boxes (anchors or proposals); the batch dims may be
                missing (anchors shared by the batch).
            gt_boxes: (..., G, 4) ground truth; gt_labels: (..., G) int64 (None: zeros);
            gt_valid: (..., G) bool, the real rows of padded ground truth (``pad_ground_truth``).
            generator: for the random keys (see the class docstring).

        Returns:
            SamplingResult with min(num, N') slots per image, N' = N (+ G with ground truth added).
        """
        if boxes.dim() < 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{type(self).__name__}.sample: boxes must be (..., N, 4), got {tuple(boxes.shape)}")
        gt_inds = assign_result.gt_inds
        batch = gt_inds.shape[:-1]
        if gt_inds.shape[-1] != boxes.shape[-2]:
            raise ValueError(f"{type(self).__name__}.sample: assign_result covers "
                             f"{gt_inds.shape[-1]} boxes, boxes has {boxes.shape[-2]}")
        device = boxes.device
        boxes = boxes.expand(*batch, *boxes.shape[-2:])
        if gt_labels is None:
            gt_labels = torch.zeros(gt_boxes.shape[:-1], dtype=torch.long, device=device)
        is_gt = torch.zeros(gt_inds.shape, dtype=torch.bool, device=device)
        if self.add_gt_as_proposals and gt_boxes.shape[-2] > 0:
            boxes = torch.cat([gt_boxes.to(boxes.dtype), boxes], dim=-2)
            assign_result = assign_result.with_gts_prepended(gt_labels, gt_valid)
            own = gt_valid if gt_valid is not None else torch.ones(gt_labels.shape, dtype=torch.bool, device=device)
            is_gt = torch.cat([own, is_gt], dim=-1)
        gt_inds = assign_result.gt_inds
        n = gt_inds.shape[-1]
        u = self._keys(gt_inds.shape, device, generator)
        cls = _UNUSED - (gt_inds == 0).to(torch.float64)  # negatives 1, the rest 2 for now
        k_pos = min(self.max_pos, n)
        if k_pos > 0:
            # The k_pos positives with the smallest keys (fewer when the pool is smaller): they
            # become class 0; a non-positive picked because the pool was short has key 2, whose
            # floor (2) leaves its class as it is.
            pos_key, chosen = u.masked_fill(gt_inds <= 0, 2.0).topk(k_pos, dim=-1, largest=False)
            cls = cls.scatter_reduce(-1, chosen, pos_key.floor(), "amin")
        slots = min(self.num, n)
        key, order = (cls + u).topk(slots, dim=-1, largest=False)  # positives, then negatives, by key
        slot_cls = key.floor()
        is_pos, is_neg = slot_cls == _POS, slot_cls == _NEG
        num_pos = is_pos.sum(dim=-1)
        if self.neg_pos_ub >= 0:
            cap = (num_pos.clamp(min=1).double() * self.neg_pos_ub).floor().long()
            rank = torch.arange(slots, device=device) - num_pos[..., None]  # a negative's rank among negatives
            is_neg = is_neg & (rank < cap[..., None])
            slot_cls = slot_cls.masked_fill(~(is_pos | is_neg), _UNUSED)
        # mmdet's layout: positives then negatives, each in ascending candidate index.
        layout = slot_cls * (n + 1) + order  # float64: exact for any realistic n
        layout, perm = layout.sort(dim=-1)
        inds, is_pos, is_neg = order.gather(-1, perm), is_pos.gather(-1, perm), is_neg.gather(-1, perm)
        return self._result(assign_result, boxes, is_gt, gt_boxes, inds, is_pos, is_neg, num_pos)

    @staticmethod
    def _result(assign_result, boxes, is_gt, gt_boxes, inds, is_pos, is_neg, num_pos) -> SamplingResult:
        gt_inds = assign_result.gt_inds.gather(-1, inds)
        matched = (gt_inds - 1).clamp(min=0)  # non-positives (gt_inds 0 or -1) point at ground truth 0
        rows = inds[..., None].expand(*inds.shape, 4)
        if gt_boxes.shape[-2] > 0:
            slot_gt_boxes = gt_boxes.to(boxes.dtype).gather(-2, matched[..., None].expand(*matched.shape, 4))
            slot_gt_boxes = slot_gt_boxes * is_pos[..., None]
        else:
            slot_gt_boxes = boxes.new_zeros((*inds.shape, 4))
        labels = assign_result.labels.gather(-1, inds).masked_fill(~is_pos, -1)
        return SamplingResult(inds=inds, is_pos=is_pos, is_neg=is_neg, boxes=boxes.gather(-2, rows),
                              is_gt=is_gt.gather(-1, inds), gt_inds=matched, gt_boxes=slot_gt_boxes, labels=labels,
                              num_pos=num_pos, num_neg=is_neg.sum(dim=-1), num_gts=assign_result.num_gts)


class FirstKSampler(RandomSampler):
    """``RandomSampler`` choosing the first k of each pool in index order instead of at random
    (the oracle's "first-k" mode): deterministic, for exact loss comparisons. Draws nothing."""

    def _keys(self, shape: tuple[int, ...], device, generator: Optional[torch.Generator]) -> Tensor:
        n = shape[-1]
        return (torch.arange(n, dtype=torch.float64, device=device) / max(n, 1)).expand(shape)
