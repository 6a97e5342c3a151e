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
    got = read_label_map(tmp_path / "a.png")
    assert np.array_equal(got, labels) and got.flags.writeable
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
