"""CocoDetection on real COCO images: labels, boxes, polygon/RLE masks, crowd, filtering, semantic."""
import random

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.io import write_png

from htc_fast.coco_classes import COCO_CLASSES
from htc_fast.data import CocoDetection, decode_segmentation
from tests.data_pipeline import ANN_FILE, CROWD_IMAGE_ID, EMPTY_IMAGE_ID, IMAGE_DIR, load_json, write_json


@pytest.fixture(scope="module")
def train_set():
    return CocoDetection(ANN_FILE, IMAGE_DIR, semantic="from_instances")


def _anns_by_image(data):
    out = {}
    for a in data["annotations"]:
        out.setdefault(a["image_id"], []).append(a)
    return out


def test_category_mapping_is_sorted_ids(train_set):
    data = load_json()
    ids = sorted(c["id"] for c in data["categories"])
    assert train_set.cat_ids == ids
    assert train_set.cat2label == {c: i for i, c in enumerate(ids)}
    assert train_set.class_names == COCO_CLASSES
    assert len(ids) == 80 and ids[-1] == 90  # COCO's ids have gaps; labels do not


def test_boxes_labels_and_masks_match_the_json(train_set):
    anns = _anns_by_image(load_json())
    index = random.randrange(len(train_set))  # every image is covered over runs; one per run stays fast
    for i in sorted({index, train_set.image_ids.index(CROWD_IMAGE_ID)}):
        s = train_set.load(i)
        h, w = s.original_shape
        things = [a for a in anns[s.image_id] if not a["iscrowd"]]
        expected = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in things)])
        torch.testing.assert_close(s.boxes, expected.float())
        assert s.boxes.dtype == torch.float32 and s.labels.dtype == torch.int64
        assert s.labels.tolist() == [train_set.cat2label[a["category_id"]] for a in things]
        assert s.masks.shape == (len(things), h, w) and s.masks.dtype == torch.bool
        for m, a in zip(s.masks, things):
            # polygon rasterisation vs the polygon's exact area: within 15% (+ 20 px for tiny ones)
            assert abs(int(m.sum()) - a["area"]) <= 0.15 * a["area"] + 20, a["id"]
            ys, xs = torch.nonzero(m, as_tuple=True)
            x1, y1, x2, y2 = expected[things.index(a)].tolist()
            assert xs.min() >= x1 - 1 and xs.max() + 1 <= x2 + 1 and ys.min() >= y1 - 1 and ys.max() + 1 <= y2 + 1


def test_crowd_is_an_ignore_box_not_a_target(train_set):
    data = load_json()
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    s = train_set.load(train_set.image_ids.index(CROWD_IMAGE_ID))
    x, y, bw, bh = crowd["bbox"]
    torch.testing.assert_close(s.ignore_boxes, torch.tensor([[x, y, x + bw, y + bh]], dtype=torch.float32))
    assert len(s.boxes) == len([a for a in data["annotations"] if a["image_id"] == CROWD_IMAGE_ID]) - 1
    # the uncompressed crowd RLE decodes to exactly its annotated area
    rle_mask = decode_segmentation(crowd["segmentation"], *crowd["segmentation"]["size"])
    assert rle_mask.shape == tuple(s.original_shape) and int(rle_mask.sum()) == crowd["area"]
    # the semantic fallback paints crowd pixels with the category's COCO-stuff id (id - 1)
    crowd_only = torch.from_numpy(rle_mask).bool() & ~s.masks.any(0)
    assert (s.semantic[crowd_only] == crowd["category_id"] - 1).all()
    assert train_set.report.crowd == 1


def test_compressed_rle_decodes_like_its_polygon(tmp_path):
    data = load_json()
    ann = random.choice([a for a in data["annotations"] if not a["iscrowd"]])
    img = next(i for i in data["images"] if i["id"] == ann["image_id"])
    poly_mask = decode_segmentation(ann["segmentation"], img["height"], img["width"])
    rle = mask_utils.encode(np.asfortranarray(poly_mask))
    ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    ds = CocoDetection(write_json(data, tmp_path / "a.json"), IMAGE_DIR)
    s = ds.load(ds.image_ids.index(ann["image_id"]))
    k = [i for i, b in enumerate(s.boxes.tolist()) if b[0] == pytest.approx(ann["bbox"][0])][0]
    assert torch.equal(s.masks[k], torch.from_numpy(poly_mask).bool())


def test_empty_images_skipped_for_training_kept_for_testing(train_set):
    assert EMPTY_IMAGE_ID not in train_set.image_ids and len(train_set) == 5
    assert train_set.report.images_without_targets == 1
    test_set = CocoDetection(ANN_FILE, IMAGE_DIR, test_mode=True)
    assert EMPTY_IMAGE_ID in test_set.image_ids and len(test_set) == 6
    s = test_set.load(test_set.image_ids.index(EMPTY_IMAGE_ID))
    assert s.boxes.shape == (0, 4) and s.masks is None and s.semantic is None


def test_min_size_filter():
    ds = CocoDetection(ANN_FILE, IMAGE_DIR, min_size=400)
    # 11813 (333 wide), 181303 (358 high), 34417 (375 high) are smaller than 400
    assert sorted(ds.image_ids) == [802, 117645] and ds.report.images_too_small == 3


def test_semantic_from_instances_with_contiguous_labels():
    ds = CocoDetection(ANN_FILE, IMAGE_DIR, semantic="from_instances", thing_ids="label")
    index = random.randrange(len(ds))
    s = ds.load(index)
    crowd_labels = {i.label for i in ds.records[index].instances if i.crowd}  # crowd pixels are painted too
    assert s.semantic.shape == s.original_shape and s.semantic.dtype == torch.uint8
    assert set(s.semantic.unique().tolist()) <= set(s.labels.tolist()) | crowd_labels | {255}
    # every thing pixel of the smallest instance (painted last) carries its label
    k = int(s.masks.flatten(1).sum(1).argmin())
    assert (s.semantic[s.masks[k]] == s.labels[k]).all()
    assert set(s.semantic[~s.masks.any(0)].unique().tolist()) <= crowd_labels | {255}


def test_stuff_maps_are_read_unchanged(tmp_path):
    ds0 = CocoDetection(ANN_FILE, IMAGE_DIR)
    maps = {}
    for rec in ds0.records:
        m = torch.randint(0, 182, (1, rec.height, rec.width), dtype=torch.uint8)
        m[0, :5] = 255
        write_png(m, str(tmp_path / rec.file_name.replace(".jpg", ".png")))
        maps[rec.image_id] = m[0]
    ds = CocoDetection(ANN_FILE, IMAGE_DIR, stuff_dir=tmp_path)
    assert ds.semantic == "stuff_maps" and ds.report.missing_stuff_maps == 0
    i = random.randrange(len(ds))
    assert torch.equal(ds.load(i).semantic, maps[ds.image_ids[i]])


def test_builders_for_the_mmdetection_layout(tmp_path):
    from htc_fast.config import htc_r50_fpn_1x, htc_tiny, htc_without_semantic_r50_fpn_1x
    from htc_fast.data import coco_test_dataset, coco_train_dataset

    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_bytes(ANN_FILE.read_bytes())
    (tmp_path / "val2017").symlink_to(IMAGE_DIR)
    with pytest.raises(FileNotFoundError, match="stuffthingmaps/val2017 does not exist"):
        coco_train_dataset(tmp_path, htc_r50_fpn_1x(), split="val2017")
    assert coco_train_dataset(tmp_path, htc_without_semantic_r50_fpn_1x(), split="val2017").semantic == "off"
    derived = coco_train_dataset(tmp_path, htc_r50_fpn_1x(), split="val2017", semantic="from_instances")
    assert derived.thing_ids == "stuff_id" and derived.skip_bad and len(derived) == 5
    assert coco_train_dataset(tmp_path, htc_tiny(), split="val2017", semantic="from_instances").thing_ids == "label"
    (tmp_path / "stuffthingmaps" / "val2017").mkdir(parents=True)
    with pytest.warns(UserWarning, match="5 missing stuff maps"):
        assert coco_train_dataset(tmp_path, htc_r50_fpn_1x(), split="val2017").semantic == "stuff_maps"
    test_set = coco_test_dataset(tmp_path, htc_r50_fpn_1x())
    assert test_set.test_mode and len(test_set) == 6
