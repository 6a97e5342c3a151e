"""Tensors that depend only on host values (shapes, counts, image sizes, coder constants), built
once per key and reused, so that a training or inference step dispatches no ops and copies
nothing host->device for them (on a GPU such a copy is a launch, and from pageable memory it
waits for the host).

A small LRU: a run sees few distinct keys (one per batch layout), and tensors made in inference
mode are kept apart from the rest (they cannot enter autograd).
"""
import collections
from collections.abc import Callable, Hashable, Sequence

import torch

__all__ = ["host_constant", "row_layout"]

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


def row_layout(image_shapes: Sequence[tuple[float, float]], counts: Sequence[int], device) -> tuple[torch.Tensor, ...]:
    """For R = sum(counts) rows of boxes, counts[i] of them from image i in order: the (R, 4)
    [w, h, w, h] clip bounds of each row's image (``decode_boxes``' max_shape) and the (R, 1)
    float32 image index (the rois' first column). image_shapes: per image (h, w)."""
    shapes = tuple((float(h), float(w)) for h, w in image_shapes)

    def build():
        image_of = torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
        bounds = torch.tensor([(w, h, w, h) for h, w in shapes]).reshape(-1, 4)[image_of]
        return bounds.to(device), image_of[:, None].float().to(device)

    return host_constant(("rows", shapes, tuple(counts), str(device)), build)
