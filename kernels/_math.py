"""Triton arithmetic shared by the kernels of htc_fast.kernels.

Exactly rounded operations: on NVIDIA GPUs Triton's fp32 ``/`` and ``sqrt`` are approximate, and
the ops here must agree with their C++/PyTorch references bit for bit where a rounding decides a
discrete outcome (a sampling grid size, an NMS suppression).
"""
import torch
import triton
import triton.language as tl


def threshold_as(threshold: float, dtype: torch.dtype) -> float:
    """The largest `dtype` value not above `threshold`, as a Python float: comparing a `dtype` IoU
    ``x > this`` equals comparing ``x > threshold`` in double (torchvision's rule). The reference
    NMS (htc_fast/ops/reference/nms.py) applies the same rule with tensors; kernels import nothing
    from htc_fast.ops, and the reference must work without triton, hence the two homes."""
    t = torch.tensor(threshold, dtype=dtype)
    below = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(torch.where(t.double() > threshold, below, t))


@triton.jit
def div_rn(a, b):
    """IEEE-rounded a / b in the dtype of a (tl.div_rn only exists for fp32)."""
    if a.dtype == tl.float32:
        q = tl.div_rn(a, b)
    else:
        q = a / b
    return q


@triton.jit
def sqrt_rn(a):
    """IEEE-rounded sqrt in the dtype of a (tl.sqrt_rn only exists for fp32)."""
    if a.dtype == tl.float32:
        r = tl.sqrt_rn(a)
    else:
        r = tl.sqrt(a)
    return r
