"""Deformable convolution layers with mmcv's parameter layout, so mmdetection DCN checkpoints load.

``DeformConv2dPack`` (DCNv1, used by HTC's DCN configs in ResNet stages c3-c5) and
``ModulatedDeformConv2dPack`` (DCNv2) own their offset branch ``conv_offset``: a regular conv with
the same kernel, stride, padding and dilation that predicts 2 * dg * kh * kw offsets (v1) or
3 * dg * kh * kw offsets and mask logits (v2). It is zero-initialised, so a fresh layer starts as a
plain convolution. State-dict keys: ``weight``, ``bias`` (if any), ``conv_offset.weight``,
``conv_offset.bias`` -- mmcv's names and shapes. (mmdetection v1 checkpoints stored the v1 offset
conv beside the layer, "conv2_offset.*"; a module cannot see its siblings' keys while loading, so
``htc_fast.model.checkpoint.load_checkpoint`` renames those.)
"""
import math

import torch
from torch import Tensor, nn

from htc_fast.ops.deform_conv import deform_conv2d

__all__ = ["DeformConv2dPack", "ModulatedDeformConv2dPack"]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


class _DeformConvBase(nn.Module):
    """Weights, bias and offset branch shared by the v1 and v2 layers (`offset_channels_per_tap`
    is 2 for v1, 3 for v2)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                 deform_groups, bias, offset_channels_per_tap):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be "
                             f"divisible by groups ({groups})")
        if in_channels % deform_groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by deform_groups ({deform_groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.groups, self.deform_groups = groups, deform_groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * offset_channels_per_tap * taps,
                                     self.kernel_size, self.stride, self.padding, self.dilation, bias=True)
        self.reset_parameters()

    def reset_parameters(self):
        # mmcv's initialisation: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = C * kh * kw
        # (the full input channels, not per group), zero bias, zero offset branch.
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def _deform(self, x, offset, mask):
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deform_groups={self.deform_groups}, bias={self.bias is not None}")


class DeformConv2dPack(_DeformConvBase):
    """DCNv1 with its offset branch (mmcv's ``DeformConv2dPack``; no bias by default, like mmcv).

    forward: x (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deform_groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         deform_groups, bias, offset_channels_per_tap=2)

    def forward(self, x: Tensor) -> Tensor:
        return self._deform(x, self.conv_offset(x), None)


class ModulatedDeformConv2dPack(_DeformConvBase):
    """DCNv2 with its offset-and-mask branch (mmcv's ``ModulatedDeformConv2dPack``; bias by default).

    The branch's output is split in three along channels: (o1, o2, m); the offsets are
    cat(o1, o2) and the mask sigmoid(m), as in mmcv. forward: x (N, C_in, H, W) -> (N, C_out, Ho, Wo).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 deform_groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         deform_groups, bias, offset_channels_per_tap=3)

    def forward(self, x: Tensor) -> Tensor:
        o1, o2, m = torch.chunk(self.conv_offset(x), 3, dim=1)
        return self._deform(x, torch.cat((o1, o2), dim=1), torch.sigmoid(m))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # mmcv's older layout named the branch "conv_offset_mask".
        for name in ("weight", "bias"):
            old = prefix + "conv_offset_mask." + name
            if old in state_dict and prefix + "conv_offset." + name not in state_dict:
                state_dict[prefix + "conv_offset." + name] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
