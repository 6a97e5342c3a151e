"""Shared by the RPN tests (test_rpn.py: head and proposals; test_rpn_loss.py: targets and
losses): feature-map sizes, a small head, random head outputs, the mmdetection oracle's outputs."""
import functools
import os
from pathlib import Path

import pytest
import torch

from htc_fast.config import RPNConfig
from htc_fast.model.rpn_head import RPNHead, RPNOutput

SIZES = [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]  # a 64 x 80 padded batch at strides 4..64
BIG = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]  # 128 x 160: enough anchors for 256 samples


def small_head(**kw):
    """A 4-channel head; kw: RPNConfig fields."""
    return RPNHead(RPNConfig(feat_channels=4, **kw), in_channels=4)


def random_output(n=2, sizes=SIZES, a=3, spread=3.0, delta_scale=0.3):
    return RPNOutput([torch.randn(n, a, h, w) * spread for h, w in sizes],
                     [torch.randn(n, 4 * a, h, w) * delta_scale for h, w in sizes])


# The mmdetection 3.3.0 oracle's outputs (its export_reference.py) for the parity tests, which run
# when they exist: $HTC_FAST_ORACLE_OUT, else ../oracle_out beside the repository.
ORACLE_OUT = Path(os.environ.get("HTC_FAST_ORACLE_OUT", Path(__file__).resolve().parents[3] / "oracle_out"))
needs_oracle = pytest.mark.skipif(not (ORACLE_OUT / "train_check.pth").exists(),
                                  reason=f"mmdet oracle outputs not found at {ORACLE_OUT} "
                                         "(set HTC_FAST_ORACLE_OUT)")


@functools.cache
def load_oracle(name):
    return torch.load(ORACLE_OUT / f"{name}.pth", weights_only=False)
