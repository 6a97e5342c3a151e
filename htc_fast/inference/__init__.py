"""Batched inference on image files: what ``python -m htc_fast.predict`` and
``python -m htc_fast.evaluate`` share.

    items = [(path, key) for key, path in enumerate(list_images(["photos/"]))]
    loader = build_inference_loader(items, cfg.data.test_scale, batch_size=4, workers=2)
    for batch, dets in predict_batches(model.eval(), loader, "cuda", amp="bf16"):
        for bad in batch.unreadable:
            print(f"skipped {bad}")  # bad.key, bad.name, bad.reason
        for image, det in zip(batch.images, dets):
            ...  # image.key, image.name; det in original-image pixels

Files: ``images`` (folders -> files, the Dataset decoding and resizing one image), ``loader``
(padding into batches, the DataLoader), ``runner`` (model switches, autocast, the predict loop).
"""
from htc_fast.inference.images import (
    IMAGE_SUFFIXES,
    ImageFiles,
    PreparedImage,
    Unreadable,
    image_name,
    list_images,
    prepare_image,
)
from htc_fast.inference.loader import InferenceBatch, build_inference_loader, collate_images
from htc_fast.inference.runner import AMP_DTYPES, autocast, check_amp, predict_batches, prepare_model

__all__ = [
    "IMAGE_SUFFIXES", "ImageFiles", "PreparedImage", "Unreadable", "image_name", "list_images", "prepare_image",
    "InferenceBatch", "build_inference_loader", "collate_images",
    "AMP_DTYPES", "autocast", "check_amp", "predict_batches", "prepare_model",
]
