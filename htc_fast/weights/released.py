"""The released HTC checkpoints, one per preset, and the COCO val2017 AP mmdetection reports.

What it owns: the table (preset name -> checkpoint URL and reported box / mask AP). What it does
not own: downloading (downloader.py) or loading (htc_fast.model.checkpoint).

The files are mmdetection 2.x's HTC model-zoo releases. By open-mmlab's publishing convention the
part of the file name after the date is the first 8 hex digits of the file's sha256; the
downloader reads it from the name and checks it (see downloader.hash_prefix_of).
"""
from __future__ import annotations

from typing import NamedTuple

_ZOO = "https://download.openmmlab.com/mmdetection/v2.0/htc"


class ReleasedCheckpoint(NamedTuple):
    """One row of mmdetection's HTC model table.

    url: the checkpoint file (a dict with `state_dict` in mmdetection's keys, and `meta`).
    box_ap, mask_ap: COCO val2017 AP (x100) that mmdetection reports for it.
    """
    url: str
    box_ap: float
    mask_ap: float


def _row(folder: str, stamp: str, box_ap: float, mask_ap: float) -> ReleasedCheckpoint:
    return ReleasedCheckpoint(f"{_ZOO}/{folder}/{folder}_{stamp}.pth", box_ap, mask_ap)


# preset name (htc_fast.config.PRESETS) -> its released checkpoint. The DCN preset's name spells
# "c3_c5" where mmdetection's folder spells "c3-c5" (Python identifiers have no hyphen).
RELEASED: dict[str, ReleasedCheckpoint] = {
    "htc_r50_fpn_1x": _row("htc_r50_fpn_1x_coco", "20200317-7332cf16", 42.3, 37.4),
    "htc_r50_fpn_20e": _row("htc_r50_fpn_20e_coco", "20200319-fe28c577", 43.3, 38.3),
    "htc_r101_fpn_20e": _row("htc_r101_fpn_20e_coco", "20200317-9b41b48f", 44.8, 39.6),
    "htc_x101_32x4d_fpn_16x1_20e": _row("htc_x101_32x4d_fpn_16x1_20e_coco", "20200318-de97ae01",
                                        46.1, 40.5),
    "htc_x101_64x4d_fpn_16x1_20e": _row("htc_x101_64x4d_fpn_16x1_20e_coco", "20200318-b181fd7a",
                                        47.0, 41.4),
    "htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e": _row(
        "htc_x101_64x4d_fpn_dconv_c3-c5_mstrain_400_1400_16x1_20e_coco", "20200312-946fd751",
        50.4, 43.8),
}


def released_checkpoint(preset: str) -> ReleasedCheckpoint:
    """The released checkpoint of `preset`; ValueError naming the presets that have one."""
    if not isinstance(preset, str):
        raise TypeError(f"preset must be a preset name (str), got {type(preset).__name__}")
    try:
        return RELEASED[preset]
    except KeyError:
        raise ValueError(f"preset {preset!r} has no released checkpoint; presets with one: "
                         f"{', '.join(RELEASED)}") from None
