"""htc_fast.ops as a drop-in for torchvision.ops where code written for torchvision notices:

  * ``batched_nms`` of empty 1-D tensors returns an empty int64 tensor, as torchvision's does;
  * every bad call that torchvision rejects, htc_fast rejects with an exception that the same
    ``except`` clause catches (torchvision raises RuntimeError, and AssertionError for roi_align's
    boxes), while keeping its own message naming the argument;
  * TorchScript: the public functions are not scriptable (keyword-only ``backend=``, Python-level
    checks); torch.compile and torch.export trace through the registered operators instead.
"""
import pytest
import torch
import torchvision

from htc_fast import ops
from tests.support import require_backend

BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_nms_of_empty_1d_tensors(backend):
    require_backend(backend, "cpu")
    empty = torch.empty(0)
    got = ops.batched_nms(empty, empty, empty, 0.5, backend=backend)
    expected = torchvision.ops.batched_nms(empty, empty, empty, 0.5)
    assert got.dtype == expected.dtype == torch.int64 and got.shape == expected.shape == (0,)
    padded = ops.batched_nms(empty, empty, empty, 0.5, max_output=4, backend=backend)
    assert padded.keep.tolist() == [-1] * 4 and int(padded.num_kept) == 0


def _boxes(n):
    xy = torch.rand(n, 2) * 50
    return torch.cat([xy, xy + 1 + torch.rand(n, 2) * 20], 1)


def _rois(k, n=1):
    return torch.cat([torch.randint(0, n, (k, 1)).float(), _boxes(k)], 1)


def _dcn(**change):
    args = dict(input=torch.randn(1, 4, 6, 6), offset=torch.randn(1, 18, 6, 6),
                weight=torch.randn(4, 4, 3, 3), bias=None, padding=(1, 1), mask=torch.rand(1, 9, 6, 6))
    args.update(change)
    return lambda o: o.deform_conv2d(args["input"], args["offset"], args["weight"], args["bias"],
                                     padding=args["padding"], mask=args["mask"])


# name: a function of the op namespace (torchvision.ops or htc_fast.ops) that makes one bad call
BAD_CALLS = {
    "nms_boxes_3_columns": lambda o: o.nms(torch.rand(5, 3), torch.rand(5), 0.5),
    "nms_lengths": lambda o: o.nms(_boxes(5), torch.rand(4), 0.5),
    "nms_int_boxes": lambda o: o.nms(_boxes(5).long(), torch.rand(5), 0.5),
    "nms_threshold_none": lambda o: o.nms(_boxes(5), torch.rand(5), None),
    "nms_threshold_str": lambda o: o.nms(_boxes(5), torch.rand(5), "0.5"),
    "roi_align_rois_4_columns": lambda o: o.roi_align(torch.randn(1, 3, 8, 8), _rois(3)[:, 1:], 2),
    "roi_align_box_list_5_columns": lambda o: o.roi_align(torch.randn(1, 3, 8, 8), [_rois(3)], 2),
    "roi_align_boxes_int": lambda o: o.roi_align(torch.randn(1, 3, 8, 8), 3, 2),
    "roi_align_output_size_float": lambda o: o.roi_align(torch.randn(1, 3, 8, 8), _rois(3), 2.7),
    "roi_align_int_input": lambda o: o.roi_align(torch.ones(1, 3, 8, 8, dtype=torch.long), _rois(3), 2),
    "deform_conv2d_offset_channels": _dcn(offset=torch.randn(1, 17, 6, 6)),
    "deform_conv2d_offset_size": _dcn(offset=torch.randn(1, 18, 5, 6)),
    "deform_conv2d_mask_channels": _dcn(mask=torch.rand(1, 8, 6, 6)),
    "deform_conv2d_weight_dtype": _dcn(weight=torch.randn(4, 4, 3, 3, dtype=torch.float64)),
    "deform_conv2d_size_and_dtype": _dcn(offset=torch.randn(1, 17, 6, 6), weight=torch.randn(4, 4, 3, 3).double()),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_errors_are_caught_by_torchvision_except_clauses(case):
    """The exception torchvision raises for a call is a base class of ours; ours is also a
    ValueError or TypeError and names the op."""
    call = BAD_CALLS[case]
    with pytest.raises(Exception) as theirs:
        call(torchvision.ops)
    with pytest.raises(theirs.type) as ours:
        call(ops)
    assert isinstance(ours.value, (ops.OpArgumentError, ops.OpTypeError)), type(ours.value)
    assert str(ours.value).startswith(case.split("_")[0] if not case.startswith(("roi_align", "deform"))
                                      else "_".join(case.split("_")[:2]))


def test_error_classes():
    assert issubclass(ops.OpArgumentError, ValueError) and issubclass(ops.OpArgumentError, RuntimeError)
    assert issubclass(ops.OpTypeError, TypeError) and issubclass(ops.OpTypeError, RuntimeError)
    assert issubclass(ops.RoiBoxesError, AssertionError) and issubclass(ops.RoiBoxesError, ops.OpArgumentError)
    assert issubclass(ops.RoiBoxesTypeError, AssertionError) and issubclass(ops.RoiBoxesTypeError, ops.OpTypeError)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
@pytest.mark.parametrize("fn", [ops.nms, ops.batched_nms, ops.roi_align, ops.deform_conv2d])
def test_not_scriptable(fn):
    """Pinned: TorchScript refuses the public functions (documented in their modules; use
    torch.compile or torch.export). If this starts passing, document scripting instead."""
    with pytest.raises(torch.jit.frontend.NotSupportedError):
        torch.jit.script(fn)


def test_torch_export_traces_the_operators():
    require_backend("cpp", "cpu")

    class Pool(torch.nn.Module):
        def forward(self, x, rois):
            return ops.roi_align(x, rois, 2, 0.5, 2, True, backend="cpp")

    x, rois = torch.randn(2, 3, 8, 8), _rois(4, 2)
    exported = torch.export.export(Pool(), (x, rois))
    assert "htc_fast.roi_align" in str(exported.graph)
    assert torch.equal(exported.module()(x, rois), Pool()(x, rois))
