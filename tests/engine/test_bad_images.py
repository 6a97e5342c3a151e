"""Issue 16 item 2 (training): an unreadable image is skipped with a warning naming the file and
counted in the run summary, even when it is the only image of its aspect-ratio group (which used
to abort the run with BadSampleError after 11 retries of the same file)."""
import json

import pytest

from htc_fast import train
from htc_fast.data.synthetic import make_synthetic_coco


def _corrupt_portrait_image(root):
    """Makes train image 3 a portrait image (alone in its aspect group) whose file is garbage."""
    ann_file = root / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    img = data["images"][3]
    img["height"], img["width"] = img["width"], img["height"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != img["id"]]
    data["annotations"].append(dict(id=10 ** 6, image_id=img["id"], category_id=1, iscrowd=0, area=400.0,
                                    bbox=[10.0, 10.0, 20.0, 20.0], segmentation=[[10, 10, 30, 10, 30, 30, 10, 30]]))
    ann_file.write_text(json.dumps(data))
    (root / "train" / img["file_name"]).write_bytes(b"this is not an image")
    return img["file_name"]


def test_unreadable_image_alone_in_its_group_is_skipped_and_counted(tmp_path, capsys):
    # The built-in run uses work_dir/synthetic_coco when it exists: 8 images, batch 2, so an
    # epoch is 4 landscape batches + 1 batch of the portrait image (padded with itself).
    name = _corrupt_portrait_image(make_synthetic_coco(tmp_path / "synthetic_coco", num_train=8, num_val=2))
    with pytest.warns(UserWarning, match=f"skipping a sample: .*{name}"):
        assert train.main(["--work-dir", str(tmp_path), "--no-eval", "--max-iters", "5", "--log-interval", "5"]) == 0
    out = capsys.readouterr().out
    assert f"2 unreadable image load(s) skipped (1 file(s): {name})" in out
    assert "trained 5 iterations" in out
