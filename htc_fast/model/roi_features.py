"""RoI feature extraction for the cascade: FPN multi-level RoIAlign plus HTC's semantic fusion.

Box branch: 7x7 RoIAlign on P2..P5 (level by RoI scale) + the semantic feature's 14x14 RoIAlign
average-pooled to 7x7. Mask branch: 14x14 on P2..P5 + 14x14 on the semantic feature. Both use
sampling_ratio 0 and aligned=True (mmcv's RoIAlign defaults that HTC keeps).
"""
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from htc_fast.ops import multilevel_roi_align, roi_align


@dataclass(frozen=True)
class RoIFeatureExtractor:
    """strides: of the FPN levels used (P2..P5: 4, 8, 16, 32); finest_scale: 56;
    semantic_stride: of the semantic feature (8); semantic_size: its RoIAlign output (14)."""
    strides: tuple = (4, 8, 16, 32)
    finest_scale: float = 56
    sampling_ratio: int = 0
    aligned: bool = True
    semantic_stride: int = 8
    semantic_size: int = 14

    def __call__(self, feats: Sequence[Tensor], semantic_feat: Optional[Tensor], rois: Tensor,
                 output_size: int) -> Tensor:
        """feats: the FPN outputs (at least len(strides) levels, P2 first), each (N, C, H_l, W_l);
        semantic_feat: (N, C, H/8, W/8) or None; rois: (R, 5) [batch_index, x1, y1, x2, y2] in
        network-input pixels. Returns (R, C, output_size, output_size)."""
        out = multilevel_roi_align(list(feats[:len(self.strides)]), rois, output_size, strides=self.strides,
                                   finest_scale=self.finest_scale, sampling_ratio=self.sampling_ratio,
                                   aligned=self.aligned)
        if semantic_feat is not None:
            sem = roi_align(semantic_feat, rois, self.semantic_size, 1.0 / self.semantic_stride,
                            self.sampling_ratio, self.aligned)
            if sem.shape[-2:] != out.shape[-2:]:
                sem = F.adaptive_avg_pool2d(sem, out.shape[-2:])
            out = out + sem
        return out
