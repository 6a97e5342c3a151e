"""One COCO sample loaded straight at the network resolution: the fast path of `CocoDetection`.

What this module owns: turning an image record plus a drawn (scale, flip) into a transformed
`Sample` without any full-resolution intermediate other than the decoded image (and crowd RLEs):
the image is resized on uint8 (`preprocess.resize`), polygons are rasterised at the resized size
(`raster.rasterise_polygons`), semantic maps are produced at `semantic_stride`. It gives what
`TrainTransform` / `TestTransform` applied to `CocoDetection.load(i)` give (the reference path),
up to one grey level in the image (uint8 vs float resize) and boundary pixels of polygon masks.
"""
import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from htc_fast.data.device_decode import EncodedImage, encode_image
from htc_fast.data.image_decode import read_file
from htc_fast.data.mask_crops import MaskCrops
from htc_fast.data.preprocess import rescale_size, resize
from htc_fast.data.raster import dense_crops, paint_labels, polygon_crops, rasterise_polygons, sample_grid
from htc_fast.data.semantic import IGNORE_INDEX, load_stuff_map
from htc_fast.data.transforms import flip_boxes, resize_boxes

if TYPE_CHECKING:
    from htc_fast.data.coco import CocoDetection, Sample


def rgb_tensor(array: np.ndarray) -> Tensor:
    """(3, H, W) uint8 channels-last view of a decoded (H, W, 3) array, sharing its memory.
    Pillow's arrays are read-only: the view is only read (resized into a new tensor)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array).permute(2, 0, 1)


def resized_image(array: np.ndarray, size: tuple[int, int], flip: bool) -> Tensor:
    """(3, H, W) uint8 (channels-last memory) of a decoded (h, w, 3) image resized to `size`,
    mirrored when `flip`. The source is mirrored before resizing (fewer pixels to move): the
    bilinear sampling positions are symmetric, so this is the resized image mirrored (the tests
    compare it with `flip_sample(resize_sample(...))` bit for bit)."""
    image = rgb_tensor(array)
    if flip:
        image = image.flip(-1)
    return resize(image, size) if tuple(size) != tuple(image.shape[1:]) else image.clone()


def _instance_masks(ds: "CocoDetection", rec, instances, scale, size, flip) -> MaskCrops:
    """The masks at the resized size: polygons rasterised there, RLEs (rare) sampled."""
    if all(isinstance(i.segmentation, list) for i in instances):
        return polygon_crops([i.segmentation for i in instances], scale, size, flip)
    dense = torch.zeros(len(instances), *size, dtype=torch.bool)
    for k, inst in enumerate(instances):
        if isinstance(inst.segmentation, list):
            dense[k] = rasterise_polygons([inst.segmentation], scale, size, flip)[0]
        else:
            dense[k] = torch.from_numpy(sample_grid(ds.decode_instance(rec, inst), size, 1, flip) != 0)
    return dense_crops(dense.numpy())


def _encoded(ds: "CocoDetection", rec, size, flip) -> EncodedImage:
    from htc_fast.data.coco import BadSampleError

    path = ds.image_dir / rec.file_name
    try:
        return encode_image(read_file(path), str(path), (rec.height, rec.width), size, flip, ds.data_device)
    except (OSError, ValueError) as exc:
        raise BadSampleError(f"image {rec.image_id}: {exc}") from exc


def load_resized(ds: "CocoDetection", index: int, scale: tuple[int, int], flip: bool) -> "Sample":
    """Sample `index` of `ds` resized with mmcv's keep-ratio rule into `scale` (long max, short
    max) and mirrored when `flip`; `BadSampleError` naming the file when it cannot be loaded.
    The semantic map (if any) is at `ds.semantic_stride` (`Sample.semantic_stride`); the masks
    are `MaskCrops` (dense where the batch is used: `TrainBatch.targets`)."""
    from htc_fast.data.coco import BadSampleError, Sample

    rec = ds.records[index]
    h, w = rec.height, rec.width
    nh, nw = rescale_size(h, w, scale)
    factor = (nw / w, nh / h)
    if ds.data_device is None:
        image = resized_image(ds.read_image(rec), (nh, nw), flip)
    else:  # decoded later, on the device, by the batch (`TrainBatch.inputs`)
        image = _encoded(ds, rec, (nh, nw), flip)
    targets = [i for i in rec.instances if not i.crowd]
    crowd = [i for i in rec.instances if i.crowd]
    boxes = resize_boxes(torch.tensor([i.box for i in targets], dtype=torch.float32).reshape(-1, 4), factor, (nh, nw))
    ignore = resize_boxes(torch.tensor([i.box for i in crowd], dtype=torch.float32).reshape(-1, 4), factor, (nh, nw))
    if flip:
        boxes, ignore = flip_boxes(boxes, nw), flip_boxes(ignore, nw)
    labels = torch.tensor([i.label for i in targets], dtype=torch.int64)
    masks = None
    if not ds.test_mode or ds.semantic == "from_instances":
        masks = _instance_masks(ds, rec, targets, factor, (nh, nw), flip)
    semantic, stride = None, ds.semantic_stride
    if ds.semantic == "stuff_maps":
        try:
            full = load_stuff_map(ds.stuff_map_path(rec), (h, w)).numpy()
        except (OSError, ValueError) as exc:
            raise BadSampleError(f"image {rec.image_id} ({rec.file_name}): {exc}") from exc
        semantic = torch.from_numpy(sample_grid(full, (nh, nw), stride, flip))
    elif ds.semantic == "from_instances":
        # every `stride`-th pixel of the instance masks (already resized and flipped) and of the
        # crowd RLEs (decoded at the original size), painted largest first
        grid = [masks.sample_grid(stride)]
        if crowd:
            grid.append(sample_grid(np.stack([ds.decode_instance(rec, i) for i in crowd]), (nh, nw), stride, flip))
        painted = targets + crowd
        values = [i.category_id - 1 if ds.thing_ids == "stuff_id" else i.label for i in painted]
        semantic = torch.from_numpy(paint_labels(np.concatenate(grid), values, [i.area for i in painted],
                                                 IGNORE_INDEX))
    if ds.test_mode:
        masks = None
    return Sample(image, boxes, labels, masks, ignore, semantic, rec.image_id, rec.file_name, (h, w),
                  scale_factor=factor, flipped=flip, semantic_stride=stride if semantic is not None else 1)
