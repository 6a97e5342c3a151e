"""Mask paste: every backend against the grid_sample reference (mmdetection's pixel model).

Oracle: ``reference.paste_mask_probs`` (grid_sample, align_corners=False, zero padding, on a window
wider than the support) thresholded with ``>=``. A backend's binary mask must equal it at every
pixel except where the reference's probability is within ``BAND`` = 1e-6 of the threshold (the
kernels interpolate along x then y where grid_sample sums four corner products, and FMAs differ by
device: a few float32 ulps); the flips must lie in the band and the band must hold only a handful
of pixels (``assert_binary_matches``).
Inputs are fresh every run: boxes of every kind (ordinary, tiny, huge, partly and fully outside the
image, zero-size, flipped, NaN/inf), masks uniform (the harshest for the threshold) or smooth (like
a mask head's), square and non-square images and masks. COCO RLE: test_mask_rle.py.
"""
import random

import pytest
import torch

from htc_fast import ops
from htc_fast.ops.reference import mask_paste as reference
from tests.support import require_backend

BAND = 1e-6
KINDS = ("ordinary", "tiny", "huge", "partly_outside", "outside", "degenerate")


# ----------------------------------------------------------------------------- inputs

def random_boxes(n, height, width, kinds=KINDS):
    """(n, 4) float32 boxes, each of a random kind."""
    rows = []
    for _ in range(n):
        kind = random.choice(kinds)
        cx, cy = random.uniform(0, width), random.uniform(0, height)
        if kind == "ordinary":
            w, h = random.uniform(4, 0.8 * width), random.uniform(4, 0.8 * height)
        elif kind == "tiny":
            w, h = random.uniform(0.05, 3), random.uniform(0.05, 3)
        elif kind == "huge":
            w, h = random.uniform(1.5, 40) * width, random.uniform(1.5, 40) * height
        elif kind == "partly_outside":
            w, h = random.uniform(10, width), random.uniform(10, height)
            cx, cy = random.choice([0, width]) + random.uniform(-5, 5), random.choice([0, height])
        elif kind == "outside":
            w, h = random.uniform(2, 30), random.uniform(2, 30)
            cx, cy = random.choice([-w, width + w]), random.choice([-h, height + h])
        else:
            rows.append(random.choice([[5, 5, 5, 20], [3, 4, 30, 4], [30, 20, 10, 5], [1, 2, 1, 2],
                                       [float("nan"), 1, 9, 9], [0, float("inf"), 9, 9],
                                       [-3e38, 0, 3e38, 10], [0, float("-inf"), 9, float("inf")]]))
            continue
        rows.append([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    return torch.tensor(rows, dtype=torch.float32).reshape(n, 4)


def random_masks(n, mh, mw, smooth):
    """(n, mh, mw) float32 probabilities: uniform, or a mask head's kind (sigmoid of smooth logits)."""
    if not smooth:
        return torch.rand(n, mh, mw)
    coarse = torch.randn(n, 1, max(mh // 4, 1), max(mw // 4, 1)) * 4
    fine = torch.nn.functional.interpolate(coarse, size=(mh, mw), mode="bilinear", align_corners=False)
    return fine[:, 0].sigmoid()


def problem(backend):
    """(n, mask (mh, mw), (height, width)); small under Triton (the interpreter is slow)."""
    size = random.choice([(28, 28), (28, 28), (14, 20)])
    if backend == "triton":
        return 6, size, (random.randint(20, 70), random.randint(20, 130))
    return 40, size, (random.randint(20, 160), random.randint(20, 220))


def assert_binary_matches(got, probs, threshold):
    """got == (probs >= threshold) except at pixels within BAND of the threshold; those are rare."""
    assert got.dtype == torch.bool and got.shape == probs.shape
    got, probs = got.cpu(), probs.cpu()
    expected = probs >= threshold
    near = (probs - threshold).abs() < BAND
    flips = got != expected
    bad = flips & ~near
    if bad.any():
        k, y, x = bad.nonzero()[0].tolist()
        raise AssertionError(f"{int(bad.sum())} pixels differ from the reference away from the threshold; "
                             f"first (mask {k}, y {y}, x {x}): got {bool(got[k, y, x])}, p = {float(probs[k, y, x])!r}")
    # The band may only hide a handful of pixels: with uniform masks ~2e-6 of the evaluated pixels.
    assert int(near.sum()) <= 10 + 1e-4 * int((probs > 0).sum()), int(near.sum())
    return int(flips.sum())


def paste(backend, probs, boxes, size, threshold=0.5):
    return ops.paste_masks(probs, boxes, size, threshold, backend=backend)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("smooth", [False, True])
def test_matches_reference(backend, device, smooth):
    n, (mh, mw), size = problem(backend)
    boxes = random_boxes(n, *size)
    probs = random_masks(n, mh, mw, smooth)
    expected = reference.paste_mask_probs(probs, boxes, *size)
    got = paste(backend, probs.to(device), boxes.to(device), size)
    assert got.device.type == device.type
    assert_binary_matches(got, expected, 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_mask_dtypes(backend, device, dtype):
    """Probabilities are read in their dtype and interpolated in float32, like the reference
    (mmdetection casts the masks to float32 before grid_sample)."""
    n, (mh, mw), size = problem(backend)
    boxes = random_boxes(n, *size, kinds=("ordinary", "partly_outside"))
    probs = random_masks(n, mh, mw, smooth=True).to(dtype)
    got = paste(backend, probs.to(device), boxes.to(device), size)
    assert_binary_matches(got, reference.paste_mask_probs(probs.float(), boxes, *size), 0.5)


@pytest.mark.parametrize("threshold", [0.05, 0.3, 0.7, 0.95])
def test_thresholds(backend, device, threshold):
    """Low thresholds set pixels up to half a mask cell outside the box: the window must hold them."""
    n, (mh, mw), size = problem(backend)
    boxes = random_boxes(n, *size, kinds=("ordinary", "tiny", "partly_outside"))
    probs = random_masks(n, mh, mw, smooth=False)
    probs[0] = 1.0  # a mask of ones reaches exactly 1.0 inside the box and 0.5 on its edge
    got = paste(backend, probs.to(device), boxes.to(device), size, threshold)
    assert_binary_matches(got, reference.paste_mask_probs(probs, boxes, *size), threshold)


def test_non_contiguous_masks(backend, device):
    n, (mh, mw), size = problem(backend)
    boxes = random_boxes(n, *size, kinds=("ordinary",))
    probs = random_masks(n, mw, mh, smooth=True)
    view = probs.to(device).transpose(1, 2)  # (n, mh, mw), strides (., 1, mh)
    assert not view.is_contiguous()
    got = paste(backend, view, boxes.to(device), size)
    assert_binary_matches(got, reference.paste_mask_probs(probs.transpose(1, 2), boxes, *size), 0.5)


def test_huge_boxes_are_bounded(backend, device):
    """A box of 1e7 pixels costs only the image's pixels; the result is still the reference's."""
    boxes = torch.tensor([[-1e7, -1e7, 1e7, 1e7], [-1e7, 3.5, 50, 9.25], [2.5, -4e6, 9, 5e6]])
    probs = random_masks(3, 28, 28, smooth=True)
    size = (random.randint(30, 60), random.randint(30, 60))
    got = paste(backend, probs.to(device), boxes.to(device), size)
    assert_binary_matches(got, reference.paste_mask_probs(probs, boxes, *size), 0.5)


def test_degenerate_boxes_give_empty_masks(backend, device):
    """Zero width/height, flipped, non-finite and float32-overflowing boxes paste nothing (where
    mmdetection paints a stripe for zero width: see ``mmdet_stripe``), on every backend."""
    boxes = torch.tensor([[5, 5, 5, 20], [3, 4, 30, 4], [30, 20, 10, 5], [float("nan"), 1, 9, 9],
                          [0, float("inf"), 9, 9], [-3e38, 0, 3e38, 10], [2, 2, 2, 2]])
    probs = torch.ones(len(boxes), 28, 28)
    got = paste(backend, probs.to(device), boxes.to(device), (32, 40))
    assert got.shape == (len(boxes), 32, 40) and not got.any()
    assert mmdet_stripe(probs[0], boxes[0], 32, 40).sum() > 0  # what we do not reproduce


def mmdet_stripe(mask, box, height, width):
    """mmdetection's handling of a zero-width box, restated: the infinite grid coordinates are set
    to 0 (the mask's centre), so every row of the box's height gets the centre column's value."""
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    gx = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
    gx[torch.isinf(gx)] = 0
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    gy = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
    grid = torch.stack([gx[None, :].expand(height, width), gy[:, None].expand(height, width)], -1)
    return torch.nn.functional.grid_sample(mask[None, None], grid[None], align_corners=False)[0, 0] >= 0.5


def test_no_boxes(backend, device):
    got = paste(backend, torch.zeros(0, 28, 28, device=device), torch.zeros(0, 4, device=device), (7, 9))
    assert got.shape == (0, 7, 9) and got.dtype == torch.bool


# ----------------------------------------------------------------------------- windows

def test_windows_hold_the_support(device):
    """The reference's values (computed on a wider window) are exactly 0 outside the C++ window,
    the window is at most one pixel wider than the box grown by half a cell, and the Triton twin
    computes the same windows."""
    require_backend("cpp", device.type)
    n, (mh, mw), size = 60, random.choice([(28, 28), (14, 20)]), (random.randint(20, 160), random.randint(20, 220))
    boxes = random_boxes(n, *size)
    windows = torch.ops.htc_fast.paste_mask_windows(boxes.to(device), mh, mw, *size).cpu()
    probs = reference.paste_mask_probs(torch.rand(n, mh, mw) + 0.01, boxes, *size)
    for k, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        inside = torch.zeros(size, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        assert not probs[k][~inside].any(), k
        if not bool(reference.pasted(boxes[k:k + 1])) or x1 == x0 or y1 == y0:  # nothing to paste
            assert [x0, y0, x1, y1] == [0, 0, 0, 0]
            continue
        bx0, by0, bx1, by1 = boxes[k].double().tolist()
        hx, hy = (bx1 - bx0) / (2 * mw), (by1 - by0) / (2 * mh)
        assert x0 >= min(max(bx0 - hx - 1.5, 0), size[1]) and x1 <= max(min(bx1 + hx + 1.5, size[1]), 0)
        assert y0 >= min(max(by0 - hy - 1.5, 0), size[0]) and y1 <= max(min(by1 + hy + 1.5, size[0]), 0)
    pytest.importorskip("triton")
    from htc_fast.kernels.mask_paste import paste_mask_windows_torch

    assert torch.equal(paste_mask_windows_torch(boxes.to(device), mh, mw, *size).cpu(), windows)


# ----------------------------------------------------------------------------- HTC stage merge

def test_htc_mask_probs(device):
    n, c, m = 7, 5, 6
    logits = [torch.randn(n, c, m, m, device=device) for _ in range(3)]
    labels = torch.randint(0, c, (n,), device=device)
    merged = torch.stack([t.sigmoid() for t in logits]).mean(0)  # mmdetection: merge, then gather
    got = ops.htc_mask_probs(logits, labels)
    torch.testing.assert_close(got, merged[torch.arange(n, device=device), labels], rtol=0, atol=1e-7)
    assert got.dtype == torch.float32 and got.shape == (n, m, m)
    with pytest.raises(ValueError, match="stage_logits\\[1\\]"):
        ops.htc_mask_probs([logits[0], logits[1][:, :2]], labels)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        ops.htc_mask_probs(logits, labels.float())


# ----------------------------------------------------------------------------- API

def test_argument_errors():
    probs, boxes = torch.rand(3, 28, 28), torch.tensor([[1.0, 1, 9, 9]] * 3)
    cases = [
        ((probs, boxes[:, :3], (8, 8)), ValueError, "boxes must have shape \\(N, 4\\)"),
        ((probs, boxes[:2], (8, 8)), ValueError, "mask_probs has 3 masks for 2 boxes"),
        ((probs[0], boxes, (8, 8)), ValueError, "mask_probs must have shape \\(N, M, M\\)"),
        ((probs, boxes, (0, 8)), ValueError, "image_size must be positive"),
        ((probs, boxes, (8, -1)), ValueError, "image_size must be positive"),
        ((probs, boxes, 8), ValueError, "image_size must be \\(height, width\\)"),
        ((probs, boxes.long(), (8, 8)), TypeError, "boxes must be floating point"),
        ((probs > 0.5, boxes, (8, 8)), TypeError, "mask_probs must be floating point"),
        ((probs, boxes.tolist(), (8, 8)), TypeError, "boxes must be a Tensor"),
    ]
    for fn in (ops.paste_masks, ops.paste_masks_rle):
        for args, error, message in cases:
            with pytest.raises(error, match=message):
                fn(*args)
        for threshold in (0.0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="threshold must be positive"):
                fn(probs, boxes, (8, 8), threshold)


def test_operator_checks():
    """The compiled operators check their arguments too (they are public as torch.ops.htc_fast.*)."""
    require_backend("cpp", "cpu")
    probs, boxes = torch.rand(2, 28, 28), torch.tensor([[1.0, 1, 9, 9]] * 2)
    with pytest.raises(RuntimeError, match="boxes must be float32"):
        torch.ops.htc_fast.paste_masks(probs, boxes.double(), 8, 8, 0.5)
    with pytest.raises(RuntimeError, match="image size must be positive"):
        torch.ops.htc_fast.paste_masks(probs, boxes, 0, 8, 0.5)
    windows = torch.tensor([[0, 0, 4, 4], [0, 0, 9, 4]])
    with pytest.raises(RuntimeError, match="is not a window of the"):
        torch.ops.htc_fast.paste_mask_crops(probs, boxes, windows, torch.tensor([0, 16, 52]), 52, 8, 8, 0.5)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.htc_fast.paste_mask_crops(probs, boxes, windows[:1].repeat(2, 1), torch.tensor([0, 16, 20]),
                                            20, 8, 8, 0.5)


@pytest.mark.cuda
def test_inputs_on_two_devices():
    with pytest.raises(ValueError, match="boxes are on cpu but mask_probs on cuda"):
        ops.paste_masks(torch.rand(1, 4, 4, device="cuda"), torch.ones(1, 4), (5, 5))


def test_default_backends():
    for op in ("paste_masks", "paste_masks_rle"):
        for device_type in ("cpu", "cuda"):
            assert ops.DEFAULT_BACKENDS[(op, device_type)] == "cpp"


@pytest.mark.cuda
def test_cuda_peak_memory_is_the_output():
    """100 detections at 1333x800: the kernel allocates the bool output and nothing else sizeable."""
    require_backend("cpp", "cuda")
    boxes = random_boxes(100, 800, 1333, kinds=("ordinary",)).cuda()
    probs = torch.rand(100, 28, 28, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ops.paste_masks(probs, boxes, (800, 1333), backend="cpp")
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before <= 1.2 * out.numel()


# ----------------------------------------------------------------------------- torch.library

def _operators(backend):
    if backend == "cpp":
        return torch.ops.htc_fast.paste_masks, torch.ops.htc_fast.paste_mask_crops
    from htc_fast.kernels import mask_paste as kernels

    return kernels.paste_masks_triton, kernels.paste_mask_crops_triton


def test_opcheck(fast_backend, device):
    paste_op, crops_op = _operators(fast_backend)
    boxes = torch.tensor([[1.5, 2.0, 9.0, 7.5], [-3.0, 4.0, 5.0, 30.0]], device=device)
    probs = torch.rand(2, 6, 5, device=device)
    torch.library.opcheck(paste_op, (probs, boxes, 11, 13, 0.5))
    if fast_backend == "cpp":
        torch.library.opcheck(torch.ops.htc_fast.paste_mask_windows, (boxes, 6, 5, 11, 13))
    windows = torch.ops.htc_fast.paste_mask_windows(boxes.cpu(), 6, 5, 11, 13) if fast_backend == "cpp" else \
        __import__("htc_fast.kernels.mask_paste", fromlist=["x"]).paste_mask_windows_torch(boxes, 6, 5, 11, 13)
    areas = ((windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])).cpu()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), areas.cumsum(0)]).to(device)
    torch.library.opcheck(crops_op, (probs, boxes, windows.to(device), offsets, int(areas.sum()), 11, 13, 0.5))


def test_compile_fullgraph(fast_backend, device):
    backend = fast_backend

    def fn(logits, labels, boxes):
        return ops.paste_masks(ops.htc_mask_probs(logits, labels), boxes, (24, 31), backend=backend)

    compiled = torch.compile(fn, fullgraph=True)
    for n in (3, 5):
        logits = [torch.randn(n, 4, 28, 28, device=device) for _ in range(3)]
        labels = torch.randint(0, 4, (n,), device=device)
        boxes = random_boxes(n, 24, 31, kinds=("ordinary", "partly_outside")).to(device)
        assert torch.equal(compiled(logits, labels, boxes), fn(logits, labels, boxes))
