"""What a COCO evaluation returns: per-iou-type stats, optional per-category AP, the images that
were evaluated and those skipped as unreadable, and the text table the CLI prints."""
from dataclasses import dataclass
from typing import Optional

IOU_TYPES = ("bbox", "segm")
# COCOeval.stats, in its order: AP at IoU .50:.95 / .50 / .75, AP small / medium / large (all at
# 100 detections), then AR at 1 / 10 / 100 detections and AR small / medium / large.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# mmdetection's log names of the first six stats (e.g. "bbox_mAP_50"), for comparable logs.
_MMDET_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")


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
    stats: tuple[float, ...]  # the 12 COCOeval stats, named by STAT_NAMES
    per_category: tuple[CategoryAP, ...] = ()  # empty unless asked for

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
    """Results per iou type (None where not evaluated) over ``num_images`` images. skipped: one
    "file: reason" line per image that could not be read; those images are left out of the
    evaluation (their ground truth is neither matched nor missed)."""
    bbox: Optional[IoUTypeResult]
    segm: Optional[IoUTypeResult]
    num_images: int
    skipped: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, float]:
        """Flat metrics with mmdetection's log names ("bbox_mAP", "segm_mAP_50", ...), for logging."""
        out = {}
        for r in (self.bbox, self.segm):
            if r is not None:
                out.update({f"{r.iou_type}_{n}": float(v) for n, v in zip(_MMDET_NAMES, r.stats)})
        return out


def format_table(result: EvalResult, per_category: bool = True) -> str:
    """A text table: one row per iou type with the 12 COCOeval stats (in %), then, when the result
    has them and per_category is True, one row per category with AP, AP50, AP75 per iou type
    (categories without ground truth in the evaluated images are left out)."""
    types = [r for r in (result.bbox, result.segm) if r is not None]
    skipped = f", {len(result.skipped)} unreadable images skipped" if result.skipped else ""
    lines = [f"COCO evaluation on {result.num_images} images{skipped} (% ; -1 = no ground truth)"]
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
