"""The plain-JPEG fast path of htc_fast.data.image_decode: the marker scan (`plain_jpeg_size`)
calls a file plain only when Pillow's header would (so the file decodes as before the scan),
plain files skip Pillow and give its pixels, and `read_file` gives the writable buffer the
decoder wraps without a copy."""
import io
import random
import struct
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from htc_fast.data.image_decode import decode_rgb
from tests.data_pipeline.test_image_decode import (
    COCO_JPEGS,
    _coco_pixels,
    _count_torchvision_calls,
    _encode,
    _pillow_rgb,
)


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def _insert_after_soi(data: bytes, *segments: bytes) -> bytes:
    assert data[:2] == b"\xff\xd8"
    return data[:2] + b"".join(segments) + data[2:]


def _sos_offset(data: bytes) -> int:
    """Where the start-of-scan marker is (walking the segments: 0xFFDA may occur inside a table)."""
    pos = 2
    while data[pos + 1] != 0xDA:
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return pos


def _adobe(transform: int) -> bytes:
    """An APP14 "Adobe" segment (version 100, no flags) saying how the components are coded."""
    return _segment(0xEE, b"Adobe" + struct.pack(">HHHB", 100, 0, 0, transform))


def _mpf_one_image() -> bytes:
    """An APP2 "MPF" segment (multi-picture format) listing one image: Pillow keeps it a JPEG."""
    from PIL import TiffImagePlugin

    index = TiffImagePlugin.ImageFileDirectory_v2(prefix=b"MM")
    index[0xB001], index.tagtype[0xB001] = 1, 4  # NumberOfImages, LONG
    index[0xB002], index.tagtype[0xB002] = struct.pack(">LLLHH", 0x030000, 0, 0, 0, 0), 7  # MPEntry: primary
    return _segment(0xE2, b"MPF\0MM\0*\0\0\0\x08" + index.tobytes(8))


def _pillow_plain_size(data: bytes):
    """What Pillow's header says: (h, w) when `is_plain_jpeg`, else None (None also when it refuses)."""
    from htc_fast.data.image_decode import is_plain_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return (image.size[1], image.size[0]) if is_plain_jpeg(image) else None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None


def _jpeg_kinds() -> dict:
    """name -> (bytes, whether the scan must call it plain): one file of each kind the scan decides on."""
    pixels = _coco_pixels(random.randint(20, 90), random.randint(20, 130))
    rgb = Image.fromarray(pixels)
    exif, upright = Image.Exif(), Image.Exif()
    exif[0x0112], upright[0x0112] = random.randint(2, 8), 1
    baseline = _encode(rgb, "JPEG", quality=random.randint(50, 95))
    sos = _sos_offset(baseline)
    twelve_bit = bytearray(baseline)
    sof = baseline.index(b"\xff\xc0")
    twelve_bit[sof + 4] = 12  # sample precision
    return {
        "coco": (random.choice(COCO_JPEGS).read_bytes(), True),
        "baseline": (baseline, True),
        "progressive": (_encode(rgb, "JPEG", quality=90, progressive=True), True),
        "grayscale": (_encode(rgb.convert("L"), "JPEG", quality=90), True),
        "subsampling_444_with_icc": (_encode(rgb, "JPEG", subsampling=0, icc_profile=b"\0" * 300), True),
        "adobe_rgb": (_insert_after_soi(baseline, _adobe(random.randint(0, 1))), True),  # 3 components
        "comment": (_insert_after_soi(baseline, _segment(0xFE, b"a comment")), True),
        "cmyk_adobe": (_encode(rgb.convert("CMYK"), "JPEG", quality=90), False),
        "exif_rotated": (_encode(rgb, "JPEG", exif=exif), False),
        "exif_upright": (_encode(rgb, "JPEG", exif=upright), False),
        "mpf": (_insert_after_soi(baseline, _mpf_one_image()), False),
        "twelve_bit": (bytes(twelve_bit), False),
        "fill_bytes": (baseline[:2] + b"\xff\xff" + baseline[2:], False),
        "short_jfif": (_insert_after_soi(baseline, _segment(0xE0, b"JFIF\0")), False),
        "truncated_header": (baseline[:random.randint(2, sos + 3)], False),
        "truncated_in_table": (baseline[:random.randint(30, sos - 1)], False),
        "png": (_encode(rgb, "PNG"), False),
        "garbage_after_soi": (b"\xff\xd8" + random.randbytes(random.randint(0, 500)), False),
        "garbage": (random.randbytes(random.randint(0, 500)), False),
        "empty": (b"", False),
    }


def test_marker_scan_on_each_kind_of_file():
    from htc_fast.data.image_decode import plain_jpeg_size

    for name, (data, plain) in _jpeg_kinds().items():
        got = plain_jpeg_size(data)
        assert (got is not None) == plain, name
        if plain:  # the size Pillow reads, for every buffer type the scan takes
            assert got == _pillow_plain_size(data), name
            assert plain_jpeg_size(bytearray(data)) == plain_jpeg_size(memoryview(data)) == got, name


def test_marker_scan_never_calls_plain_what_pillow_does_not():
    """The property the fast path rests on: scan plain => Pillow's header plain, same size. Tried
    on headers with random bytes changed (the decoder is never run here: header parsing only)."""
    from htc_fast.data.image_decode import plain_jpeg_size

    kinds = _jpeg_kinds()
    seeds = [kinds[k][0] for k in ("coco", "baseline", "progressive", "grayscale", "adobe_rgb", "cmyk_adobe",
                                   "exif_upright", "mpf")]
    plain_seen = 0
    for _ in range(1500):
        data = bytearray(random.choice(seeds))
        sos = _sos_offset(bytes(data))
        for _ in range(random.randint(1, 3)):
            data[random.randrange(sos + 4)] = random.choice((random.randrange(256), 0xFF, 0, 1, 3, 4, 8, 12))
        got = plain_jpeg_size(data)
        plain_seen += got is not None
        if got is not None:
            assert got == _pillow_plain_size(bytes(data)), bytes(data[:sos + 4]).hex()
    assert plain_seen > 100  # the mutations leave many files plain: the implication was really tried


def test_marker_scan_honours_pillows_pixel_limit(monkeypatch):
    """A header announcing more pixels than PIL.Image.MAX_IMAGE_PIXELS never reaches decode_jpeg."""
    from htc_fast.data.image_decode import plain_jpeg_size

    data = _jpeg_kinds()["baseline"][0]
    h, w = plain_jpeg_size(data)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", h * w - 1)
    assert plain_jpeg_size(data) is None
    with pytest.raises(ValueError, match="cannot decode image big.jpg: DecompressionBomb"):
        decode_rgb(data, "big.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert plain_jpeg_size(data) == (h, w)


def test_each_kind_decodes_as_before(monkeypatch):
    """Plain files skip Pillow entirely (no Image.open) and give Pillow's pixels; the others go
    through Pillow's header as before the scan (an upright EXIF JPEG still to decode_jpeg)."""
    from htc_fast.data import image_decode

    kinds = _jpeg_kinds()
    expected = {}
    for name, (data, _) in kinds.items():
        try:
            expected[name] = decode_rgb(data)  # through the scan, or Pillow as before
        except ValueError as exc:
            expected[name] = str(exc)
    opened, original_open = [], Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or original_open(*a, **k))
    calls = _count_torchvision_calls(monkeypatch)
    for name, (data, plain) in kinds.items():
        del opened[:], calls[:]
        if isinstance(expected[name], str):
            assert not plain and name not in ("cmyk_adobe", "exif_rotated", "exif_upright", "mpf", "fill_bytes"), name
            with pytest.raises(ValueError, match="cannot decode image"):
                decode_rgb(data)
            continue
        got = decode_rgb(data)
        assert np.array_equal(got, expected[name]) and got.flags.c_contiguous and got.flags.writeable, name
        if plain:
            assert opened == [] and len(calls) == 1 and calls[0] is not None, name
            assert np.array_equal(got, _pillow_rgb(data)), name
        else:
            assert opened, name
    assert image_decode.plain_jpeg_size(kinds["exif_upright"][0]) is None
    del calls[:]
    decode_rgb(kinds["exif_upright"][0])  # orientation 1 in Pillow's reading: still libjpeg-turbo via torchvision
    assert len(calls) == 1 and calls[0] is not None


def test_read_file_gives_a_writable_buffer(tmp_path):
    from htc_fast.data.image_decode import plain_jpeg_size, read_file

    data = random.randbytes(random.randint(0, 300_000))
    (tmp_path / "a.bin").write_bytes(data)
    got = read_file(tmp_path / "a.bin")
    assert isinstance(got, memoryview) and not got.readonly and got.format == "B" and bytes(got) == data
    assert torch.equal(torch.frombuffer(got, dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8),
                       torch.tensor(list(data), dtype=torch.uint8))
    jpeg = random.choice(COCO_JPEGS)  # what read_rgb hands to the scan and the decoder
    assert plain_jpeg_size(read_file(jpeg)) == plain_jpeg_size(jpeg.read_bytes()) is not None
    assert np.array_equal(decode_rgb(read_file(jpeg)), decode_rgb(jpeg.read_bytes()))
    (tmp_path / "folder").mkdir()
    for name in ("folder", "missing.jpg"):
        with pytest.raises(FileNotFoundError, match=f"not found: .*{name}"):
            read_file(tmp_path / name)
