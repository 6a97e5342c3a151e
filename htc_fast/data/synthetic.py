"""A small synthetic COCO-format dataset for the built-in default run (``python -m htc_fast.train``
without arguments) and for tests: real files in the real layout, so the whole pipeline runs.

Each image shows 1-4 objects of four classes (square, disc, triangle, bar) in random colours on a
two-region background (a "sky" above a "ground" line). Written under ``root``:

    annotations/instances_{train,val}.json   COCO instances; discs as RLE, the others as polygons
    {train,val}/000000.png ...               the images
    stuffthingmaps/{train,val}/000000.png    semantic maps: thing pixels = the object's label (0..3),
                                             every other pixel 4 (htc_tiny's semantic head: 5 classes)

Deterministic for a seed. Takes a few seconds for a hundred images.
"""
import functools
import json
from pathlib import Path

import numpy as np

CLASSES = ("square", "disc", "triangle", "bar")
BACKGROUND_LABEL = 4  # every non-object pixel of the semantic map (htc_tiny: 4 things + 1 stuff)


@functools.lru_cache(maxsize=4)
def _pixel_centres(height, width):
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    return yy, xx


def _polygon_mask(points, height, width):
    """Boolean mask of a convex polygon given as [(x, y), ...] in pixel coordinates (pixel centres
    inside all edges)."""
    yy, xx = _pixel_centres(height, width)
    inside = np.ones((height, width), dtype=bool)
    n = len(points)
    for i in range(n):
        (x0, y0), (x1, y1) = points[i], points[(i + 1) % n]
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def _object(rng, cls, height, width):
    """(mask, segmentation, kind) of one object of class `cls`, fully inside the image."""
    size = rng.uniform(0.22, 0.45) * min(height, width)
    cx = rng.uniform(size / 2 + 1, width - size / 2 - 1)
    cy = rng.uniform(size / 2 + 1, height - size / 2 - 1)
    h = size / 2
    if cls == "disc":
        yy, xx = _pixel_centres(height, width)
        return ((xx - cx) ** 2 + (yy - cy) ** 2 <= h * h), None, "rle"
    if cls == "square":
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif cls == "triangle":
        pts = [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    else:  # bar: a long thin rectangle
        pts = [(cx - h, cy - h / 3), (cx + h, cy - h / 3), (cx + h, cy + h / 3), (cx - h, cy + h / 3)]
    # Clockwise in image coordinates (y down) so that the half-plane test above keeps the inside.
    mask = _polygon_mask(pts, height, width)
    return mask, [float(v) for p in pts for v in p], "polygon"


def _image(rng, height, width):
    """(H, W, 3) uint8 background: sky and ground with a gradient and noise, and the horizon row."""
    horizon = int(rng.uniform(0.35, 0.65) * height)
    sky, ground = rng.integers(60, 200, 3), rng.integers(30, 160, 3)
    img = np.empty((height, width, 3), dtype=np.float32)
    ramp = np.linspace(0.85, 1.15, height)[:, None, None]
    img[:horizon] = sky
    img[horizon:] = ground
    img *= ramp
    img += rng.normal(0, 6, img.shape)
    return img, horizon


def _split(root, split, count, height, width, rng):
    from PIL import Image
    from pycocotools import mask as mask_utils

    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "stuffthingmaps" / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        img, horizon = _image(rng, height, width)
        semantic = np.full((height, width), BACKGROUND_LABEL, dtype=np.uint8)
        for _ in range(int(rng.integers(1, 5))):
            label = int(rng.integers(0, len(CLASSES)))
            mask, poly, kind = _object(rng, CLASSES[label], height, width)
            if mask.sum() < 16:
                continue
            img[mask] = rng.integers(0, 256, 3)
            semantic[mask] = label
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=label + 1, iscrowd=0,
                                    mask=mask, poly=poly, kind=kind))
        name = f"{i:06d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / name)
        Image.fromarray(semantic).save(root / "stuffthingmaps" / split / name)
        images.append(dict(id=i + 1, file_name=name, height=height, width=width))
    # Later objects are painted over earlier ones: each annotation's mask is what stays visible.
    visible = {}
    for ann in reversed(annotations):
        taken = visible.setdefault(ann["image_id"], np.zeros((height, width), dtype=bool))
        ann["mask"] = ann["mask"] & ~taken
        taken |= ann["mask"]
    out = []
    for ann in annotations:
        mask = ann.pop("mask")
        if mask.sum() < 16:
            continue
        ys, xs = np.nonzero(mask)
        ann["bbox"] = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        ann["area"] = float(mask.sum())
        poly, kind = ann.pop("poly"), ann.pop("kind")
        if kind == "polygon" and mask.sum() == _polygon_mask(
                [(poly[j], poly[j + 1]) for j in range(0, len(poly), 2)], height, width).sum():
            ann["segmentation"] = [poly]
        else:  # a disc, or a polygon partly hidden by a later object: store what is visible
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            ann["segmentation"] = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        out.append(ann)
    categories = [dict(id=k + 1, name=n, supercategory="shape") for k, n in enumerate(CLASSES)]
    data = dict(info=dict(description="htc_fast synthetic shapes"), licenses=[], images=images,
                annotations=out, categories=categories)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))


def make_synthetic_coco(root, num_train=96, num_val=24, size=(96, 128), seed=0) -> Path:
    """Write the dataset under `root` (created) and return it. size: (height, width)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    _split(root, "train", num_train, size[0], size[1], rng)
    _split(root, "val", num_val, size[0], size[1], rng)
    return root
