"""Shared by the batched-inference tests: real photographs and the seeded htc_tiny model."""
from pathlib import Path

import pytest
import torch

from htc_fast.predict import Predictor

DATA = Path(__file__).parent.parent / "data"
GOLDEN = Path(__file__).parent.parent / "model" / "data" / "htc_tiny_golden.pth"
# Real photographs (tests/data/README.md): COCO val images of both orientations and a square one,
# plus the rocket photo.
PHOTOS = sorted((DATA / "coco_mini" / "val2017").glob("*.jpg")) + [DATA / "rocket.jpg"]


def seeded_predictor(**kwargs) -> Predictor:
    """htc_tiny with the seeded weights of the golden test (deterministic detections)."""
    predictor = Predictor("htc_tiny", device="cpu", **kwargs)
    state = torch.load(GOLDEN, weights_only=True)["state_dict"]
    predictor.model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return predictor


@pytest.fixture(scope="module")
def predictor():
    return seeded_predictor()
