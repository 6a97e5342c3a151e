"""Inference on images: the ``Predictor`` API and ``python -m htc_fast.predict``.

    python -m htc_fast.predict --config htc_r50_fpn_1x --checkpoint htc_r50_fpn_1x_coco.pth \\
        photo1.jpg photos/ --out results/ --batch-size 4

writes ``results/<name>.png`` (the image with masks, boxes and class names drawn) and
``results/<name>.json`` (every detection: box in original pixels, score, label, class name and
COCO RLE mask) for each image given and each image file directly inside each folder given (sorted
by name). Images are decoded ahead by --workers loader processes and run --batch-size at a time;
an unreadable image is reported and skipped (exit status 1 when any was). An mmdetection
checkpoint loads as it is.
"""
import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from htc_fast.config import get_config
from htc_fast.data.preprocess import ImageLike
from htc_fast.inference import (
    AMP_DTYPES,
    build_inference_loader,
    check_amp,
    collate_images,
    image_name,
    list_images,
    predict_batches,
    prepare_image,
    prepare_model,
)
from htc_fast.inference.visualize import draw, save_png, to_json
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.htc import build_htc
from htc_fast.model.inputs import Detections
from htc_fast.weights import resolve_weights


class Predictor:
    """A model ready for inference.

    Args:
        config: a preset name (see htc_fast.config.PRESETS); overrides: "dotted.path=value" items.
        checkpoint: mmdetection or htc_fast checkpoint: a path, a URL, or "released" (the
            preset's released checkpoint, downloaded once); None keeps random weights.
        device: "cpu", "cuda", ...; default cuda if available.
        amp: None, "bf16" or "fp16": autocast on CUDA (features in low precision, boxes in fp32).
        compile: torch.compile the backbone, FPN and heads (htc_fast.model.acceleration); True,
            or a dict of torch.compile arguments (e.g. {"mode": "max-autotune"}).
        channels_last: run the convolutions in channels-last memory format.
    """

    def __init__(self, config="htc_r50_fpn_1x", checkpoint=None, device=None, amp=None, overrides=(), *,
                 compile=False, channels_last: bool = False):
        check_amp(amp)
        self.cfg = get_config(config, overrides)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_htc(self.cfg).eval()
        self.report = None if checkpoint is None else load_checkpoint(
            self.model, resolve_weights(checkpoint, self.cfg))
        self.model = prepare_model(self.model.to(self.device), compile=compile, channels_last=channels_last)
        self.amp = amp

    def __call__(self, images: Sequence[ImageLike], masks: Optional[str] = "bitmap") -> list[Detections]:
        """Detections per image (original pixels), the images run as one batch (padded to the
        largest); masks: "bitmap", "rle" or None. A missing, corrupt or too thin image raises a
        FileNotFoundError / ValueError naming it."""
        if len(images) == 0:
            raise ValueError("Predictor needs at least one image")
        scale = self.cfg.data.test_scale
        prepared = [prepare_image(image, scale, key=i, name=image_name(image, i)) for i, image in enumerate(images)]
        batch = collate_images(prepared, self.cfg.data.mean, self.cfg.data.std, self.cfg.data.pad_size_divisor)
        return next(predict_batches(self.model, [batch], self.device, amp=self.amp, masks=masks))[1]


def _output_stem(out_dir: Path, path: Path, used: set) -> Path:
    """out_dir/<file stem>, or <file name> when another input already took that stem (a.jpg and a.png)."""
    stem = path.stem if path.stem not in used else path.name
    while stem in used:
        stem = "_" + stem
    used.add(stem)
    return out_dir / stem


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m htc_fast.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files and folders (every image file directly inside)")
    p.add_argument("--config", default="htc_r50_fpn_1x")
    p.add_argument("--checkpoint", help="checkpoint path, URL or 'released' (default: random weights)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES))
    p.add_argument("--batch-size", type=int, default=1, help="images per model call (default 1)")
    p.add_argument("--workers", type=int, help="image decoding processes (default: the preset's workers_per_gpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone, FPN and heads")
    p.add_argument("--channels-last", action="store_true", help="run the convolutions in channels-last layout")
    p.add_argument("--show-thr", type=float, default=0.3, help="draw detections scoring at least this")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="config override")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        p.error(f"--workers must be >= 0, got {args.workers}")
    try:
        paths = list_images(args.images)
    except ValueError as exc:
        p.error(str(exc))
    if args.checkpoint is None:
        print("warning: no --checkpoint: the model has random weights", file=sys.stderr)
    predictor = Predictor(args.config, args.checkpoint, args.device, args.amp, args.set, compile=args.compile,
                          channels_last=args.channels_last)
    data = predictor.cfg.data
    loader = build_inference_loader([(path, path) for path in paths], data.test_scale, batch_size=args.batch_size,
                                    workers=data.workers_per_gpu if args.workers is None else args.workers,
                                    keep_original=True, mean=data.mean, std=data.std,
                                    size_divisor=data.pad_size_divisor)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start, done, failed, used = time.time(), 0, 0, set()
    for batch, dets in predict_batches(predictor.model, loader, predictor.device, amp=predictor.amp,
                                       masks="bitmap"):
        for bad in batch.unreadable:  # reported; the other images still run
            failed += 1
            print(f"\nskipped {bad}", file=sys.stderr)
        for image, det in zip(batch.images, dets):
            stem = _output_stem(out_dir, image.key, used)
            save_png(draw(image.original, det, args.show_thr), str(stem) + ".png")
            stem.with_suffix(".json").write_text(json.dumps({"image": str(image.key), "detections": to_json(det)}))
        done += len(batch.images) + len(batch.unreadable)
        rate = done / max(time.time() - start, 1e-9)
        print(f"\r[{done}/{len(paths)}] {rate:.2f} images/s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
