"""The public ops of htc_fast. Each takes ``backend=`` ("reference", "cpp", "triton");
``use_backend(...)`` sets a default for a block of code; ``DEFAULT_BACKENDS`` is the table.
``debug_checks()`` (or ``HTC_FAST_DEBUG=1``) turns on the value checks that need a host sync
(``_debug.py``); bad arguments raise ``OpArgumentError`` / ``OpTypeError`` (``_errors.py``)."""
from htc_fast.ops._backend import BACKENDS, DEFAULT_BACKENDS, use_backend
from htc_fast.ops._debug import debug_checks
from htc_fast.ops._errors import OpArgumentError, OpTypeError, RoiBoxesError, RoiBoxesTypeError
from htc_fast.ops.assign import Assignment, max_iou_assign
from htc_fast.ops.deform_conv import deform_conv2d
from htc_fast.ops.mask_paste import htc_mask_probs, paste_masks
from htc_fast.ops.mask_rle import paste_masks_rle
from htc_fast.ops.multiclass_nms import MulticlassNMSResult, PaddedDetections, multiclass_nms
from htc_fast.ops.nms import PaddedKeep, batched_nms, nms
from htc_fast.ops.roi_align import map_roi_levels, multilevel_roi_align, roi_align

__all__ = ["BACKENDS", "DEFAULT_BACKENDS", "use_backend", "debug_checks", "OpArgumentError", "OpTypeError",
           "RoiBoxesError", "RoiBoxesTypeError", "roi_align", "multilevel_roi_align",
           "map_roi_levels", "nms", "batched_nms", "PaddedKeep", "multiclass_nms", "MulticlassNMSResult",
           "PaddedDetections",
           "deform_conv2d", "paste_masks", "paste_masks_rle", "htc_mask_probs", "max_iou_assign", "Assignment"]
