"""FPN: shapes, the top-down arithmetic, P6, and mmdetection's key layout."""
import pytest
import torch
import torch.nn.functional as F

from htc_fast.config import FPNConfig, htc_r50_fpn_1x
from htc_fast.model.fpn import FPN
from tests.model.test_backbone import layout, read_keys


def _inputs(channels, h, w, n=2):
    """C2..C5 for an (h, w) image, sizes rounded up like the backbone's."""
    return tuple(torch.randn(n, c, -(-h // s), -(-w // s))
                 for c, s in zip(channels, (4, 8, 16, 32)))


@pytest.mark.parametrize("h, w", [(64, 96), (100, 70)])
def test_shapes(h, w):
    channels = (32, 64, 128, 256)
    fpn = FPN(channels, 16)
    with torch.no_grad():
        outs = fpn(_inputs(channels, h, w))
    assert len(outs) == 5
    sizes = [(-(-h // s), -(-w // s)) for s in (4, 8, 16, 32)]
    sizes.append((-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2)))
    assert [tuple(o.shape) for o in outs] == [(2, 16) + s for s in sizes]
    torch.testing.assert_close(outs[4], outs[3][:, :, ::2, ::2], rtol=0, atol=0)


def test_top_down_arithmetic():
    """Recomputes P2..P5 with explicit 2x nearest upsampling (sizes are exact multiples)."""
    channels = (8, 16, 32, 64)
    fpn = FPN(channels, 8)
    for p in fpn.parameters():
        p.data.normal_(0, 0.1)  # non-zero biases too
    inputs = _inputs(channels, 64, 32, n=1)
    with torch.no_grad():
        outs = fpn(inputs)
        top = None
        for i in range(3, -1, -1):
            lat = fpn.lateral_convs[i].conv(inputs[i])
            if top is not None:
                lat = lat + top.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            top = lat
            conv = fpn.fpn_convs[i].conv
            ref = F.conv2d(lat, conv.weight, conv.bias, padding=1)
            torch.testing.assert_close(outs[i], ref, rtol=1e-5, atol=1e-5)


def test_layout_matches_mmdetection():
    cfg = htc_r50_fpn_1x().model
    with torch.device("meta"):
        fpn = FPN.from_config(cfg.fpn, cfg.backbone.out_channels)
    assert layout(fpn, "neck.") == read_keys("neck.")


def test_errors():
    with pytest.raises(ValueError, match="fpn.num_outs must be 5"):
        FPNConfig(num_outs=4)
    fpn = FPN((8, 16, 32, 64), 8)
    with pytest.raises(ValueError, match="expected 4 input levels, got 3"):
        fpn(_inputs((8, 16, 32), 32, 32))
