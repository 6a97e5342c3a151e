"""The exception classes of the public ops: our messages, torchvision's types.

torchvision's ops report bad arguments as ``RuntimeError`` (from their C++ checks) and
``roi_align``'s malformed boxes as ``AssertionError`` (``torch._assert``); Python code raises
``ValueError`` / ``TypeError``. Each class here is both, so an ``except`` written for either keeps
working when ``htc_fast.ops`` replaces ``torchvision.ops``:

    OpArgumentError   ValueError + RuntimeError    a bad value, shape, size or device
    OpTypeError       TypeError + RuntimeError     a wrong Python type or tensor dtype
    RoiBoxesError     OpArgumentError + AssertionError   roi_align boxes not (K, 5) / [(L, 4)]
    RoiBoxesTypeError OpTypeError + AssertionError       roi_align boxes not a Tensor or a list
"""

__all__ = ["OpArgumentError", "OpTypeError", "RoiBoxesError", "RoiBoxesTypeError"]


class OpArgumentError(ValueError, RuntimeError):
    """An argument of an htc_fast op has a bad value, shape, size or device (the message names it)."""


class OpTypeError(TypeError, RuntimeError):
    """An argument of an htc_fast op has the wrong type or dtype (the message names it)."""


class RoiBoxesError(OpArgumentError, AssertionError):
    """``roi_align`` boxes of the wrong shape (torchvision asserts on these)."""


class RoiBoxesTypeError(OpTypeError, AssertionError):
    """``roi_align`` boxes that are neither a Tensor nor a list of Tensors."""
