"""RoIAlign's public API around the math: argument errors, backend selection, autocast.

Numerical parity lives in test_roi_align.py and test_multilevel_roi_align.py.
"""
import importlib
import warnings

import pytest
import torch
import torchvision

from htc_fast import _extension, ops
from htc_fast.ops import _backend
from tests.ops.naive_roi_align import random_rois
from tests.support import TOL, require_backend

# htc_fast.ops.roi_align is also the name of the function that htc_fast.ops re-exports.
roi_align_module = importlib.import_module("htc_fast.ops.roi_align")


def inputs(device="cpu", n=2, c=3, h=8, w=9, k=4):
    return torch.randn(n, c, h, w, device=device), random_rois(k, n, h, w, 0.5, device=device)


# ------------------------------------------------------------------------------ argument errors

ROI_ALIGN_ERRORS = {  # case: (changes to a good call, error, message)
    "input_3d": (dict(input=lambda x, r: x[0]), ops.OpArgumentError, "input must be 4-D"),
    "input_int": (dict(input=lambda x, r: x.long()), ops.OpTypeError, "input must be floating point"),
    "input_not_tensor": (dict(input=lambda x, r: x.tolist()), ops.OpTypeError, "input must be a Tensor"),
    "input_meta": (dict(input=lambda x, r: x.to("meta")), ops.OpArgumentError, "input is on meta"),
    "rois_k4": (dict(boxes=lambda x, r: r[:, 1:]), ops.RoiBoxesError, r"boxes/rois must be a Tensor \(K, 5\)"),
    "rois_int": (dict(boxes=lambda x, r: r.long()), ops.OpTypeError, "boxes/rois must be floating point"),
    "rois_not_tensor": (dict(boxes=lambda x, r: 3), ops.RoiBoxesTypeError, "boxes/rois must be a Tensor"),
    "box_list_shape": (dict(boxes=lambda x, r: [r[:2, 1:], r[2:]]), ops.RoiBoxesError,
                       r"boxes\[1\] must be a Tensor of shape \(L, 4\)"),
    "box_list_item": (dict(boxes=lambda x, r: [r[:2, 1:], None]), ops.RoiBoxesTypeError,
                      r"boxes\[1\] must be a Tensor of shape \(L, 4\), got NoneType"),
    "output_size_zero": (dict(output_size=0), ops.OpArgumentError, "output_size must be an int >= 1 or a pair"),
    "output_size_triple": (dict(output_size=(2, 2, 2)), ops.OpArgumentError,
                           "output_size must be an int >= 1 or a pair"),
    "output_size_float": (dict(output_size=2.7), ops.OpTypeError,
                          r"output_size must be an int or a pair of ints \(each >= 1\), got float 2.7"),
    "spatial_scale_zero": (dict(spatial_scale=0.0), ops.OpArgumentError, "spatial_scale must be positive, got 0.0"),
    "spatial_scale_negative": (dict(spatial_scale=-0.25), ops.OpArgumentError, "spatial_scale must be positive"),
    "spatial_scale_nan": (dict(spatial_scale=float("nan")), ops.OpArgumentError, "spatial_scale must not be NaN"),
    "spatial_scale_inf": (dict(spatial_scale=float("inf")), ops.OpArgumentError, "spatial_scale must be finite"),
    "spatial_scale_none": (dict(spatial_scale=None), ops.OpTypeError, "spatial_scale must be a number"),
    "sampling_ratio_huge": (dict(sampling_ratio=2 ** 40), ops.OpArgumentError, "sampling_ratio must be an int <= 64"),
    "sampling_ratio_float": (dict(sampling_ratio=2.5), ops.OpTypeError, "sampling_ratio must be an int"),
    "aligned_str": (dict(aligned="yes"), ops.OpTypeError, "aligned must be a bool"),
    "backend_name": (dict(backend="cuda"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("case", list(ROI_ALIGN_ERRORS))
def test_roi_align_argument_errors(case, backend):
    """Every backend refuses the same arguments with the same message, before running a kernel."""
    require_backend(backend, "cpu")
    x, rois = inputs()
    changes, error, message = ROI_ALIGN_ERRORS[case]
    kwargs = dict(input=x, boxes=rois, output_size=2, spatial_scale=0.5, backend=backend)
    kwargs.update({k: (v(x, rois) if callable(v) else v) for k, v in changes.items()})
    with pytest.raises(error, match=f"^roi_align: {message}"):
        ops.roi_align(**kwargs)


@pytest.mark.parametrize("case, error, message", [
    ("dtype_mismatch", ValueError, r"features\[1\] is torch.float64"),
    ("channels_mismatch", ValueError, r"features\[1\] has \(N, C\)"),
    ("strides_length", ValueError, "got 2 feature levels but strides tuple of length 3"),
    ("no_levels", ValueError, r"features must hold 1 to 5 levels \(every backend's limit\), got 0"),
    ("six_levels", ValueError, r"features must hold 1 to 5 levels \(every backend's limit\), got 6"),
    ("features_tensor", TypeError, "features must be a list of L tensors"),
    ("int_features", TypeError, r"features\[0\] must be floating point"),
    ("bad_stride", ValueError, r"strides\[1\] must be positive"),
    ("stride_nan", ValueError, r"strides\[0\] must not be NaN"),
    ("finest_scale_none", TypeError, "finest_scale must be a number"),
    ("sampling_ratio_huge", ValueError, "sampling_ratio must be an int <= 64"),
    ("bad_finest_scale", ValueError, "finest_scale must be positive"),
    ("rois_shape", ValueError, r"boxes/rois must be a Tensor \(K, 5\)"),
])
def test_multilevel_argument_errors(case, error, message):
    feats = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    rois = random_rois(4, 2, 64, 64, 1.0)
    kwargs = dict(strides=(4, 8))
    if case == "dtype_mismatch":
        feats[1] = feats[1].double()
    elif case == "channels_mismatch":
        feats[1] = feats[1][:, :2]
    elif case == "strides_length":
        kwargs["strides"] = (4, 8, 16)
    elif case == "no_levels":
        feats, kwargs["strides"] = [], ()
    elif case == "six_levels":
        feats, kwargs["strides"] = [feats[0]] * 6, (4,) * 6
    elif case == "features_tensor":
        feats = feats[0]
    elif case == "stride_nan":
        kwargs["strides"] = (float("nan"), 8)
    elif case == "finest_scale_none":
        kwargs["finest_scale"] = None
    elif case == "sampling_ratio_huge":
        kwargs["sampling_ratio"] = 2 ** 40
    elif case == "int_features":
        feats = [f.int() for f in feats]
    elif case == "bad_stride":
        kwargs["strides"] = (4, 0)
    elif case == "bad_finest_scale":
        kwargs["finest_scale"] = -56
    elif case == "rois_shape":
        rois = rois[:, :4]
    with pytest.raises(error, match=message):
        ops.multilevel_roi_align(feats, rois, 7, **kwargs)


@pytest.mark.cuda
def test_rois_on_another_device():
    x, rois = inputs("cuda")
    with pytest.raises(ValueError, match="boxes/rois is on cpu but the features is on cuda"):
        ops.roi_align(x, rois.cpu(), 2, 0.5)
    with pytest.raises(ValueError, match="boxes/rois is on cpu"):
        ops.multilevel_roi_align([x], rois.cpu(), 2, strides=(2,))


# ------------------------------------------------------------------------------ backend choice

def test_default_table_is_complete():
    for op in ("roi_align", "multilevel_roi_align"):
        for device_type in ("cpu", "cuda"):
            assert _backend.DEFAULT_BACKENDS[(op, device_type)] in _backend.BACKENDS
            assert _backend.default_backend(op, device_type) == _backend.DEFAULT_BACKENDS[(op, device_type)]
    assert _backend.default_backend("roi_align", "mps") == "reference"
    assert ops.DEFAULT_BACKENDS is _backend.DEFAULT_BACKENDS


@pytest.fixture
def reference_calls(monkeypatch):
    """Counts calls into the reference implementation made through the public API."""
    calls = []
    real = roi_align_module._ref.roi_align

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(roi_align_module._ref, "roi_align", spy)
    return calls


def test_use_backend_context(reference_calls):
    require_backend("cpp", "cpu")
    x, rois = inputs()
    with ops.use_backend("reference"):
        ops.roi_align(x, rois, 2, 0.5)
        assert len(reference_calls) == 1
        ops.roi_align(x, rois, 2, 0.5, backend="cpp")  # an explicit argument beats the context
        assert len(reference_calls) == 1
        with ops.use_backend("cpp", ops="roi_align"):  # innermost context wins
            ops.roi_align(x, rois, 2, 0.5)
        with ops.use_backend("cpp", ops=["multilevel_roi_align"]):  # does not cover roi_align
            ops.roi_align(x, rois, 2, 0.5)
        assert len(reference_calls) == 2
        assert _backend.resolve("multilevel_roi_align", "cpu") == "reference"
    ops.roi_align(x, rois, 2, 0.5)  # back to the table (cpp on CPU)
    assert len(reference_calls) == 2
    with pytest.raises(ValueError, match="use_backend: backend must be one of"):
        with ops.use_backend("fast"):
            pass


def test_unavailable_explicit_backend_raises(monkeypatch):
    x, rois = inputs()
    monkeypatch.setattr(_extension, "loaded", False)
    monkeypatch.setattr(_extension, "load_error", "ImportError: no _C in this test")
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable on cpu.*no _C in this test"):
        ops.roi_align(x, rois, 2, 0.5, backend="cpp")
    with pytest.raises(RuntimeError, match="backend 'cpp' is unavailable"):
        with ops.use_backend("cpp"):
            ops.multilevel_roi_align([x], rois, 2, strides=(2,))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    require_backend("triton", "cpu")
    x, rois = inputs()
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="only under TRITON_INTERPRET=1"):
        ops.roi_align(x, rois, 2, 0.5, backend="triton")


def test_unavailable_default_falls_back_with_one_warning(monkeypatch, reference_calls):
    x, rois = inputs()
    monkeypatch.setattr(_extension, "loaded", False)
    monkeypatch.setattr(_extension, "load_error", "ImportError: fallback test")
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match="default backend 'cpp' is unavailable") as record:
        first = ops.roi_align(x, rois, 2, 0.5)
        second = ops.roi_align(x, rois, 2, 0.5)
    assert len([w for w in record if "fallback test" in str(w.message)]) == 1
    assert len(reference_calls) == 2
    torch.testing.assert_close(first, second)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no more warnings for the same reason
        ops.roi_align(x, rois, 2, 0.5)


# ------------------------------------------------------------------------------ autocast

def test_autocast_keeps_the_feature_dtype(backend, device):
    """Under autocast, RoIAlign runs in its features' dtype; fp32 rois go with bf16 features."""
    x, rois = inputs(device.type, k=3)
    x16 = x.bfloat16()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y32 = ops.roi_align(x, rois, 2, 0.5, 0, True, backend=backend)
        y16 = ops.roi_align(x16, rois, 2, 0.5, 0, True, backend=backend)
        yml = ops.multilevel_roi_align([x16], rois, 2, strides=(2,), backend=backend)
    assert (y32.dtype, y16.dtype, yml.dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
    torch.testing.assert_close(y32, torchvision.ops.roi_align(x, rois, 2, 0.5, 0, True), **TOL[torch.float32])
    expected16 = torchvision.ops.roi_align(x16.float(), rois, 2, 0.5, 0, True).bfloat16()
    torch.testing.assert_close(y16, expected16, **TOL[torch.bfloat16])


def test_autocast_operator_casts_rois_to_geometry_dtype():
    """The compiled operators' autocast kernels: features untouched, rois become float32."""
    require_backend("cpp", "cpu")
    x, rois = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.htc_fast.roi_align(x.bfloat16(), rois.bfloat16(), 0.5, 2, 2, 0, True)
        y32 = torch.ops.htc_fast.roi_align(x, rois.double(), 0.5, 2, 2, 0, True)
        yml = torch.ops.htc_fast.multilevel_roi_align([x.bfloat16()], rois.bfloat16(), [0.5], 2, 2, 0,
                                                      True, 56.0)
    assert (y.dtype, y32.dtype, yml.dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
