"""The learning-rate schedule: linear warm-up by iteration, step decay by epoch (mmdetection's
LinearLR + MultiStepLR of the HTC configs). Plain functions of the iteration and epoch, so a
resumed run needs no scheduler state."""
from htc_fast.config import TrainConfig


def lr_factor(iteration: int, epoch: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr: linear warm-up from cfg.warmup_ratio over cfg.warmup_iters
    iterations (mmdetection's LinearLR by iteration), times lr_gamma for every step epoch already
    reached (MultiStepLR by epoch: at epoch 8 of the 1x schedule the lr drops once)."""
    warm = 1.0
    if iteration < cfg.warmup_iters:
        warm = cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * iteration / cfg.warmup_iters
    return warm * cfg.lr_gamma ** sum(epoch >= s for s in cfg.lr_steps)


def set_lr(optimizer, lr: float) -> None:
    """Writes a Python float into every group: no tensor, so no device work and no sync."""
    for group in optimizer.param_groups:
        group["lr"] = lr
