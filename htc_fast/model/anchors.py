"""Anchor boxes of the RPN: generation per FPN level, valid flags, the inside-the-image test.

Owns mmdetection's (v2.0+) ``AnchorGenerator`` semantics: per level, base anchors centred at
``center_offset * base_size`` (0 for HTC), one per (ratio, scale) pair in ratio-major order,
NOT rounded; shifted by ``(x * stride, y * stride)`` and flattened in (y, x, anchor) order, the
order of the RPN's ``(N, A, H, W) -> (N, H, W, A)`` outputs. Does not own the assignment of
anchors to ground truth (``matching.py``) or the box encoding (``box_coder.py``).

Boxes are (N, 4) xyxy float32 pixels of the network input (resized, padded image).
"""
import collections
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["AnchorGenerator", "anchor_inside_flags", "in_anchor_order"]


class AnchorGenerator:
    """mmdetection's ``AnchorGenerator`` for square strides (HTC: strides 4..64, scale 8,
    ratios 0.5, 1, 2).

    Holds no parameters and no per-call state (nothing of it is in a checkpoint).

    Args:
        strides: stride of each level in pixels, e.g. (4, 8, 16, 32, 64).
        ratios: height / width ratios, in output order, e.g. (0.5, 1.0, 2.0).
        scales: anchor sizes in units of the base size, e.g. (8,).
        base_sizes: base size per level; None uses the strides.
        center_offset: anchor centre as a fraction of the base size (mmdet v2+: 0.0).
    """

    def __init__(self, strides: Sequence[int], ratios: Sequence[float], scales: Sequence[float],
                 base_sizes: Sequence[float] = None, center_offset: float = 0.0):
        if len(strides) == 0:
            raise ValueError("AnchorGenerator: strides must name at least one level")
        if any(s <= 0 for s in strides):
            raise ValueError(f"AnchorGenerator: strides must be positive, got {tuple(strides)}")
        if len(ratios) == 0 or any(r <= 0 for r in ratios):
            raise ValueError(f"AnchorGenerator: ratios must be non-empty and positive, got {tuple(ratios)}")
        if len(scales) == 0 or any(s <= 0 for s in scales):
            raise ValueError(f"AnchorGenerator: scales must be non-empty and positive, got {tuple(scales)}")
        if base_sizes is not None and len(base_sizes) != len(strides):
            raise ValueError(f"AnchorGenerator: base_sizes has {len(base_sizes)} entries for "
                             f"{len(strides)} strides")
        if not 0.0 <= center_offset <= 1.0:
            raise ValueError(f"AnchorGenerator: center_offset must be in [0, 1], got {center_offset}")
        self.strides = tuple(strides)
        self.ratios = tuple(float(r) for r in ratios)
        self.scales = tuple(float(s) for s in scales)
        self.base_sizes = tuple(self.strides if base_sizes is None else base_sizes)
        self.center_offset = float(center_offset)
        self.base_anchors = [self._base_anchors(size) for size in self.base_sizes]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per feature-map location (A = len(ratios) * len(scales)); the same on every level."""
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, base_size) -> Tensor:
        # float32 throughout and in mmdet's order of operations (w * w_ratio * scale), so that the
        # anchors are bit-identical to the ones the released checkpoints were trained with.
        ratios = torch.tensor(self.ratios, dtype=torch.float32)
        scales = torch.tensor(self.scales, dtype=torch.float32)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * scales[None, :]).view(-1)
        hs = (base_size * h_ratios[:, None] * scales[None, :]).view(-1)
        cx = self.center_offset * base_size
        cy = self.center_offset * base_size
        return torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)

    def _check_sizes(self, featmap_sizes, where):
        if len(featmap_sizes) != self.num_levels:
            raise ValueError(f"AnchorGenerator.{where}: featmap_sizes has {len(featmap_sizes)} levels, "
                             f"the generator {self.num_levels}")

    def grid_anchors(self, featmap_sizes: Sequence[tuple[int, int]], device=None,
                     dtype: torch.dtype = torch.float32) -> list[Tensor]:
        """Anchors of every level.

        Args:
            featmap_sizes: (H_l, W_l) of each level.
            device, dtype: of the result (float32 keeps mmdet's values).

        Returns:
            One (H_l * W_l * A, 4) xyxy tensor per level, row ``(y * W_l + x) * A + a``.
        """
        self._check_sizes(featmap_sizes, "grid_anchors")
        key = ("grid", tuple((int(h), int(w)) for h, w in featmap_sizes), str(device), dtype)
        return self._cached(key, lambda: self._grid_anchors(featmap_sizes, device, dtype))

    def _cached(self, key, make) -> list[Tensor]:
        """Anchors and flags depend only on sizes and device: build them once per key, so a step
        dispatches no ops for them (a small LRU; callers never modify the tensors in place)."""
        cache = self.__dict__.setdefault("_cache", collections.OrderedDict())
        key = key + (torch.is_inference_mode_enabled(),)
        if key in cache:
            cache.move_to_end(key)
            return list(cache[key])
        value = make()
        cache[key] = value
        if len(cache) > 32:  # multi-scale training sees many sizes
            cache.popitem(last=False)
        return list(value)

    def _grid_anchors(self, featmap_sizes, device, dtype) -> list[Tensor]:
        out = []
        for level, (h, w) in enumerate(featmap_sizes):
            stride = self.strides[level]
            base = self.base_anchors[level].to(device=device, dtype=dtype)
            shift_x = torch.arange(int(w), device=device).to(dtype) * stride
            shift_y = torch.arange(int(h), device=device).to(dtype) * stride
            yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 4)
            out.append((base[None, :, :] + shifts[:, None, :]).reshape(-1, 4))
        return out

    def all_anchors(self, featmap_sizes: Sequence[tuple[int, int]], device=None) -> Tensor:
        """``cat(grid_anchors(featmap_sizes, device))``, cached."""
        key = ("all", tuple((int(h), int(w)) for h, w in featmap_sizes), str(device))
        return self._cached(key, lambda: [torch.cat(self.grid_anchors(featmap_sizes, device))])[0]

    def inside_flags(self, featmap_sizes: Sequence[tuple[int, int]], pad_shape: tuple[int, int],
                     image_size: tuple[int, int], allowed_border: float = 0, device=None) -> Tensor:
        """``anchor_inside_flags(all_anchors, cat(valid_flags), image_size, allowed_border)``, cached:
        the candidate anchors of one image for the RPN targets."""
        key = ("inside", tuple((int(h), int(w)) for h, w in featmap_sizes), tuple(map(int, pad_shape)),
               tuple(map(int, image_size)), float(allowed_border), str(device))
        return self._cached(key, lambda: [anchor_inside_flags(
            self.all_anchors(featmap_sizes, device), torch.cat(self.valid_flags(featmap_sizes, pad_shape, device)),
            image_size, allowed_border)])[0]

    def valid_flags(self, featmap_sizes: Sequence[tuple[int, int]], pad_shape: tuple[int, int],
                    device=None) -> list[Tensor]:
        """Anchors whose feature-map cell lies on the (padded) image, per level.

        A level's cells with ``x < ceil(pad_w / stride)`` and ``y < ceil(pad_h / stride)`` are valid
        (mmdet's ``valid_flags``): with a batch padded to its largest image, the cells past a
        smaller image's own padded extent are not. Used for training targets only.

        Args:
            featmap_sizes: (H_l, W_l) of each level.
            pad_shape: (h, w) of this image after padding to the size divisor.

        Returns:
            One (H_l * W_l * A,) bool tensor per level, in ``grid_anchors`` order.
        """
        self._check_sizes(featmap_sizes, "valid_flags")
        pad_h, pad_w = int(pad_shape[0]), int(pad_shape[1])
        key = ("valid", tuple((int(h), int(w)) for h, w in featmap_sizes), (pad_h, pad_w), str(device))
        return self._cached(key, lambda: self._valid_flags(featmap_sizes, pad_h, pad_w, device))

    def _valid_flags(self, featmap_sizes, pad_h, pad_w, device) -> list[Tensor]:
        out = []
        for level, (h, w) in enumerate(featmap_sizes):
            stride = self.strides[level]
            valid_h = min(math.ceil(pad_h / stride), int(h))
            valid_w = min(math.ceil(pad_w / stride), int(w))
            vy = torch.arange(int(h), device=device) < valid_h
            vx = torch.arange(int(w), device=device) < valid_w
            cell = (vy[:, None] & vx[None, :]).reshape(-1)
            out.append(cell[:, None].expand(-1, self.num_base_anchors).reshape(-1))
        return out


def anchor_inside_flags(anchors: Tensor, valid_flags: Tensor, img_shape: tuple[int, int],
                        allowed_border: float = 0) -> Tensor:
    """mmdet's ``anchor_inside_flags``: valid anchors lying within the image plus a border.

    Args:
        anchors: (N, 4) xyxy.
        valid_flags: (N,) bool (``AnchorGenerator.valid_flags``, concatenated).
        img_shape: (h, w) of the resized image before padding.
        allowed_border: anchors with ``x1 >= -b, y1 >= -b, x2 < w + b, y2 < h + b`` are inside;
            a negative value keeps every valid anchor. HTC's RPN uses 0.

    Returns:
        (N,) bool.
    """
    if anchors.dim() != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchor_inside_flags: anchors must be (N, 4), got {tuple(anchors.shape)}")
    if valid_flags.shape != anchors.shape[:1]:
        raise ValueError(f"anchor_inside_flags: valid_flags must be ({anchors.shape[0]},), got "
                         f"{tuple(valid_flags.shape)}")
    if allowed_border < 0:
        return valid_flags.clone()
    img_h, img_w = img_shape[0], img_shape[1]
    b = allowed_border
    return (valid_flags & (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b)
            & (anchors[:, 2] < img_w + b) & (anchors[:, 3] < img_h + b))


def in_anchor_order(head_output: Tensor, values: int = 1) -> Tensor:
    """One level's RPN head output in the anchors' (y, x, anchor) order: (N, A * values, H, W) ->
    (N, H * W * A, values), or (N, H * W * A) for values == 1 (objectness logits; 4 for deltas).
    A view when the layout allows, else one copy."""
    n = head_output.shape[0]
    flat = head_output.permute(0, 2, 3, 1)
    return flat.reshape(n, -1) if values == 1 else flat.reshape(n, -1, values)
