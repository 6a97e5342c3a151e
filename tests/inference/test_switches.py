"""--compile and --channels-last: the same detections as the eager, contiguous model, and the CLI
flags reach htc_fast.model.acceleration.

Tolerance: that of an image in a batch on the same padded canvas (tests/inference/test_batched.py:
same labels, boxes 1e-3 px, scores 1e-6, masks 1e-4 of the pixels). Measured on the seeded htc_tiny
and real photos: channels-last identical (scores 1.5e-8); compiled with aot_eager scores 1.5e-8;
compiled with inductor (the default; ~4 minutes of compilation per input size on a 2-core CPU, so
not run here) boxes 7.6e-6 px, scores 3e-8.
"""
import pytest
import torch

from htc_fast import evaluate as evaluate_cli
from htc_fast import predict as predict_cli
from htc_fast.inference import prepare_model
from htc_fast.model import acceleration
from tests.inference.conftest import DATA, PHOTOS, seeded_predictor
from tests.inference.test_batched import assert_same_detections


def some_photos():
    return [PHOTOS[i] for i in torch.randperm(len(PHOTOS))[:3].tolist()]


def test_channels_last_gives_the_same_detections(predictor):
    fast = seeded_predictor(channels_last=True)
    conv = fast.model.backbone.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    photos = some_photos()
    for got, want, path in zip(fast(photos), predictor(photos), photos):
        assert_same_detections(got, want, path.name)


def test_compiled_model_gives_the_same_detections(predictor):
    # aot_eager: Dynamo captures the graphs and AOTAutograd traces them (the custom ops through
    # their fake kernels), without inductor's C++ compilation time.
    fast = seeded_predictor(compile={"backend": "aot_eager"})
    assert fast.model.backbone._compiled_call_impl is not None  # nn.Module.compile() happened
    photos = some_photos()
    for got, want, path in zip(fast(photos), predictor(photos), photos):
        assert_same_detections(got, want, path.name)


def test_prepare_model_checks_its_switches(predictor):
    assert prepare_model(predictor.model) is predictor.model
    with pytest.raises(TypeError, match="compile"):
        prepare_model(predictor.model, compile="yes")
    with pytest.raises(TypeError, match="channels_last"):
        prepare_model(predictor.model, channels_last=1)


@pytest.fixture
def spies(monkeypatch):
    """Records the calls of compile_model / to_channels_last (compile_model does not compile: the
    numerics are the test above's)."""
    calls = []

    def compile_model(model, **kwargs):
        calls.append(("compile", type(model).__name__, kwargs))
        return model

    real_channels_last = acceleration.to_channels_last

    def to_channels_last(model):
        calls.append(("channels_last", type(model).__name__))
        return real_channels_last(model)

    monkeypatch.setattr(acceleration, "compile_model", compile_model)
    monkeypatch.setattr(acceleration, "to_channels_last", to_channels_last)
    return calls


def test_cli_flags_reach_the_acceleration_functions(spies, tmp_path):
    assert predict_cli.main([str(PHOTOS[0]), "--config", "htc_tiny", "--device", "cpu", "--out", str(tmp_path),
                             "--compile", "--channels-last"]) == 0
    assert spies == [("channels_last", "HTC"), ("compile", "HTC", {})]
    spies.clear()
    assert evaluate_cli.main(["--config", "htc_tiny", "--data-root", str(DATA / "eval"), "--limit", "1",
                              "--device", "cpu", "--compile", "--channels-last"]) == 0
    assert spies == [("channels_last", "HTC"), ("compile", "HTC", {})]
    spies.clear()
    predict_cli.main([str(PHOTOS[0]), "--config", "htc_tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert spies == []
