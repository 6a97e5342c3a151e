"""Bad data: malformed annotations, missing or corrupt files, missing stuff maps -> clear messages."""
import math
import random
import shutil
import warnings

import pytest
import torch
from torchvision.io import write_png

from htc_fast.config import DataConfig
from htc_fast.data import BadSampleError, CocoDetection, TrainTransform
from tests.data_pipeline import ANN_FILE, IMAGE_DIR, load_json, write_json


def _thing_anns(data):
    return [a for a in data["annotations"] if not a["iscrowd"]]


def test_malformed_annotations_are_dropped_and_counted(tmp_path):
    data = load_json()
    anns = random.sample(_thing_anns(data), 8)
    anns[0]["bbox"] = anns[0]["bbox"][:3]
    anns[1]["bbox"][2] = math.nan
    anns[2]["segmentation"] = 17
    anns[3]["category_id"] = 1000
    anns[4]["bbox"][3] = 0.5
    anns[5]["area"] = 0
    anns[6]["ignore"] = 1
    anns[7]["segmentation"] = [[1.0, 2.0, 3.0]]  # a polygon needs >= 3 points
    path = write_json(data, tmp_path / "bad.json")
    with pytest.warns(UserWarning, match=f"annotation {anns[0]['id']} "):
        ds = CocoDetection(path, IMAGE_DIR)
    d = ds.report.dropped
    assert d["malformed bbox"] == 2 and d["malformed segmentation"] == 2 and d["unknown category"] == 1
    assert d["degenerate box (w or h < 1 or area <= 0)"] == 2 and d["ignore flag"] == 1
    assert str(anns[2]["id"]) in " ".join(ds.report.examples["malformed segmentation"])
    # exactly those 8 are gone (test mode keeps every image, so nothing else is filtered)
    with pytest.warns(UserWarning):
        bad_test = CocoDetection(path, IMAGE_DIR, test_mode=True)
    assert bad_test.report.instances == CocoDetection(ANN_FILE, IMAGE_DIR, test_mode=True).report.instances - 8
    assert not {a["id"] for a in anns} & {inst.ann_id for r in ds.records for inst in r.instances}


def test_rle_of_the_wrong_size_is_malformed(tmp_path):
    data = load_json()
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    crowd["segmentation"]["size"] = [10, 10]
    with pytest.warns(UserWarning, match=f"annotation {crowd['id']} .*RLE size"):
        ds = CocoDetection(write_json(data, tmp_path / "a.json"), IMAGE_DIR)
    assert ds.report.crowd == 0


def test_unreadable_annotation_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="x.json"):
        CocoDetection(tmp_path / "x.json", IMAGE_DIR)
    write_json({"images": []}, tmp_path / "y.json")
    with pytest.raises(ValueError, match="no 'annotations' list"):
        CocoDetection(tmp_path / "y.json", IMAGE_DIR)


def test_missing_image_file(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(IMAGE_DIR, images)
    data = load_json()
    victim = random.choice([i for i in data["images"] if i["id"] != 165518])
    (images / victim["file_name"]).unlink()
    with pytest.warns(UserWarning, match=victim["file_name"]):
        ds = CocoDetection(ANN_FILE, images)
    assert ds.report.images_missing_file == 1 and victim["id"] not in ds.image_ids
    lazy = CocoDetection(ANN_FILE, images, check_files=False)
    with pytest.raises(BadSampleError, match=f"image file not found: .*{victim['file_name']}"):
        lazy.load(lazy.image_ids.index(victim["id"]))


def test_corrupt_image_raises_try_load_warns_skip_bad_replaces(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(IMAGE_DIR, images)
    ds = CocoDetection(ANN_FILE, images, transform=TrainTransform(DataConfig(train_scale=(64, 48))))
    bad = random.randrange(len(ds))
    name = ds.records[bad].file_name
    (images / name).write_bytes(b"\xff\xd8\xff garbage, not a jpeg")
    with pytest.raises(BadSampleError, match=f"cannot decode image .*{name}"):
        ds.load(bad)
    with pytest.raises(BadSampleError):
        ds[bad]
    with pytest.warns(UserWarning, match=f"skipping a sample: .*{name}"):
        assert ds.try_load(bad) is None
    ds.skip_bad = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # reported once already: no second warning
        s = ds[(bad, 0, 0)]
    assert s.image_id != ds.records[bad].image_id
    h, w = s.original_shape
    assert (w >= h) == (ds.group_flags[bad] == 0)  # the replacement keeps the aspect group


def test_image_size_disagreeing_with_json(tmp_path):
    data = load_json()
    data["images"][0]["width"] += 1
    ds = CocoDetection(write_json(data, tmp_path / "a.json"), IMAGE_DIR, test_mode=True)
    with pytest.raises(BadSampleError, match="but the annotations say"):
        ds.load(0)


def test_missing_and_wrong_stuff_maps(tmp_path):
    ds0 = CocoDetection(ANN_FILE, IMAGE_DIR)
    recs = list(ds0.records)
    missing, wrong = random.sample(range(len(recs)), 2)
    for k, rec in enumerate(recs):
        if k != missing:
            size = (rec.height, rec.width) if k != wrong else (rec.height, rec.width + 3)
            write_png(torch.zeros((1, *size), dtype=torch.uint8), str(tmp_path / rec.file_name.replace(".jpg", ".png")))
    stem = recs[missing].file_name.replace(".jpg", ".png")
    with pytest.warns(UserWarning, match=f"missing stuff map: .*{stem}"):
        ds = CocoDetection(ANN_FILE, IMAGE_DIR, stuff_dir=tmp_path)
    assert ds.report.missing_stuff_maps == 1
    with pytest.raises(BadSampleError, match=f"stuff map not found: .*{stem}"):
        ds.load(missing)
    with pytest.raises(BadSampleError, match="stuff map .* but its image is"):
        ds.load(wrong)
