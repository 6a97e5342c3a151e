"""Speed switches for a built HTC model: ``torch.compile`` of its networks and channels-last layout.

Both change how the model runs, never what it computes (up to floating-point reassociation: see
tests/model/test_acceleration.py for the tolerances). The train and predict entry points expose
them as ``--compile`` and ``--channels-last``.

What is compiled: the dense networks (backbone, FPN, RPN head, semantic head) and the RoI heads'
forward / ``trunk`` / ``logits``. Matching, sampling, proposals and NMS stay eager (they are
index work, and the custom ops they call are already kernels); the RoI feature extractor's
custom ops trace, but the heads are compiled separately so that a change in the number of RoIs
only re-specialises the heads.
"""
import torch
from torch import nn

__all__ = ["compile_model", "to_channels_last"]


def compile_model(model: nn.Module, **torch_compile_kwargs) -> nn.Module:
    """Compile an HTC model's networks in place with ``torch.compile`` and return the model.

    Args:
        model: an ``htc_fast.model.htc.HTC`` (its ``backbone``, ``neck``, ``rpn_head`` and
            ``roi_head`` are compiled; the parameters and state dict are untouched, so checkpoints
            save and load as before).
        **torch_compile_kwargs: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``,
            ``backend="inductor"``, ``dynamic=True``). The default ``dynamic=None`` lets the heads
            become dynamic in the number of RoIs after the first change of size.

    Returns:
        The same model object.
    """
    for name in ("backbone", "neck", "rpn_head", "roi_head"):
        if not isinstance(getattr(model, name, None), nn.Module):
            raise TypeError(f"compile_model: model must be an HTC model with a {name!r} module, "
                            f"got {type(model).__name__}")
    model.backbone.compile(**torch_compile_kwargs)
    model.neck.compile(**torch_compile_kwargs)
    model.rpn_head.compile(**torch_compile_kwargs)
    roi = model.roi_head
    if roi.semantic_head is not None:
        roi.semantic_head.compile(**torch_compile_kwargs)
    for head in roi.bbox_head:
        head.compile(**torch_compile_kwargs)
    for head in roi.mask_head:
        # The cascade calls the mask heads' trunk and logits, not forward: compile those methods
        # (instance attributes; the class and the state dict are unchanged).
        head.trunk = torch.compile(head.trunk, **torch_compile_kwargs)
        head.logits = torch.compile(head.logits, **torch_compile_kwargs)
    return model


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convert every 4-D parameter and buffer of ``model`` to channels-last memory format in place
    and return the model. Convolutions then produce channels-last (NHWC) activations from NCHW
    inputs too, which tensor-core convolutions on GPUs prefer; the custom ops (RoIAlign,
    deformable convolution) accept either layout."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_channels_last: model must be an nn.Module, got {type(model).__name__}")
    return model.to(memory_format=torch.channels_last)
