"""The HTC model as plain nn.Modules composed by direct calls (docs/model.md; the layers:
docs/architecture.md).

Parameter names follow mmdetection's HTC state-dict keys, so released checkpoints load through
`load_checkpoint` without a key map.
"""
from htc_fast.model.backbone import Bottleneck, ResNet, build_backbone
from htc_fast.model.checkpoint import CheckpointMismatchError, LoadReport, load_checkpoint, save_checkpoint
from htc_fast.model.fpn import FPN, ConvLayer, build_fpn
from htc_fast.model.frozen_bn import FrozenBatchNorm2d
from htc_fast.model.htc import HTC, build_htc

__all__ = ["HTC", "build_htc", "Bottleneck", "ResNet", "build_backbone", "FPN", "ConvLayer",
           "build_fpn", "FrozenBatchNorm2d", "load_checkpoint", "save_checkpoint", "LoadReport",
           "CheckpointMismatchError"]
