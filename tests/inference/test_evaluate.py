"""The evaluation loop and ``python -m htc_fast.evaluate`` on real COCO val2017 images: the model
is run in batches, its detections reach the evaluator under the right image ids, unreadable images
are skipped, named and counted, bad numbers are refused."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO
from torch import nn

from htc_fast import evaluate as evaluate_cli
from htc_fast.evaluate import coco_images, evaluate_model
from tests.test_evaluation import ANN_FILE, DATA, ONE, gt_detections

# pycocotools' single-mask decode (COCO.annToMask, used to build ground-truth masks) warns under NumPy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
MINI = Path(__file__).parent.parent / "data" / "coco_mini"


@pytest.fixture(scope="module")
def coco():
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ANN_FILE))


class OracleModel(nn.Module):
    """Stands in for HTC: predict() returns the ground truth of the next image, as RLE."""

    def __init__(self, coco, image_ids):
        super().__init__()
        self.coco, self.queue, self.calls = coco, list(image_ids), []
        self.layer = nn.Linear(1, 1)

    def predict(self, batch, *, masks="bitmap"):
        assert not self.training and batch.images.shape[0] == 1
        image_id = self.queue.pop(0)
        self.calls.append((image_id, masks, batch.original_shapes[0]))
        return [gt_detections(self.coco, image_id, masks="rle" if masks else None)]


def test_evaluate_model_runs_predict_per_image(coco):
    images = coco_images(coco, DATA / "val2017", limit=2)
    assert [i for _, i in images] == [11813, 22892]
    model = OracleModel(coco, [11813, 22892]).train()
    result = evaluate_model(model, images, coco, "cpu", scale=(128, 96), verbose=False, progress=False)
    assert model.training  # put back in training mode
    assert [c[:2] for c in model.calls] == [(11813, "rle"), (22892, "rle")]
    assert model.calls[0][2] == (coco.imgs[11813]["height"], coco.imgs[11813]["width"])
    assert result.num_images == 2 and result.bbox.AP == ONE and result.segm.AP == ONE
    model = OracleModel(coco, [11813])
    result = evaluate_model(model, images[:1], coco, "cpu", scale=(128, 96), iou_types=("bbox",), verbose=False,
                            progress=False)
    assert model.calls[0][1] is None and result.segm is None and result.bbox.AP == ONE


def test_evaluate_command_end_to_end_on_real_images(tmp_path, capsys):
    out = tmp_path / "results.json"
    rc = evaluate_cli.main(["--config", "htc_tiny", "--data-root", str(DATA), "--limit", "2", "--device", "cpu",
                            "--per-category", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "Average Precision" in printed.out and "images/s" in printed.err
    result = json.loads(out.read_text())
    assert result["num_images"] == 2 and set(result["metrics"]) >= {"bbox_mAP", "segm_mAP_50"}
    assert len(result["bbox"]["stats"]) == 12 and len(result["segm"]["per_category"]) == 80
    for t in ("bbox", "segm"):
        assert {r["image_id"] for r in result["results"][t]} <= {11813, 22892}
        assert all(r["category_id"] in (1, 2, 3, 4) for r in result["results"][t])  # htc_tiny: 4 classes
    assert len(result["results"]["bbox"]) == len(result["results"]["segm"]) > 0
    assert result["results"]["segm"][0]["segmentation"]["size"] in ([500, 333], [334, 500])
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--config", "htc_tiny", "--data-root", str(tmp_path)])  # no annotations there


class BatchOracleModel(OracleModel):
    """OracleModel for batches: the ground truth of the next len(batch) images, in batch order."""

    def predict(self, batch, *, masks="bitmap"):
        assert not self.training
        out = []
        for shape in batch.original_shapes:
            image_id = self.queue.pop(0)
            assert shape == (self.coco.imgs[image_id]["height"], self.coco.imgs[image_id]["width"])
            self.calls.append((image_id, batch.images.shape[0]))
            out.append(gt_detections(self.coco, image_id, masks="rle" if masks else None))
        return out


def test_evaluate_model_in_batches_skips_unreadable_images(coco, tmp_path):
    images = coco_images(coco, DATA / "val2017")
    readable = [(p, i) for p, i in images if p.is_file()]
    assert len(readable) == 2
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a jpeg")
    missing_id, broken_id = [i for _, i in images if i not in {j for _, j in readable}][:2]
    order = [readable[0], (tmp_path / "missing.jpg", missing_id), (broken, broken_id), readable[1]]
    model = BatchOracleModel(coco, [i for _, i in readable])
    with pytest.warns(UserWarning, match="unreadable image") as caught:
        result = evaluate_model(model, order, coco, "cpu", scale=(128, 96), batch_size=2, verbose=False,
                                progress=False)
    named = " ".join(str(w.message) for w in caught)
    assert "missing.jpg" in named and "broken.jpg" in named
    assert model.calls == [(readable[0][1], 1), (readable[1][1], 1)]  # each batch of 2 lost one image
    assert result.num_images == 2 and result.bbox.AP == ONE and result.segm.AP == ONE
    assert len(result.skipped) == 2 and any("broken.jpg" in s for s in result.skipped)
    model = BatchOracleModel(coco, [i for _, i in readable])
    result = evaluate_model(model, readable, coco, "cpu", scale=(128, 96), batch_size=2, verbose=False,
                            progress=False)
    assert model.calls == [(readable[0][1], 2), (readable[1][1], 2)] and result.bbox.AP == ONE
    assert result.skipped == ()


def test_evaluate_command_skips_unreadable_images(tmp_path, capsys):
    """coco_mini's six real images with one corrupted and one deleted: the other four are
    evaluated in batches of 3, the two are named and counted; the exit status stays 0."""
    img_dir = tmp_path / "val2017"
    shutil.copytree(MINI / "val2017", img_dir)
    (img_dir / "000000011813.jpg").write_bytes(b"\xff\xd8\xff corrupt")
    (img_dir / "000000117645.jpg").unlink()
    out = tmp_path / "results.json"
    with pytest.warns(UserWarning) as caught:
        rc = evaluate_cli.main(["--config", "htc_tiny", "--data-root", str(tmp_path), "--ann-file",
                                str(MINI / "annotations" / "instances_val2017_mini.json"), "--img-dir", str(img_dir),
                                "--device", "cpu", "--batch-size", "3", "--out", str(out)])
    assert rc == 0
    named = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(named) == 2
    assert any("000000011813.jpg" in m for m in named) and any("000000117645.jpg" in m for m in named)
    assert "2 unreadable images skipped" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_images"] == 4 and len(result["skipped"]) == 2
    assert {r["image_id"] for r in result["results"]["bbox"]} <= {802, 34417, 165518, 181303}


@pytest.mark.parametrize("args", [["--limit", "-1"], ["--limit", "0"], ["--batch-size", "0"], ["--workers", "-2"]])
def test_evaluate_command_rejects_bad_numbers(args, capsys):
    with pytest.raises(SystemExit):
        evaluate_cli.main(["--config", "htc_tiny", "--data-root", str(DATA), "--device", "cpu", *args])
    assert args[0] in capsys.readouterr().err


def test_coco_images_limit(coco):
    assert len(coco_images(coco, DATA / "val2017", limit=3)) == 3
    assert len(coco_images(coco, DATA / "val2017")) == 8
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="limit"):
            coco_images(coco, DATA / "val2017", limit=bad)


def test_evaluate_command_fails_cleanly_when_no_image_is_readable(tmp_path, capsys):
    shutil.copytree(DATA / "annotations", tmp_path / "annotations")
    (tmp_path / "val2017").mkdir()  # the annotation file's images are all missing
    with pytest.warns(UserWarning, match="unreadable"):
        rc = evaluate_cli.main(["--config", "htc_tiny", "--data-root", str(tmp_path), "--limit", "3",
                                "--device", "cpu"])
    assert rc == 1
    assert "no images were added (3 skipped as unreadable)" in capsys.readouterr().err
