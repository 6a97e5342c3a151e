"""Speed of the fused max-IoU assignment against the reference composition, on HTC's shapes.

Owns the assignment cases, their inputs and each group's baseline. The timing protocol (rounds,
CUDA synchronisation) lives in conftest.py (``bench_case``); summarize.py turns the JSON into ratios.

Cases (each a test, parametrized ``[device-fp32-impl-fwd]``; the op has no backward):
  * ``test_assign_rpn``: the RPN's assignment, 2 images sharing the 24,552 anchors of a 256x384
    input (P2-P6, strides 4-64, scale 8, aspect ratios 1/2, 1, 2), 20 ground-truth boxes each, one
    threshold set (0.7, 0.0, 0.3, 0.3), a valid mask (anchors inside each image, allowed_border 0;
    the second image is 240x320 inside the padded batch).
  * ``test_assign_cascade``: a cascade step, 2 images of 512 proposals each, 20 padded ground-truth
    rows (20 and 13 real ones, ``gt_valid``), two threshold sets at once (stage i's mask branch
    and stage i+1's box branch: (0.5, 0.0, 0.5, 0.5) and (0.6, 0.0, 0.6, 0.6)).
Both with match_low_quality and gt_max_assign_all, as HTC's assigners run. Implementations:
``reference`` (the pure-PyTorch composition, ~70 dispatched ops: the baseline of every group),
``cpp`` (the fused C++/CUDA op), ``triton`` (CUDA only: interpreter timings mean nothing). fp32.

Every result is checked, untimed, to equal the reference exactly before it is timed. extra_info
records the dispatched ops of one call (``count_ops``) and, for the candidates, ``speedup`` (the
baseline's median over this case's, both measured in this run; summarize.py computes the same).
Inputs are seeded, so runs and devices compare.
"""
import functools
import math

import pytest
import torch

import htc_fast.ops
from htc_fast.diagnostics import count_ops
from htc_fast.ops import _backend

FWD = ("fwd",)
IMAGE_H, IMAGE_W = 256, 384  # the padded batch; the second image is smaller
IMAGE_SIZES = ((256, 384), (240, 320))
STRIDES = (4, 8, 16, 32, 64)
RPN_SET = [(0.7, 0.0, 0.3, 0.3)]
CASCADE_SETS = [(0.5, 0.0, 0.5, 0.5), (0.6, 0.0, 0.6, 0.6)]
NUM_GTS = 20

_baseline_medians = {}  # group -> the reference's median in this run (its case runs first)


def cases(device):
    return [("fp32", impl) for impl in ["reference", "cpp"] + (["triton"] if device == "cuda" else [])]


def _require(impl, device):
    reason = _backend.unavailable_reason(impl, device)
    if reason is not None:
        pytest.skip(f"backend {impl!r} unavailable on {device}: {reason}")


# ----------------------------------------------------------------------------- inputs

def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _ground_truth(gen, batch=2, count=NUM_GTS):
    """(batch, count, 4) objects with sqrt(area) log-uniform in [12, 200) px, aspect in [1/2, 2]."""
    size = torch.exp(torch.empty(batch, count).uniform_(math.log(12), math.log(200), generator=gen))
    aspect = torch.exp(torch.empty(batch, count).uniform_(-0.7, 0.7, generator=gen))
    wh = torch.stack([size * aspect.sqrt(), size / aspect.sqrt()], -1)
    centre = torch.rand(batch, count, 2, generator=gen) * torch.tensor([IMAGE_W, IMAGE_H])
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], -1).clamp(min=0)
    return torch.minimum(boxes, torch.tensor([IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H], dtype=boxes.dtype))


def _anchors():
    """(A, 4) the RPN's anchors of the padded batch, level by level, (y, x, ratio) within a level."""
    out = []
    for stride in STRIDES:
        ratios = torch.tensor([0.5, 1.0, 2.0])
        h = 8 * stride * ratios.sqrt()
        w = 8 * stride / ratios.sqrt()
        base = torch.stack([-w, -h, w, h], 1) / 2
        ys = torch.arange(math.ceil(IMAGE_H / stride)) * stride
        xs = torch.arange(math.ceil(IMAGE_W / stride)) * stride
        shifts = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2).float().repeat(1, 2)
        out.append((shifts[:, None, :] + base[None]).reshape(-1, 4))
    return torch.cat(out)


@functools.cache
def rpn_inputs():
    """boxes (1, A, 4), gt_boxes (2, 20, 4), valid (2, A): anchors inside each image."""
    anchors = _anchors()
    gt = _ground_truth(_generator(20))
    for b, (h, w) in enumerate(IMAGE_SIZES):
        gt[b] = torch.minimum(gt[b], torch.tensor([w, h, w, h], dtype=gt.dtype))
    valid = torch.stack([(anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] < w) & (anchors[:, 3] < h)
                         for h, w in IMAGE_SIZES])
    return dict(boxes=anchors[None], gt_boxes=gt, valid=valid)


@functools.cache
def cascade_inputs():
    """boxes (2, 512, 4) proposals (70% around a ground truth, centre +-15% of its size, log-size
    +-20%; the rest anywhere), gt_boxes (2, 20, 4) padded with zero rows, gt_labels, gt_valid."""
    gen = _generator(21)
    gt = _ground_truth(gen)
    gt_valid = torch.arange(NUM_GTS) < torch.tensor([NUM_GTS, 13])[:, None]
    gt[~gt_valid] = 0
    n = 512
    obj = (torch.rand(2, n, generator=gen) * gt_valid.sum(1, keepdim=True)).long()
    g = torch.gather(gt, 1, obj[..., None].expand(2, n, 4))
    centre, wh = (g[..., :2] + g[..., 2:]) / 2, g[..., 2:] - g[..., :2]
    centre = centre + 0.15 * wh * torch.randn(2, n, 2, generator=gen)
    wh = wh * torch.exp(0.2 * torch.randn(2, n, 2, generator=gen))
    near = torch.cat([centre - wh / 2, centre + wh / 2], -1)
    anywhere = _ground_truth(gen, 2, n)
    boxes = torch.where(torch.rand(2, n, 1, generator=gen) < 0.7, near, anywhere)
    labels = torch.randint(0, 80, (2, NUM_GTS), generator=gen)
    return dict(boxes=boxes, gt_boxes=gt, gt_labels=labels, gt_valid=gt_valid)


# ----------------------------------------------------------------------------- running

def _run(bench_case, benchmark, inputs, thresholds, *, case, impl, device, dtype):
    """Check the result once against the reference (untimed), count its ops, then time it."""
    args = {k: v.to(device) for k, v in inputs.items()}
    boxes, gt_boxes = args.pop("boxes"), args.pop("gt_boxes")

    def forward():
        return htc_fast.ops.max_iou_assign(boxes, gt_boxes, thresholds, **args, backend=impl)

    expected = htc_fast.ops.max_iou_assign(boxes.cpu(), gt_boxes.cpu(), thresholds,
                                           **{k: v.cpu() for k, v in args.items()}, backend="reference")
    for got, want in zip(forward(), expected):
        assert torch.equal(got.cpu(), want), f"{impl}: result differs from the reference"
    with count_ops() as counts:
        forward()
    group = f"max_iou_assign {case} fwd {device} fp32"
    role = "baseline" if impl == "reference" else "candidate"
    # Milliseconds a call on CPU: 50 timed rounds (the default 5 is meant for 0.1-2 s calls).
    bench_case(forward=forward, inputs=[], direction="fwd", device=device, group=group, cpu_rounds=(5, 50),
               extra_info=dict(op="max_iou_assign", case=case, impl=impl, dtype=dtype, role=role,
                               batch=gt_boxes.shape[0], num_boxes=boxes.shape[1], num_gts=gt_boxes.shape[1],
                               threshold_sets=len(thresholds), dispatched_ops=counts.ops,
                               kernel_ops=counts.kernel_ops, exact=True))
    median = benchmark.stats.stats.median
    if role == "baseline":
        _baseline_medians[group] = median
    elif group in _baseline_medians:
        benchmark.extra_info["speedup"] = round(_baseline_medians[group] / median, 2)


@pytest.mark.bench_cases(cases=cases, directions=FWD)
def test_assign_rpn(bench_case, benchmark, device, dtype, impl, direction):
    _require(impl, device)
    _run(bench_case, benchmark, rpn_inputs(), RPN_SET, case=f"rpn 2x{rpn_inputs()['boxes'].shape[1]} anchors",
         impl=impl, device=device, dtype=dtype)


@pytest.mark.bench_cases(cases=cases, directions=FWD)
def test_assign_cascade(bench_case, benchmark, device, dtype, impl, direction):
    _require(impl, device)
    _run(bench_case, benchmark, cascade_inputs(), CASCADE_SETS, case="cascade 2x512 proposals, 2 sets",
         impl=impl, device=device, dtype=dtype)
