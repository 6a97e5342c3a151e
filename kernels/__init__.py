"""Triton kernels, shipped as ``htc_fast.kernels`` (setup.py maps this folder there).

Each op lives in its own module and registers itself with ``torch.library.triton_op`` under the
``htc_fast::`` namespace, so it is visible to ``torch.compile``. On CPU tensors the kernels run
only under ``TRITON_INTERPRET=1`` (how CI tests them).

``available`` is False (with ``unavailable_reason``) when triton cannot be imported; importing this
package never raises.
"""
try:
    import triton  # noqa: F401

    available = True
    unavailable_reason = None
except Exception as exc:  # pragma: no cover - depends on the machine
    available = False
    unavailable_reason = f"{type(exc).__name__}: {exc}"

if available:
    try:  # a kernel module that fails to import disables the backend with the reason, no crash
        from htc_fast.kernels import assign, deform_conv, mask_paste, nms, roi_align  # noqa: F401,E402
    except Exception as exc:  # pragma: no cover - depends on the triton version
        available = False
        unavailable_reason = f"htc_fast.kernels failed to import: {type(exc).__name__}: {exc}"
