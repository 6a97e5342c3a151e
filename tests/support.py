"""What the tests share: tolerances per dtype, devices, backends and the availability policy.

Imported by tests/conftest.py (which first sets TRITON_INTERPRET when there is no GPU) and by
the test modules (`from tests.support import TOL, require_backend`). The policy is documented in
tests/conftest.py.
"""
import importlib.util
import os

import pytest
import torch

from htc_fast.ops import _backend

# Comparison of a result in `dtype` against an oracle evaluated on the same (already rounded)
# inputs: float64 is exact up to summation order; float32 accumulates up to a few thousand
# samples per bin; float16/bfloat16 results are fp32 results rounded once, so two backends may
# differ by one unit in the last place (rtol = the dtype's epsilon).
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.float16: dict(atol=1e-5, rtol=2.0 ** -10),
    torch.bfloat16: dict(atol=1e-5, rtol=2.0 ** -7),
}

# Low precision against float64: the fast path's largest error may be at most this multiple of
# PyTorch's own error in that dtype (the error of rounding the float64 result to the dtype).
LOW_PRECISION_FACTOR = 2.0

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]
OPERATOR_BACKENDS = BACKENDS[1:]  # the ones registered as torch operators (opcheck, compile)


def require_backend(backend, device_type):
    """Skip or fail the calling test when `backend` cannot run on `device_type` (policy above)."""
    if backend == "reference":
        return
    if backend == "cpp" and os.environ.get("HTC_FAST_SKIP_EXTENSION") == "1":
        pytest.skip("HTC_FAST_SKIP_EXTENSION=1: htc_fast._C deliberately not built")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("triton is not installed")
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    try:
        reason = _backend.unavailable_reason(backend, device_type)
    except Exception as exc:  # e.g. an ImportError inside htc_fast.kernels
        reason = f"checking it raised {type(exc).__name__}: {exc}"
    if reason is not None:
        pytest.fail(f"backend {backend!r} must be available on {device_type} but is not: {reason}",
                    pytrace=False)
