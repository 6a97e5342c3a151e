"""The images an inference run reads: folders expanded to their image files, and a Dataset that
decodes and resizes one image per item (in DataLoader workers, ahead of the model).

An image that cannot be used (missing, corrupt, or too thin to resize) does not raise inside the
worker, which would end the whole loader: the item becomes an ``Unreadable`` record naming the
file, and the caller skips it with one warning.
"""
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from htc_fast.data.preprocess import ImageLike, as_image_tensor, rescale_size, resize

# What a folder given to ``predict`` contributes (compared case-insensitively).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def list_images(paths: Sequence[Union[str, Path]]) -> list[Path]:
    """Files as given (in order; kept even if missing, so the run reports them); each folder
    replaced by the image files directly inside it, sorted by name. A folder without images is
    an error naming it."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ValueError(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            out.extend(found)
        else:
            out.append(path)
    return out


@dataclass
class PreparedImage:
    """One image resized for the network. image: (3, h, w) uint8 at the test scale (None once
    collated into a batch's pixels); image_shape: its (h, w); scale_factor: (w_scale, h_scale)
    from the original; original_shape: (H, W); original: the (3, H, W) uint8 decoded image when
    kept (for drawing), else None. key: the caller's id (e.g. COCO image id); name: the file (or
    "images[i]") for messages."""
    key: Hashable
    name: str
    image: Optional[Tensor]
    image_shape: tuple[int, int]
    scale_factor: tuple[float, float]
    original_shape: tuple[int, int]
    original: Optional[Tensor] = None


@dataclass
class Unreadable:
    """An image that could not be used: key and name as in PreparedImage, reason: the error."""
    key: Hashable
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


def image_name(source: ImageLike, index: int) -> str:
    """How messages name an input: its path, or "images[index]" for an array or tensor."""
    return str(source) if isinstance(source, (str, Path)) else f"images[{index}]"


def prepare_image(image: ImageLike, scale: tuple[int, int], key: Hashable = None, name: Optional[str] = None,
                  keep_original: bool = False) -> PreparedImage:
    """Decode (if a path) and resize ``image`` to ``scale`` with mmdetection's keep-ratio rule.
    Raises ValueError naming the image when it is so thin that a side would round to 0 pixels
    (e.g. 4000 x 1), FileNotFoundError / ValueError from decoding otherwise."""
    name = str(image) if name is None and isinstance(image, (str, Path)) else name or "image"
    original = as_image_tensor(image)
    h, w = int(original.shape[1]), int(original.shape[2])
    if h == 0 or w == 0:
        raise ValueError(f"{name}: image is empty ({h} x {w} pixels)")
    nh, nw = rescale_size(h, w, scale)
    if nh < 1 or nw < 1:
        raise ValueError(f"{name}: a {h} x {w} (h x w) image resized into {tuple(scale)} keeping its aspect "
                         f"ratio would be {nh} x {nw} pixels; the model needs at least 1 x 1")
    return PreparedImage(key, name, resize(original, (nh, nw)), (nh, nw), (nw / w, nh / h), (h, w),
                         original if keep_original else None)


class ImageFiles(torch.utils.data.Dataset):
    """Items ``(source, key)``: source a path (or an array / tensor, see htc_fast.data.preprocess), key
    anything identifying it for the caller. Item i is a PreparedImage or, when the image cannot be
    read or resized, an Unreadable.

    Args:
        items: (source, key) pairs.
        scale: the test scale (cfg.data.test_scale).
        keep_original: also return the decoded original image (predict draws on it).
    """

    def __init__(self, items: Sequence[tuple[ImageLike, Hashable]], scale: tuple[int, int],
                 keep_original: bool = False):
        self.items = list(items)
        self.scale = tuple(scale)
        self.keep_original = keep_original

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Union[PreparedImage, Unreadable]:
        source, key = self.items[index]
        name = image_name(source, index)
        try:
            return prepare_image(source, self.scale, key, name, self.keep_original)
        except (OSError, ValueError) as exc:
            reason = str(exc)
            return Unreadable(key, name, reason[len(name) + 2:] if reason.startswith(name + ": ") else reason)
