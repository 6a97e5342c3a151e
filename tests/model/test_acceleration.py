"""compile_model and to_channels_last (htc_fast/model/acceleration.py) change speed, not results.

Tolerances: FPN features and losses rel 1e-4 (channels-last and inductor reorder the float
accumulations of convolutions; fp32 sums of ~10^3 terms differ by ~1e-6 relative); detections
of a randomly seeded htc_tiny model: the same labels in the same order, boxes atol 1e-2 px,
scores atol 1e-4.
"""
import pytest
import torch

from htc_fast.config import get_config
from htc_fast.model.acceleration import compile_model, to_channels_last
from htc_fast.model.htc import build_htc
from scripts.make_golden import batch_and_targets, golden_inputs


def tiny(seed):
    torch.manual_seed(seed)
    return build_htc(get_config("htc_tiny"))


def run(model, data):
    batch, targets = batch_and_targets(data)
    model.eval()
    with torch.no_grad():
        feats = [f.contiguous() for f in model.features(batch.images)]
        dets = model.predict(batch, masks=None)
    model.train()
    losses = model(batch, targets, sampler="first-k").as_dict()
    model.eval()
    return feats, dets, {k: v.detach() for k, v in losses.items()}


def assert_same(got, want):
    for a, b in zip(got[0], want[0]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(got[1], want[1]):
        assert torch.equal(a.labels, b.labels)
        torch.testing.assert_close(a.boxes, b.boxes, rtol=0, atol=1e-2)
        torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-4)
    assert set(got[2]) == set(want[2])
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture
def case():
    seed = int(torch.randint(0, 2**31, ()))
    data = golden_inputs(torch.Generator().manual_seed(seed))
    return seed, data, run(tiny(seed), data)


def test_channels_last_equals_eager(case):
    seed, data, want = case
    model = to_channels_last(tiny(seed))
    conv = model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert_same(run(model, data), want)


@pytest.mark.slow  # inductor compiles five networks: ~4 minutes on 2 CPU cores
def test_compiled_equals_eager(case):
    seed, data, want = case
    model = compile_model(tiny(seed))
    assert set(model.state_dict()) == set(tiny(seed).state_dict())  # checkpoints unchanged
    assert_same(run(model, data), want)


def test_errors_name_the_argument():
    with pytest.raises(TypeError, match="backbone"):
        compile_model(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        to_channels_last("not a model")
