"""Loads the compiled extension htc_fast._C once and remembers why it failed, if it did.

Importing htc_fast never fails because of _C: the ops fall back to their pure-PyTorch references
(with one warning, from ops/_backend.py) and an explicit ``backend="cpp"`` raises with the reason
recorded here (the check is in ops/_backend.py).
"""
import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

__all__ = ["loaded", "load_error", "compiled_cuda_archs", "has_cuda_kernels"]

try:
    from htc_fast import _C  # noqa: F401  (registers the htc_fast:: operators with torch)

    loaded = True
    load_error = None
except Exception as exc:  # ImportError, or an undefined symbol from an ABI mismatch
    _C = None
    loaded = False
    load_error = f"{type(exc).__name__}: {exc}"


def has_cuda_kernels():
    """True if _C was compiled with its CUDA kernels."""
    return bool(compiled_cuda_archs())


def compiled_cuda_archs():
    """The CUDA archs _C was compiled for (e.g. ['sm_80', 'sm_90']); [] for a CPU-only build."""
    if not loaded:
        return []
    return [f"sm_{a}" for a in _C.cuda_archs().split(";") if a]
