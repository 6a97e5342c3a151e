"""The optimizer and one optimisation step (backward, fp16 loss scaling, gradient clipping).

SGD runs fused (one kernel for every parameter's momentum/weight-decay update, on CPU and CUDA)
where torch has the fused kernel for the parameters' device, else with the multi-tensor
(`foreach`) implementation: the per-parameter Python loop of the default SGD dispatches ~10 ops
per parameter (an R-50 HTC has ~300 trainable tensors).
"""
from typing import Optional

import torch

from htc_fast.config import TrainConfig

_FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum and weight decay on every trainable parameter (mmdetection's HTC).
    Call it after the model is on its device: the fused kernel is chosen by the parameters' device."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    fused = all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                fused=fused or None, foreach=None if fused else True)
    if cfg.momentum:
        # Momentum buffers exist from the start, as zeros: the first step then computes
        # buf = momentum * 0 + grad = grad, exactly SGD's first-step initialisation. Without them the
        # fused kernel allocates the buffers uninitialised (empty_like) and fills them in its first
        # step -- which it skips when a fp16 GradScaler found inf gradients (common: the initial
        # scale overflows), leaving garbage that turns every later step into NaN.
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def optimizer_step(total: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: Optional[torch.amp.GradScaler] = None, clip_grad: Optional[float] = None) -> None:
    """zero_grad, backward of `total`, optional gradient-norm clipping, one optimizer step.

    Host syncs: none (clip_grad_norm_ scales by a clamped device factor; with fp16 the fused SGD
    takes the GradScaler's inf flag and scale as device tensors, where a non-fused optimizer
    would make GradScaler.step read the flag on the host)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if clip_grad:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
