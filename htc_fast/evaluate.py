"""COCO bbox and segm AP of a model: ``python -m htc_fast.evaluate``.

    python -m htc_fast.evaluate --config htc_r50_fpn_1x --checkpoint htc_r50_fpn_1x_coco.pth \\
        --data-root data/coco --batch-size 4 --out results.json
    torchrun --nproc_per_node 8 -m htc_fast.evaluate --config ... --checkpoint ... --data-root ...

reads DIR/annotations/instances_val2017.json and DIR/val2017/ (override with --ann-file and
--img-dir), runs the model with mmdetection's test-time preprocessing in batches of --batch-size
(images decoded ahead by --workers loader processes; masks pasted straight to RLE), prints
COCOeval's summary and a table, and writes the metrics and every detection in COCO's result
format to --out. An image that cannot be read is skipped with a warning naming it; the table and
--out count and list the skipped images (they are left out of the AP), and the exit status stays 0.
Under torchrun (WORLD_SIZE > 1) each rank takes a contiguous shard of the images; results are
gathered on rank 0, which evaluates and writes.

The helpers live in ``htc_fast.evaluation``; ``evaluate_model``, ``run_inference`` and
``coco_images`` are re-exported here for existing callers.
"""
import argparse
import contextlib
import io
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from htc_fast.evaluation import (  # noqa: F401
    IOU_TYPES,
    CocoEvaluator,
    coco_images,
    evaluate_model,
    format_table,
    rank_and_world,
    run_inference,
)
from htc_fast.inference import AMP_DTYPES, prepare_model


def _init_distributed(device: Optional[str]) -> torch.device:
    """Init the process group under torchrun (WORLD_SIZE > 1): nccl on cuda, gloo on cpu."""
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return torch.device(want)
    if torch.device(want).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device(want)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m htc_fast.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="htc_r50_fpn_1x")
    p.add_argument("--checkpoint", help="checkpoint path, URL or 'released' (default: random weights)")
    p.add_argument("--data-root", required=True, help="COCO folder (annotations/, val2017/)")
    p.add_argument("--ann-file", help="default DATA_ROOT/annotations/instances_val2017.json")
    p.add_argument("--img-dir", help="default DATA_ROOT/val2017")
    p.add_argument("--iou-types", nargs="+", choices=IOU_TYPES, default=list(IOU_TYPES))
    p.add_argument("--per-category", action="store_true", help="also print AP per category")
    p.add_argument("--device")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES))
    p.add_argument("--limit", type=int, metavar="N",
                   help="evaluate only the first N images by id (N >= 1; default all)")
    p.add_argument("--batch-size", type=int, default=1, help="images per model call (default 1)")
    p.add_argument("--workers", type=int, help="image decoding processes (default: the preset's workers_per_gpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone, FPN and heads")
    p.add_argument("--channels-last", action="store_true", help="run the convolutions in channels-last layout")
    p.add_argument("--out", help="write metrics and detections (COCO result format) to this JSON file")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="config override")
    args = p.parse_args(argv)
    # --limit 0 or -1 would silently evaluate no image or all but the last (a Python slice): refuse.
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit must be >= 1 (leave it out to evaluate every image), got {args.limit}")
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")

    from pycocotools.coco import COCO

    from htc_fast.config import get_config
    from htc_fast.model.checkpoint import load_checkpoint
    from htc_fast.model.htc import build_htc
    from htc_fast.weights import resolve_weights

    root = Path(args.data_root)
    ann_file = Path(args.ann_file or root / "annotations" / "instances_val2017.json")
    img_dir = Path(args.img_dir or root / "val2017")
    if not ann_file.is_file():
        p.error(f"annotation file not found: {ann_file}")
    if not img_dir.is_dir():
        p.error(f"image folder not found: {img_dir}")
    started_dist = not dist.is_initialized()
    device = _init_distributed(args.device)
    rank, world = rank_and_world()
    try:
        cfg = get_config(args.config, args.set)
        if args.checkpoint is None and rank == 0:
            print("warning: no --checkpoint: the model has random weights", file=sys.stderr)
        model = build_htc(cfg).eval()
        if args.checkpoint is not None:
            load_checkpoint(model, resolve_weights(args.checkpoint, cfg))
        model = prepare_model(model.to(device), compile=args.compile, channels_last=args.channels_last)
        with contextlib.redirect_stdout(sys.stderr if rank == 0 else io.StringIO()):
            coco_gt = COCO(str(ann_file))
        images = coco_images(coco_gt, img_dir, args.limit)
        if rank == 0:
            print(f"{len(images)} images from {img_dir} on {world} rank(s), device {device}", file=sys.stderr)
        evaluator = CocoEvaluator(coco_gt)
        workers = cfg.data.workers_per_gpu if args.workers is None else args.workers
        run_inference(model, images, evaluator, device, scale=cfg.data.test_scale, amp=args.amp,
                      with_masks="segm" in args.iou_types, batch_size=args.batch_size, workers=workers)
        try:
            result = evaluator.evaluate(args.iou_types, per_category=args.per_category)
        except ValueError as exc:  # e.g. every image was unreadable: say so without a traceback
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if rank != 0:
            return 0
        print(format_table(result, per_category=args.per_category))
        if args.out:
            out = {"config": args.config, "checkpoint": args.checkpoint, "ann_file": str(ann_file),
                   "num_images": result.num_images, "skipped": list(result.skipped), "metrics": result.as_dict(),
                   **{t: asdict(getattr(result, t)) for t in args.iou_types},
                   "results": {t: evaluator.coco_results(t) for t in args.iou_types}}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(out))
            print(f"wrote {args.out}", file=sys.stderr)
        return 0
    finally:
        if started_dist and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
