"""Anchors: values and order against a naive float64 loop, mmdet's documented values, valid
flags and the inside-the-image test."""
import itertools
import math
import random

import pytest
import torch

from htc_fast.model.anchors import AnchorGenerator, anchor_inside_flags, in_anchor_order


def naive_anchors(stride, base_size, ratios, scales, h, w):
    """(y, x, ratio, scale) loop in float64: centre (x*s, y*s), w = b*s/sqrt(r), h = b*s*sqrt(r)."""
    rows = []
    for y in range(h):
        for x in range(w):
            for r in ratios:
                for s in scales:
                    aw = base_size / math.sqrt(r) * s
                    ah = base_size * math.sqrt(r) * s
                    cx, cy = x * stride, y * stride
                    rows.append([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def test_htc_anchors_match_naive_loop():
    strides = (4, 8, 16, 32, 64)
    gen = AnchorGenerator(strides, (0.5, 1.0, 2.0), (8,))
    sizes = [(random.randint(1, 9), random.randint(1, 9)) for _ in strides]
    anchors = gen.grid_anchors(sizes)
    assert gen.num_base_anchors == 3
    for level, (stride, (h, w)) in enumerate(zip(strides, sizes)):
        assert anchors[level].dtype == torch.float32
        assert anchors[level].shape == (h * w * 3, 4)
        expected = naive_anchors(stride, stride, (0.5, 1.0, 2.0), (8,), h, w)
        # float32 anchors of float64 values below ~1000: a few float32 ulps.
        torch.testing.assert_close(anchors[level].double(), expected, rtol=0, atol=1e-4)


def test_random_generator_matches_naive_loop():
    strides = [random.choice([2, 4, 8, 16, 32]) for _ in range(random.randint(1, 3))]
    ratios = [random.uniform(0.2, 4.0) for _ in range(random.randint(1, 3))]
    scales = [random.uniform(1.0, 10.0) for _ in range(random.randint(1, 2))]
    gen = AnchorGenerator(strides, ratios, scales)
    sizes = [(random.randint(1, 6), random.randint(1, 6)) for _ in strides]
    for level, anchors in enumerate(gen.grid_anchors(sizes)):
        h, w = sizes[level]
        expected = naive_anchors(strides[level], strides[level], ratios, scales, h, w)
        torch.testing.assert_close(anchors.double(), expected, rtol=1e-6, atol=1e-4)


def test_documented_mmdet_values_exactly():
    # Values printed in mmdetection's AnchorGenerator docstring (v2.0+ anchors, centre offset 0).
    gen = AnchorGenerator([16], [1.0], [1.0], base_sizes=[9])
    expected = torch.tensor([[-4.5, -4.5, 4.5, 4.5], [11.5, -4.5, 20.5, 4.5],
                             [-4.5, 11.5, 4.5, 20.5], [11.5, 11.5, 20.5, 20.5]])
    assert torch.equal(gen.grid_anchors([(2, 2)])[0], expected)
    gen = AnchorGenerator([16, 32], [1.0], [1.0], base_sizes=[9, 18])
    assert torch.equal(gen.grid_anchors([(2, 2), (1, 1)])[1], torch.tensor([[-9.0, -9.0, 9.0, 9.0]]))


def test_htc_base_anchors_are_not_rounded():
    gen = AnchorGenerator((4,), (0.5, 1.0, 2.0), (8,))
    base = gen.grid_anchors([(1, 1)])[0].double()
    half_long = 16 * math.sqrt(2)  # ratio 0.5: w = 4 * 8 * sqrt(2), h = 4 * 8 / sqrt(2)
    expected = torch.tensor([[-half_long, -half_long / 2, half_long, half_long / 2],
                             [-16, -16, 16, 16],
                             [-half_long / 2, -half_long, half_long / 2, half_long]], dtype=torch.float64)
    torch.testing.assert_close(base, expected, rtol=0, atol=1e-5)
    assert base[0, 0] != round(float(base[0, 0]))


def test_valid_flags_match_naive():
    strides = (4, 8, 16, 32, 64)
    gen = AnchorGenerator(strides, (0.5, 1.0, 2.0), (8,))
    batch_h, batch_w = 32 * random.randint(3, 6), 32 * random.randint(3, 6)
    pad_h, pad_w = 32 * random.randint(1, batch_h // 32), 32 * random.randint(1, batch_w // 32)
    sizes = [(math.ceil(batch_h / s), math.ceil(batch_w / s)) for s in strides]
    flags = gen.valid_flags(sizes, (pad_h, pad_w))
    for level, (s, (h, w)) in enumerate(zip(strides, sizes)):
        expected = [y < math.ceil(pad_h / s) and x < math.ceil(pad_w / s)
                    for y in range(h) for x in range(w) for _ in range(3)]
        assert flags[level].dtype == torch.bool
        assert flags[level].tolist() == expected


def test_anchor_inside_flags():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [-1.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0],
                            [0.0, 0.0, 19.9, 29.9], [5.0, 5.0, 25.0, 15.0]])
    valid = torch.tensor([True, True, True, True, False])
    img = (30, 20)  # (h, w)
    assert anchor_inside_flags(anchors, valid, img, 0).tolist() == [True, False, False, True, False]
    assert anchor_inside_flags(anchors, valid, img, 1).tolist() == [True, True, True, True, False]
    assert anchor_inside_flags(anchors, valid, img, -1).tolist() == valid.tolist()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="strides"):
        AnchorGenerator([], [1.0], [8])
    with pytest.raises(ValueError, match="ratios"):
        AnchorGenerator([4], [0.0], [8])
    gen = AnchorGenerator([4, 8], [1.0], [8])
    with pytest.raises(ValueError, match="featmap_sizes"):
        gen.grid_anchors([(2, 2)])
    with pytest.raises(ValueError, match="valid_flags"):
        anchor_inside_flags(torch.zeros(3, 4), torch.ones(2, dtype=torch.bool), (10, 10))


@pytest.mark.parametrize("values", [1, 4])
def test_in_anchor_order_is_the_anchors_y_x_anchor_order(values):
    # Row (y * W + x) * A + a of image n holds channel a * values + v at (y, x): the order in which
    # AnchorGenerator lists a level's anchors.
    n, a, h, w = 2, 3, random.randint(1, 5), random.randint(1, 5)
    out = torch.randn(n, a * values, h, w)
    got = in_anchor_order(out, values)
    assert got.shape == ((n, h * w * a) if values == 1 else (n, h * w * a, values))
    got = got.reshape(n, h * w * a, values)
    for i, y, x, k, v in itertools.product(range(n), range(h), range(w), range(a), range(values)):
        assert got[i, (y * w + x) * a + k, v] == out[i, k * values + v, y, x]
