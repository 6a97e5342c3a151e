"""Model detections -> COCO's result format: the label <-> category-id mapping and one image's
``Detections`` as bbox and segm result dicts.

Conventions are mmdetection's, so numbers compare one to one: label i is the i-th smallest
category id of the annotations; boxes are written as [x, y, w, h] with w = x2 - x1 (no +1);
segm results carry no "bbox", so COCOeval's small/medium/large split uses the mask area.
"""
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from htc_fast.model.inputs import Detections


def category_ids(coco) -> list[int]:
    """label -> category id: the sorted category ids of a pycocotools ``COCO`` (mmdetection's order;
    for COCO's 80 thing classes this is htc_fast.coco_classes.COCO_CLASSES' order)."""
    return sorted(coco.getCatIds())


def category_to_label(coco) -> dict[int, int]:
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


def encode_masks(masks: torch.Tensor) -> list[dict]:
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
                       ) -> tuple[list[dict], Optional[list[dict]]]:
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
    bad = [label for label in labels if not 0 <= label < len(label_to_cat)]
    if bad:
        raise ValueError(f"image {image_id}: labels {sorted(set(bad))} outside [0, {len(label_to_cat)})")
    cats = [int(label_to_cat[label]) for label in labels]
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

