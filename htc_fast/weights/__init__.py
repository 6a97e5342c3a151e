"""Weights by name: released HTC checkpoints, ImageNet backbones, URLs, local files.

    from htc_fast.weights import resolve_weights
    path = resolve_weights("released", preset="htc_r50_fpn_1x")   # downloaded once, hash-checked
    path = resolve_weights("torchvision://resnet50")

`resolve_weights` returns a local file for `htc_fast.model.load_checkpoint`, which maps the
keys (mmdetection, htc_fast and torchvision/open-mmlab ImageNet layouts).
"""
from htc_fast.weights.downloader import WeightsDownloadError, cache_dir, download, hash_prefix_of
from htc_fast.weights.imagenet import IMAGENET_URLS, imagenet_name
from htc_fast.weights.released import RELEASED, ReleasedCheckpoint, released_checkpoint
from htc_fast.weights.resolve import resolve_weights

__all__ = ["resolve_weights", "download", "cache_dir", "hash_prefix_of", "WeightsDownloadError",
           "RELEASED", "ReleasedCheckpoint", "released_checkpoint", "IMAGENET_URLS",
           "imagenet_name"]
