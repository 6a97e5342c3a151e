"""Max-IoU assignment as Triton kernels, registered as ``htc_fast::max_iou_assign_triton``.

Owns the two kernels and their ``torch.library.triton_op`` registration. Argument checking and the
backend choice live in ``htc_fast/ops/assign.py``; the semantics (the spec every backend follows,
mmdetection's MaxIoUAssigner) in ``htc_fast/ops/reference/assign.py``; this mirrors the two passes
of ``csrc/assign/assign_common.h`` (``gt_best_over``, ``assign_and_write``).

Math. The overlap of ground truth g with box b, in T with the reference's operations in its order:
w = min(g.x2, b.x2) - max(g.x1, b.x1) (torch.minimum/maximum: NaN if either is NaN), h likewise,
inter = max(w, 0) * max(h, 0) (clamp keeps NaN), union = area_g + area_b - inter floored at
T(1e-6) (NaN kept), overlap = inter / union. Maxima follow torch.max: NaN is the largest value,
ties go to the first index. Thresholds are T values (a double rounded to T, as the reference's
tensor of thresholds), compared in T.

Dtype T: the boxes' and ground truth's (float32 or float64, one dtype; htc_fast/ops/assign.py
converts float16/bfloat16 and mixed dtypes). fp32 division is tl.div_rn (plain '/' is approximate
on NVIDIA GPUs), and the kernels are compiled with enable_fp_fusion=False: area_g + area_b - w*h
contracted into an FMA rounds differently, and the low-quality rule decides by == on overlaps.

Kernels and grids (B images, G ground-truth rows per image, N boxes, A <= 8 threshold sets):
- _gt_best_kernel (only with match_low_quality): grid (G, B); program (k, b) runs over the N boxes
  BLOCK_N at a time and writes ground truth k's best overlap over the valid boxes and the first box
  reaching it (start (-1, 0): what the reference's -1 columns of invalid boxes give) to (B, G)
  scratch; padding rows skip the loop (nothing reads their result). A block's result is its first
  NaN if it has one, else its max and that max's first index (two min-reductions of indices); it
  replaces the running result only when it beats it (the running result's indices come first, so
  ties keep it). Each program reads all N boxes of its image (L2-resident across the G programs).
- _assign_kernel: grid (ceil(N / BLOCK), B); program (i, b) takes BLOCK boxes of image b and loops
  over the G rows (scalar loads of the row, its gt_valid flag, best overlap and first box): running
  max/argmax, whether the image has a real row, and per threshold set the low-quality winner (the
  last real k with gt_max[k] >= min_pos claiming the box), kept as a (BLOCK, SETS) tile with SETS
  = A rounded up to a power of two. Then it writes max_overlaps, gt_inds and labels.
The thresholds are constexprs (a tuple of 4 A floats): they are config constants, and as launch
arguments they would cost a host-to-device copy per call (or 32 scalar arguments); a new set of
values compiles the kernel once more. Empty sizes (B, N or G = 0) launch nothing: the outputs are
then made by torch ops.

Determinism: the output is deterministic (each element is written by one program; no atomics).

Tracing: the outputs' shapes come from the inputs', so torch.compile traces through the op (the
launches become graph nodes). Under TRITON_INTERPRET=1 the launch is skipped for fake tensors and
the op is kept whole, as in kernels/mask_paste.py.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from htc_fast.kernels._device import on_device
from htc_fast.kernels._math import div_rn

__all__ = ["max_iou_assign_triton"]

MAX_SETS = 8   # threshold sets per call (csrc/assign/assign_common.h kMaxSets)
BLOCK_N = 512  # boxes per step of _gt_best_kernel
BLOCK = 128    # boxes per program of _assign_kernel
# Register ceilings checked by scripts/check_triton_compile.py (sm_80 and sm_90), 4-warp programs;
# both loops are load-latency bound, so occupancy matters: 64 registers allow 8 CTAs per SM
# (65536 / (64 * 128)), 80 allow 6 (float64 needs two registers per value). NO_FMA: the checker
# rejects an fma.rn in their PTX (the overlaps must round as the reference's).
MAX_REGS = {"_gt_best_kernel": 80, "_assign_kernel": 64}
NO_FMA = ("_gt_best_kernel", "_assign_kernel")


@triton.jit
def _nan_max(a, b):
    """torch.maximum of two values: NaN if either is NaN. (Nested wheres, not (a > b) | (a != a):
    the interpreter cannot OR a scalar's mask with a vector's.)"""
    return tl.where(a != a, a, tl.where(a > b, a, b))


@triton.jit
def _nan_min(a, b):
    return tl.where(a != a, a, tl.where(a < b, a, b))


@triton.jit
def _overlap(gx1, gy1, gx2, gy2, area_g, bx1, by1, bx2, by2, area_b):
    """The reference's bbox_overlaps(gt, boxes) element (assign_common.h ``overlap``)."""
    w = _nan_min(gx2, bx2) - _nan_max(gx1, bx1)
    h = _nan_min(gy2, by2) - _nan_max(gy1, by1)
    zero = tl.zeros([], w.dtype)
    inter = tl.where(w < zero, zero, w) * tl.where(h < zero, zero, h)
    union = area_g + area_b - inter
    eps = tl.full([], 1e-6, w.dtype)
    union = tl.where(union < eps, eps, union)
    return div_rn(inter, union)


@triton.jit
def _beats(v, best):
    """v replaces best in a running max keeping the first index (NaN above every number)."""
    return (v > best) | ((v != v) & (best == best))


@triton.jit
def _load_box(ptr, mask):
    # Masked lanes read a unit box: a finite overlap (the interpreter warns on 0/0).
    x1 = tl.load(ptr, mask=mask, other=0.0)
    y1 = tl.load(ptr + 1, mask=mask, other=0.0)
    x2 = tl.load(ptr + 2, mask=mask, other=1.0)
    y2 = tl.load(ptr + 3, mask=mask, other=1.0)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


@triton.jit
def _load_gt(ptr):
    x1 = tl.load(ptr)
    y1 = tl.load(ptr + 1)
    x2 = tl.load(ptr + 2)
    y2 = tl.load(ptr + 3)
    return x1, y1, x2, y2, (x2 - x1) * (y2 - y1)


@triton.jit(do_not_specialize=["num_boxes", "num_gts", "box_stride"])
def _gt_best_kernel(boxes_ptr, gt_ptr, valid_ptr, gt_valid_ptr, gt_max_ptr, gt_first_ptr, num_boxes, num_gts,
                    box_stride, HAS_VALID: tl.constexpr, HAS_GT_VALID: tl.constexpr, BLOCK_N: tl.constexpr):
    """boxes (B or 1, N, 4) T (image b at b * box_stride); gt (B, G, 4) T; valid (B, N) / gt_valid
    (B, G) uint8 (read when HAS_VALID / HAS_GT_VALID); writes gt_max (B, G) T and gt_first (B, G)
    int64. A padding row (gt_valid False) skips its loop: pass 2 never reads its result."""
    k = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    row = b * num_gts + k
    gx1, gy1, gx2, gy2, area_g = _load_gt(gt_ptr + row * 4)
    best = tl.full([], -1.0, gx1.dtype)
    first = tl.zeros([], tl.int64)
    offs = tl.arange(0, BLOCK_N).to(tl.int64)
    none = num_boxes + tl.zeros([], tl.int64)  # "no index": past every box
    end = num_boxes
    if HAS_GT_VALID:
        end = tl.where(tl.load(gt_valid_ptr + row) != 0, num_boxes, 0)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + offs
        ok = n < num_boxes
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * num_boxes + n, mask=ok, other=0) != 0)
        bx1, by1, bx2, by2, area_b = _load_box(boxes_ptr + b * box_stride + n * 4, ok)
        v = _overlap(gx1, gy1, gx2, gy2, area_g, bx1, by1, bx2, by2, area_b)
        is_nan = v != v
        nan_at = tl.min(tl.where(ok & is_nan, n, none))
        # Overlaps are >= 0 or NaN: -1 marks the lanes that take no part.
        top = tl.max(tl.where(ok & ~is_nan, v, -1.0))
        top_at = tl.min(tl.where(ok & (v == top), n, none))
        at = tl.where(nan_at < none, nan_at, top_at)
        block_best = tl.sum(tl.where(n == at, v, 0.0))  # the value at `at` (NaN stays NaN)
        take = (at < none) & _beats(block_best, best)
        best = tl.where(take, block_best, best)
        first = tl.where(take, at, first)
    tl.store(gt_max_ptr + row, best)
    tl.store(gt_first_ptr + row, first)


@triton.jit
def _set_values(TH: tl.constexpr, J: tl.constexpr, s, NUM_SETS: tl.constexpr, dtype: tl.constexpr):
    """(SETS,) T: threshold J (0 pos, 1 neg_lo, 2 neg_hi, 3 min_pos) of each set s (0 past A)."""
    out = tl.zeros(s.shape, dtype)
    for i in tl.static_range(NUM_SETS):
        out = tl.where(s == i, tl.full([], TH[4 * i + J], dtype), out)
    return out


@triton.jit(do_not_specialize=["num_boxes", "num_gts", "box_stride"])
def _assign_kernel(boxes_ptr, gt_ptr, labels_ptr, valid_ptr, gt_valid_ptr, gt_max_ptr, gt_first_ptr,
                   inds_ptr, max_ptr, out_labels_ptr, num_boxes, num_gts, box_stride,
                   TH: tl.constexpr, NUM_SETS: tl.constexpr, SETS: tl.constexpr, HAS_VALID: tl.constexpr,
                   HAS_GT_VALID: tl.constexpr, HAS_LABELS: tl.constexpr, LOW_QUALITY: tl.constexpr,
                   ASSIGN_ALL: tl.constexpr, BLOCK: tl.constexpr):
    """boxes, gt, valid as _gt_best_kernel; labels (B, G) int64 (read when HAS_LABELS); gt_valid
    (B, G) uint8 (when HAS_GT_VALID); gt_max, gt_first from _gt_best_kernel (when LOW_QUALITY).
    Writes inds (A, B, N) int64, max (B, N) T, out_labels (A, B, N) int64. num_gts >= 1."""
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = n < num_boxes
    valid = in_range
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + b * num_boxes + n, mask=in_range, other=0) != 0)
    bx1, by1, bx2, by2, area_b = _load_box(boxes_ptr + b * box_stride + n * 4, in_range)
    T = bx1.dtype
    s = tl.arange(0, SETS)
    s_ok = s < NUM_SETS
    min_pos = _set_values(TH, 3, s, NUM_SETS, T)
    best = tl.zeros([BLOCK], T)
    argmax = tl.zeros([BLOCK], tl.int32)
    winner = tl.zeros([BLOCK, SETS], tl.int32)
    any_real = tl.zeros([], tl.int32)
    for k in range(0, num_gts):
        row = b * num_gts + k
        gx1, gy1, gx2, gy2, area_g = _load_gt(gt_ptr + row * 4)
        v = _overlap(gx1, gy1, gx2, gy2, area_g, bx1, by1, bx2, by2, area_b)
        take = tl.where(k == 0, True, _beats(v, best))
        best = tl.where(take, v, best)
        argmax = tl.where(take, k, argmax)
        if HAS_GT_VALID:
            real = tl.load(gt_valid_ptr + row) != 0
        else:
            real = tl.full([], 1, tl.int1)
        any_real = any_real | real.to(tl.int32)
        if LOW_QUALITY:
            gt_max = tl.load(gt_max_ptr + row)
            if ASSIGN_ALL:
                hit = v == gt_max
            else:
                hit = n == tl.load(gt_first_ptr + row)
            eligible = tl.where(real, gt_max >= min_pos, False)  # (SETS,), compared in T
            winner = tl.where(hit[:, None] & eligible[None, :], k + 1, winner)
    has_gt = any_real != 0
    max_overlap = tl.where(has_gt, tl.where(valid, best, -1.0), 0.0)
    tl.store(max_ptr + b * num_boxes + n, max_overlap, mask=in_range)

    top = best[:, None]
    neg_lo = _set_values(TH, 1, s, NUM_SETS, T)[None, :]
    neg_hi = _set_values(TH, 2, s, NUM_SETS, T)[None, :]
    pos = _set_values(TH, 0, s, NUM_SETS, T)[None, :]
    ind = tl.where((top >= neg_lo) & (top < neg_hi), 0, -1)
    ind = tl.where(top >= pos, argmax[:, None] + 1, ind)
    if LOW_QUALITY:
        ind = tl.where(winner > 0, winner, ind)
    ind = tl.where(has_gt, ind, 0)
    ind = tl.where(valid[:, None], ind, -1).to(tl.int64)  # (BLOCK, SETS)
    out = s.to(tl.int64)[None, :] * (tl.num_programs(1).to(tl.int64) * num_boxes) + (b * num_boxes + n)[:, None]
    keep = in_range[:, None] & s_ok[None, :]
    tl.store(inds_ptr + out, ind, mask=keep)
    positive = ind > 0
    if HAS_LABELS:
        label = tl.load(labels_ptr + b * num_gts + ind - 1, mask=keep & positive, other=0)
    else:
        label = tl.zeros([BLOCK, SETS], tl.int64)
    tl.store(out_labels_ptr + out, tl.where(positive, label, -1), mask=keep)


# ------------------------------------------------------------------------------------ launching

_INTERPRETED = not isinstance(_assign_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


def _check(boxes, gt_boxes, gt_labels, valid, gt_valid, thresholds):
    """What would make the kernels read out of bounds (htc_fast/ops/assign.py checks the rest)."""
    op = "max_iou_assign_triton"
    if gt_boxes.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: gt_boxes must be float32 or float64, got {gt_boxes.dtype}")
    if boxes.dtype != gt_boxes.dtype:
        raise ValueError(f"{op}: boxes must have gt_boxes' dtype {gt_boxes.dtype}, got {boxes.dtype}")
    if gt_boxes.dim() != 3 or gt_boxes.shape[2] != 4:
        raise ValueError(f"{op}: gt_boxes must have shape (B, G, 4), got {tuple(gt_boxes.shape)}")
    batch, num_gts = gt_boxes.shape[:2]
    if boxes.dim() != 3 or boxes.shape[2] != 4 or boxes.shape[0] not in (1, batch):
        raise ValueError(f"{op}: boxes must have shape ({batch}, N, 4) or (1, N, 4), got {tuple(boxes.shape)}")
    for name, t, shape, dtype in (("gt_labels", gt_labels, (batch, num_gts), torch.long),
                                  ("valid", valid, (batch, boxes.shape[1]), torch.bool),
                                  ("gt_valid", gt_valid, (batch, num_gts), torch.bool)):
        if t is not None and (t.dtype != dtype or tuple(t.shape) != shape):
            raise ValueError(f"{op}: {name} must be {dtype} of shape {shape}, got {t.dtype} {tuple(t.shape)}")
    if len(thresholds) % 4 or not 1 <= len(thresholds) // 4 <= MAX_SETS:
        raise ValueError(f"{op}: thresholds must hold 4 values per set for 1 to {MAX_SETS} sets, got "
                         f"{len(thresholds)} values")


def _launch(boxes, gt_boxes, gt_labels, valid, gt_valid, thresholds, low_quality, assign_all,
            inds, max_overlaps, labels):
    batch, num_gts = gt_boxes.shape[:2]
    num_boxes = boxes.shape[1]
    box_stride = 0 if boxes.shape[0] == 1 else num_boxes * 4  # (1, N, 4): shared by every image
    flags = {"HAS_VALID": valid is not None, "HAS_GT_VALID": gt_valid is not None}
    # (Absent optional tensors: any pointer, never read.)
    valid = gt_boxes if valid is None else valid.contiguous().view(torch.uint8)
    gt_valid = gt_boxes if gt_valid is None else gt_valid.contiguous().view(torch.uint8)
    gt_max, gt_first = gt_boxes, gt_boxes  # unread without the low-quality step
    with on_device(gt_boxes):
        if low_quality:
            gt_max = torch.empty((batch, num_gts), dtype=gt_boxes.dtype, device=gt_boxes.device)
            gt_first = torch.empty((batch, num_gts), dtype=torch.long, device=gt_boxes.device)
            wrap_triton(_gt_best_kernel)[(num_gts, batch)](
                boxes, gt_boxes, valid, gt_valid, gt_max, gt_first, num_boxes, num_gts, box_stride,
                BLOCK_N=BLOCK_N, num_warps=4, enable_fp_fusion=False, **flags)
        sets = len(thresholds) // 4
        wrap_triton(_assign_kernel)[(triton.cdiv(num_boxes, BLOCK), batch)](
            boxes, gt_boxes, gt_boxes if gt_labels is None else gt_labels.contiguous(),
            valid, gt_valid, gt_max, gt_first, inds, max_overlaps, labels, num_boxes, num_gts, box_stride,
            TH=tuple(float(t) for t in thresholds), NUM_SETS=sets, SETS=triton.next_power_of_2(sets),
            HAS_LABELS=gt_labels is not None, LOW_QUALITY=low_quality,
            ASSIGN_ALL=assign_all, BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False, **flags)


@triton_op("htc_fast::max_iou_assign_triton", mutates_args=())
def max_iou_assign_triton(boxes: Tensor, gt_boxes: Tensor, gt_labels: Optional[Tensor], valid: Optional[Tensor],
                          gt_valid: Optional[Tensor], thresholds: list[float], match_low_quality: bool,
                          gt_max_assign_all: bool) -> tuple[Tensor, Tensor, Tensor]:
    """boxes (B or 1, N, 4), gt_boxes (B, G, 4) float32 or float64, one dtype T;
    gt_labels (B, G) int64 or None; valid (B, N) / gt_valid (B, G) bool or None; thresholds: 4 A
    floats (pos, neg_lo, neg_hi, min_pos per set, A <= 8). Returns gt_inds (A, B, N) int64,
    max_overlaps (B, N), labels (A, B, N) int64, equal to reference/assign.py's max_iou_assign."""
    _check(boxes, gt_boxes, gt_labels, valid, gt_valid, thresholds)
    batch, num_gts = gt_boxes.shape[:2]
    num_boxes, sets = boxes.shape[1], len(thresholds) // 4
    device = gt_boxes.device
    if batch == 0 or num_gts == 0 or num_boxes == 0:  # no overlap to compute: valid boxes are negative
        inds = torch.zeros((sets, batch, num_boxes), dtype=torch.long, device=device)
        if valid is not None:
            inds = inds.masked_fill(~valid, -1)
        max_overlaps = torch.zeros((batch, num_boxes), dtype=gt_boxes.dtype, device=device)
        return inds, max_overlaps, torch.full_like(inds, -1)
    inds = torch.empty((sets, batch, num_boxes), dtype=torch.long, device=device)
    max_overlaps = torch.empty((batch, num_boxes), dtype=gt_boxes.dtype, device=device)
    labels = torch.empty_like(inds)
    if not (_INTERPRETED and is_fake(inds)):
        # (Fake tensors under the interpreter: the shapes are all tracing needs; an interpreted
        # launch would read their absent data, as kernels/mask_paste.py says.)
        _launch(boxes.contiguous(), gt_boxes.contiguous(), gt_labels, valid, gt_valid,
                thresholds, bool(match_low_quality), bool(gt_max_assign_all), inds, max_overlaps, labels)
    return inds, max_overlaps, labels


if _INTERPRETED:
    def _opaque(mode, op, types, args, kwargs):
        # triton_op decomposes into its kernel launches when AOTAutograd traces; an interpreted
        # launch cannot be captured, so keep the op whole (as kernels/mask_paste.py).
        return mode.__torch_dispatch__(op, types, args, kwargs)

    max_iou_assign_triton.register_torch_dispatch(FunctionalTensorMode, _opaque)
