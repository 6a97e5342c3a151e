"""multiclass_nms (HTC's final detection step) against a straightforward per-class loop, and the
API around all three NMS ops: argument errors, the backend table, opcheck, torch.compile.
(Numerical parity of nms and batched_nms: test_nms.py.)

The oracle, ``loop_multiclass_nms``, spells out mmdetection's ``multiclass_nms`` semantics one class
at a time: class-agnostic (N, 4) boxes serve every class, (N, C, 4) boxes one per class; the last
score column (background) is dropped; a (row, class) pair is a candidate when its score is
> score_threshold (strict); torchvision's nms runs within each class; the survivors are ordered by
descending score and the first max_per_image kept (all when <= 0). mmdetection leaves the order of
equal scores to an unstable sort; htc_fast fixes it (ties by row, then class: the row-major order
of the (N, C) score matrix), and so does the oracle. Results must be exactly equal.
"""
import pytest
import torch
import torchvision

from htc_fast import ops
from tests.ops.test_nms import assert_same_indices, class_scores, detections, nms_inputs
from tests.support import require_backend

HTC_TEST = dict(score_threshold=0.001, iou_threshold=0.5, max_per_image=100)  # HTC's rcnn test cfg


def operators(backend):
    """(nms, batched_nms): the registered torch operators of a fast backend."""
    if backend == "cpp":
        return torch.ops.htc_fast.nms.default, torch.ops.htc_fast.batched_nms.default
    from htc_fast.kernels import nms as triton_nms

    return triton_nms.nms_triton, triton_nms.batched_nms_triton


def problem(backend):
    """(rows, classes): HTC's 1000 x 80 for the C++ kernels, less for the reference's Python chain
    (~0.1 ms a kept box) and the Triton interpreter."""
    return {"reference": (200, 12), "cpp": (1000, 80), "triton": (24, 3)}[backend]


def loop_multiclass_nms(boxes, scores, score_threshold, iou_threshold, max_per_image):
    """(boxes, scores, labels, rows) by the definition, one class at a time, on the CPU. torchvision
    runs in fp64 for fp64 inputs, else on the fp32-upcast inputs (htc_fast's IoU dtype)."""
    boxes, scores = boxes.cpu(), scores.cpu()
    n, num_classes = scores.shape[0], scores.shape[1] - 1
    per_class = boxes[:, None].expand(n, num_classes, 4) if boxes.dim() == 2 else boxes
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    rows, labels = [], []
    for c in range(num_classes):
        cand = (scores[:, c] > score_threshold).nonzero().squeeze(1)
        keep = torchvision.ops.nms(per_class[cand, c].to(acc), scores[cand, c].to(acc), iou_threshold)
        rows.append(cand[keep])
        labels.append(torch.full_like(keep, c))
    rows, labels = torch.cat(rows), torch.cat(labels)
    order = torch.sort(rows * num_classes + labels).indices  # row-major: the tie order
    order = order[torch.sort(scores[rows[order], labels[order]], descending=True, stable=True).indices]
    if max_per_image > 0:
        order = order[:max_per_image]
    rows, labels = rows[order], labels[order]
    return per_class[rows, labels], scores[rows, labels], labels, rows


def assert_same_result(got, expected, device, dtype):
    assert isinstance(got, ops.MulticlassNMSResult)
    assert got.boxes.dtype == got.scores.dtype == dtype
    assert got.labels.dtype == got.indices.dtype == torch.int64
    assert {t.device.type for t in got} == {device.type}
    for name, g, e in zip(got._fields, got, expected):
        assert torch.equal(g.cpu(), e), f"{name} differs: got {g.shape[0]} detections, expected {e.shape[0]}"


@pytest.mark.parametrize("max_per_image", [100, 0])
@pytest.mark.parametrize("layout", ["agnostic", "per_class"])
def test_matches_the_loop(backend, device, layout, max_per_image):
    n, num_classes = problem(backend)
    boxes, obj = detections(n)
    if layout == "per_class":  # a box head with per-class regression: each class moves the box
        boxes = boxes[:, None] + 4 * torch.randn(n, num_classes, 4)
    scores = class_scores(obj, num_classes)
    args = dict(HTC_TEST, max_per_image=max_per_image)
    got = ops.multiclass_nms(boxes.to(device), scores.to(device), **args, backend=backend)
    assert_same_result(got, loop_multiclass_nms(boxes, scores, **args), device, torch.float32)


def test_definition_on_a_hand_made_case(backend, device):
    """Two rows overlapping (IoU 0.81), three classes + background, written out by hand."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], device=device)
    scores = torch.tensor([[0.50, 0.25, 0.10, 0.15],   # row 0: loses class 0 to row 1
                           [0.60, 0.25, 0.05, 0.10],   # row 1: beats row 0 in class 0; ties in class 1
                           [0.25, 0.00, 0.25, 0.50]],  # row 2: alone; 0.25 is not > 0.25
                          device=device)
    got = ops.multiclass_nms(boxes, scores, 0.25, 0.5, 0, backend=backend)
    assert got.indices.tolist() == [1]  # class 0: row 1 suppresses row 0; the rest are <= 0.25
    got = ops.multiclass_nms(boxes, scores, 0.05, 0.5, 0, backend=backend)
    # class 0: rows 1, 2 (row 0 suppressed); class 1: tie 0.25 -> row 0 kept, row 1 suppressed;
    # class 2: rows 0, 2 (0.05 is not > 0.05). Ordered by score, ties by (row, class).
    assert list(zip(got.indices.tolist(), got.labels.tolist())) == [(1, 0), (0, 1), (2, 0), (2, 2), (0, 2)]
    assert torch.equal(got.scores, torch.tensor([0.6, 0.25, 0.25, 0.25, 0.1], device=device))
    assert torch.equal(got.boxes, boxes[got.indices])
    top = ops.multiclass_nms(boxes, scores, 0.05, 0.5, 2, backend=backend)
    assert top.indices.tolist() == [1, 0] and top.labels.tolist() == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(backend, device, dtype):
    """Outputs keep the input dtype; decisions are fp32 ones on the upcast values (fp64 in fp64).
    bf16 scores are heavily tied, which exercises the tie order."""
    n, num_classes = problem(backend)
    boxes, obj = detections(n)
    boxes, scores = boxes.to(dtype), class_scores(obj, num_classes).to(dtype)
    got = ops.multiclass_nms(boxes.to(device), scores.to(device), **HTC_TEST, backend=backend)
    assert_same_result(got, loop_multiclass_nms(boxes, scores, **HTC_TEST), device, dtype)


def test_nothing_to_keep(backend, device):
    for n, threshold in ((0, 0.001), (5, 0.9)):  # no rows; every score <= the threshold
        scores = torch.full((n, 4), 0.9, device=device)
        scores[:, :3] = 0.05
        got = ops.multiclass_nms(torch.rand(n, 4, device=device), scores, threshold, 0.5, 100,
                                 backend=backend)
        assert got.boxes.shape == (0, 4) and got.scores.shape == got.labels.shape == got.indices.shape == (0,)
        assert got.labels.dtype == got.indices.dtype == torch.int64


@pytest.mark.parametrize("case, error, message", [
    ("scores_1d", ValueError, r"scores must be \(N, C \+ 1\) with background last"),
    ("background_only", ValueError, r"scores must be \(N, C \+ 1\)"),
    ("boxes_n5", ValueError, r"boxes must be \(6, 4\) or \(6, 3, 4\)"),
    ("boxes_classes", ValueError, r"boxes must be \(6, 4\) or \(6, 3, 4\)"),
    ("boxes_rows", ValueError, r"boxes must be \(6, 4\) or \(6, 3, 4\)"),
    ("boxes_list", TypeError, "boxes must be a Tensor"),
    ("boxes_int", TypeError, "boxes must be floating point"),
    ("scores_int", TypeError, "scores must be floating point"),
    ("max_per_image_none", TypeError, "max_per_image must be an int, got NoneType None"),
    ("max_per_image_float", TypeError, "max_per_image must be an int, got float 100.0"),
    ("score_threshold_nan", ValueError, "score_threshold must not be NaN"),
    ("iou_threshold_none", TypeError, "iou_threshold must be a number"),
    ("padded_str", TypeError, "padded must be a bool"),
])
def test_multiclass_argument_errors(case, error, message):
    boxes, scores = torch.rand(6, 4), torch.rand(6, 4).softmax(1)
    if case == "scores_1d":
        scores = scores[:, 0]
    elif case == "background_only":
        scores = scores[:, :1]
    elif case == "boxes_n5":
        boxes = torch.rand(6, 5)
    elif case == "boxes_classes":
        boxes = torch.rand(6, 4, 4)  # C + 1 boxes: the background has none
    elif case == "boxes_rows":
        boxes = torch.rand(5, 4)
    elif case == "boxes_list":
        boxes = boxes.tolist()
    elif case == "boxes_int":
        boxes = (boxes * 100).long()
    elif case == "scores_int":
        scores = (scores * 100).long()
    args, kwargs = dict(score_threshold=0.0, iou_threshold=0.5, max_per_image=100), {}
    if case == "max_per_image_none":
        args["max_per_image"] = None
    elif case == "max_per_image_float":
        args["max_per_image"] = 100.0
    elif case == "score_threshold_nan":
        args["score_threshold"] = float("nan")
    elif case == "iou_threshold_none":
        args["iou_threshold"] = None
    elif case == "padded_str":
        kwargs["padded"] = "yes"
    with pytest.raises(error, match=f"^multiclass_nms: {message}"):
        ops.multiclass_nms(boxes, scores, *args.values(), **kwargs)


# ----------------------------------------------------------------------------- API of nms, batched_nms

ARGUMENT_ERRORS = {  # case: (how it breaks (boxes, scores, idxs), error, message after "<fn>: ")
    "boxes_1d": (lambda b, s, i: (b[0], s, i), ValueError, "boxes must be 2-D"),
    "boxes_n5": (lambda b, s, i: (torch.cat([b, b[:, :1]], 1), s, i), ValueError, r"boxes must have shape \(N, 4\)"),
    "boxes_int": (lambda b, s, i: (b.long(), s, i), TypeError, "boxes must be floating point"),
    "boxes_list": (lambda b, s, i: (b.tolist(), s, i), TypeError, "boxes must be a Tensor"),
    "scores_2d": (lambda b, s, i: (b, s[:, None], i), ValueError, "scores must be 1-D"),
    "scores_int": (lambda b, s, i: (b, s.long(), i), TypeError, "scores must be floating point"),
    "lengths": (lambda b, s, i: (b, s[:5], i), ValueError, "scores has 5 entries for 6 boxes"),
    "idxs_length": (lambda b, s, i: (b, s, i[:4]), ValueError, r"idxs must be a Tensor of shape \(6,\)"),
    "idxs_float": (lambda b, s, i: (b, s, i.float()), TypeError, "idxs must be an integer tensor"),
    "idxs_bool": (lambda b, s, i: (b, s, i.bool()), TypeError, "idxs must be an integer tensor"),
}


@pytest.mark.parametrize("case", [*ARGUMENT_ERRORS, "backend_name"])
def test_nms_argument_errors(case):
    """Errors name the function and the argument; the same checks guard nms and batched_nms."""
    boxes, scores, idxs = detections(6)[0], torch.rand(6), torch.zeros(6, dtype=torch.long)
    if case == "backend_name":
        error, message, kwargs = ValueError, "backend must be one of", dict(backend="cuda")
    else:
        breaks, error, message = ARGUMENT_ERRORS[case]
        (boxes, scores, idxs), kwargs = breaks(boxes, scores, idxs), {}
    calls = {"batched_nms": lambda: ops.batched_nms(boxes, scores, idxs, 0.5, **kwargs)}
    if not case.startswith("idxs"):
        calls["nms"] = lambda: ops.nms(boxes, scores, 0.5, **kwargs)
    for name, call in calls.items():
        with pytest.raises(error, match=f"^{name}: {message}"):
            call()


def test_operator_argument_errors(fast_backend, device):
    """Called directly (torch.ops.htc_fast.*), the operators still reject what would make them read
    out of bounds or silently drop boxes, naming the argument (the C++ ones with TORCH_CHECK)."""
    nms_op, batched_op = operators(fast_backend)
    boxes, scores = detections(6)[0].to(device), torch.rand(6, device=device)
    errors = (RuntimeError, ValueError, TypeError)
    with pytest.raises(errors, match=r"boxes must have shape \(N, 4\)"):
        nms_op(boxes[:, :3], scores, 0.5)
    with pytest.raises(errors, match="scores has 5 entries for 6 boxes"):
        nms_op(boxes, scores[:5], 0.5)
    with pytest.raises(errors, match="idxs must be an integer tensor"):
        batched_op(boxes, scores, scores, 0.5)


@pytest.mark.cuda
def test_inputs_on_two_devices():
    boxes, scores = detections(6)[0].cuda(), torch.rand(6)
    with pytest.raises(ValueError, match="nms: scores are on cpu but boxes are on cuda"):
        ops.nms(boxes, scores, 0.5)
    with pytest.raises(ValueError, match="batched_nms: idxs are on cpu but boxes are on cuda"):
        ops.batched_nms(boxes, scores.cuda(), torch.zeros(6, dtype=torch.long), 0.5)


def test_default_backends():
    for op in ("nms", "batched_nms"):
        for device_type in ("cpu", "cuda"):
            assert ops.DEFAULT_BACKENDS[(op, device_type)] == "cpp"
    boxes, scores = nms_inputs("clustered", 200, 0.5)
    with ops.use_backend("reference", ops="nms"):
        assert_same_indices(ops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5),
                            torch.device("cpu"))


# ----------------------------------------------------------------------------- torch.library

def test_opcheck(fast_backend, device):
    """Schema, fake kernel (a data-dependent output size) and AOT dispatch of the operators."""
    nms_op, batched_op = operators(fast_backend)
    boxes, obj = detections(24)
    boxes, scores, idxs = boxes.to(device), torch.rand(24, device=device), (obj % 3).to(device)
    torch.library.opcheck(nms_op, (boxes, scores, 0.5))
    torch.library.opcheck(batched_op, (boxes, scores, idxs, 0.5))


def test_compile_fullgraph_nms(fast_backend, device):
    """No graph break around the ops, and the data-dependent size survives a second shape.
    (Needs no capture_dynamic_output_shape_ops: the fake kernels allocate an unbacked size.)"""
    backend = fast_backend

    def fn(boxes, scores, idxs):
        keep = ops.nms(boxes, scores, 0.5, backend=backend)
        return boxes[keep], keep, ops.batched_nms(boxes, scores, idxs, 0.5, backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    for n in (30, 47):
        boxes, obj = detections(n)
        args = boxes.to(device), torch.rand(n, device=device), (obj % 4).to(device)
        for got, expected in zip(compiled(*args), fn(*args)):
            assert torch.equal(got, expected)


def test_compile_fullgraph_multiclass(device):
    require_backend("cpp", device.type)

    def fn(boxes, scores):
        return ops.multiclass_nms(boxes, scores, **HTC_TEST, backend="cpp")

    boxes, obj = detections(40)  # one shape: test_nms.py's compile test covers a second one
    args = boxes.to(device), class_scores(obj, 5).to(device)
    for got, expected in zip(torch.compile(fn, fullgraph=True)(*args), fn(*args)):
        assert torch.equal(got, expected)
