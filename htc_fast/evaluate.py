"""COCO bbox and segm AP of a model: ``evaluate_model`` (called by training) and
``python -m htc_fast.evaluate``.

    python -m htc_fast.evaluate --config htc_r50_fpn_1x --checkpoint htc_r50_fpn_1x_coco.pth \\
        --data-root data/coco --out results.json
    torchrun --nproc_per_node 8 -m htc_fast.evaluate --config ... --checkpoint ... --data-root ...

reads DIR/annotations/instances_val2017.json and DIR/val2017/ (override with --ann-file and
--img-dir), runs the model with the test-time preprocessing of ``htc_fast.predict`` (one image at a
time, masks pasted straight to RLE), prints COCOeval's summary and a table, and writes the metrics
and every detection in COCO's result format to --out. Under torchrun (WORLD_SIZE > 1) rank r takes
images r, r + world_size, ...; results are gathered on rank 0, which evaluates and writes.
"""
import argparse
import contextlib
import io
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from htc_fast.evaluation import IOU_TYPES, CocoEvaluator, EvalResult, format_table
from htc_fast.preprocess import make_batch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _rank_and_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def run_inference(model, images: Sequence[Tuple[Union[str, Path], int]], evaluator: CocoEvaluator, device, *,
                  scale=(1333, 800), amp: Optional[str] = None, with_masks: bool = True,
                  progress: bool = True) -> None:
    """Run ``model.predict`` on this rank's share of ``images`` ((path, image id) pairs: images
    rank::world_size) one at a time and add the detections to ``evaluator``. The model is put in
    eval mode and back in its previous mode; a DDP wrapper is looked through."""
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
    net = model.module if hasattr(model, "module") and not hasattr(model, "predict") else model
    device = torch.device(device)
    rank, world = _rank_and_world()
    mine = list(images)[rank::world]
    autocast = torch.autocast(device.type, dtype=AMP_DTYPES[amp]) if amp else contextlib.nullcontext()
    was_training = net.training
    net.eval()
    start = time.time()
    try:
        for n, (path, image_id) in enumerate(mine, 1):
            batch = make_batch([path], scale, device=device)
            with torch.no_grad(), autocast:
                det = net.predict(batch, masks="rle" if with_masks else None)[0]
            evaluator.add(image_id, det)
            if progress and rank == 0 and (n == len(mine) or n % 20 == 0 or n == 1):
                rate = n / max(time.time() - start, 1e-9)
                print(f"\r[rank 0: {n}/{len(mine)}, {world} ranks] {rate:.2f} images/s", end="",
                      file=sys.stderr, flush=True)
    finally:
        net.train(was_training)
    if progress and rank == 0:
        print(file=sys.stderr)


def evaluate_model(model, image_paths_and_ids: Sequence[Tuple[Union[str, Path], int]], coco_gt, device, *,
                   scale=(1333, 800), amp: Optional[str] = None, iou_types: Sequence[str] = IOU_TYPES,
                   per_category: bool = False, verbose: bool = True, progress: bool = True
                   ) -> Optional[EvalResult]:
    """COCO AP of ``model`` on ``image_paths_and_ids`` ((path, COCO image id) pairs, e.g.
    ``coco_images(coco_gt, img_dir)``) against ``coco_gt`` (a pycocotools COCO). scale: the test
    scale (cfg.data.test_scale). Under torch.distributed every rank must call it (each runs its
    share); rank 0 gets the EvalResult, the other ranks None."""
    evaluator = CocoEvaluator(coco_gt)
    run_inference(model, image_paths_and_ids, evaluator, device, scale=scale, amp=amp,
                  with_masks="segm" in iou_types, progress=progress)
    return evaluator.evaluate(iou_types, per_category=per_category, verbose=verbose)


def coco_images(coco_gt, img_dir: Union[str, Path], limit: Optional[int] = None):
    """(path, image id) of the annotation file's images in id order, the first ``limit`` of them."""
    ids = sorted(coco_gt.getImgIds())[:limit]
    return [(Path(img_dir) / coco_gt.imgs[i]["file_name"], i) for i in ids]


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
    p.add_argument("--limit", type=int, help="evaluate only the first N images (by id)")
    p.add_argument("--out", help="write metrics and detections (COCO result format) to this JSON file")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="config override")
    args = p.parse_args(argv)

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
    rank, world = _rank_and_world()
    try:
        cfg = get_config(args.config, args.set)
        if args.checkpoint is None and rank == 0:
            print("warning: no --checkpoint: the model has random weights", file=sys.stderr)
        model = build_htc(cfg).eval()
        if args.checkpoint is not None:
            load_checkpoint(model, resolve_weights(args.checkpoint, cfg))
        model.to(device)
        with contextlib.redirect_stdout(sys.stderr if rank == 0 else io.StringIO()):
            coco_gt = COCO(str(ann_file))
        images = coco_images(coco_gt, img_dir, args.limit)
        if rank == 0:
            print(f"{len(images)} images from {img_dir} on {world} rank(s), device {device}", file=sys.stderr)
        evaluator = CocoEvaluator(coco_gt)
        run_inference(model, images, evaluator, device, scale=cfg.data.test_scale, amp=args.amp,
                      with_masks="segm" in args.iou_types)
        result = evaluator.evaluate(args.iou_types, per_category=args.per_category)
        if rank != 0:
            return 0
        print(format_table(result, per_category=args.per_category))
        if args.out:
            out = {"config": args.config, "checkpoint": args.checkpoint, "ann_file": str(ann_file),
                   "num_images": result.num_images, "metrics": result.as_dict(),
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
