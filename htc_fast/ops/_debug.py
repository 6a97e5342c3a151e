"""The debug switch: argument checks that read tensor values, off by default.

Checking a value held on the device (NaN scores, batch indices in range, labels in range) makes the
host wait for the device: one synchronisation per check, which on a GPU drains the launch queue.
The ops therefore check only tensor metadata (shapes, dtypes, devices: free) unless the switch is
on, and give a defined, documented result for bad values otherwise (each op's docstring says
which: e.g. a RoI whose batch index is outside [0, N) pools zeros).

Turn it on while hunting a bug:

    with htc_fast.ops.debug_checks():          # for a block; restores the previous state
        model(images)
    htc_fast.ops.debug_checks(True)            # or as a plain setter, for the rest of the process
    HTC_FAST_DEBUG=1 python -m htc_fast.train  # or from the environment, read at import

``debug_checks`` follows ``torch.set_grad_enabled``: calling it sets the state at once; using the
returned object in a ``with`` statement restores the state it replaced on exit. The state is
process-wide (not per thread). Inside ``torch.compile``d code the value checks never run
(``enabled()`` is False while tracing: a data-dependent branch would break the graph).
"""
import os

import torch
from torch import Tensor

from htc_fast.ops._errors import OpArgumentError

__all__ = ["debug_checks", "enabled", "check"]

_enabled = os.environ.get("HTC_FAST_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


def enabled() -> bool:
    """True when value checks that synchronise with the device should run: the switch is on and
    the caller is not being traced by torch.compile."""
    return _enabled and not torch.compiler.is_compiling()


class debug_checks:
    """Turn the value checks of the htc_fast ops on (``enabled=True``) or off.

    Sets the state when called; as a context manager, restores the previous state on exit.
    """

    def __init__(self, enabled: bool = True):
        global _enabled
        if not isinstance(enabled, bool):
            raise TypeError(f"debug_checks: enabled must be a bool, got {type(enabled).__name__}")
        self.previous = _enabled
        _enabled = enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        global _enabled
        _enabled = self.previous
        return False

    def __repr__(self):
        return f"debug_checks(enabled={_enabled})"


def check(bad: Tensor, message) -> None:
    """Raise ``OpArgumentError(message())`` if any element of the bool tensor `bad` is True.

    One device->host synchronisation; call it only under ``enabled()``. `message` is a callable
    taking the index of the first bad element (flat), so the message can name the value.
    """
    if bad.numel() and bool(bad.any()):
        first = int(bad.reshape(-1).int().argmax())
        raise OpArgumentError(message(first))
