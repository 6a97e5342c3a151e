"""The one explicit backend table, and how a call picks its backend.

Order of precedence: the ``backend=`` argument of an op, else the innermost ``use_backend(...)``
context, else ``DEFAULT_BACKENDS`` below. An explicit backend that cannot run raises with the
reason; a default that cannot run falls back to "reference" with one warning per reason.
Nothing is swapped at import time.

Backends:
  "reference"  pure PyTorch (htc_fast/ops/reference/): the specification; runs anywhere
  "cpp"        htc_fast._C: the C++ kernel on CPU tensors, the CUDA kernel on CUDA tensors
  "triton"     htc_fast.kernels (Triton): CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
"""
import contextlib
import contextvars
import os
import warnings

from htc_fast import _extension

BACKENDS = ("reference", "cpp", "triton")

# (op, device type) -> backend. Each default names the benchmark that justifies it.
DEFAULT_BACKENDS = {
    # benchmarks/bench_roi_align.py::test_roi_align_*[cpu-*]: cpp beats torchvision's CPU op
    ("roi_align", "cpu"): "cpp",
    # benchmarks/bench_roi_align.py::test_roi_align_*[cuda-*]: see benchmarks/results/
    ("roi_align", "cuda"): "cpp",
    # benchmarks/bench_roi_align.py::test_multilevel_*: one launch vs a per-level loop
    ("multilevel_roi_align", "cpu"): "cpp",
    ("multilevel_roi_align", "cuda"): "cpp",
    # benchmarks/bench_nms.py: cpp vs torchvision nms / batched_nms
    ("nms", "cpu"): "cpp",
    ("nms", "cuda"): "cpp",
    ("batched_nms", "cpu"): "cpp",
    ("batched_nms", "cuda"): "cpp",
    # benchmarks/bench_deform_conv.py: cpp vs torchvision.ops.deform_conv2d (ResNet c3-c5 shapes)
    ("deform_conv2d", "cpu"): "cpp",
    ("deform_conv2d", "cuda"): "cpp",
    # benchmarks/bench_mask_paste.py::test_paste_masks[cpu-*]: cpp vs mmdetection's grid_sample
    # formulation and torchvision's paste_masks_in_image (results/cpu_mask_paste_2026-11-25.md)
    ("paste_masks", "cpu"): "cpp",
    # benchmarks/bench_mask_paste.py::test_paste_masks[cuda-*] (gpu_suite.sh); one thread per pixel
    # of each box's window vs the full grid_sample grid
    ("paste_masks", "cuda"): "cpp",
    # benchmarks/bench_mask_paste.py::test_paste_masks_rle: crops + C++ RLE vs dense + pycocotools
    ("paste_masks_rle", "cpu"): "cpp",
    ("paste_masks_rle", "cuda"): "cpp",
    # benchmarks/bench_assign.py: one fused op vs the ~70 ops of the reference's IoU matrix passes
    ("max_iou_assign", "cpu"): "cpp",
    ("max_iou_assign", "cuda"): "cpp",
}

_override = contextvars.ContextVar("htc_fast_backend_override", default=None)
_warned = set()


@contextlib.contextmanager
def use_backend(backend, ops=None):
    """Run the enclosed code with `backend` as the default for `ops` (all ops if None).

    Call it outside ``torch.compile``d code (dynamo cannot trace a ContextVar.set); inside, pass
    ``backend=`` to the op instead.

    Example::

        with htc_fast.ops.use_backend("triton"):
            y = htc_fast.ops.roi_align(x, rois, 7)
    """
    _check_name(backend, "use_backend")
    ops = None if ops is None else frozenset([ops] if isinstance(ops, str) else ops)
    token = _override.set((backend, ops, _override.get()))
    try:
        yield
    finally:
        _override.reset(token)


def _check_name(backend, where):
    if backend not in BACKENDS:
        raise ValueError(f"{where}: backend must be one of {BACKENDS}, got {backend!r}")


def _context_backend(op):
    entry = _override.get()
    while entry is not None:
        backend, ops, entry = entry[0], entry[1], entry[2]
        if ops is None or op in ops:
            return backend
    return None


def unavailable_reason(backend, device_type):
    """Why `backend` cannot run on `device_type` here, or None if it can."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if not _extension.loaded:
            return f"htc_fast._C is not available ({_extension.load_error})"
        if device_type == "cuda" and not _extension.has_cuda_kernels():
            return "htc_fast._C was built without CUDA kernels"
        if device_type not in ("cpu", "cuda"):
            return f"no C++ kernel for device type {device_type!r}"
        return None
    if backend == "triton":
        from htc_fast import kernels

        if not kernels.available:
            return f"triton is not available ({kernels.unavailable_reason})"
        if device_type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return f"no Triton kernel for device type {device_type!r}"
        return None
    raise AssertionError(backend)


def default_backend(op, device_type):
    """The table's choice for (op, device_type), before any availability check."""
    return DEFAULT_BACKENDS.get((op, device_type), "reference")


def resolve(op, device_type, backend=None):
    """The backend `op` runs with on `device_type`: explicit > use_backend context > table."""
    explicit = backend if backend is not None else _context_backend(op)
    if explicit is not None:
        _check_name(explicit, op)
        reason = unavailable_reason(explicit, device_type)
        if reason is not None:
            raise RuntimeError(f"{op}: backend {explicit!r} is unavailable on {device_type}: {reason}")
        return explicit
    chosen = default_backend(op, device_type)
    reason = unavailable_reason(chosen, device_type)
    if reason is None:
        return chosen
    if reason not in _warned:  # one warning per reason, not one per call or per op
        _warned.add(reason)
        warnings.warn(f"htc_fast.ops.{op}: default backend {chosen!r} is unavailable on {device_type} "
                      f"({reason}); using the pure-PyTorch reference", RuntimeWarning, stacklevel=3)
    return "reference"
