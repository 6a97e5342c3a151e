"""``CocoEvaluator``: accumulates one image's detections at a time (as COCO result dicts, so
dense masks are not kept), gathers them across ranks and scores them with COCOeval."""
from collections.abc import Sequence
from typing import Optional

import torch.distributed as dist

from htc_fast.evaluation.coco_format import category_ids, detections_to_coco
from htc_fast.evaluation.cocoeval import check_iou_types, run_cocoeval
from htc_fast.evaluation.results import IOU_TYPES, EvalResult
from htc_fast.model.inputs import Detections


class CocoEvaluator:
    """Accumulates detections per image and evaluates them with COCOeval.

    Only the images passed to ``add`` are evaluated (an image added with no detections counts: its
    ground truth are misses); images passed to ``skip`` (unreadable files) are left out and listed
    in the result. Results are converted to COCO dicts at ``add`` time, so dense masks
    are not kept. Under torch.distributed every rank adds its share of images and every rank calls
    ``evaluate`` (a collective); rank 0 gets the result, the other ranks None.

    Args:
        coco_gt: a pycocotools ``COCO`` with the ground truth.
        class_names: label -> name for tables; default the categories' names.
    """

    def __init__(self, coco_gt, class_names: Optional[Sequence[str]] = None):
        self.coco_gt = coco_gt
        self.label_to_cat = category_ids(coco_gt)
        cats = coco_gt.loadCats(self.label_to_cat)
        self.class_names = tuple(class_names) if class_names is not None else tuple(c["name"] for c in cats)
        # image id -> (bbox results, segm results or None when the detections had no masks)
        self._results: dict[int, tuple[list[dict], Optional[list[dict]]]] = {}
        self._skipped: dict[int, str] = {}  # image id -> "file: reason"

    def __len__(self) -> int:
        return len(self._results)

    def add(self, image_id: int, det: Detections) -> None:
        """Record one image's detections (original-image pixels). Adding an image twice keeps the
        first (a distributed sampler may pad its last batch with repeated images)."""
        image_id = int(image_id)
        if image_id not in self.coco_gt.imgs:
            raise KeyError(f"image id {image_id} is not in the ground truth")
        if image_id in self._results:
            return
        bbox, segm = detections_to_coco(image_id, det, self.label_to_cat)
        if segm:
            info = self.coco_gt.imgs[image_id]
            size = [info["height"], info["width"]]
            if segm[0]["segmentation"]["size"] != size:
                raise ValueError(f"image {image_id}: masks are {segm[0]['segmentation']['size']}, the "
                                 f"image is {size} (masks must be in original-image pixels)")
        self._results[image_id] = (bbox, segm)

    def skip(self, image_id: int, reason: str) -> None:
        """Record that an image could not be read (reason: "file: why"). It is not evaluated; the
        result lists it. An image that was also added (e.g. read on another rank) counts as added."""
        self._skipped.setdefault(int(image_id), str(reason))

    def gather(self) -> None:
        """Merge every rank's results into every rank's evaluator (all_gather_object; a no-op
        without an initialised process group of more than one rank)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (self._results, self._skipped))
        results, skipped = {}, {}
        for part_results, part_skipped in parts:
            for image_id, res in part_results.items():
                results.setdefault(image_id, res)
            for image_id, reason in part_skipped.items():
                skipped.setdefault(image_id, reason)
        self._results, self._skipped = results, skipped

    def coco_results(self, iou_type: str) -> list[dict]:
        """Every result dict of one iou type, in image-id order (what COCO.loadRes and COCO's
        test server take)."""
        check_iou_types((iou_type,))
        index = IOU_TYPES.index(iou_type)
        out = []
        for image_id in sorted(self._results):
            res = self._results[image_id][index]
            if res is None:
                raise ValueError(f"segm results asked for, but image {image_id}'s detections had no masks")
            out.extend(res)
        return out

    def evaluate(self, iou_types: Sequence[str] = IOU_TYPES, per_category: bool = False,
                 verbose: bool = True) -> Optional[EvalResult]:
        """Gather across ranks, then COCOeval on rank 0. verbose prints COCOeval's summary.
        Returns an EvalResult on rank 0 (and without distributed), None on the other ranks."""
        check_iou_types(iou_types)
        self.gather()
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return None
        if not self._results:
            unreadable = f" ({len(self._skipped)} skipped as unreadable)" if self._skipped else ""
            raise ValueError(f"CocoEvaluator.evaluate: no images were added{unreadable}")
        image_ids = sorted(self._results)
        by_type = {}
        for iou_type in iou_types:
            by_type[iou_type] = run_cocoeval(self.coco_gt, self.coco_results(iou_type), iou_type, image_ids,
                                              self.label_to_cat, self.class_names, per_category, verbose)
        skipped = tuple(reason for image_id, reason in sorted(self._skipped.items()) if image_id not in self._results)
        return EvalResult(bbox=by_type.get("bbox"), segm=by_type.get("segm"), num_images=len(image_ids),
                          skipped=skipped)


