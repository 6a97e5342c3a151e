"""COCO evaluation: model detections -> COCO result dicts -> pycocotools' COCOeval (bbox and segm AP).

Owns the label <-> category-id mapping, the conversion of ``Detections`` to COCO's result format,
the accumulation of results over images (and over ranks with ``torch.distributed``), and the
summary as a dataclass and a text table. It does not run the model: ``htc_fast.evaluate`` does.

Conventions are mmdetection's, so numbers compare one to one: label i is the i-th smallest
category id of the annotations; boxes are written as [x, y, w, h] with w = x2 - x1 (no +1);
segm results carry no "bbox", so COCOeval's small/medium/large split uses the mask area.
"""
import contextlib
import copy
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from htc_fast.model.inputs import Detections

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats, in its order: AP at IoU .50:.95 / .50 / .75, AP small / medium / large (all at
# 100 detections), then AR at 1 / 10 / 100 detections and AR small / medium / large.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# mmdetection's log names of the first six stats (e.g. "bbox_mAP_50"), for comparable logs.
_MMDET_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


def category_ids(coco) -> List[int]:
    """label -> category id: the sorted category ids of a pycocotools ``COCO`` (mmdetection's order;
    for COCO's 80 thing classes this is htc_fast.coco_classes.COCO_CLASSES' order)."""
    return sorted(coco.getCatIds())


def category_to_label(coco) -> Dict[int, int]:
    """category id -> contiguous label in [0, num_categories), the inverse of ``category_ids``."""
    return {cat: label for label, cat in enumerate(category_ids(coco))}


def _rle_to_json(rle: dict) -> dict:
    """A compressed RLE with str counts (what json and COCO.loadRes take); uncompressed RLEs
    (counts as a list) are compressed first."""
    from pycocotools import mask as mask_utils

    h, w = (int(s) for s in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, list):
        counts = mask_utils.frPyObjects(rle, h, w)["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [h, w], "counts": counts}


def encode_masks(masks: torch.Tensor) -> List[dict]:
    """(D, H, W) bool/uint8 masks -> D compressed COCO RLEs (counts as str)."""
    from pycocotools import mask as mask_utils

    if masks.dim() != 3:
        raise ValueError(f"masks must be (D, H, W), got {tuple(masks.shape)}")
    if masks.shape[0] == 0:
        return []
    # pycocotools wants (H, W, D) uint8 in Fortran order; one call encodes all D masks.
    array = np.asfortranarray(masks.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
    return [_rle_to_json(r) for r in mask_utils.encode(array)]


def detections_to_coco(image_id: int, det: Detections, label_to_cat: Sequence[int]
                       ) -> Tuple[List[dict], Optional[List[dict]]]:
    """COCO result dicts of one image's detections.

    Args:
        image_id: the COCO image id.
        det: boxes (D, 4) xyxy original-image pixels, scores (D,), labels (D,) int64 in
            [0, len(label_to_cat)), masks (D, H, W) bool, a list of D RLE dicts, or None.
        label_to_cat: label -> category id (``category_ids(coco)``).
    Returns:
        (bbox_results, segm_results): lists of {"image_id", "category_id", "bbox": [x, y, w, h],
        "score"} and {"image_id", "category_id", "segmentation": RLE (counts str), "score"};
        segm_results is None when det.masks is None and there is at least one detection.
    """
    boxes = det.boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    scores = det.scores.detach().to("cpu", torch.float64).reshape(-1).tolist()
    labels = det.labels.detach().to("cpu").reshape(-1).tolist()
    if not (len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
    bad = [l for l in labels if not 0 <= l < len(label_to_cat)]
    if bad:
        raise ValueError(f"image {image_id}: labels {sorted(set(bad))} outside [0, {len(label_to_cat)})")
    cats = [int(label_to_cat[l]) for l in labels]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    image_id = int(image_id)
    bbox_results = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                    for c, b, s in zip(cats, xywh, scores)]
    if det.masks is None:
        return bbox_results, ([] if not labels else None)
    rles = encode_masks(det.masks) if isinstance(det.masks, torch.Tensor) else [_rle_to_json(r) for r in det.masks]
    if len(rles) != len(labels):
        raise ValueError(f"image {image_id}: {len(rles)} masks for {len(labels)} detections")
    segm_results = [{"image_id": image_id, "category_id": c, "segmentation": r, "score": s}
                    for c, r, s in zip(cats, rles, scores)]
    return bbox_results, segm_results


@dataclass(frozen=True)
class CategoryAP:
    """One category's AP (area "all", 100 detections); -1 where the category has no ground truth."""
    category_id: int
    name: str
    AP: float
    AP50: float
    AP75: float


@dataclass(frozen=True)
class IoUTypeResult:
    """COCOeval's result for one iou type ("bbox" or "segm")."""
    iou_type: str
    stats: Tuple[float, ...]  # the 12 COCOeval stats, named by STAT_NAMES
    per_category: Tuple[CategoryAP, ...] = ()  # empty unless asked for

    @property
    def AP(self) -> float:
        return self.stats[0]

    @property
    def AP50(self) -> float:
        return self.stats[1]

    @property
    def AP75(self) -> float:
        return self.stats[2]

    @property
    def APs(self) -> float:
        return self.stats[3]

    @property
    def APm(self) -> float:
        return self.stats[4]

    @property
    def APl(self) -> float:
        return self.stats[5]


@dataclass(frozen=True)
class EvalResult:
    """Results per iou type (None where not evaluated) over ``num_images`` images."""
    bbox: Optional[IoUTypeResult]
    segm: Optional[IoUTypeResult]
    num_images: int

    def as_dict(self) -> Dict[str, float]:
        """Flat metrics with mmdetection's log names ("bbox_mAP", "segm_mAP_50", ...), for logging."""
        out = {}
        for r in (self.bbox, self.segm):
            if r is not None:
                out.update({f"{r.iou_type}_{n}": float(v) for n, v in zip(_MMDET_NAMES, r.stats)})
        return out


class CocoEvaluator:
    """Accumulates detections per image and evaluates them with COCOeval.

    Only the images passed to ``add`` are evaluated (an image added with no detections counts: its
    ground truth are misses). Results are converted to COCO dicts at ``add`` time, so dense masks
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
        self._results: Dict[int, Tuple[List[dict], Optional[List[dict]]]] = {}

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

    def gather(self) -> None:
        """Merge every rank's results into every rank's evaluator (all_gather_object; a no-op
        without an initialised process group of more than one rank)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._results)
        merged = {}
        for part in parts:
            for image_id, res in part.items():
                merged.setdefault(image_id, res)
        self._results = merged

    def coco_results(self, iou_type: str) -> List[dict]:
        """Every result dict of one iou type, in image-id order (what COCO.loadRes and COCO's
        test server take)."""
        _check_iou_types((iou_type,))
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
        _check_iou_types(iou_types)
        self.gather()
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return None
        if not self._results:
            raise ValueError("CocoEvaluator.evaluate: no images were added")
        image_ids = sorted(self._results)
        by_type = {}
        for iou_type in iou_types:
            by_type[iou_type] = _run_cocoeval(self.coco_gt, self.coco_results(iou_type), iou_type, image_ids,
                                              self.label_to_cat, self.class_names, per_category, verbose)
        return EvalResult(bbox=by_type.get("bbox"), segm=by_type.get("segm"), num_images=len(image_ids))


def _check_iou_types(iou_types: Sequence[str]) -> None:
    if isinstance(iou_types, str) or not iou_types or any(t not in IOU_TYPES for t in iou_types):
        raise ValueError(f"iou_types must be a non-empty sequence of {IOU_TYPES}, got {iou_types!r}")


def _load_results(coco_gt, results: List[dict]):
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


def _run_cocoeval(coco_gt, results, iou_type, image_ids, label_to_cat, class_names, per_category,
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


def format_table(result: EvalResult, per_category: bool = True) -> str:
    """A text table: one row per iou type with the 12 COCOeval stats (in %), then, when the result
    has them and per_category is True, one row per category with AP, AP50, AP75 per iou type
    (categories without ground truth in the evaluated images are left out)."""
    types = [r for r in (result.bbox, result.segm) if r is not None]
    lines = [f"COCO evaluation on {result.num_images} images (% ; -1 = no ground truth)"]
    head = f"{'':<6}" + "".join(f"{n:>7}" for n in STAT_NAMES)
    lines += [head, "-" * len(head)]
    for r in types:
        lines.append(f"{r.iou_type:<6}" + "".join(f"{_pct(v):>7}" for v in r.stats))
    with_rows = [r for r in types if r.per_category]
    if per_category and with_rows:
        width = max(len(c.name) for c in with_rows[0].per_category) + 2
        head = f"{'category':<{width}}" + "".join(f"{r.iou_type + ' ' + n:>11}" for r in with_rows
                                                  for n in ("AP", "AP50", "AP75"))
        lines += ["", head, "-" * len(head)]
        for k, row in enumerate(with_rows[0].per_category):
            cells = [(r.per_category[k].AP, r.per_category[k].AP50, r.per_category[k].AP75) for r in with_rows]
            if all(v < 0 for c in cells for v in c):
                continue  # no ground truth of this category in the evaluated images
            lines.append(f"{row.name:<{width}}" + "".join(f"{_pct(v):>11}" for c in cells for v in c))
    return "\n".join(lines)


def _pct(value: float) -> str:
    return "-1" if value < 0 else f"{100 * value:.1f}"
