"""Deformable convolution v1 and modulated v2: public API.

Owns argument checking, the backend choice, and what torch needs to know about the compiled
operator ``htc_fast::deform_conv2d`` (fake kernels for ``torch.compile``, autograd, autocast). The
math lives in ``reference/deform_conv.py`` (the spec), ``csrc/deform_conv/`` (C++/CUDA) and
``kernels/deform_conv.py`` (Triton).

Autocast rule: like a convolution, the op runs in the autocast dtype (input, weight and bias are
cast; the kernels accumulate in fp32), while offsets and masks are geometry and stay float32
(float64 beside float64 features).

TorchScript: the public function is not scriptable (keyword-only ``backend=``, Python-level
checks); use ``torch.compile`` or ``torch.export``, which trace through the registered operators.
"""
import functools

import torch
from torch import Tensor

from htc_fast import _extension
from htc_fast.ops import _backend, _checks
from htc_fast.ops._errors import OpArgumentError, OpTypeError
from htc_fast.ops.reference import deform_conv as _ref

__all__ = ["deform_conv2d"]


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                  mask=None, *, backend=None):
    """Deformable 2-D convolution; a drop-in for ``torchvision.ops.deform_conv2d``.

    Args:
        input: (N, C, H, W) float32/float64/float16/bfloat16.
        offset: (N, 2 * dg * kh * kw, Ho, Wo): for offset group g and tap k = i * kw + j, channel
            (g * kh * kw + k) * 2 is the y offset and the next one the x offset, in input pixels.
            dg (offset groups) is inferred from the channel count; C must be divisible by it.
        weight: (Co, C / groups, kh, kw), same dtype as input; groups is inferred as
            C // weight.shape[1].
        bias: (Co,) or None.
        stride, padding, dilation: int or (h, w).
        mask: (N, dg * kh * kw, Ho, Wo) modulation (DCNv2, already sigmoid-ed) or None (DCNv1).
        backend: "reference", "cpp" or "triton"; None uses ``use_backend`` / the default table.

    Returns:
        (N, Co, Ho, Wo) in input's dtype, with Ho = (H + 2 * pad_h - dil_h * (kh - 1) - 1) // stride_h + 1
        (Wo likewise). Differentiable w.r.t. input, offset, mask, weight and bias. A sample whose
        position is outside the map (or not finite) reads 0. Under ``torch.autocast`` input, weight
        and bias are first cast to the autocast dtype (module docstring), so the output is in it.
    """
    where = "deform_conv2d"
    stride = _checks.pair(where, "stride", stride, minimum=1)
    padding = _checks.pair(where, "padding", padding, minimum=0)
    dilation = _checks.pair(where, "dilation", dilation, minimum=1)
    input, weight, bias = _autocast_features(input, weight, bias)
    groups, offset_groups = _check(input, offset, weight, bias, mask, stride, padding, dilation)
    geometry = torch.float64 if input.dtype == torch.float64 else torch.float32
    offset = offset.to(geometry)
    mask = None if mask is None else mask.to(geometry)
    bias = None if bias is None else bias.contiguous()  # (Co,): the Triton kernel reads it densely
    chosen = _backend.resolve("deform_conv2d", input.device.type, backend)
    args = (*stride, *padding, *dilation, groups, offset_groups)
    if chosen == "reference":
        return _ref.deform_conv2d(input, weight, offset, mask, bias, stride, padding, dilation,
                                  groups, offset_groups)
    op = torch.ops.htc_fast.deform_conv2d if chosen == "cpp" else _triton().deform_conv2d_triton
    return op(input, weight, offset, mask, bias, *args)


def _autocast_features(input, weight, bias):
    """The autocast rule applied before the checks (they would otherwise see bf16 activations
    beside fp32 weights, the normal state under AMP): input, weight and bias in the autocast
    dtype, unless the input is float64 (autocast leaves float64 alone, as for convolutions)."""
    if not isinstance(input, Tensor) or input.device.type not in ("cpu", "cuda") \
            or not torch.is_autocast_enabled(input.device.type) or input.dtype == torch.float64:
        return input, weight, bias
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(input), cast(weight), cast(bias)


# ----------------------------------------------------------------------------- argument checks

def _check(input, offset, weight, bias, mask, stride, padding, dilation):
    """Validate types, shapes, devices, then dtypes (torchvision's order: a wrong size is
    reported before a dtype mismatch); return (groups, offset_groups)."""
    where = "deform_conv2d"
    _checks.tensor(where, "input", input, dim=4, floating=True)
    _checks.tensor(where, "offset", offset, dim=4, floating=True)
    _checks.tensor(where, "weight", weight, dim=4, floating=True)
    if mask is not None:
        _checks.tensor(where, "mask", mask, dim=4, floating=True)
    if bias is not None:
        _checks.tensor(where, "bias", bias, dim=1, floating=True)
    _checks.same_device(where, "input", input, offset=offset, weight=weight, mask=mask, bias=bias)
    n, c, h, w = input.shape
    co, cg, kh, kw = weight.shape
    if min(cg, kh, kw, co) <= 0 or c % cg != 0:
        raise OpArgumentError(f"{where}: input has {c} channels, which weight of shape "
                              f"{tuple(weight.shape)} (Co, C/groups, kh, kw) does not divide into groups")
    groups = c // cg
    if co % groups != 0:
        raise OpArgumentError(f"{where}: weight has {co} output channels, not divisible by "
                              f"groups = {groups} (input channels {c} / weight.shape[1] {cg})")
    taps = kh * kw
    if offset.shape[1] == 0 or offset.shape[1] % (2 * taps) != 0:
        raise OpArgumentError(f"{where}: offset must have 2 * offset_groups * kh * kw channels "
                              f"(a multiple of {2 * taps}), got {offset.shape[1]}")
    offset_groups = offset.shape[1] // (2 * taps)
    if c % offset_groups != 0:
        raise OpArgumentError(f"{where}: input channels ({c}) must be divisible by the offset "
                              f"groups ({offset_groups}, from offset's {offset.shape[1]} channels)")
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if ho <= 0 or wo <= 0:
        raise OpArgumentError(f"{where}: the output would be empty ({ho} x {wo}) for input "
                              f"{h} x {w}, kernel {kh} x {kw}, stride {stride}, padding {padding}, "
                              f"dilation {dilation}")
    if tuple(offset.shape) != (n, offset.shape[1], ho, wo):
        raise OpArgumentError(f"{where}: offset must have shape (N, 2*dg*kh*kw, Ho, Wo) = "
                              f"({n}, {offset.shape[1]}, {ho}, {wo}), got {tuple(offset.shape)}")
    if mask is not None and tuple(mask.shape) != (n, offset_groups * taps, ho, wo):
        raise OpArgumentError(f"{where}: mask must have shape (N, dg*kh*kw, Ho, Wo) = "
                              f"({n}, {offset_groups * taps}, {ho}, {wo}), got {tuple(mask.shape)}")
    if bias is not None and bias.shape[0] != co:
        raise OpArgumentError(f"{where}: bias must have shape ({co},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise OpTypeError(f"{where}: {name} is {t.dtype} but input is {input.dtype}; cast them to "
                              "one dtype (or use torch.autocast)")
    return groups, offset_groups


@functools.cache
def _triton():
    """The Triton kernels module; its operator gets this module's autograd on first load (kernels
    import nothing from htc_fast.ops, so the registration lives here, once)."""
    from htc_fast.kernels import deform_conv as triton_deform_conv

    register_deform_conv_autograd(triton_deform_conv.deform_conv2d_triton,
                                  triton_deform_conv.deform_conv2d_backward_triton)
    return triton_deform_conv


# ----------------------------------------------------------------- registration of the operators

def _fake_deform_conv2d(input, weight, offset, mask, bias, stride_h, stride_w, pad_h, pad_w, dil_h,
                        dil_w, groups, offset_groups):
    return input.new_empty((input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


def _fake_deform_conv2d_backward(grad, input, weight, offset, mask, *args):
    mask_grad = mask.new_empty(mask.shape) if mask is not None else offset.new_empty((0,))
    return (input.new_empty(input.shape), weight.new_empty(weight.shape),
            offset.new_empty(offset.shape), mask_grad)


def _setup_context(ctx, inputs, output):
    input, weight, offset, mask, bias = inputs[:5]
    ctx.save_for_backward(input, weight, offset, mask)
    ctx.args = inputs[5:]
    ctx.has_mask, ctx.has_bias = mask is not None, bias is not None


def register_deform_conv_autograd(forward_op, backward_op):
    """Autograd for a deform_conv2d operator (C++ or Triton): `backward_op` takes the arguments of
    ``htc_fast::deform_conv2d_backward`` and returns (grad_input, grad_weight, grad_offset,
    grad_mask); the bias gradient is the sum of the output gradient over (N, Ho, Wo)."""
    def backward(ctx, grad):
        input, weight, offset, mask = ctx.saved_tensors
        grad = grad.contiguous()
        g_input, g_weight, g_offset, g_mask = backward_op(grad, input, weight, offset, mask, *ctx.args)
        g_bias = grad.sum((0, 2, 3)) if ctx.has_bias else None
        return (g_input, g_weight, g_offset, g_mask if ctx.has_mask else None, g_bias) + \
            (None,) * len(ctx.args)

    torch.library.register_autograd(forward_op, backward, setup_context=_setup_context)


_AUTOCAST_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)
                  | torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCUDA))


def autocast_kernel(op_name):
    """The Autocast{CPU,CUDA} kernel of the operator ``htc_fast::<op_name>`` (C++ or Triton): the
    rule of the module docstring, then the operator below autocast."""
    def kernel(input, weight, offset, mask, bias, *args):
        dtype = torch.get_autocast_dtype(input.device.type)
        keep = input.dtype == torch.float64
        cast = (lambda t: t) if keep else (lambda t: t if t is None else t.to(dtype))
        geometry = torch.float64 if keep else torch.float32
        with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_KEYS):
            return getattr(torch.ops.htc_fast, op_name)(
                cast(input), cast(weight), offset.to(geometry), None if mask is None else mask.to(geometry),
                cast(bias), *args)

    return kernel


def _register():
    lib = "htc_fast::"
    torch.library.register_fake(lib + "deform_conv2d", _fake_deform_conv2d)
    torch.library.register_fake(lib + "deform_conv2d_backward", _fake_deform_conv2d_backward)
    register_deform_conv_autograd(lib + "deform_conv2d", torch.ops.htc_fast.deform_conv2d_backward)


# The autocast kernels of the C++ and the Triton operators, registered by name (a kernel may precede
# its schema: htc_fast.kernels defines the Triton one later, and _C may be missing); the library
# object must stay alive: dropping it unregisters its kernels.
_autocast_lib = torch.library.Library("htc_fast", "IMPL")
for _name in (["deform_conv2d"] if _extension.loaded else []) + ["deform_conv2d_triton"]:
    for _key in ("AutocastCPU", "AutocastCUDA"):
        _autocast_lib.impl(_name, autocast_kernel(_name), _key)
if _extension.loaded:
    _register()
