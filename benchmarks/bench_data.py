"""Training data pipeline throughput per CPU core, against the pipeline it replaced, on real COCO.

Owns the data cases and each group's baseline; the timing protocol is conftest.py's ``bench_case``.

Work per image (issue 13's, mmdetection's ``LoadImageFromFile + LoadAnnotations(bbox, mask) +
Resize(1333x800, keep ratio) + RandomFlip(0.5) + PackDetInputs``, plus htc_fast's collate: normalise,
pad, batch by 2): the five annotated real COCO val2017 images shipped in tests/data/coco_mini, one
epoch of the grouped train sampler per timed round, ``torch.set_num_threads(1)`` (one core).

Groups (one per semantic variant) and implementations:
  * ``legacy`` (baseline): the pipeline before issue 13, restated here: torchvision's decoder,
    every annotation decoded to a full-resolution bitmap, float bilinear image resize, nearest
    resize of the (G, h, w) masks and of the full semantic map, flip, full-resolution int64
    semantic batch (the model then reads every 8th pixel);
  * ``fast``: `coco_train_dataset`'s path (`CocoDetection.load(i, scale, flip)`): Pillow decoder,
    uint8 resize, polygons rasterised at the network size as window crops, semantic maps at the
    head's stride 8; the batch keeps uint8 images (normalised and padded where `inputs` is read,
    on the GPU in training: not timed here, as mmdetection's data preprocessor is not);
  * ``device-workers`` (semantic off only): the worker side of ``data_device="cuda"`` -- file
    bytes, header check, annotations, mask crops, collate; the decoding is the GPU's.
Semantic variants: ``off``; ``stuff_maps`` (label PNGs at the image size -- random blocky labels
written to a temporary folder, since COCO-stuff is not shipped; decoding cost is a real map's);
``from_instances``. A ``decode`` group times the decoders alone on the same JPEGs: torchvision's
``decode_image`` (the baseline), Pillow alone (the decoder before issue 16 item 1), and
``read_rgb`` (the data package's decoder: a marker scan finds the plain JPEGs, which go to
torchvision's ``decode_jpeg`` operator without Pillow). A round is ~8 ms, so the group takes 60
timed rounds per case: on a shared machine the ratio of medians then varies by about 1 %.

extra_info: ``images`` per round and ``images_per_s_per_core`` (images / median round time).
mmdetection 3.3.0's rate on the same images is measured outside the repository (it needs the
oracle virtualenv); issue 13 quotes 22.0 (busy) / 36.8 (idle) images/s per core on 80 images.
"""
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from htc_fast.config import get_config
from htc_fast.data import (
    CocoDetection,
    Sample,
    TrainTransform,
    build_train_loader,
    collate_train,
    flip_sample,
    resize_nearest,
    semantic_from_instances,
)
from htc_fast.data.image_decode import read_rgb
from htc_fast.data.preprocess import rescale_size, resize_float
from htc_fast.data.transforms import resize_boxes

ROOT = Path(__file__).resolve().parents[1] / "tests" / "data" / "coco_mini"
ANN_FILE, IMAGE_DIR = ROOT / "annotations" / "instances_val2017_mini.json", ROOT / "val2017"
CFG = get_config("htc_r50_fpn_1x")
SEMANTIC = ("off", "stuff_maps", "from_instances")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def stuff_dir():
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        for rec in CocoDetection(ANN_FILE, IMAGE_DIR).records:
            small = rng.integers(0, 183, (rec.height // 16 + 1, rec.width // 16 + 1)).astype(np.uint8)
            full = np.repeat(np.repeat(small, 16, 0), 16, 1)[:rec.height, :rec.width]
            Image.fromarray(full).save(Path(folder) / rec.file_name.replace(".jpg", ".png"))
        yield Path(folder)


def _torchvision_decode(path, mode):
    from torchvision.io import ImageReadMode, decode_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(str(path), mode=getattr(ImageReadMode, mode))


def legacy_sample(ds: CocoDetection, index: int, rng: np.random.Generator) -> Sample:
    """One training sample as the pipeline before issue 13 produced it (see the module docstring)."""
    rec = ds.records[index]
    image = _torchvision_decode(ds.image_dir / rec.file_name, "RGB")
    targets = [i for i in rec.instances if not i.crowd]
    crowd = [i for i in rec.instances if i.crowd]
    masks = ds._masks(rec, targets)
    semantic = None
    if ds.semantic == "stuff_maps":
        semantic = _torchvision_decode(ds.stuff_map_path(rec), "UNCHANGED")[0]
    elif ds.semantic == "from_instances":
        painted = torch.cat([masks, ds._masks(rec, crowd)])
        semantic = semantic_from_instances(painted, [i.category_id - 1 for i in targets + crowd],
                                           (rec.height, rec.width))
    scale, flip = TrainTransform(CFG.data).draw(rng)
    h, w = rec.height, rec.width
    nh, nw = rescale_size(h, w, scale)
    factor = (nw / w, nh / h)
    boxes = torch.tensor([i.box for i in targets], dtype=torch.float32).reshape(-1, 4)
    ignore = torch.tensor([i.box for i in crowd], dtype=torch.float32).reshape(-1, 4)
    sample = Sample(resize_float(image, (nh, nw)), resize_boxes(boxes, factor, (nh, nw)),
                    torch.tensor([i.label for i in targets]), resize_nearest(masks, (nh, nw)),
                    resize_boxes(ignore, factor, (nh, nw)),
                    None if semantic is None else resize_nearest(semantic, (nh, nw)), rec.image_id, rec.file_name,
                    (h, w), factor)
    return flip_sample(sample) if flip else sample


def _dataset(semantic, stuff, data_device=None):
    return CocoDetection(ANN_FILE, IMAGE_DIR, transform=TrainTransform(CFG.data), semantic=semantic,
                         stuff_dir=stuff if semantic == "stuff_maps" else None, semantic_stride=8,
                         data_device=data_device)


def _epoch(impl, ds):
    """() -> number of images: one epoch of 2-image batches, collated."""
    loader = build_train_loader(ds, CFG, batch_size=2, workers=0, pin_memory=False)
    epoch = [0]

    def run_fast():
        loader.batch_sampler.set_epoch(epoch[0])
        epoch[0] += 1
        return sum(len(batch.image_ids) for batch in loader)

    def run_legacy():
        loader.batch_sampler.set_epoch(epoch[0])
        epoch[0] += 1
        n = 0
        for keys in loader.batch_sampler:
            samples = [legacy_sample(ds, i, np.random.default_rng([seed, e, i])) for i, seed, e in keys]
            n += len(collate_train(samples).image_ids)
        return n

    return run_legacy if impl == "legacy" else run_fast


CASES = [(semantic, impl) for semantic in SEMANTIC for impl in ("legacy", "fast")] + [("off", "device-workers")]


@pytest.mark.parametrize("semantic,impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
def test_train_pipeline(benchmark, bench_case, stuff_dir, semantic, impl):
    ds = _dataset(semantic, stuff_dir, "cuda" if impl == "device-workers" else None)
    run = _epoch(impl, ds)
    images = run()
    bench_case(forward=run, inputs=[], direction="fwd", device="cpu", group=f"data-train-semantic_{semantic}",
               extra_info={"op": "train data (1 core)", "case": f"semantic {semantic}, {images} images",
                           "impl": impl, "role": "baseline" if impl == "legacy" else "candidate", "dtype": "uint8",
                           "images": images, "semantic": semantic}, cpu_rounds=(1, 7))
    benchmark.extra_info["images_per_s_per_core"] = round(images / benchmark.stats.stats.median, 2)


def _pillow_decode(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("impl", ["torchvision", "pillow", "decoder"])
def test_decode(benchmark, bench_case, impl):
    paths = sorted(IMAGE_DIR.glob("*.jpg"))
    decode = {"torchvision": lambda p: _torchvision_decode(p, "RGB"), "pillow": _pillow_decode,
              "decoder": read_rgb}[impl]

    def run():
        return [decode(p) for p in paths]

    bench_case(forward=run, inputs=[], direction="fwd", device="cpu", group="data-decode-jpeg",
               extra_info={"op": "decode jpeg (1 core)", "case": f"{len(paths)} COCO images", "impl": impl,
                           "role": "baseline" if impl == "torchvision" else "candidate", "dtype": "uint8",
                           "images": len(paths)}, cpu_rounds=(5, 60))
    benchmark.extra_info["images_per_s_per_core"] = round(len(paths) / benchmark.stats.stats.median, 2)
