"""Delta-xywh coder: round trip, clamping, clipping, a float64 oracle, mmdet's documented values."""
import math

import pytest
import torch

from htc_fast.model.box_coder import DeltaXYWHBoxCoder, decode_boxes, encode_boxes

STDS = [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067)]


def random_boxes(n, size=500.0, min_wh=1.0, dtype=torch.float32):
    xy = torch.rand(n, 2, dtype=torch.float64) * size
    wh = torch.rand(n, 2, dtype=torch.float64) * size / 2 + min_wh
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def naive_decode(boxes, deltas, means, stds, max_shape, clip):
    """float64 per-box formula of R-CNN decoding with mmdet's clamp and clip."""
    out = []
    max_ratio = abs(math.log(clip))
    for b, d in zip(boxes.double().tolist(), deltas.double().tolist()):
        dx, dy, dw, dh = [v * s + m for v, s, m in zip(d, stds, means)]
        dw, dh = min(max(dw, -max_ratio), max_ratio), min(max(dh, -max_ratio), max_ratio)
        px, py, pw, ph = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, b[2] - b[0], b[3] - b[1]
        gx, gy, gw, gh = px + pw * dx, py + ph * dy, pw * math.exp(dw), ph * math.exp(dh)
        box = [gx - gw / 2, gy - gh / 2, gx + gw / 2, gy + gh / 2]
        if max_shape is not None:
            h, w = max_shape
            box = [min(max(box[0], 0), w), min(max(box[1], 0), h), min(max(box[2], 0), w),
                   min(max(box[3], 0), h)]
        out.append(box)
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


@pytest.mark.parametrize("stds", STDS)
def test_round_trip(stds):
    boxes, gts = random_boxes(200, min_wh=20.0), random_boxes(200, min_wh=20.0)
    coder = DeltaXYWHBoxCoder(stds=stds)
    deltas = coder.encode(boxes, gts)
    assert deltas.shape == (200, 4) and deltas.dtype == torch.float32
    # Sizes in [20, 270]: ratios below 62.5 stay inside the clamp, so decode inverts encode.
    decoded = coder.decode(boxes, deltas)
    torch.testing.assert_close(decoded, gts, rtol=0, atol=2e-3)
    # float64 in, float64 out: the round trip is exact up to float64 rounding.
    d64 = coder.encode(boxes.double(), gts.double())
    assert d64.dtype == torch.float64
    torch.testing.assert_close(coder.decode(boxes.double(), d64), gts.double(), rtol=0, atol=1e-9)


@pytest.mark.parametrize("stds", STDS[:2])
def test_decode_matches_float64_formula(stds):
    boxes = random_boxes(300)
    deltas = torch.randn(300, 4) * 3  # large enough that many dw/dh hit the clamp
    max_shape = (int(torch.randint(200, 800, ())), int(torch.randint(200, 800, ())))
    for shape in (None, max_shape):
        got = decode_boxes(boxes, deltas, stds=stds, max_shape=shape)
        want = naive_decode(boxes, deltas, (0, 0, 0, 0), stds, shape, 16 / 1000)
        # float32 arithmetic on coordinates up to ~3e4 (62.5x growth): a few ulps at that scale.
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_encode_matches_float64_formula():
    boxes, gts = random_boxes(100), random_boxes(100)
    means, stds = (0.1, -0.2, 0.0, 0.05), (0.1, 0.1, 0.2, 0.2)
    got = encode_boxes(boxes, gts, means, stds).double()
    b, g = boxes.double(), gts.double()
    pw, ph, gw, gh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    want = torch.stack([((g[:, 0] + g[:, 2]) - (b[:, 0] + b[:, 2])) / 2 / pw,
                        ((g[:, 1] + g[:, 3]) - (b[:, 1] + b[:, 3])) / 2 / ph,
                        torch.log(gw / pw), torch.log(gh / ph)], dim=1)
    want = (want - torch.tensor(means, dtype=torch.float64)) / torch.tensor(stds, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_wh_clamp():
    box = torch.tensor([[100.0, 100.0, 110.0, 120.0]])
    big = decode_boxes(box, torch.tensor([[0.0, 0.0, 10.0, -10.0]]))
    w, h = big[0, 2] - big[0, 0], big[0, 3] - big[0, 1]
    torch.testing.assert_close(w, torch.tensor(10.0 * 62.5), rtol=1e-5, atol=0)
    # h = y2 - y1 with y ~ 110: float32 ulp there is 7.6e-6.
    torch.testing.assert_close(h, torch.tensor(20.0 * 0.016), rtol=0, atol=2e-5)
    # Just inside the clamp: unchanged.
    small = decode_boxes(box, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    torch.testing.assert_close(small[0, 2] - small[0, 0], torch.tensor(10.0 * math.e), rtol=1e-6, atol=0)


def test_documented_mmdet_values():
    # delta2bbox's docstring example in mmdetection (max_shape (32, 32)), printed to 4 decimals.
    rois = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0],
                         [5.0, 5.0, 5.0, 5.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, -1.0],
                           [0.7, -1.9, -0.5, 0.3]])
    expected = torch.tensor([[0.0000, 0.0000, 1.0000, 1.0000], [0.1409, 0.1409, 2.8591, 2.8591],
                             [0.0000, 0.3161, 4.1945, 0.6839], [5.0000, 5.0000, 5.0000, 5.0000]])
    torch.testing.assert_close(decode_boxes(rois, deltas, max_shape=(32, 32)), expected, rtol=0, atol=6e-5)


def test_clip_to_image():
    boxes = random_boxes(100, size=300)
    deltas = torch.randn(100, 4)
    out = decode_boxes(boxes, deltas, max_shape=(120, 250))
    assert (out[:, 0::2] >= 0).all() and (out[:, 0::2] <= 250).all()
    assert (out[:, 1::2] >= 0).all() and (out[:, 1::2] <= 120).all()


def test_class_specific_deltas_decode_per_class():
    boxes = random_boxes(7)
    deltas = torch.randn(7, 12)
    out = decode_boxes(boxes, deltas, stds=STDS[1], max_shape=(400, 400))
    assert out.shape == (7, 12)
    for c in range(3):
        one = decode_boxes(boxes, deltas[:, 4 * c:4 * c + 4], stds=STDS[1], max_shape=(400, 400))
        torch.testing.assert_close(out[:, 4 * c:4 * c + 4], one, rtol=0, atol=0)


def test_empty_and_gradient():
    assert decode_boxes(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    assert encode_boxes(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
    deltas = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    boxes = random_boxes(5, dtype=torch.float64)
    torch.autograd.gradcheck(lambda d: decode_boxes(boxes, d, stds=STDS[1]), (deltas,))


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="stds"):
        DeltaXYWHBoxCoder(stds=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="deltas"):
        decode_boxes(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="gt_boxes"):
        encode_boxes(torch.zeros(3, 4), torch.zeros(2, 4))
