"""Imports run one way: htc_fast.ops loads the Triton kernels lazily; kernels/ imports nothing from
htc_fast.ops (registration of autograd, fake and autocast kernels lives in htc_fast/ops)."""
import ast
import random
from pathlib import Path

import pytest
import torch

KERNELS = Path(__file__).resolve().parents[2] / "kernels"


def _imported_modules(path):
    """Every module named by an import statement of `path` (relative imports resolved in kernels)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = "htc_fast.kernels" if node.level else ""
            names.append(".".join(p for p in (base, node.module or "") if p))
    return names


def test_kernels_import_nothing_from_ops():
    files = sorted(KERNELS.glob("*.py"))
    assert len(files) >= 5, f"kernels/ not found next to tests/ ({KERNELS})"
    bad = {f.name: m for f in files for m in _imported_modules(f)
           if m == "htc_fast.ops" or m.startswith("htc_fast.ops.")}
    assert not bad, f"kernels/ must not import htc_fast.ops (ops import kernels, once): {bad}"
    # grep-style as well: no string import of htc_fast.ops (importlib) either.
    for f in files:
        assert "import_module(\"htc_fast.ops" not in f.read_text(), f.name


def test_import_scanner_sees_imports(tmp_path):
    """The scanner above would catch an ops import (the test can fail)."""
    f = tmp_path / "k.py"
    f.write_text("import torch\nif True:\n    from htc_fast.ops.roi_align import x\n")
    assert "htc_fast.ops.roi_align" in _imported_modules(f)


def test_kernel_threshold_matches_reference_rule():
    """kernels/_math.threshold_as and the reference NMS's helper agree (same rule, two homes)."""
    pytest.importorskip("triton")
    from htc_fast.kernels._math import threshold_as
    from htc_fast.ops.reference.nms import _threshold_as

    for _ in range(200):
        t = random.random()
        for dtype in (torch.float32, torch.float64):
            got = threshold_as(t, dtype)
            assert got == float(_threshold_as(t, dtype))
            assert got <= t and torch.tensor(got, dtype=dtype).item() == got
