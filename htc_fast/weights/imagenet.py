"""ImageNet backbone weights by the names mmdetection's HTC configs use.

What it owns: the hub-name table (`torchvision://resnet50`, `open-mmlab://resnext101_32x4d`, ...)
and which name a backbone configuration needs. What it does not own: downloading (downloader.py)
or mapping the keys (htc_fast.model.checkpoint loads these files with source="torchvision").

`torchvision://NAME` is torchvision's IMAGENET1K_V1 file for that architecture (what mmcv's
`torchvision://` prefix resolved to when the HTC models were trained); `open-mmlab://NAME` is
the entry of mmcv's published model-zoo table (mmcv/model_zoo/open_mmlab.json). Both publish the
first 8 (torchvision) hex digits of the file's sha256 after the last hyphen of the file name.
"""
from __future__ import annotations

from htc_fast.config import BackboneConfig

HUB_PREFIXES = ("torchvision://", "open-mmlab://")

IMAGENET_URLS: dict[str, str] = {
    "torchvision://resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "torchvision://resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "open-mmlab://resnext101_32x4d":
        "https://download.openmmlab.com/pretrain/third_party/resnext101_32x4d-a5af3160.pth",
    "open-mmlab://resnext101_64x4d":
        "https://download.openmmlab.com/pretrain/third_party/resnext101_64x4d-ee2c6f71.pth",
}

# (depth, groups, base_width) -> hub name, as mmdetection's HTC configs pair them.
_BY_ARCH = {
    (50, 1, 4): "torchvision://resnet50",
    (101, 1, 4): "torchvision://resnet101",
    (101, 32, 4): "open-mmlab://resnext101_32x4d",
    (101, 64, 4): "open-mmlab://resnext101_64x4d",
}


def hub_url(name: str) -> str:
    """The download URL of a hub name; ValueError listing the known names."""
    try:
        return IMAGENET_URLS[name]
    except KeyError:
        known = ", ".join(IMAGENET_URLS)
        raise ValueError(f"unknown weights name {name!r}; known: {known}") from None


def imagenet_name(backbone: BackboneConfig) -> str:
    """The hub name of the ImageNet weights for `backbone` (DCN layers start from the plain
    conv's weights; their offset convs keep their zero init)."""
    key = (backbone.depth, backbone.groups, backbone.base_width)
    if backbone.base_channels != 64 or key not in _BY_ARCH:
        raise ValueError(f"no ImageNet weights for a backbone with depth={backbone.depth}, "
                         f"groups={backbone.groups}, base_width={backbone.base_width}, "
                         f"base_channels={backbone.base_channels}; known: ResNet-50/101 and "
                         "ResNeXt-101 32x4d/64x4d with 64 base channels")
    return _BY_ARCH[key]
