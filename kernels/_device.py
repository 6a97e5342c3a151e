"""The device guard of every Triton launch in htc_fast.kernels.

Triton launches on the current CUDA device's current stream, not on the device of the tensors it is
given: with tensors on cuda:1 while cuda:0 is current, a bare launch would run on the wrong device
(and stream). The C++ ops guard with CUDAGuard; the Triton op bodies guard with ``on_device``.
"""
import contextlib

import torch
from torch import Tensor


def on_device(tensor: Tensor):
    """Context manager making tensor's CUDA device current; a no-op for CPU (interpreter) tensors."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
