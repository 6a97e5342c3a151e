"""Inference on images: the ``Predictor`` API and ``python -m htc_fast.predict``.

    python -m htc_fast.predict --config htc_r50_fpn_1x --checkpoint htc_r50_fpn_1x_coco.pth \\
        photo1.jpg photo2.jpg --out results/

writes ``results/<name>.png`` (the image with masks, boxes and class names drawn) and
``results/<name>.json`` (every detection: box in original pixels, score, label, class name and
COCO RLE mask). An mmdetection checkpoint loads as it is.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from htc_fast.coco_classes import COCO_CLASSES
from htc_fast.config import get_config
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.htc import build_htc
from htc_fast.model.inputs import Detections
from htc_fast.preprocess import ImageLike, as_image_tensor, make_batch
from htc_fast.weights import resolve_weights

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Predictor:
    """A model ready for inference.

    Args:
        config: a preset name (see htc_fast.config.PRESETS); overrides: "dotted.path=value" items.
        checkpoint: mmdetection or htc_fast checkpoint: a path, a URL, or "released" (the
            preset's released checkpoint, downloaded once); None keeps random weights.
        device: "cpu", "cuda", ...; default cuda if available.
        amp: None, "bf16" or "fp16": autocast on CUDA (features in low precision, boxes in fp32).
    """

    def __init__(self, config="htc_r50_fpn_1x", checkpoint=None, device=None, amp=None, overrides=()):
        if amp not in (None, *AMP_DTYPES):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}")
        self.cfg = get_config(config, overrides)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_htc(self.cfg).eval()
        self.report = None if checkpoint is None else load_checkpoint(
            self.model, resolve_weights(checkpoint, self.cfg))
        self.model.to(self.device)
        self.amp = amp

    def __call__(self, images: Sequence[ImageLike], masks: Optional[str] = "bitmap") -> List[Detections]:
        """Detections per image (original pixels); masks: "bitmap", "rle" or None."""
        batch = make_batch(images, self.cfg.data.test_scale, device=self.device)
        autocast = torch.autocast(self.device.type, dtype=AMP_DTYPES[self.amp]) if self.amp \
            else contextlib.nullcontext()
        with autocast:
            return self.model.predict(batch, masks=masks)


def class_name(label: int, names=COCO_CLASSES) -> str:
    return names[label] if 0 <= label < len(names) else str(label)


def draw(image: torch.Tensor, det: Detections, score_thr: float, names=COCO_CLASSES) -> torch.Tensor:
    """(3, H, W) uint8 with the detections scoring >= score_thr drawn (masks, boxes, names)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = det.scores >= score_thr
    if not keep.any():
        return image
    labels = det.labels[keep].tolist()
    colors = [tuple(int(c) for c in torch.tensor([(37 * l) % 255, (97 * l) % 255, (173 * l) % 255]))
              for l in labels]
    out = image
    if det.masks is not None:
        out = draw_segmentation_masks(out, det.masks[keep].cpu(), alpha=0.45, colors=colors)
    text = [f"{class_name(l, names)} {s:.2f}" for l, s in zip(labels, det.scores[keep].tolist())]
    return draw_bounding_boxes(out, det.boxes[keep].cpu(), labels=text, colors=colors, width=2)


def to_json(det: Detections) -> list:
    """One dict per detection: bbox [x1, y1, x2, y2], score, label, category, segmentation (RLE)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    out = []
    for i in range(len(det.scores)):
        item = {"bbox": [round(v, 3) for v in det.boxes[i].tolist()], "score": round(det.scores[i].item(), 5),
                "label": int(det.labels[i]), "category": class_name(int(det.labels[i]))}
        if det.masks is not None:
            rle = mask_utils.encode(np.asfortranarray(det.masks[i].cpu().numpy().astype(np.uint8)))
            item["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        out.append(item)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m htc_fast.predict", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--config", default="htc_r50_fpn_1x")
    p.add_argument("--checkpoint", help="checkpoint path, URL or 'released' (default: random weights)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device")
    p.add_argument("--amp", choices=sorted(AMP_DTYPES))
    p.add_argument("--show-thr", type=float, default=0.3, help="draw detections scoring at least this")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="config override")
    args = p.parse_args(argv)
    if args.checkpoint is None:
        print("warning: no --checkpoint: the model has random weights", file=sys.stderr)
    predictor = Predictor(args.config, args.checkpoint, args.device, args.amp, args.set)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    failed = 0
    for n, path in enumerate(args.images, 1):
        try:
            image = as_image_tensor(path)
            det = predictor([image])[0]
        except (OSError, ValueError) as exc:  # a bad file is reported; the others still run
            failed += 1
            print(f"\nskipped {path}: {exc}", file=sys.stderr)
            continue
        from torchvision.io import write_png

        stem = out_dir / Path(path).stem
        write_png(draw(image, det, args.show_thr), str(stem) + ".png")
        stem.with_suffix(".json").write_text(json.dumps({"image": str(path), "detections": to_json(det)}))
        rate = n / max(time.time() - start, 1e-9)
        print(f"\r[{n}/{len(args.images)}] {rate:.2f} images/s  {path}: {len(det.scores)} detections",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
