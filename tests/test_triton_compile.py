"""scripts/check_triton_compile.py: compiles Triton kernels for sm_90 without a GPU, prints the
resource table and fails on what it must reject. Runs the script as its own process (it replaces
Triton's driver, and TRITON_INTERPRET, which conftest sets for this process, must be unset)."""
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_triton_compile.py")


def run_script(*args, **env):
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env=environ, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_nms_kernels_compile_for_sm90_within_their_ceilings():
    result = run_script("--arch", "90", "--ops", "nms")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("sm_90")]
    kernels = {row[1] for row in rows}
    assert kernels == {"_nms_mask_kernel", "_nms_reduce_kernel"}
    for row in rows:
        assert row[-1] == "ok" and int(row[-6]) <= int(row[-5])  # regs <= max


def test_refuses_to_run_under_the_interpreter():
    result = run_script("--ops", "nms", TRITON_INTERPRET="1")
    assert result.returncode != 0 and "TRITON_INTERPRET" in result.stderr


def _checker():
    """The script's check() without importing the project's kernels (a plain import of the module
    is safe: the patching happens in main())."""
    environ_interpret = os.environ.pop("TRITON_INTERPRET", None)
    try:
        sys.path.insert(0, ROOT)
        import scripts.check_triton_compile as script
    finally:
        sys.path.remove(ROOT)
        if environ_interpret is not None:
            os.environ["TRITON_INTERPRET"] = environ_interpret
    return script


def _record(kernel, ptx="", fusion=False, warps=4):
    compiled = SimpleNamespace(asm={"ptx": ptx},
                               metadata=SimpleNamespace(enable_fp_fusion=fusion, num_warps=warps))
    return SimpleNamespace(kernel=kernel, module="m", arch=90, compiled=compiled)


def test_check_rejects_registers_local_memory_missing_ceilings_and_fma():
    check = _checker().check
    usage = {"REG": 100, "STACK": 0, "LOCAL": 0}
    assert check(_record("k"), usage, {"k": 100}, ()) == []
    assert "registers > ceiling" in check(_record("k"), dict(usage, REG=101), {"k": 100}, ())[0]
    assert "local memory" in check(_record("k"), dict(usage, LOCAL=16), {"k": 100}, ())[0]
    assert "no MAX_REGS" in check(_record("k"), usage, {}, ())[0]
    by_warps = {4: 128, 8: 64}  # a ceiling by num_warps
    assert check(_record("k", warps=4), usage, {"k": by_warps}, ()) == []
    assert "registers > ceiling 64" in check(_record("k", warps=8), usage, {"k": by_warps}, ())[0]
    assert "no MAX_REGS" in check(_record("k", warps=2), usage, {"k": by_warps}, ())[0]
    fma = _record("k", ptx="\tfma.rn.f32 \t%f3, %f1, %f2, %f0;")
    assert "fma.rn" in check(fma, usage, {"k": 100}, ("k",))[0]
    assert check(fma, usage, {"k": 100}, ()) == []  # only the listed kernels must avoid FMAs
