"""Element-wise losses with mmdetection's weighting and "mean" reduction.

mmdet (v2.x, v3.x) reduces a weighted element-wise loss as ``sum(loss * weight) / (avg_factor +
eps)`` when a normaliser ``avg_factor`` is given (eps = float32 epsilon, so that a zero
normaliser gives 0 rather than NaN), else as the plain mean of ``loss * weight``. Sampled heads
pass ``avg_factor`` = number of sampled boxes, so unsampled entries (weight 0) do not dilute it.
Owns only the arithmetic; which boxes get which weight is the heads' business.
"""
from typing import Optional

import torch
from torch import Tensor

__all__ = ["EPS", "weight_reduce", "smooth_l1", "smooth_l1_loss"]

# The floor of a normaliser (mmdet's): a zero avg_factor gives a zero loss, not NaN.
EPS = torch.finfo(torch.float32).eps


def weight_reduce(loss: Tensor, weight: Optional[Tensor] = None,
                  avg_factor: Optional[float] = None) -> Tensor:
    """mmdet's ``weight_reduce_loss(..., reduction="mean")``.

    Args:
        loss: element-wise loss, any shape.
        weight: broadcastable to ``loss``, or None.
        avg_factor: the normaliser, or None for the mean over all elements.

    Returns:
        A 0-dim tensor.
    """
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean()
    return loss.sum() / (avg_factor + EPS)


def smooth_l1(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    """The element-wise smooth L1 of ``smooth_l1_loss`` (same shape as pred), unreduced."""
    diff = torch.abs(pred - target)
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta) if beta > 0 else diff


def smooth_l1_loss(pred: Tensor, target: Tensor, beta: float = 1.0, weight: Optional[Tensor] = None,
                   avg_factor: Optional[float] = None, reduction: str = "mean") -> Tensor:
    """Huber-style smooth L1: ``0.5 d^2 / beta`` for ``d < beta``, else ``d - 0.5 beta``
    (d = |pred - target|); ``beta = 0`` is plain L1, as in ``torch.nn.functional.smooth_l1_loss``.
    HTC: RPN beta 1/9, cascade box heads beta 1.0.

    Args:
        pred, target: same shape; weight: broadcastable to it, or None.
        beta: >= 0.
        avg_factor: the normaliser of ``reduction="mean"`` (see ``weight_reduce``).
        reduction: "mean" (mmdet's, ``weight_reduce``) or "sum": the weighted sum, for callers
            that divide by a normaliser of their own (the box head's count stays on the device).

    Returns:
        A 0-dim tensor; empty input gives a 0 connected to ``pred``.
    """
    if not beta >= 0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"smooth_l1_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    if reduction == "sum" and avg_factor is not None:
        raise ValueError("smooth_l1_loss: avg_factor is the normaliser of reduction='mean'; "
                         "reduction='sum' takes none")
    if pred.shape != target.shape:
        raise ValueError(f"smooth_l1_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if target.numel() == 0:
        return pred.sum() * 0
    loss = smooth_l1(pred, target, beta)
    if reduction == "sum":
        return (loss if weight is None else loss * weight).sum()
    return weight_reduce(loss, weight, avg_factor)
