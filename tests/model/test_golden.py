"""Golden outputs of a seeded htc_tiny model (tests/model/data/htc_tiny_golden.pth, written by
scripts/make_golden.py): proposals, detections, merged mask probabilities and first-k training
losses must not change unless a change of numbers is intended. The model itself is checked
against mmdetection by scripts/compare_oracle.py (exact on R-50); this keeps CI watching the same
code paths."""
from pathlib import Path

import pytest
import torch

from htc_fast.config import get_config
from htc_fast.model.htc import build_htc
from scripts.make_golden import compute

GOLDEN = Path(__file__).parent / "data" / "htc_tiny_golden.pth"


@pytest.fixture(scope="module")
def golden_run():
    golden = torch.load(GOLDEN, weights_only=True)
    model = build_htc(get_config("htc_tiny"))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in golden["state_dict"].items()})
    with torch.no_grad():
        return golden["outputs"], compute(model, golden["inputs"])


def test_proposals_match_golden(golden_run):
    want, got = golden_run
    for a, b in zip(want["proposals"], got["proposals"]):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=0)
    for a, b in zip(want["proposal_scores"], got["proposal_scores"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_detections_match_golden(golden_run):
    want, got = golden_run
    for i in range(len(want["boxes"])):
        assert torch.equal(got["labels"][i], want["labels"][i])
        torch.testing.assert_close(got["boxes"][i], want["boxes"][i], atol=0.01, rtol=0)
        torch.testing.assert_close(got["scores"][i], want["scores"][i], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got["mask_probs"][i], want["mask_probs"][i], atol=1e-5, rtol=1e-4)


def test_training_losses_match_golden(golden_run):
    want, got = golden_run
    assert set(got["losses"]) == set(want["losses"])
    for name, value in want["losses"].items():
        torch.testing.assert_close(got["losses"][name], value, rtol=1e-4, atol=1e-6, msg=name)
