"""Tests of htc_fast.data on six real COCO val2017 images (tests/data/coco_mini, see
tests/data/README.md)."""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "data" / "coco_mini"
ANN_FILE = ROOT / "annotations" / "instances_val2017_mini.json"
IMAGE_DIR = ROOT / "val2017"
EMPTY_IMAGE_ID = 165518  # its annotations were removed from the trimmed json on purpose
CROWD_IMAGE_ID = 34417  # holds the crowd RLE annotation 906000034417


def load_json() -> dict:
    with open(ANN_FILE) as f:
        return json.load(f)


def write_json(data: dict, path: Path) -> Path:
    with open(path, "w") as f:
        json.dump(data, f)
    return path
