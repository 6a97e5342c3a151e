"""``python -m htc_fast.train``: train HTC on COCO -- one readable loop (docs/architecture.md).

    python -m htc_fast.train                                    # built-in default (see below)
    python -m htc_fast.train --config htc_r50_fpn_1x --data-root data/coco \\
        --backbone-weights imagenet                             # the real thing, one process
    torchrun --nproc_per_node 8 -m htc_fast.train --config htc_r50_fpn_1x --data-root data/coco

Built-in default (no --config, no --data-root): writes a small synthetic COCO-format dataset
(shapes with instance masks and semantic maps, htc_fast/data/synthetic.py) into the work
directory, evaluates the untrained `htc_tiny` model, trains it for a few minutes on whatever
device there is, evaluates again, and writes a checkpoint and a picture of its predictions.

The loop: fused SGD (lr per 16 images, scaled linearly by the global batch), linear warm-up by
iteration, step decay by epoch; optional autocast (bf16/fp16), gradient clipping, torch.compile
and channels-last; checkpoints written atomically every --ckpt-interval iterations and at each
epoch end, the last --keep-checkpoints kept; --resume continues from the latest one exactly where
it stopped (same batches, same random state); evaluation at each epoch end. Between two log lines
the loop never waits for the device: losses are summed on it and read at log lines, where a
NaN/inf loss stops the run naming the iteration window and the last good checkpoint. Images that
cannot be read are skipped (the dataset warns naming the file) and counted in the run summary.
The helpers live in htc_fast/engine/ (schedule, checkpoints, distributed, feed, metrics, loop).
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from htc_fast.config import get_config
from htc_fast.engine import (
    Checkpoints,
    MetricLog,
    Progress,
    SkippedImages,
    TrainingDiverged,
    TrainLoop,
    build_optimizer,
    build_run_loader,
    default_workers,
    init_distributed,
    latest_checkpoint,
    read_resume_state,
    set_rng_state,
)
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.htc import build_htc
from htc_fast.weights import resolve_weights

# The built-in run: htc_tiny on 96 synthetic 96x128 images, 2 per iteration, from scratch (no
# ImageNet weights), so a higher lr than 0.02/16 per image and a short warm-up.
BUILTIN_OVERRIDES = ("train.epochs=6", "train.lr_steps=(5,)", "train.lr=0.16", "train.warmup_iters=30")
AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}
__all__ = ["main", "TrainingDiverged"]


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
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone, FPN and heads")
    p.add_argument("--channels-last", action="store_true", help="channels-last (NHWC) parameters and activations")
    p.add_argument("--device", help="cpu or cuda (default cuda when available)")
    p.add_argument("--workers", type=int, help="data loader processes per rank (default: the cores this rank "
                   "may use minus one, at most 8; 0 for presets that load in-process, like htc_tiny)")
    p.add_argument("--prefetch-factor", type=int, default=2, help="batches each worker loads ahead")
    p.add_argument("--data-device", help="decode, resize, flip and normalise the images on this device (cuda: "
                   "nvJPEG) in the training process; the workers only read files and annotations")
    p.add_argument("--log-interval", type=int, default=20)
    p.add_argument("--ckpt-interval", type=int, default=0, help="also checkpoint every N iterations")
    p.add_argument("--keep-checkpoints", type=int, default=3,
                   help="keep the last N iteration checkpoints (0: all); the one --resume uses is never deleted")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluations")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N val images only")
    p.add_argument("--tensorboard", action="store_true")
    args = p.parse_args(argv)
    for name in ("log_interval", "prefetch_factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("ckpt_interval", "keep_checkpoints", "workers", "max_iters"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    builtin = args.config is None and args.data_root is None
    if (args.config is None) != (args.data_root is None):
        raise SystemExit("give both --config and --data-root, or neither (the built-in run)")
    overrides = (list(BUILTIN_OVERRIDES) if builtin else []) + list(args.set)
    cfg = get_config(args.config or "htc_tiny", overrides)
    d = init_distributed(args.device)
    torch.manual_seed(cfg.train.seed + d.rank)
    work_dir = Path(args.work_dir or Path("work_dirs") / cfg.name)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_root, splits = prepare_data(builtin, args, work_dir, d)
    train_set, loader, coco_gt, val_images = build_data(cfg, args, data_root, splits, d)
    batches = loader.batch_sampler
    steps_per_epoch = batches.steps_per_epoch()

    model = build_model(cfg, args, d)
    optimizer = build_optimizer(model, cfg.train)
    scaler = torch.amp.GradScaler(d.device.type) if args.amp == "fp16" else None
    progress = Progress()
    checkpoints = Checkpoints(work_dir, cfg.name, overrides, keep=args.keep_checkpoints)
    checkpoints.last = resume(args, work_dir, model, optimizer, scaler, progress, d)
    net = wrap(model, args, d)
    total_batch = cfg.train.images_per_gpu * d.world_size
    base_lr = cfg.train.scaled_lr(total_batch)
    total_iters = min(args.max_iters if args.max_iters is not None else 10 ** 12, cfg.train.epochs * steps_per_epoch)
    log = MetricLog(work_dir, total_iters, total_batch, args.tensorboard) if d.main else None
    skipped = SkippedImages(train_set, batches)
    say(d, f"{cfg.name}: {len(train_set)} training images, {steps_per_epoch} iterations per epoch, "
           f"{d.world_size} process(es) on {d.device}, {loader.num_workers} loader worker(s) each, "
           f"lr {base_lr:g} for {total_batch} images per step")
    untrained = last_eval = None
    if builtin and progress.iteration == 0 and not args.no_eval:
        untrained = maybe_evaluate(model, cfg, coco_gt, val_images, d, log, progress, "untrained")

    loop = TrainLoop(net, model, optimizer, cfg.train, base_lr=base_lr, total_iters=total_iters, d=d,
                     progress=progress, checkpoints=checkpoints, log=log, log_interval=args.log_interval,
                     ckpt_interval=args.ckpt_interval, amp=AMP.get(args.amp), scaler=scaler,
                     clip_grad=args.clip_grad, skipped=skipped)
    start = time.time()
    model.train()
    while not loop.finished:
        batches.start_epoch(progress.epoch, skip=progress.step)
        epoch_ended = loop.run_epoch(loader, steps_per_epoch)
        if not epoch_ended and not loop.finished:
            raise RuntimeError(f"the loader ended epoch {progress.epoch} after {progress.step} of "
                               f"{steps_per_epoch} batches")
        if epoch_ended:
            progress.next_epoch()
            loop.checkpoint()
            if not args.no_eval:
                last_eval = maybe_evaluate(model, cfg, coco_gt, val_images, d, log, progress,
                                           f"epoch {progress.epoch}")
                model.train()
    if progress.step and loop.checkpointed_at != progress.iteration:  # stopped inside an epoch: save where
        loop.checkpoint()
    skipped_summary = skipped.summary(d)  # a collective: on every rank, not only where it is printed
    say(d, f"trained {progress.iteration} iterations in {time.time() - start:.0f} s; checkpoint "
           f"{checkpoints.last}; {skipped_summary}")

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


def build_model(cfg, args, d):
    """The HTC model on its device: weights loaded, channels-last if asked."""
    model = build_htc(cfg)
    if args.backbone_weights:
        report = load_checkpoint(model, resolve_weights(args.backbone_weights, cfg), source="torchvision")
        say(d, f"backbone weights: {report.loaded} tensors from {args.backbone_weights}")
    if args.load_from:
        say(d, load_checkpoint(model, resolve_weights(args.load_from, cfg)).describe())
    model.to(d.device)
    if args.channels_last:
        from htc_fast.model.acceleration import to_channels_last

        to_channels_last(model)
    return model


def wrap(model, args, d):
    """What the loop calls: the model compiled in place if asked, in DDP with several processes."""
    if args.compile:
        from htc_fast.model.acceleration import compile_model

        compile_model(model)
    if d.world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None)


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
    from htc_fast.evaluation import coco_images

    train_set = coco_train_dataset(root, cfg, split=splits[0], semantic=args.semantic, data_device=args.data_device)
    if len(train_set.class_names) != cfg.model.num_classes:
        raise SystemExit(f"the dataset {root} has {len(train_set.class_names)} categories, the preset {cfg.name} "
                         f"{cfg.model.num_classes}: pick a preset for this dataset or pass "
                         f"--set model.num_classes={len(train_set.class_names)}")
    workers = default_workers(cfg.data.workers_per_gpu) if args.workers is None else args.workers
    grouped = build_train_loader(train_set, cfg, cfg.train.images_per_gpu, d.rank, d.world_size, cfg.train.seed)
    loader = build_run_loader(train_set, grouped, workers, d.device, cfg.train.seed, args.prefetch_factor)
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
    path = latest_checkpoint(work_dir)
    if path is None:
        say(d, f"--resume: no checkpoint in {work_dir}; starting from scratch")
        return None
    state = read_resume_state(path)
    load_checkpoint(model, {"model": state["model"], "meta": state.get("meta", {})}, source="htc_fast")
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    for key, value in state["progress"].items():
        setattr(progress, key, value)
    set_rng_state(state["rng"])
    torch.manual_seed(torch.initial_seed() + d.rank) if d.rank else None
    say(d, f"resumed from {path} at iteration {progress.iteration} (epoch {progress.epoch}, step {progress.step})")
    return path


def maybe_evaluate(model, cfg, coco_gt, val_images, d, log, progress, what):
    if coco_gt is None or not val_images:
        return None
    from htc_fast.evaluation import evaluate_model

    result = evaluate_model(model, val_images, coco_gt, d.device, scale=cfg.data.test_scale, verbose=False,
                            progress=False)
    if d.main and result is not None:
        print(f"evaluation ({what}): bbox AP {result.bbox.AP:.4f}, mask AP {result.segm.AP:.4f}", flush=True)
        log.log_eval(progress.iteration, progress.epoch, {f"{what} {k}": v for k, v in result.as_dict().items()})
    return result


def draw_predictions(model, cfg, image_path, out_path, device, names):
    from htc_fast.data.preprocess import load_image, make_batch
    from htc_fast.inference.visualize import draw, save_png

    image = load_image(image_path)
    model.eval()
    det = model.predict(make_batch([image], cfg.data.test_scale, device=device))[0]
    # A small model trained for minutes scores low: draw its ten best detections above 0.05.
    tenth_best = float(det.scores[min(9, len(det.scores) - 1)]) if len(det.scores) else 1.0
    keep = det.scores >= max(0.05, tenth_best)
    det = det._replace(boxes=det.boxes[keep], scores=det.scores[keep], labels=det.labels[keep],
                       masks=det.masks[keep])
    save_png(draw(image, det, 0.0, names), out_path)
    print(f"predictions on {image_path} drawn to {out_path}")


def say(d, message):
    if d.main:
        print(message, flush=True)


if __name__ == "__main__":
    sys.exit(main())
