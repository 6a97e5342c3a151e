"""`resolve_weights`: what the user names (a word, a hub name, a URL, a path) -> a local file.

What it owns: telling the kinds of name apart and sending each to its table or to the
downloader. What it does not own: loading the file into a model (htc_fast.model.checkpoint).
"""
from __future__ import annotations

import os
from pathlib import Path

from htc_fast.config import HTCConfig, get_config
from htc_fast.weights.downloader import download
from htc_fast.weights.imagenet import HUB_PREFIXES, hub_url, imagenet_name
from htc_fast.weights.released import released_checkpoint

NAMED_SPECS = ("released", "imagenet")


def resolve_weights(spec: str | os.PathLike, preset: str | HTCConfig | None = None, *,
                    directory: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The local file that `spec` names, downloaded (hash-checked) into the cache if needed.

    Args:
        spec: one of
            "released"   the preset's released mmdetection checkpoint (htc_fast.weights.RELEASED);
            "imagenet"   the ImageNet weights mmdetection's HTC configs use for the preset's
                         backbone (torchvision://resnet50, open-mmlab://resnext101_64x4d, ...);
            "torchvision://NAME" or "open-mmlab://NAME"  those weights by name;
            "http(s)://..."  any checkpoint URL (a `-<sha256 prefix>.pth` file name is checked);
            a local path  returned as it is, if the file exists.
        preset: the preset name or HTCConfig that "released" and "imagenet" refer to.
        directory: download folder; default `<torch hub dir>/checkpoints`.
        progress: print download progress on stderr.
    Raises:
        ValueError / TypeError: a spec or preset that names nothing.
        FileNotFoundError: a local path that does not exist.
        WeightsDownloadError: the network failed or the file's hash is wrong.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, str) or not spec:
        raise TypeError(f"weights spec must be a non-empty str or path, got {spec!r}")
    fetch = dict(directory=directory, progress=progress)
    if spec in NAMED_SPECS:
        if preset is None:
            raise ValueError(f"weights spec {spec!r} needs a preset (which model's weights?)")
        if spec == "released":
            return download(released_checkpoint(_preset_name(preset)).url, **fetch)
        return download(hub_url(imagenet_name(_config(preset).model.backbone)), **fetch)
    if spec.startswith(HUB_PREFIXES):
        return download(hub_url(spec), **fetch)
    if spec.startswith(("http://", "https://")):
        return download(spec, **fetch)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {spec!r} (a spec is a local file, an http(s) URL, "
            f"{' or '.join(map(repr, NAMED_SPECS))}, or a name starting with "
            f"{' or '.join(HUB_PREFIXES)})")
    return path


def _preset_name(preset: str | HTCConfig) -> str:
    return preset.name if isinstance(preset, HTCConfig) else preset


def _config(preset: str | HTCConfig) -> HTCConfig:
    if isinstance(preset, HTCConfig):
        return preset
    if not isinstance(preset, str):
        raise TypeError("preset must be a preset name or an HTCConfig, got "
                        f"{type(preset).__name__}")
    return get_config(preset)
