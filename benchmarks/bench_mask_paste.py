"""Speed and memory of htc_fast's mask paste against mmdetection's and torchvision's, on HTC's shapes.

Owns the mask paste cases, their inputs and each group's baseline. The timing protocol (rounds,
CUDA synchronisation, CUDA peak memory) lives in conftest.py (``bench_case``); summarize.py turns the
JSON into ratios.

Cases (each a test, parametrized ``[device-dtype-impl-fwd]``; inference only, so fwd only), both
on 100 detections with 28x28 mask probabilities (a mask head's: sigmoid of smooth logits), boxes of
sqrt(area) log-uniform over 1/50 to 3/4 of the image height, anywhere in the image:
  * ``test_paste_masks``: (N, H, W) bool masks, at HTC's test scale (1333x800) and at a COCO
    original's size (640x480, where mmdetection pastes for evaluation).
    Implementations: ``mmdet`` (the baseline: mmdetection's ``_get_seg_masks`` pasting, restated in
    ``mmdet_paste``: on CPU one mask at a time over its box grown by a pixel, on CUDA all masks at
    once over the whole image with an (N, H, W, 2) float32 grid), ``torchvision``
    (``paste_masks_in_image``, a different pixel model: for speed only), ``reference`` (htc_fast's
    pure-PyTorch spec), ``cpp`` (C++/CUDA), ``triton`` (CUDA only).
  * ``test_paste_masks_rle``: COCO RLE of the same masks. Baseline ``mmdet+pycocotools``
    (mmdetection's paste, dense masks to the host, ``pycocotools.mask.encode`` per mask as its
    ``encode_mask_results`` does); ``cpp+pycocotools`` (htc_fast's dense paste, same encoding);
    ``cpp`` / ``triton`` (``paste_masks_rle``: crops only, C++ run lengths).
Every htc_fast result is checked untimed against the baseline (dense: equal except pixels within
1e-6 of the threshold, counted in ``pixels_differing``; RLE: equal to pycocotools' encoding of
htc_fast's dense result). extra_info records the output size and the peak memory of one untimed
call: ``peak_mem_bytes`` on CUDA (allocator), ``peak_rss_bytes`` on CPU (resident set growth).

Targets (the issue): on CPU >= 5x the grid_sample formulation and the RLE path faster than dense
paste + pycocotools; on CUDA >= 10x and peak memory within 1.2x the output size.
"""
import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import htc_fast.ops
from htc_fast.ops import _backend

NUM_DETECTIONS, MASK_SIZE, THRESHOLD = 100, 28, 0.5
SHAPES = {"1333x800": (800, 1333), "640x480": (480, 640)}  # name -> (height, width)


# ----------------------------------------------------------------------------- cases
# conftest's ``bench_cases`` marker parametrizes ``device, dtype, impl, direction`` from these;
# pasting is inference only, so every test asks for ``directions=("fwd",)``.

FWD = ("fwd",)


def dense_cases(device):
    impls = ["mmdet", "torchvision", "reference", "cpp"] + (["triton"] if device == "cuda" else [])
    return [("fp32", impl) for impl in impls]


def rle_cases(device):
    impls = ["mmdet+pycocotools", "cpp+pycocotools", "cpp"] + (["triton"] if device == "cuda" else [])
    return [("fp32", impl) for impl in impls]


def _require(impl, device):
    backend = impl.split("+")[0]
    if backend in ("cpp", "triton", "reference"):
        reason = _backend.unavailable_reason(backend, device)
        if reason is not None:
            pytest.skip(f"backend {backend!r} unavailable on {device}: {reason}")


# ----------------------------------------------------------------------------- inputs

@functools.cache
def detections(shape):
    """(mask_probs (100, 28, 28), boxes (100, 4)) on the CPU, the same every run (seeded)."""
    height, width = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    n = NUM_DETECTIONS
    size = torch.exp(torch.empty(n).uniform_(math.log(height / 50), math.log(0.75 * height), generator=gen))
    aspect = torch.exp(torch.empty(n).uniform_(-0.7, 0.7, generator=gen))
    wh = torch.stack([size * aspect.sqrt(), size / aspect.sqrt()], 1)
    centre = torch.rand(n, 2, generator=gen) * torch.tensor([width, height])
    boxes = torch.cat([centre - wh / 2, centre + wh / 2], 1)
    boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height], dtype=torch.float32))
    logits = torch.randn(n, 1, 7, 7, generator=gen) * 4 + 1
    probs = F.interpolate(logits, size=(MASK_SIZE, MASK_SIZE), mode="bilinear", align_corners=False)[:, 0].sigmoid()
    return probs, boxes


# ----------------------------------------------------------------------------- baselines

def mmdet_paste(masks, boxes, height, width, threshold):
    """mmdetection's mask pasting (``_get_seg_masks`` around ``_do_paste_mask``), restated.

    On CPU: one mask at a time, each over its box grown by a pixel (floor/ceil, clamped). On CUDA:
    all masks at once over the whole image, in chunks whose float32 output stays under 1 GiB. Each
    chunk builds the (n, h, w, 2) float32 sampling grid, grid_samples the masks (align_corners=False,
    zero padding) and thresholds with >=. Infinite grid coordinates (zero-size boxes) become 0.
    """
    n = masks.shape[0]
    out = torch.zeros(n, height, width, dtype=torch.bool, device=masks.device)
    per_mask = masks.device.type == "cpu"
    chunks = n if per_mask else max(1, math.ceil(n * height * width * 4 / 2 ** 30))
    for inds in torch.arange(n, device=masks.device).chunk(chunks):
        b = boxes[inds]
        if per_mask:
            x_lo, y_lo = (b.min(0).values.floor()[:2] - 1).clamp(min=0).int().tolist()
            x_hi = int((b[:, 2].max().ceil() + 1).clamp(max=width))
            y_hi = int((b[:, 3].max().ceil() + 1).clamp(max=height))
        else:
            x_lo, y_lo, x_hi, y_hi = 0, 0, width, height
        x0, y0, x1, y1 = b.split(1, dim=1)
        gx = ((torch.arange(x_lo, x_hi, device=b.device).float() + 0.5) - x0) / (x1 - x0) * 2 - 1
        gy = ((torch.arange(y_lo, y_hi, device=b.device).float() + 0.5) - y0) / (y1 - y0) * 2 - 1
        gx[torch.isinf(gx)] = 0
        gy[torch.isinf(gy)] = 0
        h, w = gy.shape[1], gx.shape[1]
        grid = torch.stack([gx[:, None, :].expand(-1, h, w), gy[:, :, None].expand(-1, h, w)], dim=3)
        sampled = F.grid_sample(masks[inds][:, None].float(), grid, align_corners=False)[:, 0]
        out[inds, y_lo:y_hi, x_lo:x_hi] = sampled >= threshold
    return out


def torchvision_paste(masks, boxes, height, width, threshold):
    """torchvision's ``paste_masks_in_image`` (expanded integer boxes, per-mask resize), thresholded."""
    from torchvision.models.detection.roi_heads import paste_masks_in_image

    return paste_masks_in_image(masks[:, None], boxes, (height, width), padding=1)[:, 0] >= threshold


def coco_encode(dense):
    """What mmdetection's ``encode_mask_results`` does: dense masks to the host, one encode each."""
    return [mask_util().encode(np.array(m[:, :, None], order="F", dtype=np.uint8))[0]
            for m in dense.cpu().numpy()]


def mask_util():
    return pytest.importorskip("pycocotools.mask")


# ----------------------------------------------------------------------------- measurement

def _rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return None


def cpu_peak_bytes(fn):
    """Peak resident-set growth of one call of fn (Linux: resets the high-water mark first)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss("VmRSS")
    fn()
    peak = _rss("VmHWM")
    return None if before is None or peak is None else max(peak - before, 0)


def _differing(got, expected, probs, boxes, height, width):
    """Pixels where got != expected, and how many of them are NOT within 1e-6 of the threshold."""
    diff = (got.cpu() != expected.cpu())
    if not diff.any():
        return 0, 0
    from htc_fast.ops.reference.mask_paste import paste_mask_probs

    p = paste_mask_probs(probs.cpu(), boxes.cpu(), height, width)
    return int(diff.sum()), int((diff & ((p - THRESHOLD).abs() >= 1e-6)).sum())


def _run(bench_case, forward, *, op, case, impl, device, dtype, baseline, check, **info):
    check()
    peak = {} if device == "cuda" else {"peak_rss_bytes": cpu_peak_bytes(forward)}
    bench_case(forward=forward, inputs=[], direction="fwd", device=device,
               group=f"{op} {case} fwd {device} fp32",
               extra_info=dict(op=op, case=case, impl=impl, dtype=dtype,
                               role="baseline" if impl == baseline else "candidate", **peak, **info))


# ----------------------------------------------------------------------------- benchmarks

@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.bench_cases(cases=dense_cases, directions=FWD)
def test_paste_masks(bench_case, device, dtype, impl, direction, shape):
    _require(impl, device)
    height, width = SHAPES[shape]
    probs, boxes = (t.to(device) for t in detections(shape))
    if impl == "mmdet":
        def forward():
            return mmdet_paste(probs, boxes, height, width, THRESHOLD)
    elif impl == "torchvision":
        def forward():
            return torchvision_paste(probs, boxes, height, width, THRESHOLD)
    else:
        def forward():
            return htc_fast.ops.paste_masks(probs, boxes, (height, width), THRESHOLD, backend=impl)
    info = {}

    def check():
        got = forward()
        assert got.shape == (NUM_DETECTIONS, height, width) and got.dtype == torch.bool
        if impl in ("reference", "cpp", "triton"):
            expected = mmdet_paste(probs, boxes, height, width, THRESHOLD)
            info["pixels_differing"], off_threshold = _differing(got, expected, probs, boxes, height, width)
            assert off_threshold == 0, f"{impl}: {off_threshold} pixels differ from mmdetection's"

    _run(bench_case, forward, op="paste_masks", case=shape, impl=impl, device=device, dtype=dtype,
         baseline="mmdet", check=check, output_bytes=NUM_DETECTIONS * height * width, info=info)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.bench_cases(cases=rle_cases, directions=FWD)
def test_paste_masks_rle(bench_case, device, dtype, impl, direction, shape):
    _require(impl, device)
    mask_util()
    height, width = SHAPES[shape]
    probs, boxes = (t.to(device) for t in detections(shape))
    if impl == "mmdet+pycocotools":
        def forward():
            return coco_encode(mmdet_paste(probs, boxes, height, width, THRESHOLD))
    elif impl == "cpp+pycocotools":
        def forward():
            return coco_encode(htc_fast.ops.paste_masks(probs, boxes, (height, width), THRESHOLD, backend="cpp"))
    else:
        def forward():
            return htc_fast.ops.paste_masks_rle(probs, boxes, (height, width), THRESHOLD, backend=impl)

    def check():
        got = forward()
        backend = "cpp" if impl == "cpp+pycocotools" else impl
        if backend in ("cpp", "triton"):
            dense = htc_fast.ops.paste_masks(probs, boxes, (height, width), THRESHOLD, backend=backend)
            assert got == coco_encode(dense), f"{impl}: RLE differs from pycocotools' encoding"

    _run(bench_case, forward, op="paste_masks_rle", case=shape, impl=impl, device=device, dtype=dtype,
         baseline="mmdet+pycocotools", check=check, output_bytes=NUM_DETECTIONS * height * width)
