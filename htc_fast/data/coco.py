"""COCO instances dataset for HTC training and evaluation.

What this module owns: reading an instances json (mmdetection's `CocoDataset` rules), checking it,
decoding one image with its boxes, labels, masks (polygons, uncompressed or compressed RLE) and
semantic map into a `Sample` at the ORIGINAL image size. What it does not own: resizing, flipping
(`transforms.py`), batching (`collate.py`), sampling (`samplers.py`).

Rules (mmdetection 2.x `CocoDataset._parse_ann_info` / 3.x `parse_data_info`):
  * labels: category ids sorted ascending -> 0..C-1 (COCO: the order of `COCO_CLASSES`);
  * box = [x, y, x + w, y + h] in pixels (no -1);
  * dropped, each with its reason counted in `report.dropped`: `ignore` flag set, box not
    overlapping the image, w < 1, h < 1 or area <= 0 ("degenerate"), unknown category, and
    malformed entries (bbox not 4 finite numbers, area missing/non-finite, segmentation neither a
    polygon list nor an RLE dict of the image's size);
  * crowd annotations (`iscrowd=1`) are NOT instance targets: their boxes go to
    `Sample.ignore_boxes` (mmdetection's `gt_bboxes_ignore`; HTC's assigners do not use them), their
    masks are only used by the semantic fallback;
  * training (`test_mode=False`, `filter_empty_gt=True`) keeps images with min(w, h) >= `min_size`
    (32) and at least one usable non-crowd instance. mmdetection keeps images whose only
    annotations are crowd or invalid ones; we skip them too (they carry no instance targets).
    Test mode keeps every image whose file exists.
Images whose file is missing are left out (counted; `check_files=False` defers that to load time).
"""
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from htc_fast.data.image_decode import read_rgb
from htc_fast.data.raster import decode_rle
from htc_fast.data.report import EXAMPLES_PER_REASON, DatasetReport
from htc_fast.data.semantic import ThingIds, load_stuff_map, semantic_from_instances

Key = Union[int, tuple[int, int, int]]  # index, or (index, seed, epoch) from the train sampler


class BadSampleError(RuntimeError):
    """An image (or its annotations / stuff map) cannot be loaded; the message names the file."""


@dataclass
class Sample:
    """One image and its ground truth. Before transforms everything is at the original size.

    image: (3, h, w) uint8 RGB (or, with `data_device`, an `EncodedImage` to decode later);
    boxes: (G, 4) float32 xyxy; labels: (G,) int64; masks: (G, h, w) bool, `MaskCrops` (the fast
    path: dense where the batch is used), or None (test mode); ignore_boxes: (K, 4) float32 crowd boxes;
    semantic: (ceil(h / s), ceil(w / s)) uint8 (255 = ignore) or None, the image's map sampled
    every s = `semantic_stride` pixels (rows and columns 0, s, 2s, ...; s = 1: the full map);
    scale_factor: (w_scale, h_scale) from the original image; flipped: horizontally flipped."""
    image: object  # Tensor or EncodedImage
    boxes: Tensor
    labels: Tensor
    masks: object  # Tensor, MaskCrops or None
    ignore_boxes: Tensor
    semantic: Optional[Tensor]
    image_id: int
    file_name: str
    original_shape: tuple[int, int]
    scale_factor: tuple[float, float] = (1.0, 1.0)
    flipped: bool = False
    semantic_stride: int = 1

    @property
    def image_shape(self) -> tuple[int, int]:
        return int(self.image.shape[1]), int(self.image.shape[2])


@dataclass
class _Instance:
    ann_id: object  # the json's id (reported in messages)
    box: tuple[float, float, float, float]
    label: int
    category_id: int
    segmentation: object
    crowd: bool
    area: float  # the json's area (orders the painting of derived semantic maps)


@dataclass
class _ImageRecord:
    image_id: int
    file_name: str
    height: int
    width: int
    instances: list[_Instance] = field(default_factory=list)

    @property
    def num_targets(self) -> int:
        return sum(not inst.crowd for inst in self.instances)


def _finite_numbers(values, n: Optional[int] = None) -> bool:
    return (isinstance(values, (list, tuple)) and (n is None or len(values) == n)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    for v in values))


def _check_segmentation(seg, height: int, width: int):
    """The segmentation to keep (invalid sub-polygons removed, as mmdetection 3.x does) or a
    string saying why it is unusable."""
    if isinstance(seg, list):
        polys = [p for p in seg if _finite_numbers(p) and len(p) % 2 == 0 and len(p) >= 6]
        return polys if polys else f"no valid polygon in {len(seg)} polygon(s)"
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE without 'counts'/'size'"
        if list(seg["size"]) != [height, width]:
            return f"RLE size {seg['size']} != image (h, w) {[height, width]}"
        if not isinstance(seg["counts"], (list, str, bytes)):
            return f"RLE counts of type {type(seg['counts']).__name__}"
        return seg
    return f"segmentation of type {type(seg).__name__} (expected polygon list or RLE dict)"


def decode_segmentation(seg, height: int, width: int) -> np.ndarray:
    """(h, w) uint8 mask of a polygon list, an uncompressed RLE (counts list) or a compressed
    RLE (counts string), like mmdetection's `_poly2mask` (polygons merged into one RLE)."""
    if isinstance(seg, list):
        return mask_utils.decode([mask_utils.merge(mask_utils.frPyObjects(seg, height, width))])[:, :, 0]
    return decode_rle(seg, height, width)


class CocoDetection(torch.utils.data.Dataset):
    """COCO instances dataset (see the module docstring for the rules).

    Args:
        ann_file: instances json.
        image_dir: folder of the images (`file_name` is relative to it).
        transform: callable `(Sample, np.random.Generator) -> Sample` (`TrainTransform`,
            `TestTransform`), or None for samples at the original size.
        test_mode: keep every image, no instance masks decoded (`Sample.masks` None).
        semantic: "stuff_maps" (read `stuff_dir/<file stem>.png`), "from_instances" (see
            `semantic.py`), "off" (`Sample.semantic` None). Default: "stuff_maps" when
            `stuff_dir` is given, else "off".
        thing_ids: label values of the "from_instances" maps: "stuff_id" (category id - 1) or
            "label" (0..C-1).
        filter_empty_gt, min_size: training image filter.
        check_files: look for every image (and stuff map) file at construction.
        semantic_stride: semantic maps of transformed samples are sampled every that many pixels
            (the semantic head's stride, 8 for HTC: the loss reads nothing else); 1: full maps.
        fast: with a transform that has `draw` (`TrainTransform`, `TestTransform`), load each
            sample straight at the network size (`resized_sample.load_resized`); False: decode at
            the original size, then `transform` (the reference path).
        data_device: None (decode in the workers) or a device ("cuda", "cpu"): fast-path samples
            then carry the file's bytes (`device_decode.EncodedImage`, header checked) and the
            batch decodes, resizes, flips, normalises and pads on that device.
        skip_bad: `__getitem__` replaces an image that fails to load by the next loadable one of
            the same aspect group (with a warning) instead of raising; at most `max_refetch` tries.
    """

    def __init__(self, ann_file: Union[str, Path], image_dir: Union[str, Path], *,
                 transform: Optional[Callable] = None, test_mode: bool = False,
                 stuff_dir: Union[str, Path, None] = None,
                 semantic: Optional[Literal["stuff_maps", "from_instances", "off"]] = None,
                 thing_ids: ThingIds = "stuff_id", filter_empty_gt: bool = True, min_size: int = 32,
                 check_files: bool = True, skip_bad: bool = False, max_refetch: int = 10,
                 semantic_stride: int = 1, fast: bool = True, data_device=None):
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.stuff_dir = None if stuff_dir is None else Path(stuff_dir)
        self.semantic = semantic or ("stuff_maps" if stuff_dir is not None else "off")
        if self.semantic not in ("stuff_maps", "from_instances", "off"):
            raise ValueError(f"semantic must be 'stuff_maps', 'from_instances' or 'off', got {self.semantic!r}")
        if self.semantic == "stuff_maps" and self.stuff_dir is None:
            raise ValueError("semantic='stuff_maps' needs stuff_dir")
        if thing_ids not in ("stuff_id", "label"):
            raise ValueError(f"thing_ids must be 'stuff_id' or 'label', got {thing_ids!r}")
        self.transform, self.test_mode, self.thing_ids = transform, test_mode, thing_ids
        self.skip_bad, self.max_refetch = skip_bad, max_refetch
        self._warned: set[int] = set()  # indices whose failure was reported (once per process)
        if isinstance(semantic_stride, bool) or not isinstance(semantic_stride, int) or semantic_stride < 1:
            raise ValueError(f"semantic_stride must be a positive int, got {semantic_stride!r}")
        self.semantic_stride, self.fast = semantic_stride, fast
        self.data_device = None if data_device is None else torch.device(data_device)
        try:
            with open(self.ann_file) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read annotation file {self.ann_file}: {exc}") from exc
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise ValueError(f"annotation file {self.ann_file} has no '{key}' list")
        self.cat_ids = sorted(int(c["id"]) for c in data["categories"])
        self.cat2label = {c: i for i, c in enumerate(self.cat_ids)}
        names = {int(c["id"]): c.get("name", str(c["id"])) for c in data["categories"]}
        self.class_names = tuple(names[c] for c in self.cat_ids)
        self.report = DatasetReport(images_in_file=len(data["images"]))
        records = self._parse(data)
        self.records = self._filter(records, filter_empty_gt and not test_mode, min_size, check_files)
        self.report.images_kept = len(self.records)
        self._flags = [0 if r.width >= r.height else 1 for r in self.records]
        if any(self.report.dropped.values()) or self.report.images_missing_file or self.report.missing_stuff_maps:
            warnings.warn(f"{self.ann_file}: {self.report.summary()}", stacklevel=2)

    # -- construction -------------------------------------------------------------------------

    def _parse(self, data: dict) -> list[_ImageRecord]:
        records: dict[int, _ImageRecord] = {}
        for img in data["images"]:
            try:
                rec = _ImageRecord(int(img["id"]), str(img["file_name"]), int(img["height"]), int(img["width"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{self.ann_file}: malformed image entry {img!r:.200}: {exc!r}") from exc
            records[rec.image_id] = rec
        rep = self.report
        for ann in data["annotations"]:
            if not isinstance(ann, dict):
                rep.note("malformed annotation", f"annotation entry {ann!r:.80} is not an object")
                continue
            ann_id = ann.get("id", "?")
            rec = records.get(ann.get("image_id")) if isinstance(ann.get("image_id"), int) else None
            if rec is None:
                rep.note("unknown image", f"annotation {ann_id}: image_id {ann.get('image_id')!r}")
                continue
            where = f"annotation {ann_id} ({rec.file_name})"
            if ann.get("ignore", False):
                rep.note("ignore flag", where)
                continue
            bbox, area = ann.get("bbox"), ann.get("area")
            if not _finite_numbers(bbox, 4):
                rep.note("malformed bbox", f"{where}: bbox {bbox!r:.80}")
                continue
            if not _finite_numbers([area]):
                rep.note("malformed area", f"{where}: area {area!r:.40}")
                continue
            if not isinstance(ann.get("category_id"), int) or ann["category_id"] not in self.cat2label:
                rep.note("unknown category", f"{where}: category_id {ann.get('category_id')!r}")
                continue
            x, y, w, h = (float(v) for v in bbox)
            inter_w = max(0.0, min(x + w, rec.width) - max(x, 0.0))
            inter_h = max(0.0, min(y + h, rec.height) - max(y, 0.0))
            if inter_w * inter_h == 0:
                rep.note("box outside image", f"{where}: bbox {bbox}")
                continue
            if area <= 0 or w < 1 or h < 1:
                rep.note("degenerate box (w or h < 1 or area <= 0)", f"{where}: bbox {bbox}, area {area}")
                continue
            seg = _check_segmentation(ann.get("segmentation"), rec.height, rec.width)
            if isinstance(seg, str):
                rep.note("malformed segmentation", f"{where}: {seg}")
                continue
            crowd = bool(ann.get("iscrowd", 0))
            rec.instances.append(_Instance(ann_id, (x, y, x + w, y + h), self.cat2label[ann["category_id"]],
                                           int(ann["category_id"]), seg, crowd, float(area)))
        return list(records.values())

    def _filter(self, records, filter_empty: bool, min_size: int, check_files: bool) -> list[_ImageRecord]:
        rep, kept = self.report, []
        for rec in records:
            if filter_empty and rec.num_targets == 0:
                rep.images_without_targets += 1
                continue
            if filter_empty and min(rec.width, rec.height) < min_size:
                rep.images_too_small += 1
                continue
            if check_files and not (self.image_dir / rec.file_name).is_file():
                rep.images_missing_file += 1
                if len(rep.examples["missing image file"]) < EXAMPLES_PER_REASON:
                    rep.examples["missing image file"].append(str(self.image_dir / rec.file_name))
                continue
            if check_files and self.semantic == "stuff_maps" and not self.stuff_map_path(rec).is_file():
                rep.missing_stuff_maps += 1
                if len(rep.examples["missing stuff map"]) < EXAMPLES_PER_REASON:
                    rep.examples["missing stuff map"].append(str(self.stuff_map_path(rec)))
            kept.append(rec)
        for rec in kept:
            rep.instances += rec.num_targets
            rep.crowd += len(rec.instances) - rec.num_targets
        return kept

    # -- access ---------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_ids(self) -> list[int]:
        return [r.image_id for r in self.records]

    @property
    def group_flags(self) -> list[int]:
        """Aspect-ratio group of each image: 0 when w >= h (landscape), 1 when w < h."""
        return list(self._flags)

    def stuff_map_path(self, rec: _ImageRecord) -> Path:
        return self.stuff_dir / (rec.file_name.rsplit(".", 1)[0] + ".png")

    def load(self, index: int, scale: Optional[tuple[int, int]] = None, flip: bool = False) -> Sample:
        """Sample `index` at its original size (`scale` None: the reference path), or resized into
        `scale` and mirrored when `flip` (`resized_sample.load_resized`, the fast path);
        `BadSampleError` naming the file when it cannot."""
        if scale is not None:
            from htc_fast.data.resized_sample import load_resized  # it imports this module

            return load_resized(self, index, scale, flip)
        rec = self.records[index]
        image = torch.from_numpy(self.read_image(rec).copy()).permute(2, 0, 1)
        targets = [i for i in rec.instances if not i.crowd]
        crowd = [i for i in rec.instances if i.crowd]
        boxes = torch.tensor([i.box for i in targets], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([i.label for i in targets], dtype=torch.int64)
        ignore = torch.tensor([i.box for i in crowd], dtype=torch.float32).reshape(-1, 4)
        masks = None if self.test_mode else self._masks(rec, targets)
        semantic = None
        if self.semantic == "stuff_maps":
            try:
                semantic = load_stuff_map(self.stuff_map_path(rec), (rec.height, rec.width))
            except (OSError, ValueError) as exc:
                raise BadSampleError(f"image {rec.image_id} ({rec.file_name}): {exc}") from exc
        elif self.semantic == "from_instances":
            painted = targets + crowd
            thing_masks = masks if masks is not None else self._masks(rec, targets)
            thing_masks = torch.cat([thing_masks, self._masks(rec, crowd)])
            values = [i.category_id - 1 if self.thing_ids == "stuff_id" else i.label for i in painted]
            semantic = semantic_from_instances(thing_masks, values, (rec.height, rec.width))
        return Sample(image, boxes, labels, masks, ignore, semantic, rec.image_id, rec.file_name,
                      (rec.height, rec.width))

    def read_image(self, rec: _ImageRecord) -> np.ndarray:
        """(h, w, 3) uint8 RGB (read-only) of a record's image; BadSampleError naming the file when
        it cannot be read or its size disagrees with the annotations."""
        path = self.image_dir / rec.file_name
        try:
            array = read_rgb(path)
        except (OSError, ValueError) as exc:
            raise BadSampleError(f"image {rec.image_id}: {exc}") from exc
        if array.shape[:2] != (rec.height, rec.width):
            raise BadSampleError(f"image {path} is {array.shape[:2]} (h, w) but the annotations "
                                 f"say {(rec.height, rec.width)}")
        return array

    def decode_instance(self, rec: _ImageRecord, inst: _Instance) -> np.ndarray:
        """(h, w) uint8 mask of one annotation at the original size; BadSampleError naming it."""
        try:
            return decode_segmentation(inst.segmentation, rec.height, rec.width)
        except Exception as exc:  # pycocotools raises bare Exceptions and TypeErrors
            raise BadSampleError(f"annotation {inst.ann_id} of image {rec.image_id} ({rec.file_name}): "
                                 f"cannot decode its segmentation: {exc!r}") from exc

    def _masks(self, rec: _ImageRecord, instances: Sequence[_Instance]) -> Tensor:
        out = torch.zeros(len(instances), rec.height, rec.width, dtype=torch.bool)
        for k, inst in enumerate(instances):
            out[k] = torch.from_numpy(self.decode_instance(rec, inst)) != 0
        return out

    def try_load(self, index: int, scale: Optional[tuple[int, int]] = None, flip: bool = False) -> Optional[Sample]:
        """`load(index, scale, flip)`, or None when it fails, with a warning naming the file the
        first time this process fails on it (an epoch revisits a bad file; one warning is enough,
        and the run's summary counts every skip)."""
        try:
            return self.load(index, scale, flip)
        except BadSampleError as exc:
            if index not in self._warned:
                self._warned.add(index)
                warnings.warn(f"skipping a sample: {exc}", stacklevel=2)
            return None

    def __getitem__(self, key: Key) -> Sample:
        """`key`: an index, or `(index, seed, epoch)` (the train sampler's keys): the random
        transform then draws from `np.random.default_rng([seed, epoch, index])`, so a run is
        reproducible whatever the number of workers. A plain index draws fresh randomness."""
        index, rng_seed = (key, None) if isinstance(key, (int, np.integer)) else (key[0], [key[1], key[2], key[0]])
        rng = np.random.default_rng(rng_seed)
        # the same draws, in the same order, as `transform(sample, rng)`
        plan = self.transform.draw(rng) if self.fast and hasattr(self.transform, "draw") else (None, False)
        sample, tried, original = None, 0, index
        while sample is None:
            if not self.skip_bad:
                sample = self.load(index, *plan)
                break
            sample = self.try_load(index, *plan)
            if sample is None:
                tried += 1
                if tried > self.max_refetch:
                    raise BadSampleError(f"{tried} consecutive samples from index {original} failed to load")
                index = self._next_in_group(original, tried)
        if self.transform is not None and plan[0] is None:
            sample = self.transform(sample, rng)
        return sample

    def _next_in_group(self, index: int, tried: int = 1) -> int:
        """The `tried`-th replacement for the unreadable image `index`: the other images of its
        aspect group first (cyclically after it), then the other groups' (an image alone in its
        group must not abort training; that batch then mixes aspect ratios)."""
        flags, n = self._flags, len(self._flags)
        after = [(index + step) % n for step in range(1, n)]
        candidates = [j for j in after if flags[j] == flags[index]] + [j for j in after if flags[j] != flags[index]]
        return candidates[(tried - 1) % len(candidates)] if candidates else index
