"""COCO evaluation: model detections -> COCO result dicts -> pycocotools' COCOeval (bbox and segm AP).

    evaluator = CocoEvaluator(coco_gt)
    evaluator.add(image_id, detections)      # per image, original-image pixels
    result = evaluator.evaluate(("bbox", "segm"), per_category=True)
    print(format_table(result))

or, running a model over a split's images (batched, sharded over ranks):
``evaluate_model(model, coco_images(coco_gt, img_dir), coco_gt, device, batch_size=4)``.

Files: ``coco_format`` (labels <-> category ids, Detections -> result dicts), ``results`` (the
result dataclasses and their table), ``cocoeval`` (pycocotools' COCOeval on result dicts),
``evaluator`` (CocoEvaluator: accumulate, gather across ranks, evaluate), ``loop`` (the model
over the images). The CLI is ``python -m htc_fast.evaluate``.
"""
from htc_fast.evaluation.coco_format import category_ids, category_to_label, detections_to_coco, encode_masks
from htc_fast.evaluation.evaluator import CocoEvaluator
from htc_fast.evaluation.loop import coco_images, evaluate_model, rank_and_world, run_inference
from htc_fast.evaluation.results import IOU_TYPES, STAT_NAMES, CategoryAP, EvalResult, IoUTypeResult, format_table

__all__ = [
    "category_ids", "category_to_label", "detections_to_coco", "encode_masks",
    "CocoEvaluator",
    "coco_images", "evaluate_model", "rank_and_world", "run_inference",
    "IOU_TYPES", "STAT_NAMES", "CategoryAP", "EvalResult", "IoUTypeResult", "format_table",
]
