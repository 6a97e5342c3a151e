"""Compile every Triton kernel of htc_fast for sm_80 and sm_90 on a machine without a GPU, and check
its resources: python scripts/check_triton_compile.py [--arch 90] [--ops nms roi_align ...]

How: a stand-in Triton driver answers "CUDA, compute capability 9.0 (or 8.0), warp size 32" and
JITFunction.run compiles with warmup=True instead of launching. The project's own Triton op wrappers
(kernels/*.py) are then called with CPU tensors, so the real grids, constexprs, block sizes and
argument specialisations (alignment, stride == 1) go through Triton's whole pipeline (ttir -> ttgir
-> PTX -> cubin with the bundled ptxas); nothing runs, and the outputs are garbage. Registers, stack
and local memory come from the bundled ``cuobjdump --dump-resource-usage`` of each cubin; warps and
shared memory from the kernel's metadata.

Fails (exit status 1) on: a compile error, any stack or local memory (register spills), registers
above the kernel's ceiling (``MAX_REGS`` next to its launch in kernels/*.py: the occupancy it aims
for; an int, or a dict by num_warps), a compiled kernel without a ceiling, and an ``fma.rn`` in
the PTX of a kernel that must round every operation (RoIAlign: the roi scaling and bin starts decide ceil(roi / P)).

Run it as its own process: it replaces Triton's active driver and JITFunction.run for good, and
TRITON_INTERPRET must be unset (the interpreter compiles nothing).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("check_triton_compile: TRITON_INTERPRET is set; unset it (the interpreter compiles nothing)")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

from scripts.triton_compile_cases import CASES  # noqa: E402

ARCHS = (80, 90)


def _internals_moved(what, exc):
    sys.exit(f"check_triton_compile: triton {triton.__version__} internals moved ({what}: "
             f"{type(exc).__name__}: {exc}); update the stand-in driver in this script")


try:  # the only non-public pieces this script relies on
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction
except ImportError as exc:
    _internals_moved("imports", exc)


class StandInDriver(DriverBase):
    """A CUDA target without a device. The device id is the arch, so each arch gets its own entry
    in every kernel's per-device cache (JITFunction.device_caches)."""

    def __init__(self, arch):
        self.arch = arch

    @classmethod
    def is_active(cls):
        return False

    def map_python_to_cpp_type(self, ty):
        raise NotImplementedError("nothing is launched")

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        raise NotImplementedError("nothing is launched")

    def get_current_device(self):
        return self.arch

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cuda


@dataclass
class Compiled:
    kernel: str    # the @triton.jit function's name
    module: str    # its module (where MAX_REGS lives)
    variant: str   # the case that compiled it first
    arch: int
    compiled: object


class Recorder:
    """Replaces JITFunction.run: compile (warmup=True), never launch; remember each new kernel."""

    def __init__(self):
        self.variant = "?"
        self.arch = None
        self.seen = {}
        self._run = JITFunction.run

    def install(self):
        recorder = self

        def compile_only(fn, *args, grid, warmup, **kwargs):
            kernel = recorder._run(fn, *args, grid=grid, warmup=True, **kwargs)
            key = (recorder.arch, fn.fn.__name__, kernel.hash)
            if key not in recorder.seen:
                recorder.seen[key] = Compiled(fn.fn.__name__, fn.fn.__module__, recorder.variant,
                                              recorder.arch, kernel)
            return kernel

        JITFunction.run = compile_only

    def set_arch(self, arch):
        self.arch = arch
        try:
            _driver.set_active(StandInDriver(arch))
        except (AttributeError, TypeError) as exc:
            _internals_moved("driver.set_active(StandInDriver)", exc)


def _cuobjdump():
    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    path = getattr(tool, "path", None)
    if path and os.path.exists(path):
        return path
    import triton.backends.nvidia as nvidia
    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    if not os.path.exists(path):
        sys.exit("check_triton_compile: the cuobjdump bundled with triton is missing")
    return path


def resource_usage(cubin, tool):
    """{"REG": n, "STACK": n, "LOCAL": n, "SHARED": n} of the cubin's one function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out))
    if "REG" not in found:
        sys.exit(f"check_triton_compile: cannot read cuobjdump's output:\n{out}")
    return {k: int(v) for k, v in found.items()}


def ptxas_spills(record):
    """Bytes of spill stores + loads that the bundled ptxas reports for the kernel's PTX (asked only
    when cuobjdump shows a stack frame: a call's frame, e.g. the fp64 division slow path, is no spill)."""
    tool = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "ptxas", None)
    path = getattr(tool, "path", None) or os.path.join(os.path.dirname(_cuobjdump()), "ptxas")
    arch = f"sm_{record.arch}a" if record.arch == 90 else f"sm_{record.arch}"
    fmad = [] if record.compiled.metadata.enable_fp_fusion else ["--fmad=false"]
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(record.compiled.asm["ptx"])
        log = subprocess.run([path, "-v", *fmad, f"--gpu-name={arch}", src, "-o", src + ".o"],
                             capture_output=True, text=True, check=True).stderr
    found = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if not found:
        sys.exit(f"check_triton_compile: cannot read ptxas -v:\n{log}")
    return sum(int(a) + int(b) for a, b in found)


def ceiling_of(record, ceilings):
    """The kernel's register ceiling from its module's MAX_REGS (an int, or a dict by num_warps)."""
    ceiling = ceilings.get(record.kernel)
    if isinstance(ceiling, dict):
        ceiling = ceiling.get(record.compiled.metadata.num_warps)
    return ceiling


def check(record, usage, ceilings, no_fma):
    """Problems of one compiled kernel (empty: fine)."""
    problems = []
    if usage.get("LOCAL", 0):
        problems.append(f"local memory {usage['LOCAL']} B")
    if usage.get("STACK", 0):
        spilled = ptxas_spills(record)
        if spilled:
            problems.append(f"register spills: {spilled} B stored + loaded (stack {usage['STACK']} B)")
    ceiling = ceiling_of(record, ceilings)
    if ceiling is None:
        problems.append(f"no MAX_REGS entry for {record.kernel} in {record.module} "
                        f"(at {record.compiled.metadata.num_warps} warps)")
    elif usage["REG"] > ceiling:
        problems.append(f"{usage['REG']} registers > ceiling {ceiling}")
    if record.kernel in no_fma and re.search(r"\bfma\.rn", record.compiled.asm["ptx"]):
        problems.append("fma.rn in the PTX (must be compiled with enable_fp_fusion=False)")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--ops", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args(argv)

    start = time.time()
    recorder = Recorder()
    recorder.install()
    import htc_fast.kernels as kernels
    if not kernels.available:
        sys.exit(f"check_triton_compile: htc_fast.kernels unavailable: {kernels.unavailable_reason}")
    errors = []
    for arch in args.arch:
        recorder.set_arch(arch)
        for op in args.ops:
            for variant, fn, fn_args in CASES[op]():
                recorder.variant = f"{op} {variant}"
                try:
                    fn(*fn_args)
                except Exception as exc:
                    text = traceback.format_exc(limit=-3)
                    errors.append(f"sm_{arch} {op} {variant}: compile failed: {type(exc).__name__}\n{text}")

    tool = _cuobjdump()
    rows, failures = [], []
    for record in recorder.seen.values():
        module = sys.modules[record.module]
        usage = resource_usage(record.compiled.asm["cubin"], tool)
        ceilings = getattr(module, "MAX_REGS", {})
        problems = check(record, usage, ceilings, getattr(module, "NO_FMA", ()))
        md = record.compiled.metadata
        rows.append((f"sm_{record.arch}", record.kernel, record.variant, str(usage["REG"]),
                     str(ceiling_of(record, ceilings) or "-"),
                     f"{usage.get('STACK', 0)}/{usage.get('LOCAL', 0)}", str(md.shared),
                     str(md.num_warps), "; ".join(problems) or "ok"))
        failures += [f"sm_{record.arch} {record.kernel} ({record.variant}): {p}" for p in problems]
    header = ("arch", "kernel", "variant (first case compiling it)", "regs", "max", "stack/local",
              "smem B", "warps", "check")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + sorted(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"\n{len(rows)} compiled kernels for {', '.join(f'sm_{a}' for a in args.arch)} in "
          f"{time.time() - start:.0f} s (triton {triton.__version__})")
    for message in errors + failures:
        print("FAIL", message, file=sys.stderr)
    return 1 if errors or failures else 0


if __name__ == "__main__":
    sys.exit(main())
