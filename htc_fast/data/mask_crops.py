"""Instance masks stored as the crops of their bounding windows, made dense where they are used.

Why: a training image's (G, H, W) masks at the network size are mostly zeros (COCO boxes cover a
small part of the image), and writing, sharing between processes, pinning and copying those
zeros costs more than rasterising the polygons. `MaskCrops` keeps only each mask's window; the
dense tensor is built by `dense()` on the device the crops were moved to (after
`TrainBatch.to("cuda")`: a GPU memset and G small copies).
"""
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskCrops:
    """G binary masks of an (H, W) image.

    size: (H, W); windows: per mask (x0, y0, x1, y1), the half-open pixel window holding all its
    set pixels (Python ints: read without touching the device); data: (sum of window areas,)
    uint8 0/1, each window's pixels in column-major order (x outer, y inner: pycocotools' order),
    one window after the other."""
    size: tuple[int, int]
    windows: list[tuple[int, int, int, int]]
    data: Tensor

    @staticmethod
    def from_columns(size: tuple[int, int], windows: Sequence[tuple[int, int, int, int]],
                     crops: Sequence[np.ndarray]) -> "MaskCrops":
        """From per-window (x1 - x0, y1 - y0) uint8 arrays (a window's columns, one per row)."""
        flat = np.concatenate([c.reshape(-1) for c in crops]) if crops else np.zeros(0, np.uint8)
        return MaskCrops(tuple(size), [tuple(int(v) for v in win) for win in windows], torch.from_numpy(flat))

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.windows), *self.size)

    def __len__(self) -> int:
        return len(self.windows)

    def _crops(self):
        offset = 0
        for x0, y0, x1, y1 in self.windows:
            n = (x1 - x0) * (y1 - y0)
            yield x0, y0, x1, y1, self.data[offset:offset + n].view(x1 - x0, y1 - y0)
            offset += n

    def dense(self) -> Tensor:
        """(G, H, W) bool on the data's device."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.data.device)
        for k, (x0, y0, x1, y1, crop) in enumerate(self._crops()):
            if crop.numel():
                out[k, y0:y1, x0:x1] = crop.t()
        return out

    def sample_grid(self, step: int) -> np.ndarray:
        """(G, ceil(H / step), ceil(W / step)) uint8: the dense masks at rows and columns
        0, step, 2 * step, ... (on the host)."""
        h, w = self.size
        out = np.zeros((len(self), -(-h // step), -(-w // step)), dtype=np.uint8)
        for k, (x0, y0, x1, y1, crop) in enumerate(self._crops()):
            r0, c0 = -(-y0 // step), -(-x0 // step)  # first grid row / column inside the window
            if r0 * step < y1 and c0 * step < x1:
                cols = crop.numpy()[c0 * step - x0::step, r0 * step - y0::step]
                out[k, r0:r0 + cols.shape[1], c0:c0 + cols.shape[0]] = cols.T
        return out

    def to_device(self, move) -> "MaskCrops":
        """The same masks with `move(data)` (e.g. `lambda t: t.to("cuda", non_blocking=True)`)."""
        return MaskCrops(self.size, self.windows, move(self.data))
