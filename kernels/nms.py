"""Non-maximum suppression (plain and batched) as Triton kernels, registered as ``htc_fast::*_triton``.

Owns the Triton IoU-mask and greedy-reduction kernels and their ``torch.library.triton_op``
registration. Argument checking and the backend choice live in ``htc_fast/ops/nms.py``; the exact
semantics (the spec every backend follows) in ``htc_fast/ops/reference/nms.py``; this mirrors the
CUDA design of ``csrc/nms/nms_cuda.cu``.

Math (torchvision's nms). Boxes are sorted by descending score (stable: ties by index), then, for
batched NMS, stably by idxs, so each segment (one value of idxs) is a contiguous run in score order.
Box j is suppressed by an earlier kept box i of the same segment when, in T with torchvision's
operations and order, xx1 = max(x1_i, x1_j) (same for yy1; min for xx2, yy2), w = max(0, xx2 - xx1),
h likewise, inter = w * h, and inter / (area_i + area_j - inter) > thr, where thr is the largest T
not above the double threshold (so a T comparison decides as torchvision's double comparison does;
an IoU of exactly 0.3f suppresses at 0.3). A zero union gives NaN, which never suppresses.

Dtype T: float64 for float64 boxes, else float32 (fp16/bf16 boxes are converted by torch before the
kernels). fp32 division is tl.div_rn (plain '/' is approximate on NVIDIA GPUs), and the kernels are
compiled with enable_fp_fusion=False: a contracted a*b + c (e.g. area_i + area_j - w*h as one FMA)
rounds differently from torchvision and would flip decisions at the threshold.

Kernels and grids (W = ceil(longest segment / 64) words per row; 64-bit words, bit b of word w of
row i = column start(i) + 64 w + b of i's own segment):
- _nms_mask_kernel: grid (ceil(N / BLOCK_R), W); program (rb, w) builds word w of BLOCK_R rows as
  a BLOCK_R x 64 IoU tile (row boxes against their own segment's columns, gathered), packed with an
  OR-reduction of the shifted bits. Only columns j > i of the row's segment can be set; tiles with
  none are skipped. The mask is N x W int64 (N * W * 8 bytes: 10 MB for 80 classes x 1000 boxes,
  800 MB for one segment of 80k), not N x N / 64: boxes of other segments are never compared (the
  coordinate-offset trick of torchvision/mmcv is inexact in fp32).
- _nms_reduce_kernel: grid min(N, 1024) for batched (1 for plain); program i reduces segments i,
  i + grid, ... (their first rows are compacted on the device: no host sync, no idle program per
  box). It walks a segment 64 rows (one word) at a time: the within-word greedy chain is 64
  unrolled scalar steps on the row's diagonal word (loads independent of the chain, so they issue
  together); the kept rows of the word are then OR-reduced into the segment's later removed-words
  (a scratch slice of N int64, BLOCK_W words per step), followed by a barrier so the next word's
  scalar load sees them.
The kept flags (sorted order) go back to the original indices and are read out in score order by
torch (masked_select: the one device->host sync for the output size; batched NMS syncs once more,
for W). batched_nms_padded_triton has neither sync: W comes from its static max_group_size, and
the kept indices are compacted by a stable sort into a fixed (max_output,) buffer.

Determinism: the output is deterministic (no atomics, integer bit sets only).

Tracing: the op has data-dependent sizes (W and the output), so it is kept whole (opaque) in
graphs: its fake returns a tensor of a new unbacked size, and the FunctionalTensorMode rule below
stops AOTAutograd from decomposing it into its launches (nothing would be gained: NMS fuses with
nothing). torch.compile(fullgraph=True) traces through it without capture_dynamic_output_shape_ops.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op, wrap_triton

from htc_fast.kernels._device import on_device
from htc_fast.kernels._math import div_rn, threshold_as

__all__ = ["nms_triton", "batched_nms_triton", "batched_nms_padded_triton"]

BITS = 64      # columns per mask word
BLOCK_R = 32   # mask rows per program (16 for float64 boxes: twice the registers per coordinate)
BLOCK_W = 32   # removed-words updated per step of the reduction
# Register ceilings checked by scripts/check_triton_compile.py (sm_80 and sm_90). The mask kernel
# (8 warps) aims at 2 CTAs per SM: 65536 registers / (2 * 256 threads) = 128 per thread. The reduce
# kernel (4 warps) loops over segments, latency-bound on its chain: 80 keeps >= 6 CTAs per SM.
MAX_REGS = {"_nms_mask_kernel": 128, "_nms_reduce_kernel": 80}


@triton.jit
def _or(a, b):
    return a | b


@triton.jit(do_not_specialize=["n", "words"])
def _nms_mask_kernel(boxes_ptr, seg_start_ptr, seg_end_ptr, mask_ptr, n, words, thr_arg: "fp64",
                     SEGMENTED: tl.constexpr, BLOCK_R: tl.constexpr):
    """boxes (n, 4) T, sorted; seg_start/seg_end (n,) int64 bounds of each row's segment (read only
    when SEGMENTED, else [0, n)); mask (n, words) int64, every word written."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.program_id(1).to(tl.int64)
    row_ok = rows < n
    if SEGMENTED:
        start = tl.load(seg_start_ptr + rows, mask=row_ok, other=0)
        end = tl.load(seg_end_ptr + rows, mask=row_ok, other=0)
    else:
        start = tl.zeros([BLOCK_R], tl.int64)
        end = tl.zeros([BLOCK_R], tl.int64) + n
    bit = tl.arange(0, 64).to(tl.int64)
    cols = (start + w * 64)[:, None] + bit[None, :]  # (BLOCK_R, 64)
    valid = (cols > rows[:, None]) & (cols < end[:, None]) & row_ok[:, None]
    bits = tl.zeros([BLOCK_R], tl.int64)
    if tl.max(valid.to(tl.int32)) > 0:  # tiles at or before the diagonal, or past the segment: 0
        a = boxes_ptr + rows * 4
        ax1 = tl.load(a, mask=row_ok, other=0.0)[:, None]
        ay1 = tl.load(a + 1, mask=row_ok, other=0.0)[:, None]
        ax2 = tl.load(a + 2, mask=row_ok, other=0.0)[:, None]
        ay2 = tl.load(a + 3, mask=row_ok, other=0.0)[:, None]
        b = boxes_ptr + cols * 4
        bx1 = tl.load(b, mask=valid, other=0.0)
        by1 = tl.load(b + 1, mask=valid, other=0.0)
        bx2 = tl.load(b + 2, mask=valid, other=1.0)  # masked lanes: union 1, not 0/0 (the
        by2 = tl.load(b + 3, mask=valid, other=1.0)  # interpreter warns on NaN)
        T = ax1.dtype
        zero = tl.zeros([], T)
        area_a = (ax2 - ax1) * (ay2 - ay1)
        area_b = (bx2 - bx1) * (by2 - by1)
        # Comparisons as in nms_common.h (a NaN coordinate picks the column's value / zero width).
        xx1 = tl.where(ax1 > bx1, ax1, bx1)
        yy1 = tl.where(ay1 > by1, ay1, by1)
        xx2 = tl.where(ax2 < bx2, ax2, bx2)
        yy2 = tl.where(ay2 < by2, ay2, by2)
        dw = xx2 - xx1
        dh = yy2 - yy1
        inter = tl.where(dw > 0.0, dw, zero) * tl.where(dh > 0.0, dh, zero)
        iou = div_rn(inter, area_a + area_b - inter)
        hit = valid & (iou > tl.full([], thr_arg, T))  # thr_arg is a T value: exact cast
        one = tl.full([BLOCK_R, 64], 1, tl.int64)
        bits = tl.reduce(tl.where(hit, one << bit[None, :], 0), 1, _or)
    tl.store(mask_ptr + rows * words + w, bits, mask=row_ok)


@triton.jit(do_not_specialize=["n", "words"])
def _nms_reduce_kernel(mask_ptr, starts_ptr, seg_end_ptr, num_seg_ptr, removed_ptr, kept_ptr, n, words,
                       SEGMENTED: tl.constexpr, BLOCK_W: tl.constexpr):
    """mask (n, words) int64 from _nms_mask_kernel; starts (n,) int64 whose first num_seg[0] entries
    are the segments' first rows; seg_end (n,) int64; removed (n,) int64 zeros (scratch: the segment
    [p, e) keeps its <= e - p removed-words at removed[p:]); kept (n,) int8 zeros. Program i reduces
    segments i, i + num_programs, ...; rows past `words` * 64 of their segment are never kept."""
    if SEGMENTED:
        num_seg = tl.load(num_seg_ptr)
    else:
        num_seg = tl.full([], 1, tl.int64)
    offs = tl.arange(0, 64).to(tl.int64)
    one = tl.full([], 1, tl.int64)
    for sid in range(tl.program_id(0).to(tl.int64), num_seg, tl.num_programs(0).to(tl.int64)):
        if SEGMENTED:
            p = tl.load(starts_ptr + sid)
            e = tl.load(seg_end_ptr + p)
        else:
            p = tl.zeros([], tl.int64)
            e = tl.zeros([], tl.int64) + n
        n_words = tl.minimum((e - p + 63) // 64, words)
        for wb in range(0, n_words):
            row0 = p + wb * 64
            cur = tl.load(removed_ptr + p + wb)
            kept_bits = tl.zeros([], tl.int64)
            for b in tl.static_range(64):  # the greedy chain inside this word
                r = row0 + b
                diag = tl.load(mask_ptr + r * words + wb, mask=r < e, other=0)
                keep = (r < e) & (((cur >> b) & 1) == 0)
                cur = tl.where(keep, cur | diag, cur)
                kept_bits = tl.where(keep, kept_bits | (one << b), kept_bits)
            rows = row0 + offs
            kept_rows = ((kept_bits >> offs) & 1) != 0
            tl.store(kept_ptr + rows, kept_rows.to(tl.int8), mask=rows < e)
            for wc in range(wb + 1, n_words, BLOCK_W):  # kept rows remove boxes of later words
                cw = wc + tl.arange(0, BLOCK_W).to(tl.int64)
                cw_ok = cw < n_words
                tile = tl.load(mask_ptr + rows[:, None] * words + cw[None, :],
                               mask=kept_rows[:, None] & cw_ok[None, :], other=0)
                gone = tl.reduce(tile, 0, _or)
                old = tl.load(removed_ptr + p + cw, mask=cw_ok, other=0)
                tl.store(removed_ptr + p + cw, old | gone, mask=cw_ok)
            tl.debug_barrier()  # the next word's scalar load reads what other threads stored


# ------------------------------------------------------------------------------------ launching

_INTERPRETED = not isinstance(_nms_mask_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1
# Programs of the segmented reduction: each loops over segments, so this bounds the launch, not
# the segment count (~8 per SM of an H100); the interpreter pays per program, so it gets few.
_REDUCE_PROGRAMS = 8 if _INTERPRETED else 1024


def _segments(keys):
    """keys (n,) int64 sorted -> (seg_start, seg_end, starts, num_seg): each row's segment bounds
    (n,), the segments' first rows in the first num_seg entries of starts (n,), num_seg (1,) int64.
    All on the device, no host sync."""
    seg_start = torch.searchsorted(keys, keys, side="left")
    seg_end = torch.searchsorted(keys, keys, side="right")
    is_start = seg_start == torch.arange(keys.shape[0], device=keys.device)
    seg_id = torch.cumsum(is_start, 0) - 1
    starts = torch.zeros_like(seg_start).scatter_(0, seg_id, seg_start)  # equal values per id
    return seg_start, seg_end, starts, seg_id[-1:] + 1


def _kept_sorted(sorted_boxes, segments, words, threshold):
    """Kept flags (n,) bool of the sorted boxes; segments from _segments (None: one segment)."""
    n = sorted_boxes.shape[0]
    segmented = segments is not None
    seg_start, seg_end, starts, num_seg = segments if segmented else (sorted_boxes,) * 4  # unread
    mask = torch.empty((n, words), dtype=torch.int64, device=sorted_boxes.device)
    removed = torch.zeros(n, dtype=torch.int64, device=sorted_boxes.device)
    kept = torch.zeros(n, dtype=torch.int8, device=sorted_boxes.device)
    block_r = BLOCK_R // 2 if sorted_boxes.dtype == torch.float64 else BLOCK_R
    with on_device(sorted_boxes):
        wrap_triton(_nms_mask_kernel)[(triton.cdiv(n, block_r), words)](
            sorted_boxes, seg_start, seg_end, mask, n, words, threshold, SEGMENTED=segmented,
            BLOCK_R=block_r, num_warps=8, enable_fp_fusion=False)
        wrap_triton(_nms_reduce_kernel)[(min(n, _REDUCE_PROGRAMS) if segmented else 1,)](
            mask, starts, seg_end, num_seg, removed, kept, n, words, SEGMENTED=segmented,
            BLOCK_W=min(BLOCK_W, triton.next_power_of_2(words)), num_warps=4, enable_fp_fusion=False)
    return kept.view(torch.bool)


def _grouped_order(scores, idxs):
    """(by_score, order, keys): indices by descending score (ties by index), and the same stably
    regrouped by idxs so that each group is a contiguous run in score order, with its keys."""
    by_score = torch.sort(scores, descending=True, stable=True).indices
    keys = idxs.index_select(0, by_score).to(torch.int64)
    keys, perm = torch.sort(keys, stable=True)
    return by_score, by_score.index_select(0, perm), keys


def _prepare(boxes, order, iou_threshold):
    """Boxes in `order`, contiguous in T, and the threshold as the largest T not above it."""
    acc = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    sorted_boxes = boxes.index_select(0, order).to(acc).contiguous()
    return sorted_boxes, threshold_as(iou_threshold, acc)


def _check(op, boxes, scores, idxs):
    """What would make the kernels read out of bounds (htc_fast/ops/nms.py checks the rest)."""
    if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(f"{op}: boxes must have shape (N, 4) and a float dtype, got "
                         f"{tuple(boxes.shape)} {boxes.dtype}")
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must be 1-D, got shape {tuple(scores.shape)}")
    if scores.shape[0] != boxes.shape[0]:
        raise ValueError(f"{op}: scores has {scores.shape[0]} entries for {boxes.shape[0]} boxes")
    if idxs is not None:
        if idxs.is_floating_point() or idxs.is_complex() or idxs.dtype == torch.bool:
            raise TypeError(f"{op}: idxs must be an integer tensor, got {idxs.dtype}")
        if idxs.shape != scores.shape:
            raise ValueError(f"{op}: idxs must have shape ({boxes.shape[0]},), got {tuple(idxs.shape)}")


def _check_capacity(max_output, max_group_size):
    for name, value in (("max_output", max_output), ("max_group_size", max_group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"batched_nms_padded_triton: {name} must be an int >= 0, got {value!r}")


def _dynamic_output(boxes):
    # Fake tensors (torch.compile, opcheck): the size is data-dependent.
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


@triton_op("htc_fast::nms_triton", mutates_args=())
def nms_triton(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS: boxes (N, 4) xyxy float, scores (N,) -> kept indices (K,) int64, by descending
    score (ties by index); equal to torchvision.ops.nms."""
    _check("nms_triton", boxes, scores, None)
    if is_fake(boxes):
        return _dynamic_output(boxes)
    if boxes.shape[0] == 0:
        return boxes.new_empty((0,), dtype=torch.long)
    order = torch.sort(scores, descending=True, stable=True).indices
    sorted_boxes, threshold = _prepare(boxes, order, iou_threshold)
    kept = _kept_sorted(sorted_boxes, None, triton.cdiv(boxes.shape[0], BITS), threshold)
    return order.masked_select(kept)


@triton_op("htc_fast::batched_nms_triton", mutates_args=())
def batched_nms_triton(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each value of idxs (N,) int, merged: kept indices (K,) int64 by descending score,
    ties by index; equal to a per-group loop of nms (boxes of different groups are never compared)."""
    _check("batched_nms_triton", boxes, scores, idxs)
    if is_fake(boxes):
        return _dynamic_output(boxes)
    if boxes.shape[0] == 0:
        return boxes.new_empty((0,), dtype=torch.long)
    by_score, order, keys = _grouped_order(scores, idxs)
    segments = _segments(keys)
    longest = int((segments[1] - segments[0]).max())  # host sync: the mask width
    sorted_boxes, threshold = _prepare(boxes, order, iou_threshold)
    kept = _kept_sorted(sorted_boxes, segments, triton.cdiv(longest, BITS), threshold)
    keep = torch.zeros_like(kept).index_put_((order,), kept)  # back to the original indices
    return by_score.masked_select(keep.index_select(0, by_score))


@triton_op("htc_fast::batched_nms_padded_triton", mutates_args=())
def batched_nms_padded_triton(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float,
                              max_output: int, max_group_size: int) -> tuple[Tensor, Tensor]:
    """batched_nms_triton at a fixed capacity, without a host sync: with K its result, returns
    keep (max_output,) int64 = K[:max_output] padded with -1, and num_kept, a 0-d int64 tensor
    min(len(K), max_output). max_group_size bounds the boxes of one group (it sizes the IoU mask);
    in a group larger than that, the boxes past the first max_group_size (by score) are dropped."""
    _check("batched_nms_padded_triton", boxes, scores, idxs)
    _check_capacity(max_output, max_group_size)
    n = boxes.shape[0]
    keep = torch.full((max_output,), -1, dtype=torch.long, device=boxes.device)
    num_kept = torch.zeros((), dtype=torch.long, device=boxes.device)
    if is_fake(boxes) or n == 0 or max_output == 0 or max_group_size == 0:
        return keep, num_kept
    by_score, order, keys = _grouped_order(scores, idxs)
    sorted_boxes, threshold = _prepare(boxes, order, iou_threshold)
    segments = _segments(keys)
    kept = _kept_sorted(sorted_boxes, segments, triton.cdiv(min(max_group_size, n), BITS), threshold)
    # The mask holds only a group's first max_group_size columns, so later boxes are never marked
    # removed: drop them here (they come last in their group, so they suppressed nothing earlier).
    rank = torch.arange(n, device=boxes.device) - segments[0]
    kept = kept & (rank < max_group_size)
    flags = torch.zeros_like(kept).index_put_((order,), kept).index_select(0, by_score)
    first = torch.sort((~flags).to(torch.uint8), stable=True).indices[:max_output]  # kept first
    num_kept = flags.sum(dtype=torch.long).clamp(max=max_output)
    slots = torch.arange(first.shape[0], device=boxes.device)
    keep[:first.shape[0]] = torch.where(slots < num_kept, by_score.index_select(0, first), -1)
    return keep, num_kept


def _opaque(mode, op, types, args, kwargs):
    # triton_op decomposes into its launches when AOTAutograd traces (torch.compile, opcheck); these
    # ops size their buffers and output from the data, so keep them whole: the fake gives the shape.
    return mode.__torch_dispatch__(op, types, args, kwargs)


for _op in (nms_triton, batched_nms_triton, batched_nms_padded_triton):
    _op.register_torch_dispatch(FunctionalTensorMode, _opaque)
