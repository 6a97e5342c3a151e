"""Mask paste straight to COCO RLE: what COCO evaluation and result files consume.

Owns ``paste_masks_rle`` and the host-side encoding of cropped masks. The dense (N, H, W) tensor is
never built (on the "cpp" and "triton" backends): a mask is zero outside its window (the pixels
within half a mask cell of its box, ``paste_mask_windows``), so the kernels paste each window into
one flat buffer of column-major crops on the device, only those crops move to the host, and the
run lengths outside the windows are closed forms (``htc_fast::mask_rle_encode``, C++). Pixel model
and bad-box behaviour: ``htc_fast.ops.paste_masks``.
"""
import torch
from torch import Tensor

from htc_fast import _extension
from htc_fast.ops import _backend
from htc_fast.ops.mask_paste import check_args
from htc_fast.ops.reference import mask_paste as _ref

__all__ = ["paste_masks_rle", "encode_crops"]


def paste_masks_rle(mask_probs, boxes, image_size, threshold=0.5, *, backend=None):
    """``paste_masks``, returned as COCO RLE.

    Args: as ``paste_masks``.

    Returns:
        A list of N dicts ``{"size": [height, width], "counts": bytes}``, each equal to
        ``pycocotools.mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))`` of the dense
        mask ``paste_masks`` returns with the same backend. On CUDA this synchronises once, to size
        the crop buffer.
    """
    mask_probs, boxes, height, width, threshold = check_args(mask_probs, boxes, image_size, threshold,
                                                             "paste_masks_rle")
    chosen = _backend.resolve("paste_masks_rle", boxes.device.type, backend)
    if chosen == "reference":  # the oracle: dense masks, encoded one by one on the host
        dense = _ref.paste_masks(mask_probs, boxes, height, width, threshold).cpu()
        return [_ref.rle_encode(m) for m in dense]
    mh, mw = mask_probs.shape[1], mask_probs.shape[2]
    if chosen == "cpp":
        windows = torch.ops.htc_fast.paste_mask_windows(boxes, mh, mw, height, width)
        crops_op = torch.ops.htc_fast.paste_mask_crops
    else:
        from htc_fast.kernels import mask_paste as triton_mask_paste

        windows = triton_mask_paste.paste_mask_windows_torch(boxes, mh, mw, height, width)
        crops_op = triton_mask_paste.paste_mask_crops_triton
    windows_cpu = windows.cpu()
    offsets = crop_offsets(windows_cpu)
    total = int(offsets[-1])
    crops = crops_op(mask_probs, boxes, windows, offsets.to(boxes.device), total, height, width,
                     threshold)
    return encode_crops(crops.cpu(), windows_cpu, offsets, height, width)


def crop_offsets(windows: Tensor) -> Tensor:
    """(N + 1,) int64 start of each window's crop in a flat buffer (the last entry is the total)."""
    areas = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    offsets = torch.zeros(windows.shape[0] + 1, dtype=torch.long, device=windows.device)
    torch.cumsum(areas, 0, out=offsets[1:])
    return offsets


def encode_crops(crops: Tensor, windows: Tensor, offsets: Tensor, height: int, width: int) -> list:
    """COCO RLE dicts from CPU crops: flat bool, crop n column-major at offsets[n] covering
    windows[n] = [x0, y0, x1, y1] of a (height, width) image, zero elsewhere."""
    n = windows.shape[0]
    size = [int(height), int(width)]
    if _extension.loaded:
        chars, char_offsets = torch.ops.htc_fast.mask_rle_encode(crops, windows, offsets, height, width)
        data, bounds = chars.numpy().tobytes(), char_offsets.tolist()
        return [{"size": list(size), "counts": data[bounds[k]:bounds[k + 1]]} for k in range(n)]
    out = []  # without _C: the same runs, from each crop placed in its image column by column
    for k, (x0, y0, x1, y1) in enumerate(windows.tolist()):
        dense = torch.zeros(width, height, dtype=torch.bool)  # transposed: rows are image columns
        crop = crops[int(offsets[k]):int(offsets[k]) + (x1 - x0) * (y1 - y0)]
        dense[x0:x1, y0:y1] = crop.view(x1 - x0, y1 - y0)
        out.append(_ref.rle_encode(dense.t()))
    return out
