"""Image decoding (htc_fast.data.image_decode, preprocess.load_image): corrupt files raise a
ValueError naming the file (never a crash), every mode gives the right RGB uint8 pixels."""
import io
import random
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from htc_fast.data.image_decode import decode_rgb, read_label_map, read_rgb
from htc_fast.data.preprocess import load_image
from tests.data_pipeline import IMAGE_DIR

REPO = Path(__file__).resolve().parents[2]
COCO_JPEGS = sorted(IMAGE_DIR.glob("*.jpg"))


def _coco_pixels(h=120, w=160) -> np.ndarray:
    """A random (h, w, 3) crop of a real COCO photograph."""
    image = np.asarray(Image.open(random.choice(COCO_JPEGS)).convert("RGB"))
    y, x = random.randrange(image.shape[0] - h), random.randrange(image.shape[1] - w)
    return np.ascontiguousarray(image[y:y + h, x:x + w])


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): rows already filtered (type 0)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _bad_crc_png() -> bytes:
    data = bytearray(_encode(Image.fromarray(_coco_pixels()), "PNG"))
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8:start - 4])[0]
    data[start + random.randrange(length)] ^= 1 << random.randrange(8)  # one bit inside the pixel data
    return bytes(data)


def _corrupt_files(folder: Path):
    jpeg = random.choice(COCO_JPEGS).read_bytes()
    files = {"bad_crc.png": _bad_crc_png(), "truncated.jpg": jpeg[:random.randint(len(jpeg) // 4, len(jpeg) - 1000)],
             "empty.jpg": b"", "text.jpg": b"this is a text file, not a JPEG\n",
             "huge_header.png": _raw_png(200_000, 200_000, 8, 2)}  # 4e10 pixels announced
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


def test_corrupt_files_raise_a_clear_error_in_a_subprocess(tmp_path):
    """Run where a crash cannot take pytest down: each file must give a ValueError naming it."""
    names = _corrupt_files(tmp_path)
    script = ("import sys\nfrom htc_fast.data.preprocess import load_image\n"
              "for p in sys.argv[1:]:\n"
              "    try:\n        load_image(p)\n        print('DECODED', p)\n"
              "    except ValueError as e:\n        print('ERROR', e)\n")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script, *[str(tmp_path / n) for n in names]],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"decoder crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == len(names)
    for name, line in zip(names, lines):
        assert line.startswith(f"ERROR cannot decode image {tmp_path / name}"), line
    assert "Warning" not in proc.stderr, proc.stderr  # no warning printed by the decoder


def test_corrupt_files_in_process(tmp_path):
    for name in _corrupt_files(tmp_path):
        with pytest.raises(ValueError, match=f"cannot decode image .*{name}"):
            read_rgb(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_rgb(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="bad CRC"):
        decode_rgb(_bad_crc_png(), "x.png")
    messages = set()
    for _ in range(3):  # the same message each time (no stream address)
        with pytest.raises(ValueError, match="text.jpg: UnidentifiedImageError: not an image format") as info:
            read_rgb(tmp_path / "text.jpg")
        messages.add(str(info.value))
    assert len(messages) == 1


def test_real_coco_jpegs_decode_as_torchvision_does():
    """Same libjpeg-turbo pixels as the decoder it replaces (torchvision's, no EXIF on COCO)."""
    from torchvision.io import ImageReadMode, decode_image

    for path in random.sample(COCO_JPEGS, 2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            expected = decode_image(str(path), mode=ImageReadMode.RGB)
        got = load_image(path)
        assert got.dtype == torch.uint8 and torch.equal(got, expected)
        got[0, 0, 0] = 7  # load_image's tensor is the caller's to modify


def test_sixteen_bit_pngs_are_scaled_not_clamped():
    h, w = 9, 13
    gray = np.random.randint(0, 65536, (h, w), dtype=np.uint16)
    got = decode_rgb(_raw_png(w, h, 16, 0, b"".join(b"\0" + gray[i].astype(">u2").tobytes() for i in range(h))))
    assert np.array_equal(got, np.repeat((gray >> 8).astype(np.uint8)[:, :, None], 3, 2))  # OpenCV's high byte
    rgb = np.random.randint(0, 65536, (h, w, 3), dtype=np.uint16)
    got = decode_rgb(_raw_png(w, h, 16, 2, b"".join(b"\0" + rgb[i].astype(">u2").tobytes() for i in range(h))))
    assert np.array_equal(got, (rgb >> 8).astype(np.uint8))
    assert (got > 250).mean() < 0.05  # a clamp to 255 would saturate ~99 % of the pixels


def test_palette_alpha_grayscale_and_one_bit_pngs():
    pixels = _coco_pixels()
    palette_image = Image.fromarray(pixels).quantize(37)
    palette = np.array(palette_image.getpalette()[:3 * 37], dtype=np.uint8).reshape(-1, 3)
    assert np.array_equal(decode_rgb(_encode(palette_image, "PNG")), palette[np.asarray(palette_image)])
    alpha = np.random.randint(0, 256, pixels.shape[:2], dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    assert np.array_equal(decode_rgb(_encode(rgba, "PNG")), pixels)  # alpha dropped, as OpenCV's IMREAD_COLOR
    gray = pixels[:, :, 1]
    assert np.array_equal(decode_rgb(_encode(Image.fromarray(gray), "PNG")), np.repeat(gray[:, :, None], 3, 2))
    la = Image.fromarray(np.dstack([gray, alpha]), "LA")
    assert np.array_equal(decode_rgb(_encode(la, "PNG")), np.repeat(gray[:, :, None], 3, 2))
    bits = gray > 127
    one = Image.fromarray(bits).convert("1")
    assert np.array_equal(decode_rgb(_encode(one, "PNG")), np.repeat(bits[:, :, None] * np.uint8(255), 3, 2))


def test_cmyk_and_grayscale_jpegs():
    h, w = 48, 64
    cmyk = np.zeros((h, w, 4), dtype=np.uint8)  # four flat 32x24 blocks: JPEG keeps them within a few levels
    colors = np.random.randint(0, 256, (4, 4))
    for k, (y, x) in enumerate([(0, 0), (0, 32), (24, 0), (24, 32)]):
        cmyk[y:y + 24, x:x + 32] = colors[k]
    got = decode_rgb(_encode(Image.fromarray(cmyk, "CMYK"), "JPEG", quality=100))
    c, k = cmyk[:, :, :3].astype(float), cmyk[:, :, 3:].astype(float)
    expected = (255 - c) * (255 - k) / 255
    assert np.abs(got[4:-4, 4:-4] - expected[4:-4, 4:-4]).max() <= 3  # block interiors
    gray = _coco_pixels()[:, :, 0]
    data = _encode(Image.fromarray(gray), "JPEG", quality=95)
    decoded_gray = np.asarray(Image.open(io.BytesIO(data)))
    assert np.array_equal(decode_rgb(data), np.repeat(decoded_gray[:, :, None], 3, 2))


# EXIF Orientation -> how the stored pixels are shown upright (EXIF 2.3, tag 0x0112)
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1], 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_is_applied_as_mmcv_does(orientation):
    stored = _coco_pixels(30, 50)
    exif = Image.Exif()
    exif[0x0112] = orientation
    got = decode_rgb(_encode(Image.fromarray(stored), "PNG", exif=exif))
    assert np.array_equal(got, UPRIGHT[orientation](stored))


def test_exif_rotated_real_jpeg():
    path = random.choice(COCO_JPEGS)
    plain = Image.open(path)
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = np.asarray(Image.open(io.BytesIO(_encode(plain, "JPEG", quality=90))))  # same coefficients, no EXIF
    got = decode_rgb(_encode(plain, "JPEG", quality=90, exif=exif))
    assert got.shape == (raw.shape[1], raw.shape[0], 3) and np.array_equal(got, np.rot90(raw, -1))


def test_label_maps_keep_their_values(tmp_path):
    labels = np.random.randint(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(labels).save(tmp_path / "a.png")
    assert np.array_equal(read_label_map(tmp_path / "a.png"), labels)
    Image.fromarray(np.dstack([labels] * 3)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png.*single-channel"):
        read_label_map(tmp_path / "rgb.png")
    (tmp_path / "bad.png").write_bytes(_bad_crc_png())
    with pytest.raises(ValueError, match="bad.png.*bad CRC"):
        read_label_map(tmp_path / "bad.png")


def _pillow_rgb(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _count_torchvision_calls(monkeypatch) -> list:
    """Record what `decode_rgb`'s torchvision JPEG path returns (None: it refused the data)."""
    from htc_fast.data import image_decode

    calls, original = [], image_decode._decode_jpeg_rgb
    monkeypatch.setattr(image_decode, "_decode_jpeg_rgb", lambda data: calls.append(original(data)) or calls[-1])
    return calls


def test_plain_jpegs_take_the_torchvision_path_with_pillows_pixels(monkeypatch):
    """COCO JPEGs, and progressive / grayscale re-encodings of them, decode through torchvision's
    `decode_jpeg`; measured max abs difference to Pillow's pixels on the shipped images: 0."""
    calls, filters = _count_torchvision_calls(monkeypatch), list(warnings.filters)
    pixels = _coco_pixels()
    files = [p.read_bytes() for p in COCO_JPEGS + [REPO / "tests" / "data" / "rocket.jpg"]]
    files += [_encode(Image.fromarray(pixels), "JPEG", quality=random.randint(60, 95), progressive=True),
              _encode(Image.fromarray(pixels[:, :, random.randrange(3)]), "JPEG", quality=90)]
    for data in files:
        got = decode_rgb(data)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        assert np.abs(got.astype(np.int16) - _pillow_rgb(data)).max() <= 0
    assert len(calls) == len(files) and all(c is not None for c in calls)
    assert warnings.filters == filters  # the deprecation warning is silenced locally, no global filter


def test_other_files_take_the_pillow_path(monkeypatch):
    calls = _count_torchvision_calls(monkeypatch)
    pixels = _coco_pixels()
    exif = Image.Exif()
    exif[0x0112] = 3
    decode_rgb(_encode(Image.fromarray(pixels), "PNG"))
    decode_rgb(_encode(Image.fromarray(pixels), "JPEG", exif=exif))
    decode_rgb(_encode(Image.fromarray(pixels).convert("CMYK"), "JPEG"))
    assert calls == []


def test_corrupt_jpegs_never_crash_torchvision_in_a_subprocess(tmp_path):
    """Truncated and byte-flipped COCO JPEGs: each either raises a ValueError naming the file (the
    torchvision path refused it and Pillow did too) or decodes to Pillow's pixels."""
    paths = []
    for k in range(40):
        data = bytearray(random.choice(COCO_JPEGS).read_bytes())
        if k % 2:
            data = data[:random.randint(2, len(data) - 100)]  # cut inside the entropy-coded data
        else:
            for _ in range(random.randint(1, 20)):
                data[random.randrange(len(data))] ^= 1 << random.randrange(8)
        paths.append(tmp_path / f"bad{k}.jpg")
        paths[-1].write_bytes(bytes(data))
    script = ("import io, sys, numpy as np\nfrom PIL import Image\nfrom htc_fast.data.image_decode import read_rgb\n"
              "for p in sys.argv[1:]:\n"
              "    try:\n        got = read_rgb(p)\n"
              "    except ValueError as e:\n        print('ERROR', e)\n        continue\n"
              "    same = np.array_equal(got, np.asarray(Image.open(p).convert('RGB')))\n"
              "    print('DECODED' if same else 'DIFFERENT', p)\n")
    proc = subprocess.run([sys.executable, "-W", "always", "-c", script, *map(str, paths)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"decoder crashed (rc {proc.returncode}): {proc.stderr[-2000:]}"
    lines = proc.stdout.splitlines()
    assert len(lines) == len(paths)
    for path, line in zip(paths, lines):
        assert line in (f"DECODED {path}",) or line.startswith(f"ERROR cannot decode image {path}"), line
    assert sum(line.startswith("ERROR") for line in lines[1::2]) == len(paths) // 2  # every truncation refused
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]


# --- the JPEG marker scan that sends plain JPEGs to torchvision without opening them in Pillow ---

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
    from htc_fast.data.image_decode import read_file

    data = random.randbytes(random.randint(0, 300_000))
    (tmp_path / "a.bin").write_bytes(data)
    got = read_file(tmp_path / "a.bin")
    assert isinstance(got, bytearray) and got == data
    (tmp_path / "folder").mkdir()
    for name in ("folder", "missing.jpg"):
        with pytest.raises(FileNotFoundError, match=f"not found: .*{name}"):
            read_file(tmp_path / name)
