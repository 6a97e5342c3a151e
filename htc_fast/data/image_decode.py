"""Image file decoding: every file gives an RGB uint8 array or a ValueError naming it.

Plain JPEGs (RGB or grayscale, baseline or progressive, no EXIF rotation: `is_plain_jpeg`, from the
header; nearly all of COCO) decode through torchvision's `decode_jpeg` on the CPU (libjpeg-turbo,
about 1.35x faster than going through Pillow; the pixels are identical on the COCO test images).
It raises RuntimeError on a truncated or otherwise undecodable JPEG (never crashes: checked on
truncated and byte-flipped files in a subprocess); such a file is then decoded by Pillow, which
raises the error that names it. A JPEG with flipped bytes that libjpeg-turbo can still decode
(it prints "Corrupt JPEG data" on stderr) is accepted, as Pillow accepts it. Everything else goes
through Pillow.

Why Pillow rather than torchvision's `decode_image` for the other files: libpng errors inside torchvision's PNG decoder
(e.g. an IDAT chunk with a bad CRC) kill the process with SIGSEGV, a corrupt or truncated JPEG is
returned half grey with only a message on stderr, and torchvision 0.29 deprecates its decoders
with a warning in every process. Pillow raises on all of these (`OSError`, `SyntaxError`, ...),
which `decode_rgb` turns into one ValueError naming the file. Pillow decodes JPEG with
libjpeg-turbo, like torchvision and OpenCV: the pixels are the same.

Conversions to RGB uint8 (what mmdetection's `LoadImageFromFile` gets from OpenCV's
`IMREAD_COLOR`, then in RGB order):
  * RGB, RGBA, LA, PA, grayscale (L, 1), palette (P), CMYK, YCbCr: Pillow's `convert("RGB")`;
    alpha is dropped, not composited (as OpenCV does); CMYK uses Pillow's multiplicative rule
    R = (255 - C)(255 - K) / 255, Adobe's inverted CMYK JPEGs are un-inverted on decoding;
  * 16 bit per channel: the high byte (value >> 8), as OpenCV's `IMREAD_COLOR` (libpng's
    `png_set_strip_16`) does -- scaled, never clamped (Pillow's own I;16 -> L conversion clamps);
    32-bit integer grayscale ("I") is read as 16-bit data (clipped to 0..65535, then >> 8);
  * float images ("F") are refused with a ValueError.
EXIF orientation is APPLIED (the image is rotated/flipped upright), as mmcv's `imfrombytes` /
`imread` do by default (`flag="color"` is OpenCV's IMREAD_COLOR, which honours the EXIF
Orientation tag; only `"color_ignore_orientation"` skips it; mmcv's Pillow backend does the same
with `ImageOps.exif_transpose`). mmcv's default channel order is BGR; this module returns RGB,
the order mmdetection's data preprocessor (`bgr_to_rgb=True`) hands to the network.
"""
import io
import struct
import warnings
import zlib
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

_ORIENTATION_TAG = 0x0112
# EXIF Orientation value -> the Pillow transpose that makes the image upright (EXIF 2.3, 4.6.4 A)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Exceptions Pillow raises on malformed data (a truncated file, a bad chunk CRC, a broken zlib or
# JPEG stream, an unknown format, a header announcing an absurd size, ...).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, MemoryError,
                  Image.DecompressionBombError, Image.DecompressionBombWarning)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png_crcs(data: bytes) -> None:
    """Raise ValueError when a PNG chunk's CRC is wrong or a chunk runs past the end of the file.
    Pillow skips the CRCs of image-data (IDAT) chunks, so a flipped byte in the pixel data could
    decode silently; libpng refuses such a file, and so do we (crc32 runs at GB/s)."""
    pos, end, view = len(_PNG_SIGNATURE), len(data), memoryview(data)
    while pos + 12 <= end:
        length, = struct.unpack_from(">I", data, pos)
        if pos + 12 + length > end:
            raise ValueError(f"PNG chunk at byte {pos} runs past the end of the file")
        kind = data[pos + 4:pos + 8]
        stored, = struct.unpack_from(">I", data, pos + 8 + length)
        if zlib.crc32(view[pos + 4:pos + 8 + length]) != stored:
            raise ValueError(f"PNG chunk {kind.decode('latin-1')!r} at byte {pos} has a bad CRC")
        if kind == b"IEND":
            return
        pos += 12 + length


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag (1..8) of an opened image, 1 when absent or unreadable."""
    # JPEGs without an APP1/EXIF segment (most of COCO) skip the EXIF parse.
    if image.format == "JPEG" and "exif" not in image.info:
        return 1
    try:
        return int(image.getexif().get(_ORIENTATION_TAG, 1))
    except (ValueError, TypeError, OSError, SyntaxError):  # an unreadable EXIF block: leave as stored
        return 1


def is_plain_jpeg(image: Image.Image) -> bool:
    """Whether an opened (not yet loaded) image is a JPEG that libjpeg-turbo's RGB output gives
    as is: RGB or grayscale (not CMYK / YCCK), with no EXIF rotation to apply. Header only."""
    return image.format == "JPEG" and image.mode in ("RGB", "L") and exif_orientation(image) == 1


def _decode_jpeg_rgb(data: bytes) -> Optional[np.ndarray]:
    """(H, W, 3) uint8 from torchvision's CPU `decode_jpeg`, None when it refuses the data."""
    from torchvision.io import ImageReadMode, decode_jpeg  # lazy: a slow import, only JPEGs need it

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders in every process
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            image = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:  # corrupt or truncated: Pillow decodes it again and names the file
            return None
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # already HWC in memory: no copy


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    if image.mode == "RGB":
        return np.asarray(image)
    if image.mode in _SIXTEEN_BIT:
        gray = np.asarray(image)
        if image.mode == "I":
            gray = np.clip(gray, 0, 65535)
        gray = (gray.astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("floating-point images (Pillow mode 'F') are not supported")
    return np.asarray(image.convert("RGB"))


def decode_rgb(data: bytes, name: Union[str, Path] = "<bytes>") -> np.ndarray:
    """(H, W, 3) uint8 RGB, C-contiguous, upright, from the bytes of an image file.

    Raises ValueError("cannot decode image NAME: ...") on any malformed or unsupported file
    (including Pillow's decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`)."""
    try:
        if data[:len(_PNG_SIGNATURE)] == _PNG_SIGNATURE:
            check_png_crcs(data)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                array = _decode_jpeg_rgb(data) if is_plain_jpeg(image) else None
                if array is None:
                    image.load()
                    method = _UPRIGHT.get(exif_orientation(image))
                    upright = image.transpose(method) if method is not None else image
                    array = _to_rgb_array(upright)
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:  # a mode Pillow converted oddly
        raise ValueError(f"cannot decode image {name}: got an array {array.shape} {array.dtype}")
    return array


def read_file(path: Union[str, Path]) -> bytes:
    """The bytes of `path`; FileNotFoundError naming it when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    return path.read_bytes()


def read_rgb(path: Union[str, Path]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (see `decode_rgb`)."""
    return decode_rgb(read_file(path), path)


def read_label_map(path: Union[str, Path]) -> np.ndarray:
    """(H, W) uint8 of a single-channel 8-bit image (a COCO-stuff label PNG), values unchanged
    (no EXIF rotation: label maps carry none, and mmdetection reads them with flag 'unchanged').
    ValueError naming the file when it is malformed or not 8-bit single-channel (a palette PNG
    gives its indices)."""
    data = read_file(path)
    try:
        if data[:len(_PNG_SIGNATURE)] == _PNG_SIGNATURE:
            check_png_crcs(data)
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode not in ("L", "P"):
                raise ValueError(f"must be a single-channel 8-bit PNG, got Pillow mode {image.mode!r}")
            return np.asarray(image)
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot decode label map {path}: {exc}") from exc
