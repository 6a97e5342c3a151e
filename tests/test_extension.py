"""The package around the kernels: loading _C, falling back without it, the env report."""
import os
import subprocess
import sys
import textwrap

import pytest

import htc_fast
from htc_fast import _extension

SKIP_EXT = os.environ.get("HTC_FAST_SKIP_EXTENSION") == "1"


def _run(code):
    """Run `code` in a fresh interpreter (import-time behaviour cannot be undone in-process)."""
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.skipif(SKIP_EXT, reason="HTC_FAST_SKIP_EXTENSION=1: the extension is deliberately absent")
def test_extension_loaded():
    # A build regression must fail loudly here rather than silently fall back to the reference.
    assert _extension.loaded, _extension.load_error
    assert htc_fast.ops.DEFAULT_BACKENDS[("roi_align", "cpu")] == "cpp"


def test_missing_extension_falls_back_with_one_warning():
    result = _run("""
        import sys, warnings
        sys.modules["htc_fast._C"] = None  # makes `from htc_fast import _C` raise ImportError
        import torch, htc_fast
        assert not htc_fast._extension.loaded
        x = torch.randn(1, 3, 8, 8)
        rois = torch.tensor([[0.0, 1, 1, 6, 6]])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                htc_fast.ops.roi_align(x, rois, 2)
            htc_fast.ops.multilevel_roi_align([x], rois, 2, strides=(1,))
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        assert "htc_fast._C is not available" in msgs[0] and "reference" in msgs[0], msgs
        try:
            htc_fast.ops.roi_align(x, rois, 2, backend="cpp")
        except RuntimeError as e:
            assert "backend 'cpp' is unavailable" in str(e) and "htc_fast._C is not available" in str(e), e
        else:
            raise AssertionError("backend='cpp' without _C must raise")
        print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_env_report_runs():
    result = subprocess.run([sys.executable, "-m", "htc_fast.env"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in ("torch", "triton", "htc_fast._C", "compiled CUDA archs", "roi_align on cpu",
                "multilevel_roi_align on cpu"):
        assert key in out, out
    if not SKIP_EXT:
        assert "htc_fast._C                  loaded" in out or "loaded\n" in out, out


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        with htc_fast.ops.use_backend("fast"):
            pass
