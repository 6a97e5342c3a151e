"""``python -m htc_fast.train``: train HTC on COCO -- one readable loop (DESIGN.md section 4).

    python -m htc_fast.train                                    # built-in default (see below)
    python -m htc_fast.train --config htc_r50_fpn_1x --data-root data/coco \\
        --backbone-weights imagenet                             # the real thing, one process
    torchrun --nproc_per_node 8 -m htc_fast.train --config htc_r50_fpn_1x --data-root data/coco

Built-in default (no --config, no --data-root): writes a small synthetic COCO-format dataset
(shapes with instance masks and semantic maps, htc_fast/data/synthetic.py) into the work
directory, evaluates the untrained `htc_tiny` model, trains it for a few minutes on whatever
device there is, evaluates again, and writes a checkpoint and a picture of its predictions.

The loop: SGD (lr per 16 images, scaled linearly by the global batch), linear warm-up by
iteration, step decay by epoch; optional autocast (bf16/fp16) and gradient clipping; checkpoints
written atomically every --ckpt-interval iterations and at each epoch end; --resume continues
from the latest one exactly where it stopped (same batches, same random state); evaluation at
each epoch end; a NaN/inf loss stops the run naming the iteration and the last good checkpoint.
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from htc_fast import training
from htc_fast.config import get_config
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.htc import build_htc
from htc_fast.weights import resolve_weights

# The built-in run: htc_tiny on 96 synthetic 96x128 images, 2 per iteration, from scratch (no
# ImageNet weights), so a higher lr than 0.02/16 per image and a short warm-up.
BUILTIN_OVERRIDES = ("train.epochs=6", "train.lr_steps=(5,)", "train.lr=0.16", "train.warmup_iters=30")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m htc_fast.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="preset name (default: the built-in htc_tiny run)")
    p.add_argument("--data-root", help="COCO root: annotations/, train2017/, val2017/, stuffthingmaps/")
    p.add_argument("--work-dir", help="checkpoints, metrics.jsonl, pictures (default work_dirs/<config>)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="typed config override")
    p.add_argument("--resume", action="store_true", help="continue from the work dir's latest checkpoint")
    p.add_argument("--load-from", help="start from these weights: checkpoint path, URL or 'released'")
    p.add_argument("--backbone-weights", help="ImageNet backbone weights: 'imagenet' (the preset's), "
                   "torchvision://resnet50, open-mmlab://resnext101_64x4d, ..., a URL or a path")
    p.add_argument("--max-iters", type=int, help="stop after this many iterations in total")
    p.add_argument("--semantic", choices=["stuff_maps", "from_instances", "off"],
                   help="semantic labels (default: stuff maps if the config has a semantic head)")
    p.add_argument("--amp", choices=sorted(AMP), help="autocast dtype (CUDA: bf16 or fp16; CPU: bf16)")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this")
    p.add_argument("--device", help="cpu or cuda (default cuda when available)")
    p.add_argument("--workers", type=int, help="data loader processes per rank")
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--ckpt-interval", type=int, default=0, help="also checkpoint every N iterations")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluations")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N val images only")
    p.add_argument("--tensorboard", action="store_true")
    return p.parse_args(argv)


class SkipBatches:
    """The batch sampler's batches after the first `skip` (a resumed epoch's remaining batches)."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        for i, batch in enumerate(self.sampler):
            if i >= self.skip:
                yield batch

    def __len__(self):
        return max(len(self.sampler) - self.skip, 0)


def main(argv=None):
    args = parse_args(argv)
    builtin = args.config is None and args.data_root is None
    if (args.config is None) != (args.data_root is None):
        raise SystemExit("give both --config and --data-root, or neither (the built-in run)")
    overrides = (list(BUILTIN_OVERRIDES) if builtin else []) + list(args.set)
    cfg = get_config(args.config or "htc_tiny", overrides)
    d = training.init_distributed(args.device)
    torch.manual_seed(cfg.train.seed + d.rank)
    work_dir = Path(args.work_dir or Path("work_dirs") / cfg.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_root, splits = prepare_data(builtin, args, work_dir, d)
    train_set, loader, coco_gt, val_images = build_data(cfg, args, data_root, splits, d)

    model = build_htc(cfg)
    if args.backbone_weights:
        report = load_checkpoint(model, resolve_weights(args.backbone_weights, cfg), source="torchvision")
        say(d, f"backbone weights: {report.loaded} tensors from {args.backbone_weights}")
    if args.load_from:
        say(d, load_checkpoint(model, resolve_weights(args.load_from, cfg)).describe())
    model.to(d.device)
    optimizer = training.build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(d.device.type) if args.amp == "fp16" else None
    progress = training.Progress()
    last_ckpt = resume(args, work_dir, model, optimizer, scaler, progress, d)
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda"
                                                    else None) if d.world_size > 1 else model
    total_batch = cfg.train.images_per_gpu * d.world_size
    base_lr = cfg.train.scaled_lr(total_batch)
    total_iters = min(args.max_iters or 10 ** 12, cfg.train.epochs * len(loader.batch_sampler))
    log = training.MetricLog(work_dir, args.log_interval, total_iters, total_batch, args.tensorboard and d.main)
    say(d, f"{cfg.name}: {len(train_set)} training images, {len(loader.batch_sampler)} iterations per epoch, "
           f"{d.world_size} process(es) on {d.device}, lr {base_lr:g} for {total_batch} images per step")
    untrained = last_eval = None
    if builtin and progress.iteration == 0 and not args.no_eval:
        untrained = maybe_evaluate(model, cfg, coco_gt, val_images, d, log, progress, "untrained")
    autocast = torch.autocast(d.device.type, dtype=AMP[args.amp]) if args.amp else contextlib.nullcontext()
    start = time.time()
    model.train()
    while progress.iteration < total_iters and progress.epoch < cfg.train.epochs:
        loader.batch_sampler.set_epoch(progress.epoch)
        # Its own generator: creating the iterator must not draw from the global RNG, whose state
        # the checkpoints carry (the RoI samplers draw from it), or a resumed run would diverge.
        epoch_loader = DataLoader(train_set, batch_sampler=SkipBatches(loader.batch_sampler, progress.step),
                                  num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                                  pin_memory=loader.pin_memory,
                                  generator=torch.Generator().manual_seed(cfg.train.seed + progress.epoch))
        for batch in epoch_loader:
            inputs, targets = batch.to(d.device, non_blocking=True)
            lr = base_lr * training.lr_factor(progress.iteration, progress.epoch, cfg.train)
            training.set_lr(optimizer, lr)
            with autocast:
                loss = net(inputs, targets)
            total = loss.total()
            if not torch.isfinite(total):
                raise TrainingDiverged(f"the loss is {total.item()} at iteration {progress.iteration + 1}; "
                                       f"last good checkpoint: {last_ckpt or 'none written yet'}")
            optimizer.zero_grad(set_to_none=True)
            step(total, optimizer, scaler, model, args.clip_grad)
            progress.iteration += 1
            progress.step += 1
            values = training.reduce_mean({k: float(v.detach()) for k, v in loss.as_dict().items()}, d)
            if d.main:
                log.maybe_log(progress, values, lr, d.device)
            if args.ckpt_interval and progress.iteration % args.ckpt_interval == 0 and d.main:
                last_ckpt = training.write_checkpoint(work_dir, model, optimizer, progress, cfg.name, overrides, scaler)
            if progress.iteration >= total_iters and progress.step < len(loader.batch_sampler):
                break  # --max-iters ends the run inside an epoch
        else:  # the epoch ran to its end
            progress.epoch += 1
            progress.step = 0
            if d.main:
                last_ckpt = training.write_checkpoint(work_dir, model, optimizer, progress, cfg.name, overrides,
                                                      scaler)
            if not args.no_eval:
                last_eval = maybe_evaluate(model, cfg, coco_gt, val_images, d, log, progress,
                                           f"epoch {progress.epoch}")
                model.train()
            continue
        break
    if d.main and progress.step:  # stopped inside an epoch: save where
        last_ckpt = training.write_checkpoint(work_dir, model, optimizer, progress, cfg.name, overrides, scaler)
    say(d, f"trained {progress.iteration} iterations in {time.time() - start:.0f} s; checkpoint {last_ckpt}")
    if builtin and not args.no_eval:
        trained = last_eval if progress.step == 0 and last_eval is not None else \
            maybe_evaluate(model, cfg, coco_gt, val_images, d, log, progress, "trained")
        if d.main and trained is not None and untrained is not None:
            print(f"built-in run: bbox AP {untrained.bbox.AP:.3f} -> {trained.bbox.AP:.3f}, "
                  f"mask AP {untrained.segm.AP:.3f} -> {trained.segm.AP:.3f} (untrained -> trained)")
    if d.main and val_images:
        draw_predictions(model, cfg, val_images[0][0], work_dir / "predictions.png", d.device, train_set.class_names)
    if d.world_size > 1:
        dist.destroy_process_group()
    return 0


def step(total, optimizer, scaler, model, clip_grad):
    """Backward and one optimizer step (loss scaling for fp16, optional gradient-norm clipping)."""
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def prepare_data(builtin, args, work_dir, d):
    """(data root, (train split, val split)); the built-in run writes its synthetic dataset once."""
    if not builtin:
        return Path(args.data_root), ("train2017", "val2017")
    root = work_dir / "synthetic_coco"
    if d.main and not (root / "annotations" / "instances_val.json").is_file():
        from htc_fast.data.synthetic import make_synthetic_coco

        print(f"writing the built-in synthetic dataset to {root}", flush=True)
        make_synthetic_coco(root)
    if d.world_size > 1:
        dist.barrier()
    return root, ("train", "val")


def build_data(cfg, args, root, splits, d):
    from pycocotools.coco import COCO

    from htc_fast.data import build_train_loader, coco_train_dataset
    from htc_fast.evaluate import coco_images

    train_set = coco_train_dataset(root, cfg, split=splits[0], semantic=args.semantic)
    loader = build_train_loader(train_set, cfg, cfg.train.images_per_gpu, d.rank, d.world_size, cfg.train.seed,
                                workers=args.workers)
    coco_gt, val_images = None, []
    ann = root / "annotations" / f"instances_{splits[1]}.json"
    if not args.no_eval and ann.is_file():
        with contextlib.redirect_stdout(None):
            coco_gt = COCO(str(ann))
        val_images = coco_images(coco_gt, root / splits[1], args.eval_limit)
    return train_set, loader, coco_gt, val_images


def resume(args, work_dir, model, optimizer, scaler, progress, d):
    """Loads the latest checkpoint of work_dir into the run when --resume; returns its path."""
    if not args.resume:
        return None
    path = training.latest_checkpoint(work_dir)
    if path is None:
        say(d, f"--resume: no checkpoint in {work_dir}; starting from scratch")
        return None
    state = training.read_resume_state(path)
    load_checkpoint(model, {"model": state["model"], "meta": state.get("meta", {})}, source="htc_fast")
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)
    training.set_rng_state(state["rng"])
    torch.manual_seed(torch.initial_seed() + d.rank) if d.rank else None
    say(d, f"resumed from {path} at iteration {progress.iteration} (epoch {progress.epoch}, step {progress.step})")
    return path


def maybe_evaluate(model, cfg, coco_gt, val_images, d, log, progress, what):
    if coco_gt is None or not val_images:
        return None
    from htc_fast.evaluate import evaluate_model

    result = evaluate_model(model, val_images, coco_gt, d.device, scale=cfg.data.test_scale, verbose=False,
                            progress=False)
    if d.main and result is not None:
        print(f"evaluation ({what}): bbox AP {result.bbox.AP:.4f}, mask AP {result.segm.AP:.4f}", flush=True)
        log.log_eval(progress, {f"{what} {k}": v for k, v in result.as_dict().items()})
    return result


def draw_predictions(model, cfg, image_path, out_path, device, names):
    from torchvision.io import write_png

    from htc_fast.predict import draw
    from htc_fast.preprocess import load_image, make_batch

    image = load_image(image_path)
    model.eval()
    det = model.predict(make_batch([image], cfg.data.test_scale, device=device))[0]
    # A small model trained for minutes scores low: draw its ten best detections above 0.05.
    keep = det.scores >= max(0.05, float(det.scores[min(9, len(det.scores) - 1)])) if len(det.scores) else det.scores > 0
    det = det._replace(boxes=det.boxes[keep], scores=det.scores[keep], labels=det.labels[keep],
                       masks=det.masks[keep])
    write_png(draw(image, det, 0.0, names), str(out_path))
    print(f"predictions on {image_path} drawn to {out_path}")


def say(d, message):
    if d.main:
        print(message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
