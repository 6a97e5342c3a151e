"""COCO data pipeline for HTC: dataset (`coco`), transforms, collate, samplers and loaders.

Typical use::

    cfg = get_config("htc_r50_fpn_1x")
    train = coco_train_dataset("data/coco", cfg)  # = CocoDetection(ann_file, image_dir, stuff_dir=...,
                                                  #   transform=TrainTransform(cfg.data), skip_bad=True,
                                                  #   semantic_stride=8)
    loader = build_train_loader(train, cfg, batch_size=2, rank=rank, world_size=world, seed=0)
    for epoch in range(cfg.train.epochs):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            inputs, targets = batch.to(device, non_blocking=True)  # normalised / made dense there
    val = coco_test_dataset("data/coco", cfg)
    for inputs, image_ids in build_test_loader(val, cfg, batch_size=1, rank=rank, world_size=world):
        ...

Training samples are produced at the network size in one step (`resized_sample`: uint8 resize,
polygons rasterised there as `MaskCrops`, semantic maps at the head's stride); with
`coco_train_dataset(..., data_device="cuda")` the workers only read bytes and parse annotations,
and each batch decodes, resizes, flips, normalises and pads its images on the GPU
(`device_decode`). Images are decoded by `image_decode` (plain JPEGs by libjpeg-turbo through
torchvision, everything else by Pillow): a corrupt file raises naming it.
"""
from htc_fast.data.coco import BadSampleError, CocoDetection, Sample, decode_segmentation
from htc_fast.data.collate import TestBatch, TrainBatch, batch_images, collate_test, collate_train
from htc_fast.data.device_decode import EncodedImage, decode_batch
from htc_fast.data.image_decode import decode_rgb, read_rgb
from htc_fast.data.mask_crops import MaskCrops
from htc_fast.data.report import DatasetReport
from htc_fast.data.samplers import (
    GroupedBatchSampler,
    InferenceSampler,
    build_test_loader,
    build_train_loader,
    coco_test_dataset,
    coco_train_dataset,
)
from htc_fast.data.semantic import IGNORE_INDEX, MissingStuffMapError, load_stuff_map, semantic_from_instances
from htc_fast.data.transforms import (
    TestTransform,
    TrainTransform,
    draw_train_scale,
    flip_boxes,
    flip_sample,
    resize_nearest,
    resize_sample,
)

__all__ = [
    "BadSampleError", "CocoDetection", "DatasetReport", "Sample", "decode_segmentation",
    "TestBatch", "TrainBatch", "batch_images", "collate_test", "collate_train",
    "EncodedImage", "decode_batch", "decode_rgb", "read_rgb", "MaskCrops",
    "GroupedBatchSampler", "InferenceSampler", "build_test_loader", "build_train_loader",
    "coco_test_dataset", "coco_train_dataset",
    "IGNORE_INDEX", "MissingStuffMapError", "load_stuff_map", "semantic_from_instances",
    "TestTransform", "TrainTransform", "draw_train_scale", "flip_boxes", "flip_sample", "resize_nearest",
    "resize_sample",
]
