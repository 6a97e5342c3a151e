"""NMS and batched NMS: every backend against torchvision's C++ ``nms`` and a per-class loop.

Oracles, compared with ``torch.equal`` (kept indices and their order; no tolerance):
  * ``torchvision.ops.nms`` on the CPU, for fp32 and fp64 boxes. On CUDA tensors too, htc_fast is
    compared with torchvision's CPU op: torchvision's CUDA kernel compares the IoU with a float
    threshold, its CPU kernel (and htc_fast, on both devices) with a double (see
    ``test_iou_is_compared_with_the_threshold_as_a_double``).
  * fp16/bf16 boxes: htc_fast computes the IoU in fp32, so the oracle is torchvision on the
    fp32-upcast inputs (torchvision's CPU kernel has no fp16/bf16 anyway).
  * ``batched_nms``: ``per_class_loop``, torchvision's ``nms`` on each group alone, merged by a
    stable sort. ``torchvision.ops.batched_nms`` is not an oracle: its merge sort is not stable
    (ties across classes come out in any order) and its offset trick is not exact in fp32.
Inputs are fresh every run: uniform noise with degenerate and flipped boxes, clusters like a
cascade's detections, tied scores with duplicate boxes, and chains of boxes whose IoU is exactly
the threshold or one unit off it. multiclass_nms, argument errors, the backend table, opcheck and
torch.compile: test_multiclass_nms.py.
"""
import functools
import math
import random
from fractions import Fraction

import pytest
import torch
import torchvision

from htc_fast import ops
from tests.support import require_backend

# Zero-union boxes divide 0 by 0 on purpose (NaN IoU never suppresses); numpy, which runs the
# Triton interpreter, warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")

IMAGE_W, IMAGE_H = 1333, 800  # HTC's test scale
THRESHOLDS = (0.3, 0.5, 0.7)  # 0.3: float(0.3) > 0.3; 0.5: exact; 0.7: float(0.7) < 0.7
KINDS = ("random", "clustered", "tied", "straddle")


# ----------------------------------------------------------------------------- backends

def size_for(backend):
    """Boxes per case: the reference's Python chain costs ~0.1 ms a kept box, the Triton
    interpreter ~30 ms a program."""
    return {"reference": 300, "cpp": 3000, "triton": 40}[backend]


# ----------------------------------------------------------------------------- inputs

def detections(n, *, num_objects=None, integer=False):
    """(n, 4) fp32 boxes as a cascade's box head outputs them, and (n,) the object of each.

    A few objects (sqrt(area) log-uniform in [16, 600) px, aspect ratio in [1/2, 2]), each with
    a cluster of jittered copies (centre +-8% of the size, log-size +-12%, one sigma), so that many
    pairs overlap around the usual thresholds. Clipped to the image. ``integer`` rounds to whole
    pixels (see test_batched_nms_80_classes for why).
    """
    k = num_objects or max(1, n // 25)
    size = torch.exp(torch.empty(k).uniform_(math.log(16), math.log(600)))
    aspect = torch.exp(torch.empty(k).uniform_(-0.7, 0.7))
    wh = torch.stack([size * aspect.sqrt(), size / aspect.sqrt()], 1)
    obj = torch.randint(0, k, (n,))
    centre = (torch.rand(k, 2) * torch.tensor([IMAGE_W, IMAGE_H]))[obj] + 0.08 * wh[obj] * torch.randn(n, 2)
    half = 0.5 * wh[obj] * torch.exp(0.12 * torch.randn(n, 2))
    boxes = torch.cat([centre - half, centre + half], 1).clamp(min=0)
    boxes = torch.minimum(boxes, torch.tensor([IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H], dtype=boxes.dtype))
    return (boxes.round() if integer else boxes), obj


def class_scores(obj, num_classes):
    """(n, C + 1) softmax probabilities, background last. Each object has a class whose logit is
    raised by a random 'quality' per box; the other logits are noise, so most classes keep a small
    probability (HTC's score_thr=0.001 lets most of them through)."""
    n = obj.shape[0]
    cls = torch.randint(0, num_classes, (int(obj.max()) + 1 if n else 1,))[obj]
    logits = 1.5 * torch.randn(n, num_classes + 1)
    logits[torch.arange(n), cls] += 6 * torch.rand(n)
    logits[:, -1] += 2.0
    return logits.softmax(1)


def random_boxes(n, canvas=100.0):
    """Uniform boxes on a small canvas (dense overlaps); 10% each zero-width, points (zero union
    with each other: NaN IoU, never suppress) and flipped (x2 < x1, y2 < y1: used as given)."""
    xy = torch.rand(n, 2) * canvas
    boxes = torch.cat([xy, xy + torch.rand(n, 2) * 0.4 * canvas], 1)
    kind = torch.randint(0, 10, (n,))
    boxes[kind == 0, 2] = boxes[kind == 0, 0]
    boxes[kind == 1, 2:] = boxes[kind == 1, :2]
    boxes[kind == 2] = boxes[kind == 2][:, [2, 3, 0, 1]]
    return boxes


def tied(n):
    """Whole-pixel detections, a quarter of them exact copies of others, scores in 4 values."""
    boxes, _ = detections(n, integer=True)
    boxes[torch.randint(0, n, (n // 4,))] = boxes[torch.randint(0, n, (n // 4,))]
    return boxes, torch.randint(0, 4, (n,)).float() / 4


def straddling(n, threshold):
    """(n, 4) chains of 2-4 boxes, each shifted from the last by a step; IoU of neighbours is
    exactly `threshold` (as a rational p/q) or one unit off it either way.

    Two w x h boxes shifted by dx have IoU (w - dx) / (w + dx); w = (q + p) k and dx = (q - p) k
    give exactly p / q. Units of 1/4 px: every operation but the final division is exact, so the
    division's rounding decides (fp32 0.3f > 0.3 suppresses; 0.5 and 7/10 in fp32 do not).
    """
    p, q = Fraction(threshold).limit_denominator(100).as_integer_ratio()
    rows = []
    while len(rows) < n:
        k = random.randint(1, 8)
        w, step = (q + p) * k, (q - p) * k + random.choice([-1, 0, 0, 1])
        h, x0, y0 = random.randint(1, 60), random.randint(0, 1600), random.randint(0, 1600)
        vertical = random.random() < 0.5
        for j in range(random.randint(2, 4)):
            box = [x0 + j * step, y0, x0 + j * step + w, y0 + h]
            rows.append([box[1], box[0], box[3], box[2]] if vertical else box)
    return torch.tensor(rows[:n], dtype=torch.float32) / 4


def nms_inputs(kind, n, threshold):
    if kind == "random":
        return random_boxes(n), torch.rand(n)
    if kind == "clustered":
        boxes, obj = detections(n)
        return boxes, class_scores(obj, 1)[:, 0]
    if kind == "tied":
        return tied(n)
    return straddling(n, threshold), torch.rand(n)


def per_class_loop(boxes, scores, idxs, threshold, dtype):
    """The batched_nms oracle: torchvision's nms on each group alone, in `dtype` on the CPU, the
    kept boxes merged by descending score, ties by index (a stable sort)."""
    boxes, scores, idxs = boxes.cpu().to(dtype), scores.cpu().to(dtype), idxs.cpu()
    keep = torch.zeros(scores.shape[0], dtype=torch.bool)
    for group in torch.unique(idxs):
        members = (idxs == group).nonzero().squeeze(1)
        keep[members[torchvision.ops.nms(boxes[members], scores[members], threshold)]] = True
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[keep[order]]


def assert_same_indices(got, expected, device):
    assert got.dtype == torch.int64 and got.device.type == device.type and got.dim() == 1
    got = got.cpu()
    if not torch.equal(got, expected):
        m = min(len(got), len(expected))
        first = int((got[:m] != expected[:m]).nonzero()[0]) if (got[:m] != expected[:m]).any() else m
        raise AssertionError(f"kept {len(got)} boxes, expected {len(expected)}; first difference at "
                             f"position {first}: got {got[first:first + 5].tolist()}, expected "
                             f"{expected[first:first + 5].tolist()}")


# ----------------------------------------------------------------------------- nms

@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("kind", KINDS)
def test_nms_matches_torchvision(backend, device, kind, threshold):
    boxes, scores = nms_inputs(kind, size_for(backend), threshold)
    got = ops.nms(boxes.to(device), scores.to(device), threshold, backend=backend)
    assert_same_indices(got, torchvision.ops.nms(boxes, scores, threshold), device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_iou_is_compared_with_the_threshold_as_a_double(backend, device, dtype):
    """torchvision's CPU kernel compares the fp32 IoU with the double threshold: an IoU of exactly
    3/10 is 0.3f > 0.3 in fp32 (suppressed) but 0.3 == 0.3 in fp64 (kept). An IoU of exactly 1/2
    is kept (strict >), and 7/10 rounds to 0.7f < 0.7 (kept)."""
    pairs = {0.3: [[0, 0, 3, 1], [0, 0, 10, 1]], 0.5: [[0, 0, 1, 1], [0, 0, 2, 1]],
             0.7: [[0, 0, 7, 1], [0, 0, 10, 1]]}
    scores = torch.tensor([0.9, 0.8], dtype=dtype, device=device)
    for threshold, pair in pairs.items():
        boxes = torch.tensor(pair, dtype=dtype, device=device)
        got = ops.nms(boxes, scores, threshold, backend=backend).cpu().tolist()
        suppressed = threshold == 0.3 and dtype != torch.float64
        assert got == ([0] if suppressed else [0, 1]), (threshold, got)
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert got == torchvision.ops.nms(boxes.cpu().to(ref_dtype), scores.cpu().to(ref_dtype), threshold).tolist()


@functools.cache  # fresh each run, shared by the backends and devices of one run (~0.5 s each)
def fma_sensitive_pairs(threshold, count=128):
    """(count, 2, 4) pairs of sub-pixel fp32 boxes whose decision at `threshold` flips when a
    compiler contracts a multiply and the add after it into one FMA (one rounding where torchvision
    rounds twice): in the union, area_a + (bw * bh) or (area_a + area_b) - (w * h). nvcc and
    Triton contract by default, GCC with -mfma/-march=native. Found among near-threshold pairs
    by emulating each contraction in fp64 (w * h is exact there); the oracle stays torchvision."""
    found, total = [], 0
    while total < count:
        m = 100_000
        x1, y1 = torch.rand(m) * 1000, torch.rand(m) * 600
        w, h = 10 + torch.rand(m) * 400, 10 + torch.rand(m) * 400
        a = torch.stack([x1, y1, x1 + w, y1 + h], 1)
        dx = w * (1 - threshold) / (1 + threshold) * (1 + 3e-6 * torch.randn(m))  # IoU ~ threshold
        b = (a + torch.stack([dx, 0 * dx, dx, 0 * dx], 1)) * (1 + 1e-6 * torch.randn(m, 4))
        iw = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
        ih = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        area_a, inter = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]), iw * ih
        fused_sum = (area_a.double() + bw.double() * bh.double()).float()
        plain = (inter / (area_a + bw * bh - inter)).double() > threshold  # fp32 IoU vs the double
        flips = torch.zeros(m, dtype=torch.bool)
        for total_area in (area_a + bw * bh, fused_sum):
            for union in (total_area - inter, (total_area.double() - iw.double() * ih.double()).float()):
                flips |= ((inter / union).double() > threshold) != plain
        found.append(torch.stack([a, b], 1)[flips])
        total += int(flips.sum())
    return torch.cat(found)[:count]


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_decisions_do_not_depend_on_fma_contraction(backend, device, threshold):
    """Each pair is its own group of batched_nms; the kept boxes must be torchvision's (CPU)."""
    pairs = fma_sensitive_pairs(threshold)[:32 if backend == "triton" else None]
    boxes, idxs = pairs.reshape(-1, 4), torch.arange(len(pairs)).repeat_interleave(2)
    scores = torch.tensor([0.9, 0.8]).repeat(len(pairs))
    got = ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), threshold, backend=backend)
    assert_same_indices(got, per_class_loop(boxes, scores, idxs, threshold, torch.float32), device)


def test_ties_are_broken_by_index(backend, device):
    """A stable descending sort: equal scores keep their input order, and of identical boxes with
    equal scores the first one survives."""
    disjoint = torch.tensor([[10.0 * i, 0, 10.0 * i + 5, 5] for i in range(6)], device=device)
    scores = torch.tensor([0.5, 0.5, 0.9, 0.5, 0.9, 0.1], device=device)
    assert ops.nms(disjoint, scores, 0.5, backend=backend).tolist() == [2, 4, 0, 1, 3, 5]
    same = torch.tensor([[1.0, 2, 30, 40]], device=device).repeat(7, 1)
    ties = torch.tensor([0.2, 0.7, 0.7, 0.1, 0.7, 0.2, 0.7], device=device)
    assert ops.nms(same, ties, 0.5, backend=backend).tolist() == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_other_dtypes(backend, device, dtype):
    """fp64: IoU in fp64, equal to torchvision in fp64. fp16/bf16: IoU in fp32, equal to
    torchvision on the fp32-upcast values (bf16 scores are heavily tied: the sort matters)."""
    boxes, obj = detections(size_for(backend))
    boxes, scores = boxes.to(dtype), class_scores(obj, 1)[:, 0].to(dtype)
    idxs = obj % 5
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    got = ops.nms(boxes.to(device), scores.to(device), 0.5, backend=backend)
    assert_same_indices(got, torchvision.ops.nms(boxes.to(ref_dtype), scores.to(ref_dtype), 0.5), device)
    got = ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5, backend=backend)
    assert_same_indices(got, per_class_loop(boxes, scores, idxs, 0.5, ref_dtype), device)


def test_flipped_and_degenerate_boxes(backend, device):
    """x2 < x1 boxes are used as given (negative area, no intersection), as torchvision does;
    identical zero-area boxes have a zero union, NaN IoU, and never suppress each other."""
    boxes = torch.tensor([[10.0, 10, 0, 0], [9, 9, 1, 1], [0, 0, 10, 10], [5, 5, 5, 5], [5, 5, 5, 5],
                          [3, 3, 3, 8], [3, 3, 3, 8], [20, 0, 30, 10], [30, 0, 20, 10]])
    scores = torch.rand(len(boxes))
    for threshold in (0.5, -0.5):  # below 0, IoUs of 0 and -0.0 (negative areas) suppress too
        expected = torchvision.ops.nms(boxes, scores, threshold)
        got = ops.nms(boxes.to(device), scores.to(device), threshold, backend=backend)
        assert_same_indices(got, expected, device)
        if threshold > 0:  # the degenerate twins survive: NaN IoU with each other, 0 with the rest
            assert {3, 4, 5, 6} <= set(expected.tolist())


@pytest.mark.parametrize("threshold", [-0.5, 0.0, 1.0, 1.5])
def test_thresholds_outside_0_1(backend, device, threshold):
    """0: any overlap suppresses (a zero IoU does not); 1 and above: nothing does; below 0, zero and
    negative IoUs of degenerate and flipped boxes do (NaN still does not)."""
    boxes, scores = random_boxes(size_for(backend)), torch.rand(size_for(backend))
    got = ops.nms(boxes.to(device), scores.to(device), threshold, backend=backend)
    assert_same_indices(got, torchvision.ops.nms(boxes, scores, threshold), device)


def test_noncontiguous_inputs(backend, device):
    n = size_for(backend)
    boxes, obj = detections(n)
    table = torch.cat([torch.rand(n, 1), boxes, torch.rand(n, 2)], 1).to(device)  # (n, 7) rows
    strided_boxes, strided_scores = table[:, 1:5], table[:, 5]
    assert not strided_boxes.is_contiguous() and not strided_scores.is_contiguous()
    expected = torchvision.ops.nms(boxes, strided_scores.cpu().contiguous(), 0.6)
    assert_same_indices(ops.nms(strided_boxes, strided_scores, 0.6, backend=backend), expected, device)
    column_major = boxes.t().contiguous().t().to(device)
    assert_same_indices(ops.nms(column_major, strided_scores, 0.6, backend=backend), expected, device)
    idxs = torch.randint(0, 4, (n, 2), device=device)[:, 1]
    got = ops.batched_nms(strided_boxes, strided_scores, idxs, 0.6, backend=backend)
    assert_same_indices(got, per_class_loop(boxes, table[:, 5], idxs, 0.6, torch.float32), device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_and_single(backend, device, dtype):
    empty = torch.zeros(0, 4, dtype=dtype, device=device)
    none = torch.zeros(0, dtype=dtype, device=device)
    for got in (ops.nms(empty, none, 0.5, backend=backend),
                ops.batched_nms(empty, none, torch.zeros(0, dtype=torch.long, device=device), 0.5,
                                backend=backend)):
        assert got.shape == (0,) and got.dtype == torch.int64 and got.device.type == device.type
    one = torch.tensor([[1.0, 2, 3, 4]], dtype=dtype, device=device)
    score = torch.tensor([0.3], dtype=dtype, device=device)
    assert ops.nms(one, score, 0.5, backend=backend).tolist() == [0]
    assert ops.batched_nms(one, score, torch.tensor([7], device=device), 0.5, backend=backend).tolist() == [0]


# ----------------------------------------------------------------------------- batched_nms

@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32, torch.uint8])
def test_batched_nms_matches_per_class_loop(backend, device, idx_dtype):
    """Group ids of any integer type, negative and far apart; tied scores so that the merge of the
    groups' survivors must order ties by index."""
    n = size_for(backend)
    boxes, obj = detections(n, integer=True)
    scores = torch.randint(0, 16, (n,)).float() / 16
    values = {torch.int64: [-7, 0, 3, 2 ** 40], torch.int32: [-7, 0, 3, 100_000], torch.uint8: [0, 3, 200]}
    idxs = torch.tensor(values[idx_dtype], dtype=idx_dtype)[torch.randint(0, len(values[idx_dtype]), (n,))]
    threshold = random.choice(THRESHOLDS)
    got = ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), threshold, backend=backend)
    assert_same_indices(got, per_class_loop(boxes, scores, idxs, threshold, torch.float32), device)


def test_batched_nms_of_one_group_is_nms(backend, device):
    boxes, scores = nms_inputs("clustered", size_for(backend), 0.7)
    idxs = torch.full((len(scores),), 3, device=device)
    got = ops.batched_nms(boxes.to(device), scores.to(device), idxs, 0.7, backend=backend)
    assert_same_indices(got, torchvision.ops.nms(boxes, scores, 0.7), device)


def _large_cases():
    """(device, backend, dtype, whole_px) for the 80-class case: the kernels only. The reference
    (a Python loop: 6 s on CPU here) and the Triton interpreter (minutes) are checked on the
    smaller cases above; Triton runs here on CUDA."""
    variants = [(torch.float32, False, "fp32"), (torch.float32, True, "fp32-whole-px"),
                (torch.float64, False, "fp64")]
    cases = []
    for device, backend, marks in [("cpu", "cpp", []), ("cuda", "cpp", [pytest.mark.cuda]),
                                   ("cuda", "triton", [pytest.mark.cuda, pytest.mark.triton])]:
        cases += [pytest.param(device, backend, dtype, whole, marks=marks, id=f"{device}-{backend}-{name}")
                  for dtype, whole, name in variants]
    return cases


@pytest.mark.parametrize("device_name, backend, dtype, integer", _large_cases())
def test_batched_nms_80_classes(device_name, backend, dtype, integer):
    """HTC's final NMS: 1000 class-agnostic boxes x 80 classes, the pairs with score > 0.001.

    The oracle is the float64 per-class loop whenever its decisions provably equal fp32 ones:
    fp64 boxes, or whole-pixel boxes inside the image. Then areas and intersections are integers
    below 2^21, exact in fp32, and only the division I/U rounds; |I/U - 1/2| and |I/U - 7/10| are
    at least 1/(10 U) > 9e-8, more than fp32's rounding error (3e-8), so both sides of the
    comparison agree (not at 0.3: an I/U of exactly 3/10 suppresses in fp32 only, see above).
    Sub-pixel fp32 boxes are compared with the fp32 per-class loop instead.
    """
    require_backend(backend, device_name)
    boxes, obj = detections(1000, integer=integer)
    scores = class_scores(obj, 80)[:, :80].reshape(-1)
    candidates = (scores > 0.001).nonzero().squeeze(1)
    boxes, scores, labels = boxes[candidates // 80].to(dtype), scores[candidates].to(dtype), candidates % 80
    threshold = random.choice([0.5, 0.7])
    got = ops.batched_nms(boxes.to(device_name), scores.to(device_name), labels.to(device_name), threshold,
                          backend=backend)
    oracle_dtype = torch.float64 if integer or dtype == torch.float64 else torch.float32
    assert_same_indices(got, per_class_loop(boxes, scores, labels, threshold, oracle_dtype),
                        torch.device(device_name))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_batched_nms_200k_boxes(device):
    """200k whole-pixel fp32 boxes in 80 classes of skewed sizes (up to ~14k boxes): the float64
    per-class loop (exact here, see test_batched_nms_80_classes) against the C++/CUDA kernels. At
    this size torchvision's offset trick (offsets of ~1e5 px) loses fp32 precision."""
    require_backend("cpp", device)
    n = 200_000
    boxes, obj = detections(n, num_objects=2500, integer=True)
    weights = 1.0 / (torch.arange(80) + 5.0)
    labels = torch.multinomial(weights, n, replacement=True)
    scores = torch.rand(n)
    got = ops.batched_nms(boxes.to(device), scores.to(device), labels.to(device), 0.5, backend="cpp")
    assert_same_indices(got, per_class_loop(boxes, scores, labels, 0.5, torch.float64), torch.device(device))
