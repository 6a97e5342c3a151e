"""Argument checks shared by the public ops: metadata only (types, shapes, dtypes, devices, plain
Python numbers), so they cost no device synchronisation and run on every call, before any
allocation. Each error names the op, the argument and what it accepts, and is an
``OpArgumentError`` / ``OpTypeError`` (``htc_fast/ops/_errors.py``).
"""
import math
import numbers

import torch
from torch import Tensor

from htc_fast.ops._errors import OpArgumentError, OpTypeError

# An expanded view (stride 0 over a dimension of size > 1) is copied by the kernels that need dense
# data; a copy larger than this is refused instead of attempted (a broadcast 9 GB view would
# otherwise fail inside the allocator with no word about which argument was at fault).
MAX_EXPANDED_COPY_BYTES = 1 << 30


def describe(value) -> str:
    """A short description of an argument for a message: shape and dtype for tensors."""
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)} on {value.device}"
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (list, tuple)) else \
        f"{type(value).__name__} of length {len(value)}"


def tensor(where: str, name: str, t, *, dim=None, floating=False, integer=False) -> Tensor:
    """`t` must be a Tensor with data (not meta), of `dim` dimensions, of a float / integer dtype."""
    if not isinstance(t, Tensor):
        raise OpTypeError(f"{where}: {name} must be a Tensor, got {describe(t)}")
    if t.device.type == "meta":
        raise OpArgumentError(f"{where}: {name} is on meta, a device without data; the op reads "
                              "values: pass a tensor on cpu or cuda")
    if dim is not None and t.dim() != dim:
        raise OpArgumentError(f"{where}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise OpTypeError(f"{where}: {name} must be floating point (float32, float64, float16 or "
                          f"bfloat16), got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise OpTypeError(f"{where}: {name} must be an integer tensor, got {t.dtype}")
    _bounded_expanded_view(where, name, t)
    return t


def _bounded_expanded_view(where, name, t):
    # Strides first: they are plain ints even where sizes are symbolic (torch.compile), so a
    # dense tensor never makes the check guard on a size.
    if all(s != 0 for s in t.stride()) or not all(isinstance(n, int) for n in t.shape):
        return
    if all(s != 0 or n <= 1 for s, n in zip(t.stride(), t.shape)):
        return
    size = t.numel() * t.element_size()
    if size > MAX_EXPANDED_COPY_BYTES:
        raise OpArgumentError(
            f"{where}: {name} is an expanded view (stride 0) of shape {tuple(t.shape)} whose dense copy "
            f"would take {size / 2 ** 30:.1f} GiB (limit {MAX_EXPANDED_COPY_BYTES / 2 ** 30:.0f} GiB); "
            "pass a smaller or materialised tensor")


def same_device(where: str, ref_name: str, ref: Tensor, **others) -> None:
    """Every tensor in `others` (None skipped) is on ref's device."""
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise OpArgumentError(f"{where}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def real(where: str, name: str, value, *, positive=False, finite=False, allow_nan=False) -> float:
    """`value` must be a Python real number (not a bool, not a tensor); returned as float."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise OpTypeError(f"{where}: {name} must be a number (float), got {describe(value)}")
    value = float(value)
    if math.isnan(value) and not allow_nan:
        raise OpArgumentError(f"{where}: {name} must not be NaN")
    if finite and not math.isfinite(value):
        raise OpArgumentError(f"{where}: {name} must be finite, got {value}")
    if positive and not value > 0:
        raise OpArgumentError(f"{where}: {name} must be positive, got {value}")
    return value


def _is_int(value) -> bool:
    return isinstance(value, (numbers.Integral, torch.SymInt)) and not isinstance(value, bool)


def integer(where: str, name: str, value, *, minimum=None, maximum=None) -> int:
    """`value` must be a Python integer (not a bool, a float or a tensor) in [minimum, maximum]."""
    if not _is_int(value):
        raise OpTypeError(f"{where}: {name} must be an int, got {describe(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise OpArgumentError(f"{where}: {name} must be an int {' and '.join(filter(None, (lo, hi)))}, "
                              f"got {value}")
    return value


def pair(where: str, name: str, value, *, minimum: int) -> tuple:
    """An int or a pair of ints, each >= minimum, as a tuple (a, b)."""
    items = (value, value) if _is_int(value) else value
    if not isinstance(items, (tuple, list)) or not all(_is_int(v) for v in items):
        raise OpTypeError(f"{where}: {name} must be an int or a pair of ints (each >= {minimum}), got "
                          f"{describe(value)}")
    if len(items) != 2 or min(items) < minimum:
        raise OpArgumentError(f"{where}: {name} must be an int >= {minimum} or a pair of them, "
                              f"got {tuple(items)}")
    return int(items[0]), int(items[1])
