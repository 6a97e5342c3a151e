"""torch.use_deterministic_algorithms for the Triton kernels that accumulate with atomic adds.

torch's C++ ops call ``alertNotDeterministic``; Python has no binding for it, so this is its
equivalent: an error (or, with ``warn_only=True``, a warning) naming the op when deterministic
algorithms are requested, as torchvision's RoIAlign backward does.
"""
import warnings

import torch


def alert_not_deterministic(caller: str) -> None:
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{caller} does not have a deterministic implementation (it accumulates with atomic "
               "adds), but you set 'torch.use_deterministic_algorithms(True)'. Use another backend "
               "(backend=\"cpp\" on CPU, \"reference\") or turn the check off.")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)
