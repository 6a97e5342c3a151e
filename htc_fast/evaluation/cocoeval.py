"""pycocotools' COCOeval on a list of result dicts: one iou type at a time, mmdetection's
per-category AP rule."""
import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np

from htc_fast.evaluation.results import IOU_TYPES, CategoryAP, IoUTypeResult


def check_iou_types(iou_types: Sequence[str]) -> None:
    if isinstance(iou_types, str) or not iou_types or any(t not in IOU_TYPES for t in iou_types):
        raise ValueError(f"iou_types must be a non-empty sequence of {IOU_TYPES}, got {iou_types!r}")


def _load_results(coco_gt, results: list[dict]):
    """COCO.loadRes on a copy (it adds keys to the dicts it is given); an empty result list (which
    loadRes cannot take) becomes an empty result COCO object, which COCOeval scores as all misses."""
    from pycocotools.coco import COCO

    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    empty = COCO()
    empty.dataset = {"images": list(coco_gt.dataset["images"]),
                     "categories": copy.deepcopy(coco_gt.dataset["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def run_cocoeval(coco_gt, results, iou_type, image_ids, label_to_cat, class_names, per_category,
                  verbose) -> IoUTypeResult:
    from pycocotools.cocoeval import COCOeval

    coco_dt = _load_results(coco_gt, results)
    evaluator = COCOeval(coco_gt, coco_dt, iou_type)
    evaluator.params.imgIds = list(image_ids)
    evaluator.params.catIds = list(label_to_cat)
    log = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with log:
        if verbose:
            print(f"\nEvaluating {iou_type} on {len(image_ids)} images...")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = tuple(float(s) for s in evaluator.stats)
    rows = ()
    if per_category:
        # precision: (iou thresholds, recall thresholds, categories, area ranges, max dets); -1 marks
        # "no ground truth". Area "all" is index 0, 100 detections the last index (mmdetection's rule).
        precision = evaluator.eval["precision"]
        rows = tuple(CategoryAP(cat, class_names[k], _mean_valid(precision[:, :, k, 0, -1]),
                                _mean_valid(precision[0, :, k, 0, -1]), _mean_valid(precision[5, :, k, 0, -1]))
                     for k, cat in enumerate(label_to_cat))
    return IoUTypeResult(iou_type, stats, rows)


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0

