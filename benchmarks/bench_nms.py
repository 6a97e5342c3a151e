"""Speed of htc_fast's NMS against torchvision's, on HTC's shapes.

Owns the NMS cases, their inputs and each group's baseline. The timing protocol (rounds, CUDA
synchronisation, peak memory) lives in conftest.py (``bench_case``); summarize.py turns the JSON
into ratios.

Cases (each a test, parametrized ``[device-dtype-impl-fwd]``; NMS has no backward, so only fwd):
  * ``test_nms_rpn_level``: plain ``nms`` on one FPN level's RPN proposals (2000 boxes, IoU 0.7).
  * ``test_batched_nms_rpn``: the RPN's NMS over 5 levels batched by level (IoU 0.7): training's
    nms_pre=2000 per level, P6 holding only its 819 anchors at 1333x800 (8819 boxes), and test's
    nms_pre=1000 (4819 boxes).
  * ``test_batched_nms_final``: HTC's final NMS, 1000 class-agnostic boxes x 80 classes, the pairs
    with score > 0.001 (50,507 boxes with these inputs), batched by class (IoU 0.5).
  * ``test_multiclass_nms_final``: the whole step on the same input (threshold, NMS, top 100)
    against mmdetection's recipe written with torchvision's ``batched_nms``.
Implementations: ``torchvision`` (its ``nms`` / ``batched_nms``; the baseline of every group),
``torchvision-loop`` (a Python loop of torchvision ``nms`` per class or level: what mmcv does
above 10k boxes, and what torchvision's ``batched_nms`` itself does on CPU above 1000 boxes),
``reference`` (pure PyTorch; on CPU, RPN shapes only: see ``rpn_cases``), ``cpp`` (C++/CUDA),
``triton`` (CUDA only: interpreter timings mean nothing). All fp32: HTC keeps boxes in fp32.

Every htc_fast result is checked, untimed, to be exactly the per-class loop's before it is timed;
extra_info records ``exact`` and ``same_kept_set`` for every implementation (torchvision's
``batched_nms`` merges with an unstable sort, so equal scores may come out in another order; its
offset trick, used on GPU below 25k boxes, is also inexact in fp32).

Targets (the issue): on CPU, ``nms`` at least on par with torchvision, ``batched_nms`` on the final
shape >= 3x torchvision; on CUDA, the final NMS under 1 ms and >= 5x torchvision.

Inputs are the same every run (seeded), so runs and devices compare, and HTC-like: RPN proposals
at each level's anchor scale, most of them crowding around objects; final detections in tight
clusters around objects (a cascade's refined boxes) with softmax scores. See ``rpn_proposals`` and
``final_detections``.
"""
import functools
import math

import pytest
import torch
import torchvision

import htc_fast.ops
from htc_fast.ops import _backend

IMAGE_W, IMAGE_H = 1333, 800
RPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6, anchor scale 8: anchors of 32..512 px
RPN_LEVEL_SIZES = {"train": (2000, 2000, 2000, 2000, 819), "test": (1000, 1000, 1000, 1000, 819)}
NUM_CLASSES = 80
HTC_TEST = dict(score_threshold=0.001, iou_threshold=0.5, max_per_image=100)


# ----------------------------------------------------------------------------- cases
# conftest's ``bench_cases`` marker parametrizes ``device, dtype, impl, direction`` from these;
# NMS returns integer indices (no gradient), so every test asks for ``directions=("fwd",)``.

FWD = ("fwd",)


def _impls(device, loop, reference):
    impls = ["torchvision"] + (["torchvision-loop"] if loop else []) + (["reference"] if reference else [])
    return [("fp32", impl) for impl in impls + ["cpp"] + (["triton"] if device == "cuda" else [])]


# The reference walks the greedy chain in Python, a few ops per kept box: 0.1-0.4 s a call on the
# RPN shapes on 2 CPU cores, ~1 s on the final shape (15k kept boxes), and on CUDA a kernel launch
# per op (seconds a call, times 55 rounds). It runs on CPU on the RPN shapes only.
def rpn_level_cases(device):
    return _impls(device, loop=False, reference=device == "cpu")


def rpn_cases(device):
    return _impls(device, loop=True, reference=device == "cpu")


def final_cases(device):
    return _impls(device, loop=True, reference=False)


def multiclass_cases(device):
    return _impls(device, loop=False, reference=False)


def _require(impl, device):
    """Skip, with the reason, a backend that cannot run here (e.g. _C built without CUDA)."""
    if not impl.startswith("torchvision"):
        reason = _backend.unavailable_reason(impl, device)
        if reason is not None:
            pytest.skip(f"backend {impl!r} unavailable on {device}: {reason}")


# ----------------------------------------------------------------------------- inputs

def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _objects(k, gen):
    """(k, 2) centres and (k, 2) sizes: sqrt(area) log-uniform in [24, 600) px, aspect in [1/2, 2]."""
    size = torch.exp(torch.empty(k).uniform_(math.log(24), math.log(600), generator=gen))
    aspect = torch.exp(torch.empty(k).uniform_(-0.7, 0.7, generator=gen))
    centre = torch.rand(k, 2, generator=gen) * torch.tensor([IMAGE_W, IMAGE_H])
    return centre, torch.stack([size * aspect.sqrt(), size / aspect.sqrt()], 1)


def _clip(centre, wh):
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], 1).clamp(min=0)
    return torch.minimum(boxes, torch.tensor([IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H], dtype=boxes.dtype))


@functools.cache
def rpn_proposals(split):
    """(boxes (N, 4), scores (N,), levels (N,)): each level's top proposals, as the RPN emits them.

    Level l has anchors of 32 * 2^l px (aspect 1/2, 1, 2); a proposal is an anchor moved by its
    regression (log-size +-30%, one sigma). 70% sit on one of 15 objects (centre within +-25% of
    the size): those crowd the top-k and overlap at IoU ~0.7; the rest lie anywhere. Objectness:
    a sigmoid of N(0, 2) logits, +3 on objects.
    """
    gen = _generator(10)
    centres, _ = _objects(15, gen)
    boxes, scores, levels = [], [], []
    for level, (stride, n) in enumerate(zip(RPN_STRIDES, RPN_LEVEL_SIZES[split])):
        aspect = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (n,), generator=gen)]
        size = 8 * stride * torch.exp(0.3 * torch.randn(n, generator=gen))
        wh = torch.stack([size * aspect.sqrt(), size / aspect.sqrt()], 1)
        on_object = torch.rand(n, generator=gen) < 0.7
        centre = torch.where(on_object[:, None],
                             centres[torch.randint(0, 15, (n,), generator=gen)]
                             + 0.25 * wh * torch.randn(n, 2, generator=gen),
                             torch.rand(n, 2, generator=gen) * torch.tensor([IMAGE_W, IMAGE_H]))
        boxes.append(_clip(centre, wh))
        scores.append(torch.sigmoid(2 * torch.randn(n, generator=gen) + 3 * on_object))
        levels.append(torch.full((n,), level))
    return torch.cat(boxes), torch.cat(scores), torch.cat(levels)


@functools.cache
def final_detections():
    """(boxes (1000, 4), scores (1000, 81)): the last cascade stage's class-agnostic boxes and
    softmax scores, background last.

    70% of the 1000 RoIs refine onto one of 20 objects (tight clusters: centre +-8% of the size,
    log-size +-12%), each object of one class, its logit raised by 2..8 with the box's quality;
    the rest are background boxes anywhere with a raised background logit. All logits carry
    N(0, 1.5) noise, so most classes keep a probability above 0.001, as in HTC.
    """
    gen = _generator(11)
    n, k = 1000, 20
    centres, sizes = _objects(k, gen)
    obj = torch.randint(0, k, (n,), generator=gen)
    on_object = torch.rand(n, generator=gen) < 0.7
    centre = torch.where(on_object[:, None], centres[obj] + 0.08 * sizes[obj] * torch.randn(n, 2, generator=gen),
                         torch.rand(n, 2, generator=gen) * torch.tensor([IMAGE_W, IMAGE_H]))
    wh = torch.where(on_object[:, None], sizes[obj], _objects(n, gen)[1])
    boxes = _clip(centre, wh * torch.exp(0.12 * torch.randn(n, 2, generator=gen)))
    logits = 1.5 * torch.randn(n, NUM_CLASSES + 1, generator=gen)
    quality = 2 + 6 * torch.rand(n, generator=gen)
    cls = torch.randint(0, NUM_CLASSES, (k,), generator=gen)[obj]
    logits[torch.arange(n), torch.where(on_object, cls, NUM_CLASSES)] += quality
    return boxes, logits.softmax(1)


@functools.cache
def final_pairs():
    """The final NMS's input, the (row, class) pairs with score > 0.001: (boxes, scores, labels,
    rows), rows being the source row of each pair."""
    boxes, scores = final_detections()
    flat = scores[:, :NUM_CLASSES].reshape(-1)
    cand = (flat > HTC_TEST["score_threshold"]).nonzero().squeeze(1)
    rows = cand // NUM_CLASSES
    return boxes[rows], flat[cand], cand % NUM_CLASSES, rows


# ----------------------------------------------------------------------------- implementations

def per_group_loop(boxes, scores, idxs, threshold):
    """torchvision's nms per value of idxs, merged by descending score (stable: ties by index)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    for group in torch.unique(idxs):
        members = (idxs == group).nonzero().squeeze(1)
        keep[members[torchvision.ops.nms(boxes[members], scores[members], threshold)]] = True
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[keep[order]]


def mmdet_multiclass_nms(boxes, scores, score_threshold, iou_threshold, max_per_image):
    """mmdetection's multiclass_nms recipe around torchvision's batched_nms (the baseline)."""
    num_classes = scores.shape[1] - 1
    flat = scores[:, :num_classes].reshape(-1)
    cand = (flat > score_threshold).nonzero().squeeze(1)
    labels = cand % num_classes
    keep = torchvision.ops.batched_nms(boxes[cand // num_classes], flat[cand], labels, iou_threshold)
    keep = keep[:max_per_image]
    return boxes[cand[keep] // num_classes], flat[cand[keep]], labels[keep], cand[keep] // num_classes


def _batched_forward(impl, boxes, scores, idxs, threshold):
    if impl == "torchvision":
        return lambda: torchvision.ops.batched_nms(boxes, scores, idxs, threshold)
    if impl == "torchvision-loop":
        return lambda: per_group_loop(boxes, scores, idxs, threshold)
    return lambda: htc_fast.ops.batched_nms(boxes, scores, idxs, threshold, backend=impl)


def _run(bench_case, forward, *, op, case, impl, device, dtype, threshold, expected, **info):
    """Check the result once (untimed), then time `forward`. htc_fast must equal the per-class
    loop exactly; torchvision's batched_nms keeps the same boxes but orders equal scores by an
    unstable sort, so for it `exact` may be False while `same_kept_set` is True."""
    result, expected = forward().cpu(), expected.cpu()
    exact = torch.equal(result, expected)
    assert exact or impl.startswith("torchvision"), f"{impl}: result differs from the per-class loop"
    bench_case(forward=forward, inputs=[], direction="fwd", device=device,
               group=f"{op} {case} fwd {device} fp32",
               extra_info=dict(op=op, case=case, impl=impl, dtype=dtype,
                               role="baseline" if impl == "torchvision" else "candidate",
                               iou_threshold=threshold, exact=exact,
                               same_kept_set=set(result.tolist()) == set(expected.tolist()), **info))


# ----------------------------------------------------------------------------- benchmarks

@pytest.mark.bench_cases(cases=rpn_level_cases, directions=FWD)
def test_nms_rpn_level(bench_case, device, dtype, impl, direction):
    _require(impl, device)
    boxes, scores, levels = (t.to(device) for t in rpn_proposals("train"))
    boxes, scores = boxes[levels == 0], scores[levels == 0]
    if impl == "torchvision":
        def forward():
            return torchvision.ops.nms(boxes, scores, 0.7)
    else:
        def forward():
            return htc_fast.ops.nms(boxes, scores, 0.7, backend=impl)
    _run(bench_case, forward, op="nms", case="rpn P2 2000", impl=impl, device=device, dtype=dtype,
         threshold=0.7, expected=torchvision.ops.nms(boxes.cpu(), scores.cpu(), 0.7), num_boxes=len(scores))


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.bench_cases(cases=rpn_cases, directions=FWD)
def test_batched_nms_rpn(bench_case, device, dtype, impl, direction, split):
    _require(impl, device)
    boxes, scores, levels = (t.to(device) for t in rpn_proposals(split))
    expected = per_group_loop(*(t.cpu() for t in (boxes, scores, levels)), 0.7)
    _run(bench_case, _batched_forward(impl, boxes, scores, levels, 0.7), op="batched_nms",
         case=f"rpn {split} {len(scores)}", impl=impl, device=device, dtype=dtype, threshold=0.7,
         expected=expected, num_boxes=len(scores), boxes_per_level=list(RPN_LEVEL_SIZES[split]))


@pytest.mark.bench_cases(cases=final_cases, directions=FWD)
def test_batched_nms_final(bench_case, device, dtype, impl, direction):
    _require(impl, device)
    boxes, scores, labels = (t.to(device) for t in final_pairs()[:3])
    expected = per_group_loop(*final_pairs()[:3], 0.5)
    _run(bench_case, _batched_forward(impl, boxes, scores, labels, 0.5), op="batched_nms",
         case=f"final 1000x{NUM_CLASSES}", impl=impl, device=device, dtype=dtype, threshold=0.5,
         expected=expected, num_boxes=len(scores), num_kept=len(expected))


@pytest.mark.bench_cases(cases=multiclass_cases, directions=FWD)
def test_multiclass_nms_final(bench_case, device, dtype, impl, direction):
    _require(impl, device)
    boxes, scores = (t.to(device) for t in final_detections())
    if impl == "torchvision":
        def forward():
            return mmdet_multiclass_nms(boxes, scores, **HTC_TEST)[3]
    else:
        def forward():
            return htc_fast.ops.multiclass_nms(boxes, scores, **HTC_TEST, backend=impl).indices
    *pairs, rows = final_pairs()
    expected = rows[per_group_loop(*pairs, 0.5)[:HTC_TEST["max_per_image"]]]  # the kept source rows
    _run(bench_case, forward, op="multiclass_nms", case=f"final 1000x{NUM_CLASSES}", impl=impl,
         device=device, dtype=dtype, threshold=0.5, expected=expected, score_threshold=0.001,
         max_per_image=HTC_TEST["max_per_image"])
