"""Tensors that depend only on host values (shapes, counts, image sizes, coder constants), built
once per key and reused, so that a training or inference step dispatches no ops and copies
nothing host->device for them (on a GPU such a copy is a launch, and from pageable memory it
waits for the host).

A small LRU: a run sees few distinct keys (one per batch layout), and tensors made in inference
mode are kept apart from the rest (they cannot enter autograd).
"""
import collections
from collections.abc import Callable, Hashable

import torch

__all__ = ["host_constant"]

_CACHE: "collections.OrderedDict[Hashable, object]" = collections.OrderedDict()
_SIZE = 128


def host_constant(key: tuple, build: Callable[[], object]):
    """``build()``'s result for ``key`` (a tuple of host values that determine it), made on the
    first call. ``build`` must return tensors (or tuples of them) that nobody modifies."""
    key = (*key, torch.is_inference_mode_enabled())
    if key not in _CACHE:
        _CACHE[key] = build()
        if len(_CACHE) > _SIZE:
            _CACHE.popitem(last=False)
    _CACHE.move_to_end(key)
    return _CACHE[key]
