"""COCO evaluation (htc_fast.evaluation) on real COCO val2017 annotations (tests/data/eval: 8
images, polygons and crowd RLEs): ground truth fed back as detections scores AP 1, perturbations
lower it in the expected order, ranks gather. The model-running loop and the command:
tests/inference/test_evaluate.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from htc_fast.coco_classes import COCO_CLASSES
from htc_fast.evaluation import (
    STAT_NAMES,
    CocoEvaluator,
    category_ids,
    category_to_label,
    detections_to_coco,
    encode_masks,
    format_table,
)
from htc_fast.model.inputs import Detections

DATA = Path(__file__).parent / "data" / "eval"
ANN_FILE = DATA / "annotations" / "instances_val2017.json"
# COCOeval's precision is tp / (tp + fp + eps): a perfect result is 1 up to rounding.
ONE = pytest.approx(1.0, rel=0, abs=1e-12)
# pycocotools' single-mask decode (COCO.annToMask, used to build ground-truth masks) warns under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def coco():
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ANN_FILE))


_GT_MASKS = {}  # (id(coco), annotation id) -> (H, W) bool array, decoded once per test session


def gt_mask(coco, ann):
    key = (id(coco), ann["id"])
    if key not in _GT_MASKS:
        _GT_MASKS[key] = coco.annToMask(ann).astype(bool)
    return _GT_MASKS[key]


def gt_detections(coco, image_id, masks="bitmap", keep=lambda ann: True, shift=0.0, score=1.0):
    """The image's non-crowd annotations as Detections: boxes xyxy, masks decoded from the polygons.
    shift moves every box (and mask) right by that fraction of its width."""
    to_label = category_to_label(coco)
    anns = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if not a["iscrowd"] and keep(a)]
    info = coco.imgs[image_id]
    h, w = info["height"], info["width"]
    boxes, bitmaps = [], []
    for a in anns:
        x, y, bw, bh = a["bbox"]
        dx = shift * bw
        boxes.append([x + dx, y, x + dx + bw, y + bh])
        bitmaps.append(np.roll(gt_mask(coco, a), int(round(dx)), axis=1) if dx else gt_mask(coco, a))
    n = len(anns)
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(n, 4)
    labels = torch.tensor([to_label[a["category_id"]] for a in anns], dtype=torch.int64)
    scores = torch.full((n,), score)
    dense = torch.from_numpy(np.stack(bitmaps) if n else np.zeros((0, h, w), dtype=bool))
    if masks == "bitmap":
        out = dense
    elif masks == "rle":  # bytes counts, as htc_fast.ops.paste_masks_rle returns them
        out = [mask_utils.encode(np.asfortranarray(m.astype(np.uint8))) for m in dense.numpy()]
    else:
        out = None
    return Detections(boxes, scores, labels, out)


def run(coco, make, iou_types=("bbox", "segm"), per_category=False):
    ev = CocoEvaluator(coco)
    for image_id in sorted(coco.getImgIds()):
        ev.add(image_id, make(image_id))
    return ev.evaluate(iou_types, per_category=per_category, verbose=False)


def test_label_category_mapping_round_trip(coco):
    cats = category_ids(coco)
    assert cats == sorted(coco.getCatIds()) and len(cats) == 80
    assert cats[:3] == [1, 2, 3] and cats[-1] == 90  # COCO's ids have gaps; labels do not
    to_label = category_to_label(coco)
    assert [to_label[c] for c in cats] == list(range(80))
    assert tuple(c["name"] for c in coco.loadCats(cats)) == COCO_CLASSES


def test_ground_truth_as_detections_scores_ap_one(coco):
    crowd = [a for a in coco.dataset["annotations"] if a["iscrowd"]]
    assert len(crowd) == 3  # the fixture covers crowd regions, which COCOeval ignores
    result = run(coco, lambda i: gt_detections(coco, i))
    assert result.num_images == 8
    for r in (result.bbox, result.segm):
        assert (r.AP, r.AP50, r.AP75, r.APl, r.stats[8]) == (ONE,) * 5
        assert all(v == ONE or v == -1.0 for v in (r.APs, r.APm))
        assert len(r.stats) == len(STAT_NAMES) == 12


def test_detections_on_crowd_regions_are_ignored_not_false_positives(coco):
    to_label = category_to_label(coco)

    def with_crowd(image_id):
        det = gt_detections(coco, image_id, masks=None)
        crowd = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id)) if a["iscrowd"]]
        boxes = [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                 for a in crowd]
        return Detections(torch.cat([torch.tensor(boxes).reshape(-1, 4), det.boxes]),
                          torch.cat([torch.full((len(crowd),), 2.0), det.scores]),  # ranked first
                          torch.cat([torch.tensor([to_label[a["category_id"]] for a in crowd],
                                                  dtype=torch.int64), det.labels]), None)

    assert run(coco, with_crowd, ("bbox",)).bbox.AP == ONE


def test_perturbed_detections_rank_below_ground_truth(coco):
    def ap(make, iou_types=("bbox", "segm")):
        return run(coco, make, iou_types)

    exact = ap(lambda i: gt_detections(coco, i))
    # A box shifted by 10% of its width has IoU 0.9 / 1.1 = 0.82 with its ground truth, by 30%
    # 0.7 / 1.3 = 0.54: both still count at IoU 0.5, only the first at 0.75.
    small = ap(lambda i: gt_detections(coco, i, shift=0.1))
    large = ap(lambda i: gt_detections(coco, i, shift=0.3))
    assert small.bbox.AP50 == ONE and large.bbox.AP50 == ONE
    assert small.bbox.AP75 == ONE and large.bbox.AP75 == 0.0
    assert exact.bbox.AP == ONE and 0.99 > small.bbox.AP > large.bbox.AP > 0
    assert exact.segm.AP > small.segm.AP > large.segm.AP
    # Dropping detections lowers recall, hence AP; dropping more lowers it more.
    some = ap(lambda i: gt_detections(coco, i, keep=lambda a: a["id"] % 4 != 0))
    half = ap(lambda i: gt_detections(coco, i, keep=lambda a: a["id"] % 2 != 0))
    for t in ("bbox", "segm"):
        assert 0.99 > getattr(some, t).AP > getattr(half, t).AP > 0
        assert 0.99 > getattr(some, t).stats[8] > getattr(half, t).stats[8]  # AR@100


def test_false_positives_cost_ap_only_when_they_outrank_true_positives(coco):
    def with_false_positive(fp_score):
        def make(image_id):
            det = gt_detections(coco, image_id, masks=None)
            if len(det.scores) == 0:
                return det
            fp = torch.tensor([[0.0, 0.0, 4.0, 4.0]])  # a tiny box in the corner: matches nothing
            return Detections(torch.cat([fp, det.boxes]), torch.cat([torch.tensor([fp_score]), det.scores]),
                              torch.cat([det.labels[:1], det.labels]), None)
        return run(coco, make, ("bbox",)).bbox.AP

    assert with_false_positive(0.5) == ONE  # ranked after every true positive
    assert with_false_positive(2.0) < 0.99


def test_rle_and_bitmap_masks_give_identical_results(coco):
    to_cat = category_ids(coco)
    for image_id in sorted(coco.getImgIds()):
        _, from_bitmap = detections_to_coco(image_id, gt_detections(coco, image_id, "bitmap"), to_cat)
        _, from_rle = detections_to_coco(image_id, gt_detections(coco, image_id, "rle"), to_cat)
        assert from_bitmap == from_rle
        assert all(isinstance(r["segmentation"]["counts"], str) for r in from_rle)
    bitmap = run(coco, lambda i: gt_detections(coco, i, "bitmap", shift=0.1))
    rle = run(coco, lambda i: gt_detections(coco, i, "rle", shift=0.1))
    assert bitmap == rle


def test_detections_to_coco_format(coco):
    det = Detections(torch.tensor([[10.0, 20.0, 40.0, 60.0], [0.0, 0.0, 5.0, 5.0]]), torch.tensor([0.9, 0.25]),
                     torch.tensor([0, 79]), torch.zeros(2, 64, 48, dtype=torch.bool))
    det.masks[0, 20:60, 10:40] = True
    bbox, segm = detections_to_coco(7, det, category_ids(coco))
    assert bbox[0] == {"image_id": 7, "category_id": 1, "bbox": [10.0, 20.0, 30.0, 40.0], "score": pytest.approx(0.9)}
    assert bbox[1]["category_id"] == 90
    assert "bbox" not in segm[0]  # so COCOeval's area ranges use the mask area (mmdetection does the same)
    assert segm[0]["segmentation"]["size"] == [64, 48]
    assert mask_utils.area(segm[0]["segmentation"]) == 30 * 40 and mask_utils.area(segm[1]["segmentation"]) == 0
    # Uncompressed RLE (counts as a list) is compressed.
    plain = {"size": [64, 48], "counts": [5, 10, 64 * 48 - 15]}
    _, segm = detections_to_coco(7, det._replace(masks=[plain, plain]), category_ids(coco))
    assert mask_utils.area(segm[0]["segmentation"]) == 10
    assert encode_masks(torch.zeros(0, 4, 4, dtype=torch.bool)) == []
    with pytest.raises(ValueError, match="labels"):
        detections_to_coco(7, det._replace(labels=torch.tensor([0, 80])), category_ids(coco))
    with pytest.raises(ValueError, match="masks"):
        detections_to_coco(7, det._replace(masks=[plain]), category_ids(coco))


def _no_detections(masks):
    return Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), masks)


def test_empty_detections_score_zero_where_coco_defines_a_value(coco):
    perfect = run(coco, lambda i: gt_detections(coco, i))
    result = run(coco, lambda i: _no_detections(None))
    for r, p in ((result.bbox, perfect.bbox), (result.segm, perfect.segm)):
        # 0 wherever there is ground truth (the perfect result's value is defined), -1 elsewhere.
        assert r.stats == tuple(0.0 if v >= 0 else -1.0 for v in p.stats)
    bitmap = run(coco, lambda i: _no_detections(
        torch.zeros(0, coco.imgs[i]["height"], coco.imgs[i]["width"], dtype=torch.bool)))
    assert bitmap == run(coco, lambda i: _no_detections([])) == result
    # One image without detections: its ground truth are misses.
    partial = run(coco, lambda i: _no_detections([]) if i == 34417 else gt_detections(coco, i))
    assert 0 < partial.bbox.AP < 0.99 and 0 < partial.segm.AP < 0.99


def test_evaluator_errors(coco):
    ev = CocoEvaluator(coco)
    with pytest.raises(ValueError, match="no images"):
        ev.evaluate(verbose=False)
    ev.add(11813, gt_detections(coco, 11813, masks=None))
    assert ev.evaluate(("bbox",), verbose=False).bbox.AP == ONE
    with pytest.raises(ValueError, match="no masks"):
        ev.evaluate(("segm",), verbose=False)
    with pytest.raises(ValueError, match="original-image pixels"):
        ev.add(22892, gt_detections(coco, 11813))  # 11813's masks are not 22892's size
    with pytest.raises(KeyError, match="not in the ground truth"):
        ev.add(1, _no_detections(None))
    with pytest.raises(ValueError, match="iou_types"):
        ev.evaluate("bbox")


def test_only_added_images_are_evaluated(coco):
    ev = CocoEvaluator(coco)
    ev.add(22892, gt_detections(coco, 22892))
    ev.add(22892, gt_detections(coco, 22892, shift=0.3))  # a repeat (sampler padding) keeps the first
    result = ev.evaluate(verbose=False)
    assert result.num_images == 1 and result.bbox.AP == ONE and result.segm.AP == ONE


def test_per_category_rows_and_table(coco):
    person = category_to_label(coco)[1]
    result = run(coco, lambda i: gt_detections(coco, i, keep=lambda a: a["category_id"] != 1),
                 per_category=True)
    present = {a["category_id"] for a in coco.dataset["annotations"] if not a["iscrowd"]}
    for r in (result.bbox, result.segm):
        assert [row.category_id for row in r.per_category] == category_ids(coco)
        assert [row.name for row in r.per_category] == list(COCO_CLASSES)
        for row in r.per_category:
            expected = -1.0 if row.category_id not in present else 0.0 if row.category_id == 1 else ONE
            assert (row.AP, row.AP50, row.AP75) == (expected,) * 3, row
        # COCOeval's AP is the mean over the categories with ground truth.
        valid = [row.AP for row in r.per_category if row.AP >= 0]
        assert r.AP == pytest.approx(sum(valid) / len(valid))
    assert result.bbox.per_category[person].AP == 0.0
    table = format_table(result)
    assert "person" in table and "dining table" in table and "toothbrush" not in table  # no gt: left out
    assert "segm AP50" in table
    assert "person" not in format_table(result, per_category=False)
    assert run(coco, lambda i: gt_detections(coco, i)).bbox.per_category == ()
    assert result.as_dict()["bbox_mAP"] == result.bbox.AP and len(result.as_dict()) == 12


def _distributed_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ANN_FILE))
        ev = CocoEvaluator(coco)
        for image_id in sorted(coco.getImgIds())[rank::world]:
            ev.add(image_id, gt_detections(coco, image_id, shift=0.1, keep=lambda a: a["id"] % 3 != 0))
        if rank == 1:  # an unreadable image is reported by the rank that met it
            ev.skip(999, "missing.jpg: image file not found")
        result = ev.evaluate(per_category=True, verbose=False)
        if rank == 0:
            Path(out_file).write_text(json.dumps({"bbox": result.bbox.stats, "segm": result.segm.stats,
                                                  "rows": [r.AP for r in result.segm.per_category],
                                                  "num_images": result.num_images, "skipped": result.skipped}))
        else:
            assert result is None
    finally:
        dist.destroy_process_group()


def test_all_gather_across_two_gloo_ranks_matches_one_process(coco, tmp_path):
    out = tmp_path / "rank0.json"
    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    single = run(coco, lambda i: gt_detections(coco, i, shift=0.1, keep=lambda a: a["id"] % 3 != 0),
                 per_category=True)
    gathered = json.loads(out.read_text())
    assert gathered["num_images"] == 8 and gathered["skipped"] == ["missing.jpg: image file not found"]
    assert tuple(gathered["bbox"]) == single.bbox.stats and tuple(gathered["segm"]) == single.segm.stats
    assert gathered["rows"] == [r.AP for r in single.segm.per_category]
    assert 0 < single.bbox.AP < 1
