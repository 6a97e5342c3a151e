"""The evaluation loop: a model over a COCO split's images (batched, decoded ahead by loader
workers, sharded over ranks) into a ``CocoEvaluator``. Called by ``python -m htc_fast.evaluate``
and by training at each epoch end."""
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

import torch.distributed as dist

from htc_fast.evaluation.evaluator import CocoEvaluator
from htc_fast.evaluation.results import IOU_TYPES, EvalResult
from htc_fast.inference import build_inference_loader, check_amp, predict_batches

ImageAndId = tuple[Union[str, Path], int]


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def coco_images(coco_gt, img_dir: Union[str, Path], limit: Optional[int] = None) -> list[ImageAndId]:
    """(path, image id) of the annotation file's images in id order; the first ``limit`` of them
    when limit is given (an integer >= 1; None means all)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all images) or an integer >= 1, got {limit!r}")
    ids = sorted(coco_gt.getImgIds())[:limit]
    return [(Path(img_dir) / coco_gt.imgs[i]["file_name"], i) for i in ids]


def run_inference(model, images: Sequence[ImageAndId], evaluator: CocoEvaluator, device, *,
                  scale=(1333, 800), amp: Optional[str] = None, with_masks: bool = True, progress: bool = True,
                  batch_size: int = 1, workers: int = 0) -> None:
    """Run ``model.predict`` on this rank's shard of ``images`` ((path, COCO image id) pairs) in
    batches of ``batch_size`` and add each image's detections to ``evaluator``. An image that
    cannot be read is skipped with one warning naming the file and recorded with
    ``evaluator.skip``. workers: DataLoader processes decoding ahead (0: in this process). The
    model is put in eval mode and back in its previous mode; a DDP wrapper is looked through."""
    check_amp(amp)
    net = model.module if hasattr(model, "module") and not hasattr(model, "predict") else model
    rank, world = rank_and_world()
    loader = build_inference_loader(images, scale, batch_size=batch_size, workers=workers, rank=rank,
                                    world_size=world)
    total = len(loader.sampler)
    was_training = net.training
    net.eval()
    start, done = time.time(), 0
    try:
        for batch, dets in predict_batches(net, loader, device, amp=amp, masks="rle" if with_masks else None):
            for bad in batch.unreadable:
                warnings.warn(f"evaluation skips unreadable image {bad}", stacklevel=2)
                evaluator.skip(bad.key, str(bad))
            for image, det in zip(batch.images, dets):
                evaluator.add(image.key, det)
            done += len(batch.images) + len(batch.unreadable)
            if progress and rank == 0:
                rate = done / max(time.time() - start, 1e-9)
                print(f"\r[rank 0: {done}/{total}, {world} ranks] {rate:.2f} images/s", end="",
                      file=sys.stderr, flush=True)
    finally:
        net.train(was_training)
    if progress and rank == 0:
        print(file=sys.stderr)


def evaluate_model(model, image_paths_and_ids: Sequence[ImageAndId], coco_gt, device, *,
                   scale=(1333, 800), amp: Optional[str] = None, iou_types: Sequence[str] = IOU_TYPES,
                   per_category: bool = False, verbose: bool = True, progress: bool = True,
                   batch_size: int = 1, workers: int = 0) -> Optional[EvalResult]:
    """COCO AP of ``model`` on ``image_paths_and_ids`` ((path, COCO image id) pairs, e.g.
    ``coco_images(coco_gt, img_dir)``) against ``coco_gt`` (a pycocotools COCO). scale: the test
    scale (cfg.data.test_scale); batch_size, workers: see ``run_inference``. Under
    torch.distributed every rank must call it (each runs its shard); rank 0 gets the EvalResult
    (unreadable images listed in its ``skipped``), the other ranks None."""
    evaluator = CocoEvaluator(coco_gt)
    run_inference(model, image_paths_and_ids, evaluator, device, scale=scale, amp=amp,
                  with_masks="segm" in iou_types, progress=progress, batch_size=batch_size, workers=workers)
    return evaluator.evaluate(iou_types, per_category=per_category, verbose=verbose)
