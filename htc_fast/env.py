"""``python -m htc_fast.env``: what this installation can run, and which backend each op uses.

Prints torch / CUDA / Triton versions, whether the compiled extension ``htc_fast._C`` loaded (and
why not), the CUDA archs it was compiled for, and the backend each op picks on each device.
"""
import os
import platform
import warnings

import torch

from htc_fast import _extension
from htc_fast.ops import _backend


def _triton_version():
    try:
        import triton

        return triton.__version__
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"unavailable ({type(exc).__name__}: {exc})"


def collect():
    """The report as a list of (key, value) rows."""
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch CUDA build", torch.version.cuda or "no (CPU build)"),
        ("CUDA devices", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
         or "none"),
        ("triton", _triton_version()),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "")),
        ("htc_fast._C", "loaded" if _extension.loaded else f"NOT loaded: {_extension.load_error}"),
        ("compiled CUDA archs", ", ".join(_extension.compiled_cuda_archs()) or "none"),
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ops = sorted({op for op, _ in _backend.DEFAULT_BACKENDS})
    for op in ops:
        for device in devices:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                chosen = _backend.resolve(op, device)
            default = _backend.default_backend(op, device)
            note = "" if chosen == default else f" (default {default!r} unavailable: " \
                f"{_backend.unavailable_reason(default, device)})"
            rows.append((f"{op} on {device}", chosen + note))
    return rows


def main():
    rows = collect()
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
