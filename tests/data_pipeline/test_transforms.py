"""Transforms keep image, boxes, masks and semantic maps aligned."""
import random

import numpy as np
import pytest
import torch

from htc_fast.config import DataConfig, htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e
from htc_fast.data import (
    CocoDetection,
    Sample,
    TestTransform,
    TrainTransform,
    draw_train_scale,
    flip_boxes,
    flip_sample,
    resize_nearest,
    resize_sample,
)
from htc_fast.data.mask_crops import MaskCrops
from htc_fast.data.preprocess import make_batch, rescale_size
from tests.data_pipeline import ANN_FILE, IMAGE_DIR


@pytest.fixture(scope="module")
def dataset():
    return CocoDetection(ANN_FILE, IMAGE_DIR, semantic="from_instances")


def _tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(G, 4) xyxy boxes enclosing each mask's pixels (pixel i spans [i, i + 1))."""
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def _dense(x):
    return x.dense() if isinstance(x, MaskCrops) else x


def _assert_same(a: Sample, b: Sample):
    for f in ("image", "masks", "semantic", "labels"):
        assert torch.equal(_dense(getattr(a, f)), _dense(getattr(b, f))), f
    for f in ("boxes", "ignore_boxes"):  # w - (w - x) is x up to float32 rounding
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=0, atol=1e-4)


def test_flip_twice_is_identity(dataset):
    s = dataset.load(random.randrange(len(dataset)))
    twice = flip_sample(flip_sample(s))
    _assert_same(twice, s)
    assert not twice.flipped and flip_sample(s).flipped


def test_flipped_mask_box_is_the_flipped_box(dataset):
    s = resize_sample(dataset.load(random.randrange(len(dataset))), (320, 240))
    f = flip_sample(s)
    w = s.image_shape[1]
    torch.testing.assert_close(_tight_boxes(f.masks), flip_boxes(_tight_boxes(s.masks), w))
    torch.testing.assert_close(f.boxes[:, [0, 2]], w - s.boxes[:, [2, 0]])  # x1' = w - x2
    assert torch.equal(f.image, s.image.flip(-1)) and torch.equal(f.semantic, s.semantic.flip(-1))


@pytest.mark.parametrize("scale", [(1333, 800), (200, 120)])
def test_resize_keeps_boxes_masks_and_semantic_aligned(dataset, scale):
    s = dataset.load(random.randrange(len(dataset)))
    r = resize_sample(s, scale)
    (h, w), (nh, nw) = s.original_shape, r.image_shape
    assert (nh, nw) == rescale_size(h, w, scale)
    assert r.scale_factor == (nw / w, nh / h)
    assert r.masks.shape == (len(s.boxes), nh, nw) and r.semantic.shape == (nh, nw)
    sf = torch.tensor([nw / w, nh / h, nw / w, nh / h])
    expected = s.boxes * sf
    expected[:, 0::2] = expected[:, 0::2].clamp(0, nw)
    expected[:, 1::2] = expected[:, 1::2].clamp(0, nh)
    torch.testing.assert_close(r.boxes, expected)
    # a mask's tight box follows the box within its one-pixel rasterisation slack, scaled
    keep = r.masks.flatten(1).any(1)
    slack = 1.5 * max(nw / w, nh / h) + 1.5
    assert (_tight_boxes(r.masks[keep]) - r.boxes[keep]).abs().max() <= slack
    assert set(r.semantic.unique().tolist()) <= set(s.semantic.unique().tolist())  # nearest: no new values


def test_resize_nearest_matches_opencv_rule():
    h, w = random.randint(5, 40), random.randint(5, 40)
    nh, nw = random.randint(3, 90), random.randint(3, 90)
    x = torch.randint(0, 256, (2, h, w), dtype=torch.uint8)
    ys = np.minimum(np.floor(np.arange(nh) * (h / nh)).astype(int), h - 1)  # INTER_NEAREST
    xs = np.minimum(np.floor(np.arange(nw) * (w / nw)).astype(int), w - 1)
    expected = x[:, ys][:, :, xs]
    assert torch.equal(resize_nearest(x, (nh, nw)), expected)
    assert torch.equal(resize_nearest(x > 127, (nh, nw)), expected > 127)
    assert resize_nearest(torch.zeros(0, h, w, dtype=torch.bool), (nh, nw)).shape == (0, nh, nw)


def _synthetic(h=30, w=50) -> Sample:
    return Sample(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), torch.tensor([[1.0, 2.0, 20.0, 25.0]]),
                  torch.tensor([3]), torch.zeros(1, h, w, dtype=torch.bool), torch.zeros(0, 4), None, 1, "x.jpg",
                  (h, w))


def test_multiscale_range_of_the_dcn_preset():
    cfg = htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e().data
    rng = np.random.default_rng(random.randrange(2 ** 31))
    shorts = []
    for _ in range(2000):
        long_max, short = draw_train_scale(cfg, rng)
        assert long_max == 1600 and 400 <= short <= 1400
        shorts.append(short)
        nh, nw = rescale_size(30, 50, (long_max, short))
        assert max(nh, nw) <= 1600 and min(nh, nw) <= short
        assert max(nh, nw) == 1600 or min(nh, nw) == short
    assert min(shorts) < 450 and max(shorts) > 1350  # the whole range is drawn
    out = TrainTransform(cfg)(_synthetic(), np.random.default_rng(0))
    assert max(out.image_shape) <= 1600 and 400 <= min(out.image_shape) <= 1400


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_flip_probability(prob):
    t = TrainTransform(DataConfig(train_scale=(50, 30), flip_prob=prob))
    rng = np.random.default_rng(random.randrange(2 ** 31))
    flips = sum(t(_synthetic(), rng).flipped for _ in range(400))
    if prob in (0.0, 1.0):
        assert flips == 400 * prob
    else:
        assert 140 < flips < 260  # 10 sigma


def test_train_transform_is_reproducible_from_its_key(dataset):
    dataset.transform = TrainTransform(DataConfig(train_scale=(96, 64), train_short_range=(40, 64)))
    try:
        key = (random.randrange(len(dataset)), random.randrange(1000), random.randrange(20))
        a, b = dataset[key], dataset[key]
        _assert_same(a, b)
        assert a.scale_factor == b.scale_factor and a.flipped == b.flipped
    finally:
        dataset.transform = None


def test_test_transform_matches_inference_preprocessing(dataset):
    cfg = DataConfig(test_scale=(400, 240))
    s = TestTransform(cfg)(dataset.load(random.randrange(len(dataset))))
    ref = make_batch([IMAGE_DIR / s.file_name], scale=cfg.test_scale)
    assert s.image_shape == tuple(ref.image_shapes[0]) and s.scale_factor == ref.scale_factors[0]
    assert not s.flipped
