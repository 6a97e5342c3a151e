"""Running a model over inference batches: the model switches (torch.compile, channels-last),
autocast, the copy to the device, and the per-batch ``model.predict`` call.

The loop itself adds no host synchronisation: the next batch is decoded by the loader's workers
while the device runs the current one; results reach the host when the caller reads them.
"""
import contextlib
from collections.abc import Iterable, Iterator
from typing import Optional, Union

import torch

from htc_fast.inference.loader import InferenceBatch
from htc_fast.model.inputs import Detections

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_amp(amp: Optional[str]) -> None:
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")


def autocast(device: torch.device, amp: Optional[str]):
    """torch.autocast for ``amp`` ("bf16" / "fp16") on the device's type, or a no-op context."""
    check_amp(amp)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AMP_DTYPES[amp])


def prepare_model(model, *, compile: Union[bool, dict] = False, channels_last: bool = False):
    """Apply the speed switches of htc_fast.model.acceleration in place: channels_last converts the
    model's 4-D weights to the channels-last memory format; compile wraps backbone, FPN and heads in
    torch.compile (compile: True, or a dict of torch.compile arguments such as
    {"backend": "aot_eager"}). Both keep the results within float tolerance of the eager,
    contiguous model (tests/inference/test_switches.py). Returns the model."""
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile arguments, got {type(compile).__name__}")
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last must be a bool, got {type(channels_last).__name__}")
    from htc_fast.model import acceleration

    if channels_last:
        model = acceleration.to_channels_last(model)
    if compile is not False:
        model = acceleration.compile_model(model, **({} if compile is True else compile))
    return model


def predict_batches(model, batches: Iterable[InferenceBatch], device, *, amp: Optional[str] = None,
                    masks: Optional[str] = "rle") -> Iterator[tuple[InferenceBatch, list[Detections]]]:
    """For each batch: (batch, one Detections per batch.images). Batches whose images were all
    unreadable yield an empty list. The model must be in eval mode; gradients are off."""
    device = torch.device(device)
    context = autocast(device, amp)
    non_blocking = device.type == "cuda"
    for batch in batches:
        if not batch.pixels:
            yield batch, []
            continue
        batch = batch.to(device, non_blocking=non_blocking)  # then normalised there
        with torch.no_grad(), context:
            dets = model.predict(batch.inputs, masks=masks)
        yield batch, dets

