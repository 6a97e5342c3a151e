"""The standard workload of the op/sync budgets: an HTC model, a synthetic batch with targets, and
the counts of one training iteration (forward + backward) and one ``model.predict`` batch.

Used by tests/test_budgets.py (which pins the counts) and by benchmarks/bench_model.py and
bench_train.py (which record them). Prints the table:

    python -m htc_fast.diagnostics.workload [--preset htc_r50_fpn_1x] [--images 2] [--size 256 384]
"""
import argparse
from typing import Optional

import torch

from htc_fast.diagnostics.op_counter import OpCounts, count_ops
from htc_fast.model.inputs import ImageBatch, Targets

__all__ = ["synthetic_batch", "count_train_step", "count_predict"]


def synthetic_batch(images: int = 2, height: int = 256, width: int = 384, objects: int = 5, *,
                    seed: int = 3, device="cpu", num_classes: int = 80,
                    stuff_classes: int = 183) -> tuple[ImageBatch, Targets]:
    """A batch of ``images`` random (3, height, width) images (unpadded, scale 1), each with
    ``objects`` random boxes of 40..40+min(h, w)*0.4 pixels, box-shaped masks, labels, and a random
    semantic map: the input of the budget counts and of bench_train."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randn(images, 3, height, width, generator=gen)
    span = torch.tensor([width * 0.7, height * 0.7])
    limit = torch.tensor([width - 1.0, height - 1.0])
    boxes, labels, masks = [], [], []
    for _ in range(images):
        xy = torch.rand(objects, 2, generator=gen) * span
        wh = 40 + torch.rand(objects, 2, generator=gen) * min(height, width) * 0.4
        b = torch.cat([xy, torch.minimum(xy + wh, limit)], dim=1)
        m = torch.zeros(objects, height, width, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            m[j, y1:y2, x1:x2] = True
        boxes.append(b.to(device))
        labels.append(torch.randint(0, num_classes, (objects,), generator=gen).to(device))
        masks.append(m.to(device))
    semantic = torch.randint(0, stuff_classes, (images, height, width), generator=gen).to(device)
    batch = ImageBatch(data.to(device), [(height, width)] * images, [(1.0, 1.0)] * images,
                       [(height, width)] * images)
    return batch, Targets(boxes, labels, masks, semantic)


def count_train_step(model, batch: ImageBatch, targets: Targets, *, sampler: str = "random",
                     generator: Optional[torch.Generator] = None, warmup: bool = True,
                     **count_kwargs) -> OpCounts:
    """Counts of one training iteration: forward, total loss, backward (no optimizer step), in
    the steady state (``warmup``: one uncounted iteration first fills the anchor and layout
    caches, as every iteration but the first of a run finds them). count_kwargs go to
    ``count_ops``."""
    if warmup:
        count_train_step(model, batch, targets, sampler=sampler, generator=generator, warmup=False)
    model.train()
    # Count the GPU path: the mask branch at its fixed capacity, as on CUDA (on CPU it reads the
    # number of positives back instead, which costs nothing there; see HTCRoIHead._mask_loss).
    previous, model.roi_head.static_shapes = model.roi_head.static_shapes, True
    try:
        with count_ops(**count_kwargs) as counts:
            loss = model(batch, targets, sampler=sampler, generator=generator).total()
            loss.backward()
    finally:
        model.roi_head.static_shapes = previous
    model.zero_grad(set_to_none=True)
    return counts


def count_predict(model, batch: ImageBatch, masks: Optional[str] = "bitmap", warmup: bool = True,
                  **count_kwargs) -> OpCounts:
    """Counts of one ``model.predict`` batch (results left on the model's device), in the steady
    state (see ``count_train_step``)."""
    if warmup:
        count_predict(model, batch, masks, warmup=False)
    model.eval()
    with count_ops(**count_kwargs) as counts:
        model.predict(batch, masks=masks)
    return counts


def main(argv=None):
    from htc_fast.config import get_config
    from htc_fast.model.htc import build_htc

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="htc_r50_fpn_1x")
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, nargs=2, default=(256, 384), metavar=("H", "W"))
    parser.add_argument("--sites", type=int, default=0, help="also print this many sync sites and top ops")
    parser.add_argument("--op-sites", action="store_true", help="also record and print the callers of the ops")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cfg = get_config(args.preset).model
    model = build_htc(cfg)
    batch, targets = synthetic_batch(args.images, *args.size, num_classes=cfg.num_classes,
                                     stuff_classes=cfg.semantic.num_classes)
    extra = dict(op_sites=args.op_sites)
    for name, counts in (("train fwd+bwd", count_train_step(model, batch, targets,
                                                           generator=torch.Generator().manual_seed(0), **extra)),
                         ("predict", count_predict(model, batch, **extra))):
        print(f"{name}: ops={counts.ops} kernel_ops={counts.kernel_ops} syncs={counts.syncs} {counts.sync_breakdown}")
        if args.sites:
            print(counts.report(args.sites))


if __name__ == "__main__":
    main()
