"""The GPU-side image path (`data_device="cuda"`): workers read file bytes, the device decodes.

What this module owns: `EncodedImage` (an image file's bytes plus what to do with them: the size
to resize to, the flip), the worker-side check of its header (`encode_image`), and
`decode_batch`, which turns a batch of them into resized, mirrored (3, H, W) uint8 images on the
device: plain JPEGs (RGB or grayscale, no EXIF rotation: what the worker's header check calls
`device_decodable`, nearly all of COCO) through `torchvision.io.decode_jpeg(list, device=...)` in
one batched call (nvJPEG on CUDA); anything else (PNG, CMYK or EXIF-rotated JPEGs) or a JPEG the
decoder refuses through Pillow (`image_decode`) on the host, so that every file gets the CPU
path's conversions. Normalising and padding are `collate.normalize_into_batch`, on the same device.

The images equal the CPU path's (`resized_sample.resized_image`) within the resize tolerance: on
the CPU (device "cpu", how the tests run it) the same uint8 resize runs and the results are
identical; on a GPU the resize is `preprocess.resize_float` (within one grey level of the CPU's
fixed-point resize) and nvJPEG's IDCT / chroma upsampling may differ from libjpeg-turbo's by a few
grey levels.
"""
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch
from PIL import Image
from torch import Tensor

from htc_fast.data.image_decode import decode_rgb, exif_orientation, is_plain_jpeg, plain_jpeg_size
from htc_fast.data.preprocess import resize


@dataclass(frozen=True)
class EncodedImage:
    """An image still to decode. data: (n,) uint8, the file's bytes (on the host); name: the file
    (for messages); original_shape: upright (h, w); size: (H, W) to resize to; flip: mirror
    horizontally; device_decodable: a plain JPEG for `decode_jpeg`; device: where `decode_batch`
    decodes it. `shape` is the decoded result's."""
    data: Tensor
    name: str
    original_shape: tuple[int, int]
    size: tuple[int, int]
    flip: bool
    device_decodable: bool
    device: Optional[torch.device] = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (3, *self.size)

    def to(self, device, non_blocking: bool = False) -> "EncodedImage":
        """The same image, decoded on `device` (the bytes stay on the host: decoders read them there)."""
        return replace(self, device=torch.device(device))

    def pin_memory(self) -> "EncodedImage":
        return self


def encode_image(data: bytes, name: str, expected_hw: tuple[int, int], size: tuple[int, int], flip: bool,
                 device: Union[str, torch.device, None]) -> EncodedImage:
    """Wrap a file's bytes after reading its header only (no pixel decoding; a plain JPEG's
    marker scan, else Pillow's header parse): ValueError naming the file when it is not an image
    or its upright size is not `expected_hw`. `data` may be bytes or a writable buffer (a
    memoryview from `image_decode.read_file` is wrapped without a copy)."""
    hw = plain_jpeg_size(data)
    plain = hw is not None
    if plain:
        h, w = hw
    else:
        try:
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size
                if exif_orientation(image) in (5, 6, 7, 8):
                    h, w = w, h
                plain = is_plain_jpeg(image)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise ValueError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
    if (h, w) != tuple(expected_hw):
        raise ValueError(f"image {name} is {(h, w)} (h, w) but the annotations say {tuple(expected_hw)}")
    writable = isinstance(data, memoryview) and not data.readonly
    array = torch.frombuffer(data if writable else bytearray(data), dtype=torch.uint8)
    return EncodedImage(array, name, (h, w), tuple(size), flip, plain,
                        None if device is None else torch.device(device))


def _decode_jpegs(images: Sequence[EncodedImage], device: torch.device) -> list[Optional[Tensor]]:
    """Decoded (3, h, w) uint8 on `device`, None where the batched decoder refused the file."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in every process
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return list(decode_jpeg([x.data for x in images], mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad file fails the whole call: retry one by one
            out = []
            for x in images:
                try:
                    out.append(decode_jpeg(x.data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def decode_batch(images: Sequence[EncodedImage], device: Union[str, torch.device, None] = None) -> list[Tensor]:
    """Per image (3, H, W) uint8 on `device` (default: each image's own, else the CPU): decoded,
    mirrored when asked, resized to its `size`. ValueError naming the file when one cannot be
    decoded (Pillow's message) or decodes to another size than its header said."""
    device = torch.device(device if device is not None else (images[0].device or "cpu"))
    jpegs = [k for k, x in enumerate(images) if x.device_decodable]
    decoded: list[Optional[Tensor]] = [None] * len(images)
    if jpegs:
        for k, out in zip(jpegs, _decode_jpegs([images[k] for k in jpegs], device)):
            decoded[k] = out
    results = []
    for x, image in zip(images, decoded):
        if image is None:  # not a plain JPEG, or refused: Pillow, which raises naming the file
            image = torch.from_numpy(decode_rgb(x.data.numpy().tobytes(), x.name)).permute(2, 0, 1).to(device)
        if tuple(image.shape[1:]) != x.original_shape:
            raise ValueError(f"image {x.name} decoded to {tuple(image.shape[1:])} (h, w), its header said "
                             f"{x.original_shape}")
        if x.flip:
            image = image.flip(-1)
        results.append(resize(image, x.size) if x.size != x.original_shape else image.clone())
    return results
