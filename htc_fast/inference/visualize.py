"""What ``python -m htc_fast.predict`` writes per image, and the training run's picture: detections
drawn on the image (masks, boxes, class names), written as PNG, and as JSON (boxes, scores,
labels, COCO RLE masks).
"""
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from htc_fast.coco_classes import COCO_CLASSES
from htc_fast.evaluation.coco_format import encode_masks
from htc_fast.model.inputs import Detections


def class_name(label: int, names=COCO_CLASSES) -> str:
    return names[label] if 0 <= label < len(names) else str(label)


def draw(image: torch.Tensor, det: Detections, score_thr: float, names=COCO_CLASSES) -> torch.Tensor:
    """(3, H, W) uint8 with the detections scoring >= score_thr drawn (masks, boxes, names)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = det.scores >= score_thr
    if not keep.any():
        return image
    labels = det.labels[keep].tolist()
    colors = [((37 * label) % 255, (97 * label) % 255, (173 * label) % 255) for label in labels]
    out = image
    if det.masks is not None:
        out = draw_segmentation_masks(out, det.masks[keep].cpu(), alpha=0.45, colors=colors)
    text = [f"{class_name(label, names)} {s:.2f}" for label, s in zip(labels, det.scores[keep].tolist())]
    return draw_bounding_boxes(out, det.boxes[keep].cpu(), labels=text, colors=colors, width=2)


def save_png(image: torch.Tensor, path: Union[str, Path]) -> None:
    """Writes a (3, H, W) uint8 RGB image (any device) to `path` as an 8-bit RGB PNG, pixels as
    they are. Pillow, not torchvision's `write_png`, which prints a deprecation warning in
    torchvision 0.29."""
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise ValueError(f"save_png: image must be (3, H, W) uint8, got {tuple(image.shape)} {image.dtype}")
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy()), "RGB").save(path, format="PNG")


def to_json(det: Detections) -> list:
    """One dict per detection: bbox [x1, y1, x2, y2], score, label, category, segmentation (RLE)."""
    rles = encode_masks(det.masks) if det.masks is not None else None
    out = []
    for i, (box, score, label) in enumerate(zip(det.boxes.tolist(), det.scores.tolist(), det.labels.tolist())):
        item = {"bbox": [round(v, 3) for v in box], "score": round(score, 5), "label": label,
                "category": class_name(label)}
        if rles is not None:
            item["segmentation"] = rles[i]
        out.append(item)
    return out
