"""Image file decoding: every file gives an RGB uint8 array or a ValueError naming it.

Plain JPEGs (RGB or grayscale, baseline or progressive, no EXIF block; nearly all of COCO) decode
through torchvision's `decode_jpeg` on the CPU (libjpeg-turbo; the pixels are identical to
Pillow's on the COCO test images). Whether a file is plain is decided from its bytes by
`plain_jpeg_size`, a scan of the JPEG marker segments up to the start of scan (a few
microseconds; no Pillow object is made): it says "plain" only for a file that Pillow would open
as a JPEG of mode RGB or L without EXIF, within Pillow's pixel limit -- exactly the files that
went to `decode_jpeg` before the scan existed, when Pillow read each header. Anything the scan is
unsure of (an Exif, MPF or Photoshop segment, CMYK / YCCK, 12-bit, fill bytes, a segment cut short,
...) takes the Pillow path below, which decides as before. `read_rgb` reads the file into an
uninitialised writable buffer that `decode_jpeg`'s operator takes without a copy, and returns
the decoder's own memory (HWC) as the array. Speed on the six COCO test images, one core, time
relative to torchvision's `decode_image(path)` (the decoder before issue 16), in runs that
interleave the decoders round by round (300 rounds each, a shared 2-core machine at load 2.5-3.4):
`read_rgb` 0.995-1.009, i.e. the same within the noise (the libjpeg-turbo call is 99 % of it);
with Pillow reading each header (before the scan) 1.07-1.10 in the same runs; Pillow alone
about 1.4. `benchmarks/bench_data.py -k decode`, which times the cases one after another,
varies more (0.96-1.03 over six runs).
`decode_jpeg` raises RuntimeError on a truncated or otherwise undecodable JPEG (never crashes:
checked on truncated and byte-flipped files in a subprocess); such a file is then decoded by Pillow,
which raises the error that names it. A JPEG with flipped bytes that libjpeg-turbo can still
decode (it prints "Corrupt JPEG data" on stderr) is accepted, as Pillow accepts it. Everything
else goes through Pillow.

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
import functools
import io
import os
import struct
import warnings
import zlib
from collections.abc import Callable
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
Buffer = Union[bytes, bytearray, memoryview]  # a file's bytes (a memoryview of format "B", as read_file gives)


def check_png_crcs(data: Buffer) -> None:
    """Raise ValueError when a PNG chunk's CRC is wrong or a chunk runs past the end of the file.
    Pillow skips the CRCs of image-data (IDAT) chunks, so a flipped byte in the pixel data could
    decode silently; libpng refuses such a file, and so do we (crc32 runs at GB/s)."""
    pos, end, view = len(_PNG_SIGNATURE), len(data), memoryview(data)
    while pos + 12 <= end:
        length, = struct.unpack_from(">I", data, pos)
        if pos + 12 + length > end:
            raise ValueError(f"PNG chunk at byte {pos} runs past the end of the file")
        kind = bytes(data[pos + 4:pos + 8])
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


# JPEG markers (ITU T.81, table B.1) the scan accepts before the start of scan (SOS, 0xDA):
# the frame headers Pillow reads the mode from (SOF0-3, 5-7, 9-11, 13-15) and the table / comment
# segments it only skips or stores (DHT, DAC, DQT, DRI, COM). Any other marker (DNL, DHP, EXP,
# JPGn, RSTn, SOI, EOI) before SOS: not plain, Pillow decides.
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF))
_TABLE_MARKERS = frozenset((0xC4, 0xCC, 0xDB, 0xDD, 0xFE))
# APPn payload prefixes that make Pillow's header differ from a plain JPEG's (EXIF, which may
# rotate; MPF, which may make an MPO file) or whose parsing can make Pillow refuse the file.
_NOT_PLAIN_APP = ((0xE1, b"Exif\0\0"), (0xE2, b"MPF\0"), (0xED, b"Photoshop 3.0\0"))
# APPn payloads Pillow reads fixed fields from (JFIF version, Adobe version, ICC chunk count):
# shorter than this, Pillow refuses the file.
_MIN_APP_LENGTH = ((0xE0, b"JFIF", 7), (0xEE, b"Adobe", 7), (0xE2, b"ICC_PROFILE\0", 14))


def plain_jpeg_size(data: Buffer) -> Optional[tuple[int, int]]:
    """(height, width) of a plain JPEG (see the module docstring), None when it is not one or the
    scan cannot tell -- from the marker segments before the start of scan, without Pillow.

    data: the file's bytes (bytes, bytearray or a memoryview of bytes). "Plain" implies that
    `is_plain_jpeg(Image.open(data))` is True: the file starts with SOI, its segments follow each
    other with no fill bytes or junk, one SOF with 8-bit samples and 1 or 3 components and a size
    within `PIL.Image.MAX_IMAGE_PIXELS`, quantisation tables as Pillow parses them, no APP1 "Exif"
    (orientation), APP2 "MPF" (multi-picture) or APP13 "Photoshop" segment, then SOS. Files
    Pillow would call plain but the scan does not (e.g. with EXIF) just take the Pillow path."""
    end = len(data)
    if end < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    size, pos = None, 2
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        length, = struct.unpack_from(">H", data, pos + 2)  # counts itself, not the marker
        body, pos = pos + 4, pos + 2 + length
        if length < 2 or pos > end:
            return None
        if marker == 0xDA:
            return size
        if marker in _SOF_MARKERS:
            if size is not None or length < 8:
                return None
            height, width, components = struct.unpack_from(">HHB", data, body + 1)
            limit = Image.MAX_IMAGE_PIXELS  # read per call: callers may change it
            if (data[body] != 8 or components not in (1, 3) or height == 0 or width == 0
                    or (limit is not None and height * width > limit)):
                return None
            size = (height, width)
        elif 0xE0 <= marker <= 0xEF:
            for app, prefix in _NOT_PLAIN_APP:
                if marker == app and data[body:body + len(prefix)] == prefix:
                    return None
            for app, prefix, minimum in _MIN_APP_LENGTH:
                if marker == app and length - 2 < minimum and data[body:body + len(prefix)] == prefix:
                    return None
        elif marker == 0xDB:  # DQT: table after table, each 1 + 64 bytes (8-bit) or 1 + 128 (16-bit)
            table = body
            while table < pos:
                table += 65 if data[table] < 16 else 129
            if table != pos:
                return None
        elif marker not in _TABLE_MARKERS:
            return None
    return None


@functools.cache
def _jpeg_operator() -> tuple[Callable, int]:
    """torchvision's CPU JPEG decoding operator (what `torchvision.io.decode_jpeg` calls) and its
    RGB mode. Imported on first use: torchvision.io is a slow import that loads the operators."""
    from torchvision.io import ImageReadMode

    return torch.ops.image.decode_jpeg.default, ImageReadMode.RGB.value


def _writable(data: Buffer) -> Union[bytearray, memoryview]:
    """`data` when `torch.frombuffer` can wrap it as is (a writable buffer: torch warns about
    read-only ones, which the decoder would only read), else a writable copy."""
    return data if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly) \
        else bytearray(data)


def _decode_jpeg_rgb(data: Union[bytearray, memoryview]) -> Optional[np.ndarray]:
    """(H, W, 3) uint8 from torchvision's CPU `decode_jpeg`, None when it refuses the data.
    data: a writable buffer of bytes (`_writable`), wrapped without a copy."""
    # The operator, not the Python wrapper `decode_jpeg`: the wrapper adds a deprecation warning
    # (torchvision 0.29) and API-usage logging, ~20 us per call, 1.5 % of a COCO image's decoding.
    decode, rgb = _jpeg_operator()
    try:
        image = decode(torch.frombuffer(data, dtype=torch.uint8), rgb, False)  # False: no EXIF rotation
    except RuntimeError:  # corrupt or truncated: Pillow decodes it again and names the file
        return None
    return np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # libjpeg-turbo writes HWC: no copy


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


def _decode_with_pillow(data: Buffer, try_torchvision: bool) -> np.ndarray:
    """Pillow's header decides: a plain JPEG goes to `decode_jpeg` when `try_torchvision` (the
    scan was unsure), anything else, or a JPEG `decode_jpeg` refused, is decoded by Pillow."""
    if data[:len(_PNG_SIGNATURE)] == _PNG_SIGNATURE:
        check_png_crcs(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as image:
            array = None
            if try_torchvision and is_plain_jpeg(image):
                array = _decode_jpeg_rgb(_writable(data))
            if array is None:
                image.load()
                method = _UPRIGHT.get(exif_orientation(image))
                upright = image.transpose(method) if method is not None else image
                array = _to_rgb_array(upright)
    return array


def _reason(exc: BaseException) -> str:
    """The decoder's error for a message. Pillow's "cannot identify image file" names the
    in-memory stream, whose address changes per call: said without it, so that a file's message
    is the same on every load (a caller can tell repeats apart from new failures)."""
    if isinstance(exc, Image.UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format Pillow reads"
    return f"{type(exc).__name__}: {exc}"


def decode_rgb(data: Buffer, name: Union[str, Path] = "<bytes>") -> np.ndarray:
    """(H, W, 3) uint8 RGB, C-contiguous, writable (the caller's), upright, from the bytes of an
    image file (a writable buffer, as `read_file` gives, is decoded without a copy; bytes are
    copied once for a plain JPEG).

    Raises ValueError("cannot decode image NAME: ...") on any malformed or unsupported file
    (including Pillow's decompression-bomb limit, `PIL.Image.MAX_IMAGE_PIXELS`)."""
    try:
        plain = plain_jpeg_size(data) is not None
        array = _decode_jpeg_rgb(_writable(data)) if plain else None
        if array is None:  # not plain, or refused by decode_jpeg (then Pillow raises naming the file)
            array = _decode_with_pillow(data, try_torchvision=not plain)
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot decode image {name}: {_reason(exc)}") from exc
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:  # a mode Pillow converted oddly
        raise ValueError(f"cannot decode image {name}: got an array {array.shape} {array.dtype}")
    # Pillow's arrays wrap read-only bytes: copy those (the less common path) so that every caller
    # may wrap the result in a tensor (torch.from_numpy warns on read-only arrays) without a copy.
    return array if array.flags.writeable else array.copy()


def read_file(path: Union[str, Path]) -> memoryview:
    """The bytes of `path` as a writable memoryview (format "B"; `torch.frombuffer` wraps it
    without a copy or a warning, `io.BytesIO` takes it); FileNotFoundError naming it when it is
    not a file. The file is read straight into an uninitialised buffer: a bytearray would be
    zeroed first, an extra pass over the bytes that costs ~1 % of a COCO image's decoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    with open(path, "rb") as file:
        buffer = np.empty(os.fstat(file.fileno()).st_size, dtype=np.uint8)
        size = file.readinto(buffer)  # until the buffer is full or the file ends
    return memoryview(buffer)[:size]


def read_rgb(path: Union[str, Path]) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an image file (see `decode_rgb`)."""
    return decode_rgb(read_file(path), path)


def read_label_map(path: Union[str, Path]) -> np.ndarray:
    """(H, W) uint8, writable, of a single-channel 8-bit image (a COCO-stuff label PNG), values unchanged
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
            return np.array(image)  # a writable copy: torch.from_numpy warns on Pillow's read-only array
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot decode label map {path}: {_reason(exc)}") from exc
