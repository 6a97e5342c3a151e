"""max_iou_assign: every backend equal to the reference bit for bit; the reference against a naive
loop (tests/ops/naive_assign.py) and torchvision's box_iou; batching and threshold sets against
separate calls; argument errors (public function and raw operator); torch.compile; no host sync.

Oracles and how they compare:
  * the reference backend, ``torch.equal`` on gt_inds and labels and exact equality (NaN equal to
    NaN) on max_overlaps: the kernels compute the overlap with the reference's operations in its
    order, so ties (duplicate boxes, a box equal to a ground truth, IoUs exactly at a threshold on
    integer boxes) must be decided alike;
  * ``naive_max_iou_assign`` (float64 loops written from mmdetection's algorithm) on float64 inputs
    without IoU ties at a threshold;
  * ``torchvision.ops.box_iou`` for max_overlaps where every union is above the 1e-6 floor.
Inputs (tests/ops/naive_assign.py) are fresh every run: boxes jittered around the ground truth
plus random ones, with ties, padding, invalid boxes and images without ground truth drawn per case.
"""
import itertools
import math
import random

import pytest
import torch
import torchvision

from htc_fast import ops
from htc_fast.diagnostics import count_ops
from tests.ops.naive_assign import PRESETS, make_case, naive_max_iou_assign, random_thresholds
from tests.support import TOL, require_backend

# NaN coordinates give NaN overlaps on purpose (0 / 0 among them); numpy, which
# runs the Triton interpreter, warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

OPTIONS = list(itertools.product((True, False), (True, False)))  # match_low_quality, gt_max_assign_all
FIELDS = ("gt_inds", "max_overlaps", "labels")


@pytest.fixture(params=["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def fast(request, device):
    """A kernel backend runnable on `device` (the reference is the oracle, not a candidate)."""
    require_backend(request.param, device.type)
    return request.param


@pytest.fixture(params=["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def any_backend(request, device):
    require_backend(request.param, device.type)
    return request.param


def sizes(backend):
    """(max images, max boxes, max ground truth, cases per test): the Triton interpreter is slow."""
    return (2, 40, 6, 6) if backend == "triton" else (3, 200, 12, 24)


def random_case(backend, dtype=torch.float32, **overrides):
    max_batch, max_boxes, max_gts, _ = sizes(backend)
    flags = {k: random.random() < 0.5 for k in ("shared", "ties", "grid", "padded", "invalid", "no_gt_image")}
    batch = random.randint(2 if flags["shared"] else 1, max_batch)
    args = make_case(batch, random.randint(1, max_boxes), random.randint(1, max_gts), dtype=dtype,
                     **{**flags, **overrides})
    return args, random_thresholds()


# ----------------------------------------------------------------------------- running and comparing

def run(args, thresholds, backend, device="cpu", **options):
    args = {k: v if v is None else v.to(device) for k, v in args.items()}
    return ops.max_iou_assign(args.pop("boxes"), args.pop("gt_boxes"), thresholds, **args, **options,
                              backend=backend)


def assert_same(got, expected, context=""):
    for name, g, e in zip(FIELDS, got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, (name, g.dtype, g.shape, e.dtype, e.shape, context)
        g = g.cpu()
        same = torch.equal(g, e) if name != "max_overlaps" else \
            torch.equal(g.isnan(), e.isnan()) and torch.equal(g.nan_to_num(), e.nan_to_num())
        if not same:
            where = (g != e).nonzero()[:5].tolist()
            pytest.fail(f"{name} differs at {where} (first 5): got {g[tuple(zip(*where))].tolist()}, "
                        f"expected {e[tuple(zip(*where))].tolist()}; {context}")


def check_against_reference(args, thresholds, backend, device, **options):
    expected = run(args, thresholds, "reference", **options)
    shapes = {k: tuple(v.shape) for k, v in args.items() if v is not None}
    assert_same(run(args, thresholds, backend, device, **options), expected,
                f"thresholds={thresholds} options={options} shapes={shapes}")
    return expected


# ----------------------------------------------------------------------------- the reference as oracle

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_equals_reference(fast, device, dtype):
    """Random cases, each drawing ties / grid / padding / invalid boxes / shared boxes / an image
    without ground truth, 1-4 threshold sets, under all four option combinations."""
    for _ in range(sizes(fast)[3]):
        args, thresholds = random_case(fast, dtype)
        low_quality, assign_all = random.choice(OPTIONS)
        check_against_reference(args, thresholds, fast, device, match_low_quality=low_quality,
                                gt_max_assign_all=assign_all)


@pytest.mark.parametrize("low_quality, assign_all", OPTIONS)
def test_ties_equal_reference(fast, device, low_quality, assign_all):
    """Every kind of tie at once, on a 2-px grid (IoUs exactly 0.5 and exactly a gt's best)."""
    args = make_case(2, sizes(fast)[1], sizes(fast)[2], ties=True, grid=True, padded=True, invalid=True)
    check_against_reference(args, PRESETS[:4], fast, device, match_low_quality=low_quality,
                            gt_max_assign_all=assign_all)


@pytest.mark.parametrize("batch, num_boxes, num_gts", [(2, 0, 3), (2, 7, 0), (2, 0, 0), (0, 5, 3), (1, 1, 1)])
@pytest.mark.parametrize("shared", [False, True])
def test_empty_and_tiny(fast, device, batch, num_boxes, num_gts, shared):
    args = make_case(batch, num_boxes, num_gts, shared=shared, invalid=True, padded=num_gts > 0)
    for low_quality, assign_all in OPTIONS:
        check_against_reference(args, random_thresholds(2), fast, device, match_low_quality=low_quality,
                                gt_max_assign_all=assign_all)


def test_images_without_ground_truth(fast, device):
    """gt_valid all False in one image, and in every image: valid boxes 0 (overlap 0), others -1."""
    args = make_case(3, 20, 4, invalid=True, no_gt_image=True)
    check_against_reference(args, PRESETS[:2], fast, device)
    args["gt_valid"][:] = False
    inds, overlaps, labels = check_against_reference(args, PRESETS[:2], fast, device)
    assert torch.equal(inds, torch.where(args["valid"], 0, -1).expand_as(inds))
    assert not overlaps.any() and (labels == -1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "mixed"], ids=["fp16", "bf16", "mixed"])
def test_low_precision_and_mixed_inputs(fast, device, dtype):
    """16-bit boxes are converted to float32 on every backend; float32 next to float64 to float64."""
    args, thresholds = random_case(fast, torch.float32, grid=True)
    if dtype == "mixed":
        args["gt_boxes"] = args["gt_boxes"].double()
    else:
        args["boxes"], args["gt_boxes"] = args["boxes"].to(dtype), args["gt_boxes"].to(dtype)
    expected = check_against_reference(args, thresholds, fast, device)
    assert expected.max_overlaps.dtype == (torch.float64 if dtype == "mixed" else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_nan_coordinates(fast, device, dtype):
    """NaN follows torch.max (the largest overlap, first index) on every backend."""
    for _ in range(max(2, sizes(fast)[3] // 4)):
        args, thresholds = random_case(fast, dtype, nan=True)
        for low_quality, assign_all in OPTIONS:
            check_against_reference(args, thresholds, fast, device, match_low_quality=low_quality,
                                    gt_max_assign_all=assign_all)


def test_up_to_eight_threshold_sets(fast, device):
    """5-8 sets: more than one launch's worth on CUDA (its kernels take at most 4 sets at a time)."""
    for count in (5, 8):
        args, _ = random_case(fast, torch.float32, ties=True)
        check_against_reference(args, random_thresholds(count), fast, device)


def test_noncontiguous_and_expanded_inputs(fast, device):
    args = make_case(2, sizes(fast)[1], sizes(fast)[2], ties=True, padded=True, invalid=True)
    views = dict(boxes=args["boxes"].transpose(0, 1).contiguous().transpose(0, 1),
                 gt_boxes=torch.cat([args["gt_boxes"], args["gt_boxes"]], -1)[..., :4],
                 valid=args["valid"].t().contiguous().t(), gt_valid=args["gt_valid"][:, :, None][..., 0],
                 gt_labels=None if args["gt_labels"] is None else args["gt_labels"].t().contiguous().t())
    assert not views["boxes"].is_contiguous() and not views["gt_boxes"].is_contiguous()
    expected = run(args, PRESETS[:2], "reference")
    assert_same(run(views, PRESETS[:2], fast, device), expected, "non-contiguous")
    shared = dict(args, boxes=args["boxes"][:1].expand(2, -1, -1))  # one set of boxes as a stride-0 view
    assert_same(run(shared, PRESETS[:2], fast, device), run(dict(args, boxes=args["boxes"][:1]), PRESETS[:2],
                                                             "reference"), "expanded boxes")


# ----------------------------------------------------------------------------- independent oracles

@pytest.mark.parametrize("low_quality, assign_all", OPTIONS)
@pytest.mark.parametrize("shared", [False, True])
def test_reference_equals_naive_loop(low_quality, assign_all, shared):
    """float64, continuous coordinates (no IoU tie at a threshold, no duplicate): gt_inds and labels
    equal, max_overlaps to float64 tolerance."""
    for _ in range(6):
        batch = random.randint(2, 3)
        args = make_case(batch, random.randint(1, 40), random.randint(1, 6), dtype=torch.float64, shared=shared,
                         padded=random.random() < 0.5, invalid=random.random() < 0.5,
                         no_gt_image=random.random() < 0.3)
        thresholds = random_thresholds()
        got = run(args, thresholds, "reference", match_low_quality=low_quality, gt_max_assign_all=assign_all)
        inds, overlaps, labels = naive_max_iou_assign(**args, thresholds=thresholds,
                                                      match_low_quality=low_quality,
                                                      gt_max_assign_all=assign_all)
        assert got.gt_inds.tolist() == inds, thresholds
        assert got.labels.tolist() == labels
        torch.testing.assert_close(got.max_overlaps, torch.tensor(overlaps, dtype=torch.float64),
                                   **TOL[torch.float64])


def test_max_overlaps_equal_torchvision_box_iou(any_backend, device):
    """Each valid box's max overlap in an image with ground truth is torchvision's box_iou's max
    over the ground-truth rows (padding rows included), where no union falls under 1e-6."""
    args = make_case(3, sizes(any_backend)[1], sizes(any_backend)[2], grid=True, padded=True, invalid=True)
    overlaps = run(args, PRESETS[:1], any_backend, device).max_overlaps.cpu()
    for b in range(3):
        boxes, gts = args["boxes"][b], args["gt_boxes"][b]
        if not args["gt_valid"][b].any():
            continue
        area = lambda t: (t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])  # noqa: E731
        lt = torch.max(gts[:, None, :2], boxes[None, :, :2])
        inter = (torch.min(gts[:, None, 2:], boxes[None, :, 2:]) - lt).clamp(min=0).prod(-1)
        keep = args["valid"][b] & (area(gts)[:, None] + area(boxes)[None] - inter > 1e-6).all(0)
        expected = torchvision.ops.box_iou(gts, boxes).max(0).values
        assert keep.sum() > 0
        torch.testing.assert_close(overlaps[b][keep], expected[keep], **TOL[torch.float32])


# ----------------------------------------------------------------------------- composition

def test_threshold_sets_equal_separate_calls(any_backend, device):
    args, _ = random_case(any_backend, torch.float32)
    thresholds = random_thresholds(4)
    together = run(args, thresholds, any_backend, device)
    for a, threshold_set in enumerate(thresholds):
        alone = run(args, [threshold_set], any_backend, device)
        assert_same((together.gt_inds[a:a + 1], together.max_overlaps, together.labels[a:a + 1]),
                    tuple(t.cpu() for t in alone), f"set {a}: {threshold_set}")


@pytest.mark.parametrize("shared", [False, True])
def test_batch_equals_per_image_calls(any_backend, device, shared):
    args = make_case(3, sizes(any_backend)[1], sizes(any_backend)[2], shared=shared, ties=True, padded=True,
                     invalid=True, no_gt_image=True)
    thresholds = random_thresholds(2)
    together = run(args, thresholds, any_backend, device)
    for b in range(3):
        one = {k: v if v is None or (k == "boxes" and shared) else v[b:b + 1] for k, v in args.items()}
        alone = run(one, thresholds, any_backend, device)
        assert_same((together.gt_inds[:, b:b + 1], together.max_overlaps[b:b + 1], together.labels[:, b:b + 1]),
                    tuple(t.cpu() for t in alone), f"image {b}")


# ----------------------------------------------------------------------------- errors

def _valid_args():
    args = make_case(2, 6, 3, padded=True, invalid=True)
    args["gt_labels"] = torch.randint(0, 5, (2, 3))
    return args


ARGUMENT_ERRORS = [  # (what, change of the valid call's arguments, error, the message names)
    ("boxes 2-D", dict(boxes=lambda a: a["boxes"][0]), ops.OpArgumentError, "boxes must be 3-D"),
    ("gt_boxes 2-D", dict(gt_boxes=lambda a: a["gt_boxes"][0]), ops.OpArgumentError, "gt_boxes must be 3-D"),
    ("boxes not a tensor", dict(boxes=lambda a: a["boxes"].tolist()), ops.OpTypeError, "boxes must be a Tensor"),
    ("boxes int", dict(boxes=lambda a: a["boxes"].long()), ops.OpTypeError, "boxes must be floating"),
    ("gt_boxes int", dict(gt_boxes=lambda a: a["gt_boxes"].int()), ops.OpTypeError, "gt_boxes must be floating"),
    ("boxes (B, N, 5)", dict(boxes=lambda a: torch.cat([a["boxes"], a["boxes"][..., :1]], -1)),
     ops.OpArgumentError, r"boxes must have shape \(2, N, 4\)"),
    ("gt_boxes (B, G, 3)", dict(gt_boxes=lambda a: a["gt_boxes"][..., :3]), ops.OpArgumentError, "gt_boxes must have"),
    ("boxes batch 3", dict(boxes=lambda a: torch.cat([a["boxes"], a["boxes"][:1]])), ops.OpArgumentError,
     r"boxes must have shape \(2, N, 4\) or \(1, N, 4\), got \(3, 6, 4\)"),
    ("gt_labels int32", dict(gt_labels=lambda a: a["gt_labels"].int()), ops.OpArgumentError, "gt_labels must be"),
    ("gt_labels (B, G + 1)", dict(gt_labels=lambda a: torch.zeros(2, 4, dtype=torch.long)), ops.OpArgumentError,
     "gt_labels must be"),
    ("valid uint8", dict(valid=lambda a: a["valid"].to(torch.uint8)), ops.OpArgumentError, "valid must be"),
    ("valid (N,)", dict(valid=lambda a: a["valid"][0]), ops.OpArgumentError, "valid must be"),
    ("gt_valid int64", dict(gt_valid=lambda a: a["gt_valid"].long()), ops.OpArgumentError, "gt_valid must be"),
    ("gt_valid (B, G - 1)", dict(gt_valid=lambda a: a["gt_valid"][:, 1:]), ops.OpArgumentError, "gt_valid must be"),
    ("valid a list", dict(valid=lambda a: a["valid"].tolist()), ops.OpArgumentError, "valid must be"),
    ("valid on meta", dict(valid=lambda a: a["valid"].to("meta")), ops.OpArgumentError, "valid is on meta"),
    ("gt_valid on meta", dict(gt_valid=lambda a: a["gt_valid"].to("meta")), ops.OpArgumentError, "gt_valid is on meta"),
    ("boxes on meta", dict(boxes=lambda a: a["boxes"].to("meta")), ops.OpArgumentError, "boxes is on meta"),
    ("thresholds flat", dict(thresholds=(0.5, 0.0, 0.4, 0.3)), ops.OpTypeError, r"thresholds\[0\] must be"),
    ("no threshold set", dict(thresholds=[]), ops.OpTypeError, "thresholds must be a list of 1 to 8"),
    ("9 threshold sets", dict(thresholds=[PRESETS[0]] * 9), ops.OpTypeError, "thresholds must be a list of 1 to 8"),
    ("a set of 3", dict(thresholds=[PRESETS[0], (0.5, 0.0, 0.4)]), ops.OpTypeError, r"thresholds\[1\] must be"),
    ("a set of 5", dict(thresholds=[(0.5, 0.0, 0.4, 0.3, 0.1)]), ops.OpTypeError, r"thresholds\[0\] must be"),
    ("NaN threshold", dict(thresholds=[(0.5, math.nan, 0.4, 0.3)]), ops.OpArgumentError,
     r"thresholds\[0\]\[1\] must not be NaN"),
    ("str threshold", dict(thresholds=[(0.5, 0.0, "0.4", 0.3)]), ops.OpTypeError, r"thresholds\[0\]\[2\] must be a"),
    ("tensor thresholds", dict(thresholds=torch.tensor([PRESETS[0]])), ops.OpTypeError, "thresholds must be a list"),
]


@pytest.mark.parametrize("what, change, error, message", ARGUMENT_ERRORS, ids=[c[0] for c in ARGUMENT_ERRORS])
def test_argument_errors_name_the_argument(any_backend, what, change, error, message):
    args, thresholds = _valid_args(), [PRESETS[0]]
    for name, value in change.items():
        if name == "thresholds":
            thresholds = value
        else:
            args[name] = value(args)
    with count_ops() as counts, pytest.raises(error, match=f"^max_iou_assign: {message}"):
        ops.max_iou_assign(args.pop("boxes"), args.pop("gt_boxes"), thresholds, **args, backend=any_backend)
    assert counts.ops == 0, counts.top_ops()  # refused before anything is dispatched


@pytest.mark.cuda  # skipped without a GPU (conftest); selected by the GPU suite's -m cuda
def test_tensors_on_two_devices():
    args = _valid_args()
    for name in ("boxes", "gt_labels", "valid", "gt_valid"):
        moved = dict(args, **{name: args[name].cuda()})
        with pytest.raises(ops.OpArgumentError, match=f"{name} is on cuda:0 but gt_boxes is on cpu"):
            ops.max_iou_assign(moved.pop("boxes"), moved.pop("gt_boxes"), [PRESETS[0]], **moved)


RAW_ERRORS = [  # (change of the raw operator's arguments, the message names)
    (dict(boxes=lambda a: a["boxes"].double()), "boxes must have gt_boxes' dtype"),
    (dict(boxes=lambda a: a["boxes"].half(), gt_boxes=lambda a: a["gt_boxes"].half()),
     "gt_boxes must be float32 or float64"),
    (dict(boxes=lambda a: a["boxes"].long()), "boxes must be a floating-point tensor"),
    (dict(boxes=lambda a: a["boxes"][0]), "boxes must be 3-D"),
    (dict(gt_boxes=lambda a: a["gt_boxes"][0]), "gt_boxes must be 3-D"),
    (dict(gt_boxes=lambda a: a["gt_boxes"][..., :3]), "gt_boxes must have shape"),
    (dict(boxes=lambda a: torch.cat([a["boxes"], a["boxes"][:1]])), "boxes must have shape"),
    (dict(boxes=lambda a: a["boxes"][..., :2]), "boxes must have shape"),
    (dict(gt_labels=lambda a: a["gt_labels"].int()), "gt_labels must be"),
    (dict(gt_labels=lambda a: a["gt_labels"][:, :2]), "gt_labels must have shape"),
    (dict(valid=lambda a: a["valid"].float()), "valid must be"),
    (dict(valid=lambda a: a["valid"][:1]), "valid must have shape"),
    (dict(gt_valid=lambda a: a["gt_valid"].long()), "gt_valid must be"),
    (dict(gt_valid=lambda a: a["gt_valid"][:, None]), "gt_valid must have shape"),
    (dict(thresholds=[0.5, 0.0, 0.4]), "thresholds must hold 4 values"),
    (dict(thresholds=[]), "thresholds must hold 4 values"),
    (dict(thresholds=[0.5, 0.0, 0.4, 0.3] * 9), "thresholds must hold 4 values"),
]


@pytest.mark.parametrize("change, message", RAW_ERRORS, ids=[r[1] + str(i) for i, r in enumerate(RAW_ERRORS)])
def test_operator_errors_name_the_argument(change, message):
    """torch.ops.htc_fast.max_iou_assign itself (TorchScript users call it): TORCH_CHECKs, no crash."""
    require_backend("cpp", "cpu")
    args, thresholds = _valid_args(), [0.5, 0.0, 0.4, 0.3]
    for name, value in change.items():
        if name == "thresholds":
            thresholds = value
        else:
            args[name] = value(args)
    with pytest.raises((RuntimeError, ValueError), match=message):
        torch.ops.htc_fast.max_iou_assign(args["boxes"], args["gt_boxes"], args["gt_labels"], args["valid"],
                                          args["gt_valid"], thresholds, True, True)


# ----------------------------------------------------------------------------- torch integration

def test_opcheck(device):
    require_backend("cpp", device.type)
    args = {k: v.to(device) for k, v in _valid_args().items()}
    for labels, valid in ((args["gt_labels"], args["valid"]), (None, None)):
        torch.library.opcheck(torch.ops.htc_fast.max_iou_assign.default,
                              (args["boxes"], args["gt_boxes"], labels, valid, args["gt_valid"],
                               [0.5, 0.0, 0.4, 0.3, 0.6, 0.1, 0.6, 0.6], True, False))


def test_compile_fullgraph_equals_eager(device):
    require_backend("cpp", device.type)

    def fn(boxes, gt_boxes, gt_labels, valid, gt_valid):
        out = ops.max_iou_assign(boxes, gt_boxes, PRESETS[1:3], gt_labels=gt_labels, valid=valid,
                                 gt_valid=gt_valid, backend="cpp")
        return out.gt_inds, out.max_overlaps, out.labels, (out.gt_inds > 0).sum()

    compiled = torch.compile(fn, fullgraph=True)
    args = dict(make_case(2, 40, 5, ties=True, padded=True, invalid=True), gt_labels=torch.randint(0, 5, (2, 5)))
    args = {k: v.to(device) for k, v in args.items()}
    for got, expected in zip(compiled(**args), fn(**args)):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("shared", [False, True])
def test_one_op_and_no_host_sync(shared):
    """The whole call (checks, thresholds, backend choice) dispatches the one fused op."""
    require_backend("cpp", "cpu")
    args = make_case(2, 50, 4, shared=shared, padded=True, invalid=True)
    args["gt_labels"] = torch.randint(0, 5, (2, 4))
    boxes, gt_boxes = args.pop("boxes"), args.pop("gt_boxes")
    with count_ops() as counts:
        ops.max_iou_assign(boxes, gt_boxes, PRESETS[:3], **args, backend="cpp")
    assert counts.ops == 1 and counts.syncs == 0, counts.report()
    assert counts.top_ops() == [("htc_fast::max_iou_assign", 1)], counts.top_ops()
