"""RoIAlign (Mask R-CNN, He et al. 2017), single level and FPN multi-level: public API.

Owns argument checking, the backend choice, and what torch needs to know about the compiled
operators ``htc_fast::roi_align`` / ``htc_fast::multilevel_roi_align`` (fake kernels for
``torch.compile``, autograd, autocast). The math lives in ``reference/roi_align.py`` (the spec),
``csrc/roi_align/`` (C++/CUDA) and ``kernels/roi_align.py`` (Triton).

Autocast rule: RoIAlign runs in the dtype of its features (fp32, fp16 and bf16 kernels all
accumulate in fp32) and never casts them; rois/boxes are geometry and stay float32 (float64 for
float64 features). The autocast kernels below make that explicit for code that calls the
operators directly under ``torch.autocast``.

TorchScript: the public function is not scriptable (keyword-only ``backend=``, Python-level
checks); use ``torch.compile`` or ``torch.export``, which trace through the registered operators.
"""
import functools

import torch
from torch import Tensor

from htc_fast import _extension
from htc_fast.ops import _backend, _checks, _debug
from htc_fast.ops._errors import OpArgumentError, OpTypeError, RoiBoxesError, RoiBoxesTypeError
from htc_fast.ops.reference import roi_align as _ref

__all__ = ["roi_align", "multilevel_roi_align", "map_roi_levels", "MAX_LEVELS", "MAX_SAMPLING_RATIO",
           "MAX_OUTPUT_SIZE"]

# FPN levels one call accepts, on every backend (the Triton kernel takes one argument group per
# level and has 5; the C++ kernels 8): HTC uses 4 (P2-P5), RetinaNet-style heads 5.
MAX_LEVELS = 5
# Samples per bin side. 64 (4096 samples per bin) is far past any use (mmdetection: 0 or 2); the
# bound refuses values that would run for minutes and then fail to allocate.
MAX_SAMPLING_RATIO = 64
# Output bins per side: RoI heads use 7 to 28; the bound turns an absurd size into an error that
# names output_size instead of an overflow or a failed allocation.
MAX_OUTPUT_SIZE = 4096


def roi_align(input, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, *,
              backend=None):
    """Average-pooled RoIAlign; a drop-in for ``torchvision.ops.roi_align``.

    Args:
        input: (N, C, H, W) float32/float64/float16/bfloat16 features, contiguous or channels-last.
        boxes: (K, 5) float rois ``[batch_index, x1, y1, x2, y2]`` in input-image pixels, or a list
            of N tensors (L_i, 4) of xyxy boxes, one per image.
        output_size: int or (out_h, out_w), ints in [1, 4096] (``MAX_OUTPUT_SIZE``).
        spatial_scale: features-per-pixel, 1/stride: a positive, finite number.
        sampling_ratio: samples per bin side, an int <= 64 (``MAX_SAMPLING_RATIO``); <= 0 means
            ``ceil(roi_size / output_size)`` per RoI.
        aligned: (bool) shift rois by -0.5 feature pixels (pixel-centre model); mmcv/mmdet use True.
        backend: "reference", "cpp" or "triton"; None uses ``use_backend`` / the default table.

    Returns:
        (K, C, out_h, out_w) in ``input.dtype``, contiguous. Differentiable w.r.t. ``input`` only.
        A RoI with a non-finite coordinate, or whose batch index is outside [0, N) or NaN, gives
        zeros; a fractional batch index is truncated toward zero (``debug_checks()`` rejects both).
        Malformed boxes raise ``RoiBoxesError`` (also an AssertionError, as torchvision's).
    """
    where = "roi_align"
    out_h, out_w = _output_size(where, output_size)
    _check_features(where, input, "input")
    spatial_scale = _checks.real(where, "spatial_scale", spatial_scale, positive=True, finite=True)
    sampling_ratio, aligned = _sampling(where, sampling_ratio, aligned)
    rois = _as_rois(where, boxes, input)
    _check_rois(rois, input.shape[0])
    chosen = _backend.resolve("roi_align", input.device.type, backend)
    if chosen == "reference":
        return _ref.roi_align(input, rois, spatial_scale, out_h, out_w, sampling_ratio, aligned)
    op = torch.ops.htc_fast.roi_align if chosen == "cpp" else _triton().roi_align_triton
    return op(input, rois, spatial_scale, out_h, out_w, sampling_ratio, aligned)


def multilevel_roi_align(features, rois, output_size, *, strides=(4, 8, 16, 32), finest_scale=56,
                         sampling_ratio=0, aligned=True, backend=None):
    """FPN RoI feature extractor in one call (mmdetection's ``SingleRoIExtractor``).

    Each RoI is pooled from level ``clamp(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, L-1)``
    (see ``map_roi_levels``) with ``spatial_scale = 1 / strides[level]``. The level is chosen on the
    device inside the kernel: no per-level Python loop, no host synchronisation.

    Args:
        features: L tensors (N, C, H_l, W_l) of one dtype and device (e.g. FPN P2..P5).
        rois: (K, 5) float rois ``[batch_index, x1, y1, x2, y2]`` in image pixels.
        output_size: int or (out_h, out_w).
        strides: L level strides in pixels (``len(strides) == len(features)``), 1 <= L <= 5
            (``MAX_LEVELS``, the same on every backend).
        finest_scale, sampling_ratio, aligned: as in mmdetection (defaults are HTC's).
        backend: as in ``roi_align``.

    Returns:
        (K, C, out_h, out_w) in the features' dtype, rows in the order of ``rois``.
    """
    where = "multilevel_roi_align"
    out_h, out_w = _output_size(where, output_size)
    if not isinstance(features, (list, tuple)):
        raise OpTypeError(f"{where}: features must be a list of L tensors (N, C, H_l, W_l), got "
                          f"{_checks.describe(features)}")
    if not 1 <= len(features) <= MAX_LEVELS:
        raise OpArgumentError(f"{where}: features must hold 1 to {MAX_LEVELS} levels (every backend's "
                              f"limit), got {len(features)}")
    if not isinstance(strides, (list, tuple)) or len(strides) != len(features):
        raise OpArgumentError(f"{where}: got {len(features)} feature levels but strides "
                              f"{_checks.describe(strides)}; pass one stride per level")
    for i, f in enumerate(features):
        _check_features(where, f, f"features[{i}]")
        if f.dtype != features[0].dtype or f.device != features[0].device:
            raise OpArgumentError(f"{where}: features[{i}] is {f.dtype} on {f.device}, "
                                  f"features[0] is {features[0].dtype} on {features[0].device}")
        if f.shape[:2] != features[0].shape[:2]:
            raise OpArgumentError(f"{where}: features[{i}] has (N, C) = {tuple(f.shape[:2])}, "
                                  f"features[0] has {tuple(features[0].shape[:2])}")
    strides = [_checks.real(where, f"strides[{i}]", s, positive=True, finite=True) for i, s in enumerate(strides)]
    finest_scale = _checks.real(where, "finest_scale", finest_scale, positive=True, finite=True)
    sampling_ratio, aligned = _sampling(where, sampling_ratio, aligned)
    rois = _as_rois(where, rois, features[0])
    _check_rois(rois, features[0].shape[0])
    scales = [1.0 / float(s) for s in strides]
    chosen = _backend.resolve("multilevel_roi_align", features[0].device.type, backend)
    args = (rois, scales, out_h, out_w, sampling_ratio, aligned, finest_scale)
    if chosen == "reference":
        return _ref.multilevel_roi_align(features, *args)
    op = (torch.ops.htc_fast.multilevel_roi_align if chosen == "cpp"
          else _triton().multilevel_roi_align_triton)
    return op(features, *args)


def map_roi_levels(rois, num_levels, finest_scale=56):
    """The FPN level of each RoI, as mmdetection maps it. (K, 5) float -> (K,) int64 in
    [0, num_levels) (-1 for a RoI of NaN size)."""
    where = "map_roi_levels"
    _checks.tensor(where, "rois", rois, dim=2, floating=True)
    if rois.shape[1] != 5:
        raise RoiBoxesError(f"{where}: rois must have shape (K, 5), got {tuple(rois.shape)}")
    num_levels = _checks.integer(where, "num_levels", num_levels, minimum=1)
    finest_scale = _checks.real(where, "finest_scale", finest_scale, positive=True, finite=True)
    return _ref.map_roi_levels(rois, num_levels, finest_scale)


# ----------------------------------------------------------------------------- argument checks

def _output_size(where, output_size):
    out_h, out_w = _checks.pair(where, "output_size", output_size, minimum=1)
    if max(out_h, out_w) > MAX_OUTPUT_SIZE:
        raise OpArgumentError(f"{where}: output_size must be at most {MAX_OUTPUT_SIZE} per side, got "
                              f"({out_h}, {out_w})")
    return out_h, out_w


def _check_features(where, x, name):
    _checks.tensor(where, name, x, dim=4, floating=True)


def _sampling(where, sampling_ratio, aligned):
    """(sampling_ratio, aligned) checked: an int <= MAX_SAMPLING_RATIO and a bool."""
    sampling_ratio = _checks.integer(where, "sampling_ratio", sampling_ratio, maximum=MAX_SAMPLING_RATIO)
    if not isinstance(aligned, bool):
        raise OpTypeError(f"{where}: aligned must be a bool, got {_checks.describe(aligned)}")
    return sampling_ratio, aligned


def _as_rois(where, boxes, like):
    """(K, 5) rois from a (K, 5) tensor or a list of per-image (L, 4) boxes; geometry dtype.
    Malformed boxes raise RoiBoxesError / RoiBoxesTypeError (torchvision asserts on these)."""
    geometry = _geometry_dtype(like)
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            _check_boxes(where, f"boxes[{i}]", b, like, "a Tensor of shape (L, 4)", 4)
        if len(boxes) == 0:
            return torch.zeros(0, 5, dtype=geometry, device=like.device)
        ids = torch.cat([torch.full((len(b), 1), i, dtype=geometry, device=b.device)
                         for i, b in enumerate(boxes)])
        boxes = torch.cat([ids, torch.cat([b.to(geometry) for b in boxes])], dim=1)
    _check_boxes(where, "boxes/rois", boxes, like,
                 "a Tensor (K, 5) [batch_index, x1, y1, x2, y2] or a list of Tensors (L, 4)", 5)
    return boxes.to(geometry).contiguous()


def _check_boxes(where, name, b, like, expected, columns):
    if not isinstance(b, Tensor):
        raise RoiBoxesTypeError(f"{where}: {name} must be {expected}, got {_checks.describe(b)}")
    if b.dim() != 2 or b.shape[1] != columns:
        raise RoiBoxesError(f"{where}: {name} must be {expected}, got shape {tuple(b.shape)}")
    _checks.tensor(where, name, b, floating=True)
    _checks.same_device(where, "the features", like, **{name: b})


def _geometry_dtype(features):
    # Boxes stay fp32 under AMP; fp64 features get fp64 geometry (for gradcheck and oracles).
    return torch.float64 if features.dtype == torch.float64 else torch.float32


def _check_rois(rois, batch_size):
    """Debug check (``htc_fast.ops.debug_checks``; one host sync): batch indices are integers in
    [0, N). Without it a fractional index is truncated toward zero and an index outside [0, N)
    (or NaN) pools zeros, on every backend."""
    if not _debug.enabled():
        return
    idx = rois[:, 0]
    _debug.check((idx < 0) | (idx >= batch_size) | (idx != idx.floor()),
                 lambda i: f"rois[{i}, 0] = {idx[i].item()} is not a batch index in [0, {batch_size}) "
                           "(debug check)")


@functools.cache
def _triton():
    """The Triton kernels module; its operators get this module's autograd on first load (kernels
    import nothing from htc_fast.ops, so the registration lives here, once)."""
    from htc_fast.kernels import roi_align as triton_roi_align

    register_roi_align_autograd(triton_roi_align.roi_align_triton, triton_roi_align.roi_align_backward_triton)
    register_multilevel_autograd(triton_roi_align.multilevel_roi_align_triton,
                                 triton_roi_align.multilevel_roi_align_backward_triton)
    return triton_roi_align


# ----------------------------------------------------------------- registration of the C++ ops

def _fake_roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


def _fake_roi_align_backward(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size,
                             channels, height, width, sampling_ratio, aligned):
    return grad.new_empty((batch_size, channels, height, width))


def _fake_multilevel(features, rois, spatial_scales, pooled_height, pooled_width, sampling_ratio,
                     aligned, finest_scale):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))


def _fake_multilevel_backward(grad, rois, spatial_scales, pooled_height, pooled_width, heights, widths,
                              batch_size, channels, sampling_ratio, aligned, finest_scale):
    return [grad.new_empty((batch_size, channels, h, w)) for h, w in zip(heights, widths)]


def _setup_roi_align(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, *input.shape, sampling_ratio, aligned)


def _setup_multilevel(ctx, inputs, output):
    features, rois, scales, ph, pw, sampling_ratio, aligned, finest_scale = inputs
    ctx.save_for_backward(rois)
    ctx.args = (scales, ph, pw, [f.shape[2] for f in features], [f.shape[3] for f in features],
                features[0].shape[0], features[0].shape[1], sampling_ratio, aligned, finest_scale)


def register_roi_align_autograd(forward_op, backward_op):
    """Autograd for a roi_align operator (C++ or Triton): grad w.r.t. the features via `backward_op`,
    which takes the arguments of ``htc_fast::roi_align_backward``; rois get no gradient."""
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        return backward_op(grad.contiguous(), rois, *ctx.args), None, None, None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_roi_align)


def register_multilevel_autograd(forward_op, backward_op):
    """As ``register_roi_align_autograd``, for a multilevel_roi_align operator (one grad per level)."""
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        grads = backward_op(grad.contiguous(), rois, *ctx.args)
        return list(grads), None, None, None, None, None, None, None

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_multilevel)


_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))


def autocast_kernel(op_name):
    """The Autocast{CPU,CUDA} kernel of ``htc_fast::<op_name>``, a roi_align or multilevel_roi_align
    operator (C++ or Triton): the rule of the module docstring (features keep their dtype, rois
    are geometry), then the operator below autocast."""
    def kernel(features, rois, *args):
        like = features[0] if isinstance(features, (list, tuple)) else features
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return getattr(torch.ops.htc_fast, op_name)(features, rois.to(_geometry_dtype(like)), *args)

    return kernel


def _register():
    lib = "htc_fast::"
    torch.library.register_fake(lib + "roi_align", _fake_roi_align)
    torch.library.register_fake(lib + "roi_align_backward", _fake_roi_align_backward)
    torch.library.register_fake(lib + "multilevel_roi_align", _fake_multilevel)
    torch.library.register_fake(lib + "multilevel_roi_align_backward", _fake_multilevel_backward)
    register_roi_align_autograd(lib + "roi_align", torch.ops.htc_fast.roi_align_backward)
    register_multilevel_autograd(lib + "multilevel_roi_align", torch.ops.htc_fast.multilevel_roi_align_backward)


# The autocast kernels of the C++ and the Triton operators, registered by name (a kernel may precede
# its schema: htc_fast.kernels defines the Triton ones later, and _C may be missing); the library
# object must stay alive: dropping it unregisters its kernels.
_autocast_lib = torch.library.Library("htc_fast", "IMPL")
for _name in (["roi_align", "multilevel_roi_align"] if _extension.loaded else []) + \
        ["roi_align_triton", "multilevel_roi_align_triton"]:
    for _key in ("AutocastCPU", "AutocastCUDA"):
        _autocast_lib.impl(_name, autocast_kernel(_name), _key)
if _extension.loaded:
    _register()
