"""htc_fast: Hybrid Task Cascade with custom CPU, CUDA and Triton kernels.

``htc_fast.ops`` holds the public ops; ``python -m htc_fast.env`` reports what is available.
"""
from htc_fast import (
    _extension,  # noqa: F401  (loads _C if it is there; never raises)
    ops,  # noqa: F401
)

__version__ = "0.1.0"
