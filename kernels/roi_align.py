"""RoIAlign (single level and FPN multi-level) as Triton kernels, registered as ``htc_fast::*_triton``.

Owns the Triton forward/backward kernels and their ``torch.library.triton_op`` registration; their
autograd is registered by ``htc_fast/ops/roi_align.py`` when it loads this module (kernels import
nothing from ``htc_fast.ops``). Argument checking and the backend choice live in
``htc_fast/ops/roi_align.py``; the exact semantics (the spec every backend follows) in
``htc_fast/ops/reference/roi_align.py``.

Math (torchvision's RoIAlign, average pooling). RoI k = [b, x1, y1, x2, y2], scale s, off = 0.5 if
aligned else 0: start = x1*s - off, roi size = (x2 - x1)*s (>= 1 unless aligned), bin = size / P,
grid = sampling_ratio if > 0 else ceil(bin) (clamped to [0, 2^30]), count = max(grid_h*grid_w, 1).
Sample (iy, ix) of bin (py, px) sits at y = start_y + py*bin_h + (iy + .5)*bin_h/grid_h (same for x);
its value is the bilinear interpolation of the map (0 outside [-1, H] x [-1, W], clamped at the
border), and out = sum(values) / count. Backward scatters grad * w_tap / count to the 4 taps.
Multi-level: level = clamp(floor(log2(sqrt(w*h)/finest_scale + 1e-6)), 0, L-1), evaluated exactly
as the comparisons sqrt(w*h)/finest_scale + 1e-6 >= 2^l; a NaN value there gives a zero RoI.

Bounded work: each bin enumerates only the sample rows/columns whose coordinate can fall in
[-1, H] / [-1, W] (solved analytically, widened by 2 indices plus a rounding margin, clamped to the
grid) and tests the exact predicate per sample, so a 1e7-pixel RoI costs ~(H+2)(W+2) samples at most.

Grid mapping: one program per (RoI, output bin, block of BLOCK_C channels); axis 0 = k*PH*PW + bin
(neighbouring programs read neighbouring pixels), axis 1 = channel block. 512 RoIs x 7x7 bins is
25k programs, enough to fill the GPU at C=256, and the adaptive grid makes per-bin work uneven, which
small programs balance better than one program per RoI looping over its bins. The sample position and
the 4 bilinear weights are scalars computed once per sample and applied to the whole channel vector.
Program ids are cast to int64 before any offset arithmetic.

Memory layout: features are addressed through explicit (n, c, h, w) strides, so NCHW and
channels-last both work without a copy; channels-last is the fast one (the BLOCK_C loads of one tap
are contiguous). The output (K, C, PH, PW) is contiguous. Backward accumulates into a channels-last
zero buffer (coalesced atomics), converted at the end to a contiguous tensor of the grad's dtype.

Accumulation dtype T: float64 for float64 features, else float32 (fp16/bf16 loads are converted);
T is the rois' dtype, which the public API sets. fp32 divisions and square roots use the IEEE-rounded
tl.div_rn / tl.sqrt_rn (plain '/' is approximate on NVIDIA GPUs and ceil(roi/P) must be exact), and
the kernel is compiled with enable_fp_fusion=False: contracting the roi scaling x*s - off or the bin
start start + p*bin into one FMA rounds once instead of twice, and with a non-power-of-two scale
flips ceil(roi/P) for a few RoIs in 10^4 against the CPU (scripts/check_triton_compile.py rejects
any fma.rn in this kernel's PTX).

Determinism: the forward is deterministic; the backward uses tl.atomic_add, so the summation order
(and the last bits of the gradient) varies from run to run: it alerts (kernels/_determinism.py),
so torch.use_deterministic_algorithms(True) raises, as torchvision does.
"""
import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

from htc_fast.kernels._determinism import alert_not_deterministic
from htc_fast.kernels._device import on_device
from htc_fast.kernels._math import div_rn, sqrt_rn

__all__ = ["roi_align_triton", "roi_align_backward_triton", "multilevel_roi_align_triton",
           "multilevel_roi_align_backward_triton", "MAX_LEVELS"]

MAX_LEVELS = 5  # feature levels one launch handles (the kernel takes one argument group per level)
# Register ceiling checked by scripts/check_triton_compile.py: programs of <= 4 warps gathering
# scattered pixels want many resident warps; 80 registers keep >= 6 CTAs of 4 warps per SM
# (65536 / (80 * 128)). NO_FMA: kernels whose PTX must contain no fma.rn (exact roi geometry).
MAX_REGS = {"_roi_align_kernel": 80}
NO_FMA = ("_roi_align_kernel",)


@triton.jit
def _finite(x):
    """x is neither inf nor NaN (x - x would do, but warns in the interpreter)."""
    if x.dtype == tl.float32:
        big = 3.4028234663852886e38
    else:
        big = 1.7976931348623157e308
    return tl.abs(x) <= big


@triton.jit
def _sample_range(base, bin_size, grid, limit):
    """[lo, hi) of the sample indices i whose coordinate base + (i + .5) * bin_size / grid can lie
    in [-1, limit]; a conservative superset, clamped to [0, grid). All inputs are T scalars."""
    step = div_rn(bin_size, tl.maximum(grid, 1.0))  # grid == 0: no samples, hi is clamped to 0 below
    full = step == 0.0  # every sample at the same coordinate: test them all (grid = sampling_ratio)
    empty = ~(_finite(base) & (step == step))  # no sample can be inside
    base = tl.where(empty, 0.0, base)
    step = tl.where(full | empty, 1.0, step)
    if base.dtype == tl.float32:
        eps = 1.2e-7
    else:
        eps = 2.3e-16
    a = tl.minimum(tl.maximum(div_rn(-1.0 - base, step) - 0.5, -2.0), grid + 2.0)
    b = tl.minimum(tl.maximum(div_rn(limit - base, step) - 0.5, -2.0), grid + 2.0)
    # Rounding of the coordinate (relative to its magnitude) can move it by more than one index.
    slack = tl.minimum(2.0 + div_rn(4.0 * eps * (tl.abs(base) + limit + 1.0), tl.abs(step)), grid + 2.0)
    lo = tl.maximum(tl.floor(tl.minimum(a, b)) - slack, 0.0)
    hi = tl.minimum(tl.ceil(tl.maximum(a, b)) + slack + 1.0, grid)
    lo = tl.where(full | empty, 0.0, lo)
    hi = tl.where(empty, 0.0, tl.where(full, grid, hi))
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _axis_tap(v, size, size_f, zero):
    """Bilinear tap of coordinate v on an axis of `size` cells (torchvision's rules; the twin of
    axis_tap in csrc/roi_align/roi_align_common.h): (lo, hi, frac, valid). Invalid (outside
    [-1, size] or NaN) taps are masked by the caller."""
    valid = (v >= -1.0) & (v <= size_f)
    v = tl.where(valid, tl.maximum(v, 0.0), zero)
    lo = v.to(tl.int32)
    last = lo >= size - 1
    lo = tl.where(last, size - 1, lo)
    hi = tl.where(last, size - 1, lo + 1)
    frac = tl.where(last, zero, v - lo.to(v.dtype))
    return lo, hi, frac, valid


@triton.jit
def _choose(sel, f, H, W, sn, sc, sh, sw, s, f_l, H_l, W_l, sn_l, sc_l, sh_l, sw_l, s_l):
    """The level arguments (pointer, shape, strides, scale) of level l where sel, else the current."""
    return (tl.where(sel, f_l, f), tl.where(sel, H_l, H), tl.where(sel, W_l, W),
            tl.where(sel, sn_l, sn), tl.where(sel, sc_l, sc), tl.where(sel, sh_l, sh),
            tl.where(sel, sw_l, sw), tl.where(sel, tl.full([], s_l, s.dtype), s))


# Feature sizes change with every batch's padded image size; specialising on them (== 1, % 16) would
# compile a kernel variant per shape pattern.
_UNSPECIALIZED = [f"{p}{i}" for i in range(MAX_LEVELS) for p in ("H", "W", "sn", "sc", "sh", "sw")]
_UNSPECIALIZED += ["N", "sampling_ratio"]


@triton.jit(do_not_specialize=_UNSPECIALIZED)
def _roi_align_kernel(
    io_ptr, rois_ptr,
    f0, H0, W0, sn0, sc0, sh0, sw0, s0: "fp64",
    f1, H1, W1, sn1, sc1, sh1, sw1, s1: "fp64",
    f2, H2, W2, sn2, sc2, sh2, sw2, s2: "fp64",
    f3, H3, W3, sn3, sc3, sh3, sw3, s3: "fp64",
    f4, H4, W4, sn4, sc4, sh4, sw4, s4: "fp64",
    N, C, PH, PW, io_sk, io_sc, io_sh, io_sw, sampling_ratio, finest_scale: "fp64",
    ALIGNED: tl.constexpr, MULTILEVEL: tl.constexpr, NUM_LEVELS: tl.constexpr,
    BACKWARD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Forward (BACKWARD=False): io_ptr is the output (K, C, PH, PW); level l's f_l is read.
    Backward: io_ptr is grad_output (K, C, PH, PW); f_l is level l's T grad buffer (atomic adds).
    Per level: pointer, H, W, strides (n, c, h, w), spatial scale; only the first NUM_LEVELS are used.
    """
    pid = tl.program_id(0).to(tl.int64)
    k = pid // (PH * PW)
    py = (pid % (PH * PW)) // PW
    px = pid % PW
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C

    roi = rois_ptr + k * 5
    bf = tl.load(roi)
    x1 = tl.load(roi + 1)
    y1 = tl.load(roi + 2)
    x2 = tl.load(roi + 3)
    y2 = tl.load(roi + 4)
    T = x1.dtype
    # trunc(bf) lies in [0, N) exactly when -1 < bf < N (False for NaN).
    ok = _finite(x1) & _finite(y1) & _finite(x2) & _finite(y2)
    ok = ok & (bf > -1.0) & (bf < N)
    b = tl.where(ok, bf, 0.0).to(tl.int64)
    zero = tl.zeros([], T)

    lvl = tl.zeros([], tl.int32)
    if MULTILEVEL:
        area = (x2 - x1) * (y2 - y1)
        ok = ok & (area >= 0.0)  # log2 of a negative area is NaN (mmdetection matches no level)
        t = div_rn(sqrt_rn(tl.where(ok, area, zero)), tl.full([], finest_scale, T)) + tl.full([], 1e-6, T)
        thr = tl.full([], 2.0, T)
        for _ in tl.static_range(1, NUM_LEVELS):
            lvl += (t >= thr).to(tl.int32)
            thr = thr * 2.0
    f, H, W, sn, sc, sh, sw, s = f0, H0, W0, sn0, sc0, sh0, sw0, tl.full([], s0, T)
    if NUM_LEVELS > 1:
        f, H, W, sn, sc, sh, sw, s = _choose(lvl == 1, f, H, W, sn, sc, sh, sw, s,
                                             f1, H1, W1, sn1, sc1, sh1, sw1, s1)
    if NUM_LEVELS > 2:
        f, H, W, sn, sc, sh, sw, s = _choose(lvl == 2, f, H, W, sn, sc, sh, sw, s,
                                             f2, H2, W2, sn2, sc2, sh2, sw2, s2)
    if NUM_LEVELS > 3:
        f, H, W, sn, sc, sh, sw, s = _choose(lvl == 3, f, H, W, sn, sc, sh, sw, s,
                                             f3, H3, W3, sn3, sc3, sh3, sw3, s3)
    if NUM_LEVELS > 4:
        f, H, W, sn, sc, sh, sw, s = _choose(lvl == 4, f, H, W, sn, sc, sh, sw, s,
                                             f4, H4, W4, sn4, sc4, sh4, sw4, s4)
    ok = ok & (H > 0) & (W > 0)

    # RoI geometry in T, in torchvision's operation order.
    if ALIGNED:
        off = 0.5
    else:
        off = 0.0
    start_w = tl.where(ok, x1, zero) * s - off
    start_h = tl.where(ok, y1, zero) * s - off
    roi_w = (tl.where(ok, x2, zero) * s - off) - start_w
    roi_h = (tl.where(ok, y2, zero) * s - off) - start_h
    if not ALIGNED:
        roi_w = tl.maximum(roi_w, 1.0)
        roi_h = tl.maximum(roi_h, 1.0)
    bin_w = div_rn(roi_w, tl.full([], PW, T))
    bin_h = div_rn(roi_h, tl.full([], PH, T))
    sr = tl.full([], sampling_ratio, T)
    grid_h = tl.where(sampling_ratio > 0, sr, tl.ceil(bin_h))
    grid_w = tl.where(sampling_ratio > 0, sr, tl.ceil(bin_w))
    grid_h = tl.where(ok & (grid_h == grid_h), tl.minimum(tl.maximum(grid_h, 0.0), 1073741824.0), zero)
    grid_w = tl.where(ok & (grid_w == grid_w), tl.minimum(tl.maximum(grid_w, 0.0), 1073741824.0), zero)
    count = tl.maximum(grid_h * grid_w, 1.0)
    Hf = tl.full([], H, T)
    Wf = tl.full([], W, T)
    base_y = start_h + tl.full([], py, T) * bin_h
    base_x = start_w + tl.full([], px, T) * bin_w
    y_lo_i, y_hi_i = _sample_range(base_y, bin_h, grid_h, Hf)
    x_lo_i, x_hi_i = _sample_range(base_x, bin_w, grid_w, Wf)

    io_off = k * io_sk + c * io_sc + py * io_sh + px * io_sw
    fc = f + b * sn + c * sc  # per-channel base pointers into image b of the level
    if BACKWARD:
        g = div_rn(tl.load(io_ptr + io_off, mask=cmask, other=0.0).to(T), tl.zeros([BLOCK_C], T) + count)
    acc = tl.zeros([BLOCK_C], T)
    for iy in range(y_lo_i, y_hi_i):
        yl, yh, ly, in_y = _axis_tap(base_y + div_rn((iy + 0.5) * bin_h, grid_h), H, Hf, zero)
        hy = 1.0 - ly
        row_l = yl.to(tl.int64) * sh
        row_h = yh.to(tl.int64) * sh
        for ix in range(x_lo_i, x_hi_i):
            xl, xh, lx, in_x = _axis_tap(base_x + div_rn((ix + 0.5) * bin_w, grid_w), W, Wf, zero)
            hx = 1.0 - lx
            col_l = xl.to(tl.int64) * sw
            col_h = xh.to(tl.int64) * sw
            m = tl.where(in_y & in_x, cmask, False)  # (not cmask & scalar: the interpreter mis-splats it)
            w1 = hy * hx
            w2 = hy * lx
            w3 = ly * hx
            w4 = ly * lx
            if BACKWARD:
                tl.atomic_add(fc + row_l + col_l, g * w1, mask=m, sem="relaxed")
                tl.atomic_add(fc + row_l + col_h, g * w2, mask=m, sem="relaxed")
                tl.atomic_add(fc + row_h + col_l, g * w3, mask=m, sem="relaxed")
                tl.atomic_add(fc + row_h + col_h, g * w4, mask=m, sem="relaxed")
            else:
                v1 = tl.load(fc + row_l + col_l, mask=m, other=0.0).to(T)
                v2 = tl.load(fc + row_l + col_h, mask=m, other=0.0).to(T)
                v3 = tl.load(fc + row_h + col_l, mask=m, other=0.0).to(T)
                v4 = tl.load(fc + row_h + col_h, mask=m, other=0.0).to(T)
                acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
    if not BACKWARD:
        out = div_rn(acc, tl.zeros([BLOCK_C], T) + count)
        tl.store(io_ptr + io_off, out.to(io_ptr.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------ launching

_INTERPRETED = not isinstance(_roi_align_kernel, triton.runtime.JITFunction)  # TRITON_INTERPRET=1


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _launch(io, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned,
            finest_scale, multilevel, backward):
    """One launch of _roi_align_kernel over (K * PH * PW, C / BLOCK_C) programs."""
    if _INTERPRETED and is_fake(io):
        # Tracing (torch.compile, opcheck) runs the op on fake tensors. wrap_triton turns a compiled
        # kernel into a graph node there, but hands an interpreted one (TRITON_INTERPRET=1) back
        # unwrapped, and the interpreter would read the fake data: the shapes are all tracing needs.
        return
    n, c = levels[0].shape[0], levels[0].shape[1]
    block_c = min(128, max(16, triton.next_power_of_2(c)))
    level_args = []
    for i in range(MAX_LEVELS):  # unused slots repeat the last level; the kernel never reads them
        j = min(i, len(levels) - 1)
        t = levels[j]
        level_args += [t, t.shape[2], t.shape[3], *t.stride(), float(scales[j])]
    grid = (rois.shape[0] * pooled_height * pooled_width, triton.cdiv(c, block_c))
    with on_device(io):
        wrap_triton(_roi_align_kernel)[grid](
            io, rois, *level_args, n, c, pooled_height, pooled_width, *io.stride(), sampling_ratio,
            float(finest_scale), ALIGNED=bool(aligned), MULTILEVEL=multilevel, NUM_LEVELS=len(levels),
            BACKWARD=backward, BLOCK_C=block_c, num_warps=max(1, min(4, block_c // 32)),
            maxnreg=MAX_REGS["_roi_align_kernel"],  # left alone, ptxas spills fp64 at 64 registers
            enable_fp_fusion=False)  # x*s - off and start + p*bin must round twice, as on the CPU


def _output(k, like, pooled_height, pooled_width):
    """The (K, C, PH, PW) tensor the forward kernel writes. The interpreter (TRITON_INTERPRET=1)
    truncates fp32 -> bf16 casts (GPUs round to nearest even); there bf16
    results are written in fp32 and rounded by torch, so CI checks the rounding the GPU does."""
    dtype = torch.float32 if like.dtype == torch.bfloat16 and _INTERPRETED else like.dtype
    return torch.empty((k, like.shape[1], pooled_height, pooled_width), dtype=dtype, device=like.device)


def _grad_buffer(n, c, h, w, grad):
    """Zero (N, C, H, W) accumulator in T, channels-last so one tap's BLOCK_C atomics are contiguous."""
    return torch.zeros((n, h, w, c), dtype=_acc_dtype(grad.dtype), device=grad.device).permute(0, 3, 1, 2)


def _prepare_rois(rois, dtype, op):
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"{op}: rois must have shape (K, 5), got {tuple(rois.shape)}")
    return rois.to(_acc_dtype(dtype)).contiguous()


def _check_levels(n_levels, n_scales, op):
    if not 1 <= n_levels <= MAX_LEVELS:
        raise ValueError(f"{op}: supports 1 to {MAX_LEVELS} feature levels in one launch, got {n_levels}")
    if n_scales != n_levels:
        raise ValueError(f"{op}: got {n_levels} levels but {n_scales} spatial_scales")


@triton_op("htc_fast::roi_align_triton", mutates_args=())
def roi_align_triton(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                     pooled_width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign of (N, C, H, W) features (any strides) at (K, 5) rois -> (K, C, PH, PW), input.dtype."""
    rois = _prepare_rois(rois, input.dtype, "roi_align_triton")
    k, c = rois.shape[0], input.shape[1]
    if k == 0 or c == 0 or input.numel() == 0:
        return input.new_zeros((k, c, pooled_height, pooled_width))
    out = _output(k, input, pooled_height, pooled_width)
    _launch(out, rois, [input], [spatial_scale], pooled_height, pooled_width, sampling_ratio, aligned,
            1.0, multilevel=False, backward=False)
    return out.to(input.dtype)


@triton_op("htc_fast::roi_align_backward_triton", mutates_args=())
def roi_align_backward_triton(grad: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int,
                              pooled_width: int, batch_size: int, channels: int, height: int,
                              width: int, sampling_ratio: int, aligned: bool) -> Tensor:
    """Gradient w.r.t. the input: grad (K, C, PH, PW) -> contiguous (N, C, H, W) in grad.dtype."""
    alert_not_deterministic("roi_align_backward_triton")  # atomic adds (as torchvision)
    rois = _prepare_rois(rois, grad.dtype, "roi_align_backward_triton")
    shape = (batch_size, channels, height, width)
    if rois.shape[0] == 0 or grad.numel() == 0 or batch_size * channels * height * width == 0:
        return grad.new_zeros(shape)
    buf = _grad_buffer(batch_size, channels, height, width, grad)
    _launch(grad, rois, [buf], [spatial_scale], pooled_height, pooled_width, sampling_ratio, aligned,
            1.0, multilevel=False, backward=True)
    return buf.to(grad.dtype, memory_format=torch.contiguous_format)


@triton_op("htc_fast::multilevel_roi_align_triton", mutates_args=())
def multilevel_roi_align_triton(features: list[Tensor], rois: Tensor, spatial_scales: list[float],
                                pooled_height: int, pooled_width: int, sampling_ratio: int,
                                aligned: bool, finest_scale: float) -> Tensor:
    """FPN RoIAlign: L <= MAX_LEVELS maps (N, C, H_l, W_l), (K, 5) rois -> (K, C, PH, PW); each RoI
    is pooled from its level (chosen in the kernel), rows in rois order."""
    _check_levels(len(features), len(spatial_scales), "multilevel_roi_align_triton")
    rois = _prepare_rois(rois, features[0].dtype, "multilevel_roi_align_triton")
    k, c = rois.shape[0], features[0].shape[1]
    if k == 0 or all(f.numel() == 0 for f in features):  # a level with H or W = 0 pools zeros
        return features[0].new_zeros((k, c, pooled_height, pooled_width))
    out = _output(k, features[0], pooled_height, pooled_width)
    _launch(out, rois, list(features), spatial_scales, pooled_height, pooled_width, sampling_ratio,
            aligned, finest_scale, multilevel=True, backward=False)
    return out.to(features[0].dtype)


@triton_op("htc_fast::multilevel_roi_align_backward_triton", mutates_args=())
def multilevel_roi_align_backward_triton(grad: Tensor, rois: Tensor, spatial_scales: list[float],
                                         pooled_height: int, pooled_width: int, heights: list[int],
                                         widths: list[int], batch_size: int, channels: int,
                                         sampling_ratio: int, aligned: bool,
                                         finest_scale: float) -> list[Tensor]:
    """Gradient w.r.t. each level: grad (K, C, PH, PW) -> L contiguous (N, C, H_l, W_l), grad.dtype."""
    alert_not_deterministic("multilevel_roi_align_backward_triton")  # atomic adds
    _check_levels(len(heights), len(spatial_scales), "multilevel_roi_align_backward_triton")
    if len(widths) != len(heights):
        raise ValueError(f"multilevel_roi_align_backward_triton: {len(heights)} heights, {len(widths)} widths")
    rois = _prepare_rois(rois, grad.dtype, "multilevel_roi_align_backward_triton")
    bufs = [_grad_buffer(batch_size, channels, h, w, grad) for h, w in zip(heights, widths)]
    if rois.shape[0] > 0 and grad.numel() > 0 and any(b.numel() > 0 for b in bufs):
        _launch(grad, rois, bufs, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
                finest_scale, multilevel=True, backward=True)
    return [b.to(grad.dtype, memory_format=torch.contiguous_format) for b in bufs]


# ------------------------------------------------------------------------------------- autograd

# Autograd: the same glue as the C++ operators, with the Triton backward kernels, registered by
# htc_fast.ops.roi_align when it loads this module (imports run ops -> kernels only).

if _INTERPRETED:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    def _opaque(mode, op, types, args, kwargs):
        # triton_op decomposes into its kernel launches when AOTAutograd traces (torch.compile,
        # opcheck); an interpreted launch cannot be captured (see _launch), so keep the op whole.
        return mode.__torch_dispatch__(op, types, args, kwargs)

    for _op in (roi_align_triton, roi_align_backward_triton, multilevel_roi_align_triton,
                multilevel_roi_align_backward_triton):
        _op.register_torch_dispatch(FunctionalTensorMode, _opaque)
