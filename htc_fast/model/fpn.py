"""Feature Pyramid Network (Lin et al. 2017) as HTC configures it: C2..C5 -> P2..P6.

What it owns: 1x1 lateral convs, the nearest-neighbour top-down pathway, 3x3 output convs, and P6
as a stride-2 subsampling of P5 (mmdet FPN with `num_outs=5`, `add_extra_convs=False`).
Parameter names follow mmdetection's ConvModule wrapping: `lateral_convs.{i}.conv.{weight,bias}`
and `fpn_convs.{i}.conv.{weight,bias}`. What it does not own: the backbone, the heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from htc_fast.config import FPNConfig


class ConvLayer(nn.Module):
    """A conv with bias and an optional ReLU, named `.conv` so that its parameters get
    mmdetection's ConvModule keys (`<name>.conv.weight`, `<name>.conv.bias`).

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H', W') per nn.Conv2d's rules.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: int = 0, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                              padding=padding, bias=True)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x, inplace=True) if self.relu else x

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class FPN(nn.Module):
    """Args:
        in_channels: channels of C2..C5, e.g. (256, 512, 1024, 2048).
        out_channels: channels of every output level (256).
        num_outs: 5 (P2..P6); levels beyond the inputs are max-pool(kernel 1, stride 2) of the
            previous output, i.e. P6 = P5[:, :, ::2, ::2].
    Forward: tuple of C2..C5, C_i (N, in_channels[i], H_i, W_i) -> tuple of P2..P6,
        P_i (N, out_channels, H_i, W_i) with P6 (N, out_channels, ceil(H_5 / 2), ceil(W_5 / 2)).
    """

    def __init__(self, in_channels: tuple[int, ...] = (256, 512, 1024, 2048),
                 out_channels: int = 256, num_outs: int = 5):
        super().__init__()
        if num_outs < len(in_channels):
            raise ValueError(f"FPN: num_outs ({num_outs}) must be >= len(in_channels) "
                             f"({len(in_channels)})")
        self.in_channels = tuple(in_channels)
        self.out_channels = out_channels
        self.num_outs = num_outs
        self.lateral_convs = nn.ModuleList(ConvLayer(c, out_channels, 1) for c in in_channels)
        self.fpn_convs = nn.ModuleList(
            ConvLayer(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: FPNConfig, in_channels: tuple[int, ...]) -> FPN:
        return cls(in_channels, cfg.out_channels, cfg.num_outs)

    def reset_parameters(self) -> None:
        # mmdet's FPN init_cfg: Xavier-uniform weights, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.in_channels):
            raise ValueError(f"FPN: expected {len(self.in_channels)} input levels, "
                             f"got {len(inputs)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        # Top-down: upsample to the finer level's exact size (not a factor of 2), so that odd
        # sizes from unpadded inputs still line up; nearest, as in the paper and mmdet.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest")
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(outs)


def build_fpn(cfg: FPNConfig, in_channels: tuple[int, ...]) -> FPN:
    return FPN.from_config(cfg, in_channels)
