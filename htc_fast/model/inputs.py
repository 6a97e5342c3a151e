"""What the model takes and returns: a padded image batch, per-image ground truth, detections."""
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Optional, Union

from torch import Tensor


@dataclass(frozen=True)
class ImageBatch:
    """images: (N, 3, H, W) float32, normalised and zero-padded bottom/right (to a multiple of 32);
    image_shapes: per image (h, w) of the resized image inside the padding; scale_factors: per
    image (w_scale, h_scale) from the original image to the resized one; original_shapes: per
    image (h, w) of the original image (detections are returned in its pixels)."""
    images: Tensor
    image_shapes: Sequence[tuple[int, int]]
    scale_factors: Sequence[tuple[float, float]]
    original_shapes: Sequence[tuple[int, int]]

    def __post_init__(self):
        if self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"ImageBatch.images must be (N, 3, H, W), got {tuple(self.images.shape)}")
        n = self.images.shape[0]
        for name in ("image_shapes", "scale_factors", "original_shapes"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ImageBatch.{name} has {len(getattr(self, name))} entries for {n} images")
        for h, w in self.image_shapes:
            if not (0 < h <= self.images.shape[2] and 0 < w <= self.images.shape[3]):
                raise ValueError(f"ImageBatch: image shape {(h, w)} does not fit the padded batch "
                                 f"{tuple(self.images.shape[2:])}")

    def to(self, device) -> "ImageBatch":
        return ImageBatch(self.images.to(device), self.image_shapes, self.scale_factors, self.original_shapes)


@dataclass(frozen=True)
class Targets:
    """Ground truth of a batch, in network-input pixels.

    boxes: per image (G_i, 4) float32 xyxy; labels: per image (G_i,) int64 in [0, num_classes);
    masks: per image (G_i, h, w) bool/uint8 at exactly the resized image's size (h, w), NOT
    padded: mask targets are RoI-aligned from them, and bilinear sampling at the right/bottom edge
    must clamp to the image's last pixel rather than read padding (as mmdetection's masks do);
    semantic: (N, H, W) int64 stuff labels at the padded input resolution (255 = ignore), or
    already sampled at the semantic head's stride s, (N, H / s, W / s) (rows/columns 0, s, 2s, ...:
    what the loss reads; the data pipeline's default), or None.
    """
    boxes: list[Tensor]
    labels: list[Tensor]
    masks: list[Tensor]
    semantic: Optional[Tensor] = None

    def to(self, device) -> "Targets":
        return Targets([b.to(device) for b in self.boxes], [x.to(device) for x in self.labels],
                       [m.to(device) for m in self.masks],
                       None if self.semantic is None else self.semantic.to(device))


class Detections(NamedTuple):
    """Detections of one image, best first, in original-image pixels.

    boxes: (D, 4) float32 xyxy; scores: (D,); labels: (D,) int64 in [0, num_classes);
    masks: (D, H, W) bool at the original size, or a list of D COCO RLE dicts, or None.
    """
    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Union[Tensor, list[dict], None]
