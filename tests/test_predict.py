"""Preprocessing (mmdetection's test pipeline) and inference on a real photograph through the
Predictor API and the command line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from htc_fast import predict as predict_cli
from htc_fast.data.preprocess import MEAN, STD, as_image_tensor, load_image, make_batch, rescale_size
from htc_fast.predict import Predictor

PHOTO = Path(__file__).parent / "data" / "rocket.jpg"


@pytest.mark.parametrize("hw, expected", [((400, 600), (800, 1200)), ((300, 451), (800, 1203)),
                                          ((480, 640), (800, 1067)), ((1000, 300), (1333, 400))])
def test_rescale_size_is_mmcvs_keep_ratio_rule(hw, expected):
    assert rescale_size(*hw) == expected


def test_make_batch_pads_normalises_and_records_sizes():
    a = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    b = np.random.randint(0, 256, (40, 30, 3), dtype=np.uint8)
    batch = make_batch([a, b], scale=(140, 100))
    assert batch.image_shapes == [(100, 140), (133, 100)]
    assert batch.images.shape == (2, 3, 160, 160)  # padded to multiples of 32
    assert batch.original_shapes == [(50, 70), (40, 30)]
    assert batch.scale_factors[0] == (140 / 70, 100 / 50)
    assert (batch.images[0, :, 100:] == 0).all() and (batch.images[1, :, :, 100:] == 0).all()
    # A constant image stays constant through resize and normalises channel-wise.
    flat = torch.full((3, 20, 20), 100, dtype=torch.uint8)
    out = make_batch([flat], scale=(40, 40)).images[0, :, :40, :40]
    expected = (100 - torch.tensor(MEAN)) / torch.tensor(STD)
    torch.testing.assert_close(out, expected.view(3, 1, 1).expand(3, 40, 40))


def test_bad_images_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(corrupt)
    with pytest.raises(ValueError, match="uint8"):
        as_image_tensor(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one"):
        make_batch([])


def test_predictor_on_a_real_photograph():
    predictor = Predictor("htc_tiny", device="cpu")
    photo = load_image(PHOTO)
    det = predictor([PHOTO])[0]
    h, w = photo.shape[1:]
    assert det.masks.shape == (len(det.scores), h, w) and det.masks.dtype == torch.bool
    assert len(det.scores) <= predictor.cfg.model.test.max_per_img
    assert (det.boxes[:, 2] <= w + 1e-3).all() and (det.boxes[:, 3] <= h + 1e-3).all()
    rle = predictor([PHOTO], masks="rle")[0]
    assert len(rle.masks) == len(det.scores)
    assert torch.equal(rle.boxes, det.boxes)


def test_predict_command_writes_drawings_and_json(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    out = tmp_path / "out"
    rc = predict_cli.main([str(PHOTO), str(bad), "--config", "htc_tiny", "--out", str(out), "--device", "cpu",
                           "--show-thr", "0"])
    assert rc == 1  # one image failed, the other was written
    result = json.loads((out / "rocket.json").read_text())
    assert result["image"] == str(PHOTO)
    assert all({"bbox", "score", "label", "category", "segmentation"} <= set(d) for d in result["detections"])
    drawn = load_image(out / "rocket.png")
    assert drawn.shape == load_image(PHOTO).shape


def test_predictor_bf16_autocast_keeps_boxes_fp32():
    fp32 = Predictor("htc_tiny", device="cpu")
    bf16 = Predictor("htc_tiny", device="cpu", amp="bf16")
    bf16.model.load_state_dict(fp32.model.state_dict())
    det = bf16([PHOTO], masks="rle")[0]
    assert det.boxes.dtype == torch.float32 and det.scores.dtype == torch.float32
    assert torch.isfinite(det.boxes).all()
    with pytest.raises(ValueError, match="amp"):
        Predictor("htc_tiny", device="cpu", amp="int8")


def test_predictor_names_a_too_thin_image(tmp_path):
    from torchvision.io import write_png

    thin = tmp_path / "thin.png"
    write_png(torch.full((3, 1, 4000), 128, dtype=torch.uint8), str(thin))
    predictor = Predictor("htc_tiny", device="cpu")
    with pytest.raises(ValueError, match="thin.png.*1 x 4000"):
        predictor([PHOTO, thin])
    with pytest.raises(ValueError, match=r"images\[0\].*4000 x 1"):
        predictor([torch.zeros(3, 4000, 1, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="at least one image"):
        predictor([])


def _detections_by_image(out_dir):
    return {p.stem: json.loads(p.read_text())["detections"] for p in sorted(out_dir.glob("*.json"))}


def test_predict_command_batches_folders_and_skips_bad_files(tmp_path, capsys):
    """A folder of real photos (landscape only: each is padded to the same size alone and in a
    batch, so batch-3 and batch-1 detections agree to rounding) plus an unreadable file and a too
    thin one, in batches of 3 decoded by a worker process."""
    import shutil

    from torchvision.io import write_png

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("000000034417.jpg", "000000117645.jpg", "000000181303.jpg"):
        shutil.copy(Path(__file__).parent / "data" / "coco_mini" / "val2017" / name, folder / name)
    shutil.copy(PHOTO, folder / "rocket.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff truncated")
    write_png(torch.zeros(3, 1, 4000, dtype=torch.uint8), str(folder / "thin.png"))
    common = ["--config", "htc_tiny", "--device", "cpu", "--show-thr", "0"]
    torch.manual_seed(0)  # the same random weights for both runs
    assert predict_cli.main([str(folder), "--out", str(tmp_path / "b3"), "--batch-size", "3", "--workers", "1",
                             *common]) == 1  # two files were skipped
    err = capsys.readouterr().err
    assert f"skipped {folder / 'broken.jpg'}" in err and f"skipped {folder / 'thin.png'}" in err
    batched = _detections_by_image(tmp_path / "b3")
    assert sorted(batched) == ["000000034417", "000000117645", "000000181303", "rocket"]
    assert all((tmp_path / "b3" / f"{stem}.png").is_file() for stem in batched)
    torch.manual_seed(0)
    assert predict_cli.main([str(folder), "--out", str(tmp_path / "b1"), "--batch-size", "1", *common]) == 1
    single = _detections_by_image(tmp_path / "b1")
    assert sorted(single) == sorted(batched)
    for stem, want in single.items():
        got = batched[stem]
        assert len(want) > 0 and [d["label"] for d in got] == [d["label"] for d in want], stem
        np.testing.assert_allclose([d["bbox"] for d in got], [d["bbox"] for d in want], atol=2e-3, rtol=0)
        np.testing.assert_allclose([d["score"] for d in got], [d["score"] for d in want], atol=2e-5, rtol=0)


@pytest.mark.parametrize("args, match", [(["--batch-size", "0"], "--batch-size"), (["--workers", "-1"], "--workers")])
def test_predict_command_rejects_bad_numbers(tmp_path, capsys, args, match):
    with pytest.raises(SystemExit):
        predict_cli.main([str(PHOTO), "--config", "htc_tiny", "--out", str(tmp_path), *args])
    assert match in capsys.readouterr().err


def test_predict_command_refuses_an_empty_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        predict_cli.main([str(tmp_path), "--config", "htc_tiny", "--out", str(tmp_path / "out")])
    assert "no image files" in capsys.readouterr().err
