"""Compile every CUDA source for sm_80 and sm_90 and check each kernel's resources (CI, no GPU).

For each csrc/**/*.cu this runs nvcc device-only (-fatbin: no host compilation) with the flags
setup.py builds with plus `-Xptxas -v`, one process per file in parallel, and parses ptxas's
report per kernel and arch: registers, static shared memory, stack frame, spill stores/loads.
It prints a table and exits non-zero on:
  * a compile error;
  * any spill or stack frame (local memory) in any kernel;
  * registers above the kernel's ceiling. Ceilings are written where the kernel is launched, as
    `// htc:max-regs <kernel_name> <N> [fp64=<M>]` with the occupancy the ceiling keeps; a kernel without
    one, or an annotation naming no compiled kernel, is an error too;
  * an FMA, or a product a later pass may fuse into one (a `mul` without `.rn`), in the PTX of the
    shared helpers listed in FMA_CHECKS: the RoIAlign sampling grid and the max-IoU overlap. The
    CPU computes them without contraction, so the GPU must too for CPU and CUDA to pick identical
    sample positions and make identical == / >= decisions on overlaps.

  python scripts/check_cuda_resources.py [--arch 80 90] [--jobs 2] [FILE.cu ...]
"""
import argparse
import dataclasses
import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# source -> (header, functions): PTX lines of the source attributed to these functions' bodies
# must hold no FMA.
FMA_CHECKS = {
    "csrc/roi_align/roi_align_cuda.cu": ("csrc/roi_align/roi_align_common.h",
                                         ("make_roi_grid", "sample_coord", "sample_range", "roi_level")),
    "csrc/assign/assign_cuda.cu": ("csrc/assign/assign_common.h", ("box_area", "overlap")),
}

ANNOTATION = re.compile(r"htc:max-regs\s+(\w+)\s+(\d+)(?:\s+fp64=(\d+))?")


@dataclasses.dataclass
class KernelUsage:
    mangled: str
    arch: str
    regs: int = 0
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse_ptxas(log):
    """Kernels' resources from `ptxas -v` output: a list of KernelUsage, one per (kernel, arch)."""
    kernels, current, props_of = [], None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            current = KernelUsage(m.group(1), m.group(2))
            kernels.append(current)
            props_of = None
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props_of = m.group(1)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current is not None and props_of == current.mangled:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current.regs = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current.smem = int(s.group(1)) if s else 0
    return kernels


def parse_ceilings(source_text):
    """{kernel name: (ceiling, fp64 ceiling)} from the `htc:max-regs NAME N [fp64=M]` annotations of
    one source (M, for the variants instantiated with double, defaults to N)."""
    return {name: (int(n), int(n64 or n)) for name, n, n64 in ANNOTATION.findall(source_text)}


def kernel_name(mangled, ceilings):
    """The annotated name a mangled kernel belongs to (Itanium names carry `<len><name>`)."""
    hits = [name for name in ceilings if f"{len(name)}{name}" in mangled]
    return max(hits, key=len) if hits else None


def demangle(names):
    """Readable names through c++filt when it exists, else the mangled ones."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not tool or not names:
        return dict(zip(names, names))
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


def variant(readable):
    """The template arguments of a demangled kernel name: `nms_mask_kernel<float>(...)` -> `<float>`."""
    head = readable.replace("(anonymous namespace)", "").split("(", 1)[0]
    return head[head.find("<"):] if "<" in head else ""


def function_lines(header_text, names):
    """{name: (first, last)} 1-based line ranges of the bodies of the named functions."""
    lines = header_text.splitlines()
    ranges = {}
    for name in names:
        start = next((i for i, text in enumerate(lines) if re.search(rf"\b{name}\(", text) and "HTC_HD" in text), None)
        if start is None:
            raise ValueError(f"function {name} not found in the FMA helper header")
        depth, seen = 0, False
        for j in range(start, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            seen = seen or "{" in lines[j]
            if seen and depth == 0:
                ranges[name] = (start + 1, j + 1)
                break
    return ranges


def fusable_ops(ptx, header_path, ranges):
    """(checked, offending): arithmetic instructions of the PTX attributed (.loc, inlined included)
    to `ranges` of `header_path`, and those that are an FMA or a product ptxas may fuse into one."""
    files = {m.group(1): m.group(2) for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', ptx, re.M)}
    ids = {i for i, path in files.items() if os.path.normpath(path).endswith(os.path.normpath(header_path))}
    checked, bad, here = 0, [], None
    for line in ptx.splitlines():
        m = re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", line)
        if m:
            here = (m.group(1), int(m.group(2)))
            continue
        if here is None or here[0] not in ids:
            continue
        if not any(a <= here[1] <= b for a, b in ranges.values()):
            continue
        op = line.strip().split(" ")[0].split("\t")[0]
        if re.match(r"(add|sub|mul|fma|mad|div)\.", op) and re.search(r"\.f(32|64)$", op):
            checked += 1
            if op.startswith(("fma.", "mad.")) or (op.startswith("mul.") and ".rn" not in op):
                bad.append(f"line {here[1]}: {line.strip()}")
    return checked, bad


@functools.cache
def setup_py():
    """setup.py as a module (its __main__ guard keeps it from building): the build's own helpers."""
    spec = importlib.util.spec_from_file_location("htc_fast_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvcc_command(nvcc, source, archs, keep_dir):
    """nvcc with setup.py's flags, device code only, ptxas verbose, intermediates kept."""
    includes = [os.path.join(ROOT, "csrc")] + setup_py().nvidia_wheel_include_dirs() + \
        cpp_extension.include_paths(device_type="cuda")
    cmd = [nvcc, "-fatbin", "-o", os.path.join(keep_dir, "out.fatbin"), source, "-DHTC_FAST_WITH_CUDA",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-std=c++20"]
    cmd += [f"-I{d}" for d in includes] + cpp_extension.COMMON_NVCC_FLAGS + setup_py().nvcc_flags()
    cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return cmd + ["-Xptxas", "-v", "-keep", "-keep-dir", keep_dir]


def compile_one(nvcc, source, archs):
    """(returncode, ptxas log, {arch: ptx text}) for one .cu file."""
    with tempfile.TemporaryDirectory(prefix="htc_res_") as keep:
        proc = subprocess.run(nvcc_command(nvcc, source, archs, keep), capture_output=True, text=True)
        ptx = {}
        for path in glob.glob(os.path.join(keep, "*.ptx")):
            # name.compute_90.ptx per arch; plain name.ptx when only one arch is compiled
            m = re.search(r"compute_(\d+)", os.path.basename(path))
            if m or len(archs) == 1:
                with open(path) as f:
                    ptx[m.group(1) if m else archs[0]] = f.read()
        return proc.returncode, proc.stdout + proc.stderr, ptx


def find_nvcc():
    home = setup_py().find_cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", help="sources (default: every csrc/**/*.cu)")
    ap.add_argument("--arch", nargs="+", default=["80", "90"], help="SM archs (default 80 90)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel nvcc processes")
    args = ap.parse_args(argv)
    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_resources: no CUDA toolkit found (set CUDA_HOME)", file=sys.stderr)
        return 2
    sources = [os.path.relpath(os.path.abspath(f), ROOT) for f in args.files] or \
        sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = dict(zip(sources, pool.map(lambda s: compile_one(nvcc, os.path.join(ROOT, s), args.arch), sources)))

    errors, rows = [], []
    for source, (rc, log, ptx) in results.items():
        if rc != 0:
            errors.append(f"{source}: nvcc failed (exit {rc}):\n{log[-4000:]}")
            continue
        with open(os.path.join(ROOT, source)) as f:
            ceilings = parse_ceilings(f.read())
        kernels = parse_ptxas(log)
        names = demangle([k.mangled for k in kernels])
        used = set()
        for k in kernels:
            name = kernel_name(k.mangled, ceilings)
            readable = names[k.mangled]
            ceiling = ceilings[name][1 if "double" in variant(readable) else 0] if name else None
            used.add(name)
            problems = []
            if ceiling is None:
                problems.append("no htc:max-regs ceiling")
            elif k.regs > ceiling:
                problems.append(f"regs > {ceiling}")
            if k.spill_stores or k.spill_loads:
                problems.append("spills")
            if k.stack:
                problems.append("stack frame")
            label = name or readable.replace("(anonymous namespace)", "").split("(")[0]
            rows.append((os.path.basename(source), label, variant(readable), k.arch, k.regs,
                         "-" if ceiling is None else ceiling, k.smem, k.stack,
                         f"{k.spill_stores}/{k.spill_loads}", "; ".join(problems) or "ok"))
            if problems:
                errors.append(f"{source}: {readable} ({k.arch}): {', '.join(problems)}")
        for name in set(ceilings) - used:
            errors.append(f"{source}: htc:max-regs names {name}, which is not a compiled kernel")
        if source in FMA_CHECKS:
            header, funcs = FMA_CHECKS[source]
            with open(os.path.join(ROOT, header)) as f:
                ranges = function_lines(f.read(), funcs)
            for arch in args.arch:
                checked, bad = fusable_ops(ptx.get(arch, ""), header, ranges)
                print(f"FMA check sm_{arch}: {checked} arithmetic instructions in {', '.join(funcs)}, "
                      f"{len(bad)} fusable")
                if checked == 0:
                    errors.append(f"{header}: no PTX attributed to {funcs} for compute_{arch} (check is blind)")
                errors += [f"{header} (compute_{arch}) contractible product: {b}" for b in bad[:20]]

    header = ("file", "kernel", "variant", "arch", "regs", "max", "smem", "stack", "spill st/ld", "status")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + sorted(rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    for e in errors:
        print(f"ERROR {e}", file=sys.stderr)
    print(f"{len(rows)} kernel variants, {len(errors)} problems", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
