"""The GPU-side path (`data_device`): workers read bytes and parse annotations, the batch decodes,
resizes, flips, normalises and pads on its device. Tested with CPU tensors (device "cpu"): the
batches must equal the CPU path's; with a GPU the same comparison runs on CUDA within the resize
tolerance (one grey level for the resize, a few for nvJPEG's decoding)."""
import io
import random
import shutil

import pytest
import torch
from PIL import Image

from htc_fast.config import DataConfig
from htc_fast.data import BadSampleError, CocoDetection, TrainTransform, build_train_loader
from htc_fast.data.device_decode import EncodedImage, decode_batch, encode_image
from htc_fast.data.preprocess import STD
from tests.data_pipeline import ANN_FILE, IMAGE_DIR

CFG = DataConfig(train_scale=(400, 240))


def _loader_batches(data_device, seed, semantic="from_instances"):
    ds = CocoDetection(ANN_FILE, IMAGE_DIR, transform=TrainTransform(CFG), semantic=semantic, semantic_stride=8,
                       data_device=data_device)
    loader = build_train_loader(ds, CFG, batch_size=2, seed=seed, workers=0, pin_memory=False)
    loader.batch_sampler.set_epoch(1)
    return list(loader)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
def test_device_path_gives_the_cpu_path_batches(device):
    seed = random.randrange(1000)
    cpu_batches, device_batches = _loader_batches(None, seed), _loader_batches(device, seed)
    assert len(cpu_batches) == len(device_batches) > 0
    for a, b in zip(cpu_batches, device_batches):
        assert all(isinstance(x, EncodedImage) and x.device_decodable for x in b.images)  # COCO: plain JPEGs
        assert b.image_ids == a.image_ids
        inputs_a, targets_a = a.to(device)
        inputs_b, targets_b = b.to(device)
        assert inputs_b.images.device.type == device and inputs_b.images.shape == inputs_a.images.shape
        assert inputs_b.image_shapes == inputs_a.image_shapes and inputs_b.scale_factors == inputs_a.scale_factors
        tolerance = 0 if device == "cpu" else 4.01 / min(STD)  # CUDA: float resize, nvJPEG's IDCT
        assert (inputs_b.images - inputs_a.images).abs().max() <= tolerance
        assert torch.equal(targets_b.semantic, targets_a.semantic)
        assert all(torch.equal(x, y) for x, y in zip(targets_b.masks, targets_a.masks))
        assert all(torch.equal(x, y) for x, y in zip(targets_b.boxes, targets_a.boxes))


def test_decode_batch_handles_png_and_exif_and_flip():
    """Non-JPEG files go through Pillow; EXIF rotation is applied by both decoders."""
    photo = Image.open(random.choice(sorted(IMAGE_DIR.glob("*.jpg")))).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show upright
    jpeg, png = io.BytesIO(), io.BytesIO()
    photo.save(jpeg, format="JPEG", quality=90, exif=exif)
    photo.save(png, format="PNG")
    w, h = photo.size
    size = (random.randint(50, 300), random.randint(50, 300))
    a = encode_image(jpeg.getvalue(), "a.jpg", (w, h), size, True, "cpu")  # upright: h and w swapped
    b = encode_image(png.getvalue(), "b.png", (h, w), size, False, "cpu")
    assert not a.device_decodable and not b.device_decodable  # EXIF-rotated JPEG, PNG: Pillow
    plain, cmyk = io.BytesIO(), io.BytesIO()
    photo.save(plain, format="JPEG")
    photo.convert("CMYK").save(cmyk, format="JPEG")
    assert encode_image(plain.getvalue(), "c.jpg", (h, w), size, False, "cpu").device_decodable
    assert not encode_image(cmyk.getvalue(), "d.jpg", (h, w), size, False, "cpu").device_decodable
    out = decode_batch([a, b])
    assert [tuple(x.shape) for x in out] == [(3, *size), (3, *size)] and all(x.dtype == torch.uint8 for x in out)
    from htc_fast.data.image_decode import decode_rgb
    from htc_fast.data.resized_sample import resized_image

    assert torch.equal(out[0], resized_image(decode_rgb(jpeg.getvalue()), size, True))
    assert torch.equal(out[1], resized_image(decode_rgb(png.getvalue()), size, False))


def test_bad_files_are_caught_in_the_worker_or_named_at_decoding(tmp_path):
    images = tmp_path / "images"
    shutil.copytree(IMAGE_DIR, images)
    ds = CocoDetection(ANN_FILE, images, transform=TrainTransform(CFG), data_device="cpu")
    bad = random.randrange(len(ds))
    name = ds.records[bad].file_name
    (images / name).write_bytes(b"not an image at all")
    with pytest.raises(BadSampleError, match=f"cannot decode image .*{name}"):
        ds[(bad, 0, 0)]
    with pytest.raises(ValueError, match="but the annotations say"):
        encode_image((IMAGE_DIR / ds.records[(bad + 1) % len(ds)].file_name).read_bytes(), "x.jpg", (1, 1),
                     (8, 8), False, "cpu")
    png = io.BytesIO()
    Image.new("RGB", (30, 20)).save(png, format="PNG")
    broken = bytearray(png.getvalue())
    broken[-20] ^= 0xFF  # inside the pixel data: the header is fine, decoding is not
    encoded = encode_image(bytes(broken), "broken.png", (20, 30), (10, 15), False, "cpu")
    with pytest.raises(ValueError, match="cannot decode image broken.png"):
        decode_batch([encoded])


def test_coco_jpegs_are_wrapped_from_the_marker_scan_without_a_copy():
    from htc_fast.data.image_decode import read_file

    for path in sorted(IMAGE_DIR.glob("*.jpg")):
        with Image.open(path) as image:
            w, h = image.size
        data = read_file(path)
        encoded = encode_image(data, path.name, (h, w), (h // 2, w // 2), False, "cpu")
        assert encoded.device_decodable and encoded.original_shape == (h, w)
        # the file's buffer itself, not a copy of it
        assert encoded.data.data_ptr() == torch.frombuffer(data, dtype=torch.uint8).data_ptr()
        with pytest.raises(ValueError, match=path.name):  # the size check still runs on this path
            encode_image(data, path.name, (h + 1, w), (h, w), False, "cpu")
