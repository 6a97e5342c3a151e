"""What htc_fast's ops replace, written the way mmdetection runs it: the baselines that
``python -m htc_fast.demo`` and ``benchmarks/`` time htc_fast against, and the oracles that
``tests/ops`` check it with. One copy each, so the demo, the benchmarks and the tests compare
against the same thing.

Nothing here calls htc_fast's ops: the FPN level of a RoI comes from this module's own copy of
mmdetection's formula (``mmdet_levels``), not from ``htc_fast.ops.map_roi_levels``, so an oracle
built on it stays independent of the code under test.
"""
import torch
import torchvision
from torch import Tensor

__all__ = ["mmdet_levels", "per_level_torchvision"]


def mmdet_levels(rois: Tensor, num_levels: int, finest_scale: float = 56.0) -> Tensor:
    """mmdetection's ``SingleRoIExtractor.map_roi_levels``: (K, 5) rois ``[b, x1, y1, x2, y2]`` ->
    (K,) float levels ``clamp(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, L-1)``. Kept as a
    float tensor so that a RoI of NaN size (negative area) stays visible as NaN."""
    scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=num_levels - 1)


def per_level_torchvision(features: list[Tensor], rois: Tensor, output_size: tuple[int, int],
                          strides, sampling_ratio: int, aligned: bool, finest_scale: float = 56.0) -> Tensor:
    """mmdetection's FPN RoI extractor: a Python loop over levels, a boolean mask per level (a host
    sync on CUDA), ``torchvision.ops.roi_align`` on that level's RoIs, a scatter into the output.

    Args:
        features: L tensors (N, C, H_l, W_l), one dtype and device.
        rois: (K, 5) float ``[batch_index, x1, y1, x2, y2]`` in image pixels.
        output_size: (PH, PW); strides: L level strides in pixels.
        sampling_ratio, aligned, finest_scale: as in ``htc_fast.ops.multilevel_roi_align``.

    Returns:
        (K, C, PH, PW) in the features' dtype. RoIs with a non-finite coordinate stay zero (the
        spec; torchvision's kernel crashes on them). Each level's rois are cast to the features'
        dtype, as torchvision requires (fp16 boxes under AMP: the trap htc_fast avoids).
    """
    levels = mmdet_levels(rois, len(features), finest_scale)
    levels[~torch.isfinite(rois).all(1)] = -1
    out = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output_size))
    for lvl, (feat, stride) in enumerate(zip(features, strides)):
        mask = levels == lvl
        if mask.any():
            out[mask] = torchvision.ops.roi_align(feat, rois[mask].to(feat.dtype), output_size,
                                                  1.0 / stride, sampling_ratio, aligned)
    return out
