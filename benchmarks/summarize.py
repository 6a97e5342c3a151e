"""Turn pytest-benchmark JSON into a short markdown report of medians and speedups.

Usage::

    python benchmarks/summarize.py results.json [more.json ...] > benchmarks/results/<name>.md

Each benchmark is compared with the baseline of its pytest-benchmark group (the case whose
``extra_info["role"] == "baseline"``, as bench_*.py record it):

    speedup = baseline_median / case_median        (> 1: faster than the baseline)

Medians, not means: on a shared machine a few slow rounds are noise, not the kernel. The report has
one table per device: a row per (op, case, implementation, dtype), a column per direction
(fwd, bwd, fwd+bwd), each cell "median · speedup", and on CUDA the peak memory per direction.
Benchmarks without htc_fast's extra_info still appear, one column "time", named by their test name.
"""
import argparse
import json
import platform
import sys
from collections import OrderedDict

DIRECTIONS = ("fwd", "bwd", "fwdbwd")
DIRECTION_TITLES = {"fwd": "fwd", "bwd": "bwd", "fwdbwd": "fwd+bwd", "time": "time"}
IMPL_ORDER = ("torchvision", "torchvision-loop", "reference", "cpp", "triton")
DTYPE_ORDER = ("fp32", "fp16", "bf16")


def load(paths):
    """(benchmarks, machine_info, other metadata) from one or more JSON files, merged in order."""
    benchmarks, machine, meta = [], {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        benchmarks += data.get("benchmarks", [])
        machine = machine or data.get("machine_info", {})
        meta = meta or {"datetime": data.get("datetime"), "commit": data.get("commit_info", {})}
    return benchmarks, machine, meta


def fmt_time(seconds):
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms" if seconds < 0.1 else f"{seconds * 1e3:.0f} ms"
    return f"{seconds * 1e6:.3g} µs"


def speedups(benchmarks):
    """{fullname: (speedup or None, baseline label or None)}, against each group's baseline."""
    baselines = {}
    for b in benchmarks:
        if b.get("extra_info", {}).get("role") == "baseline":
            baselines.setdefault(b.get("group"), b)  # first one wins if a group has two
    out = {}
    for b in benchmarks:
        base = baselines.get(b.get("group"))
        if base is None:
            out[b["fullname"]] = (None, None)
            continue
        info = base.get("extra_info", {})
        label = " ".join(str(info[k]) for k in ("impl", "dtype") if k in info) or base["name"]
        out[b["fullname"]] = (base["stats"]["median"] / b["stats"]["median"], label)
    return out


def _row_key(b):
    info = b.get("extra_info", {})
    if "direction" not in info:  # not one of ours: one row per benchmark
        return (info.get("device", "?"), b["name"], "", "", "", "time")
    return (info.get("device", "?"), info.get("op", ""), info.get("case", ""), info.get("impl", ""),
            info.get("dtype", ""), info["direction"])


def _order(key):
    """Sort rows: op and case as given, then fp32 before 16-bit, baseline impls first."""
    _, _, _, impl, dtype, _ = key
    return (DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else 9,
            IMPL_ORDER.index(impl) if impl in IMPL_ORDER else 9, impl, dtype)


def device_table(rows, ratios, device):
    """The markdown lines for one device. rows: {(op, case, impl, dtype): {direction: bench}}."""
    directions = [d for d in (*DIRECTIONS, "time") if any(d in cells for cells in rows.values())]
    with_mem = device == "cuda" and any("peak_mem_bytes" in b.get("extra_info", {})
                                        for cells in rows.values() for b in cells.values())
    head = ["op", "case", "impl", "dtype", "baseline"] + [DIRECTION_TITLES[d] for d in directions]
    if with_mem:
        head.append("peak MiB (" + " / ".join(DIRECTION_TITLES[d] for d in directions) + ")")
    # Dispatched ops (of them, kernel ops) and host syncs per call (bench_model / bench_train record them).
    with_counts = any("ops" in b.get("extra_info", {}) for cells in rows.values() for b in cells.values())
    if with_counts:
        head.append("ops (kernel ops) / syncs")
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < 5 else "---:" for i in range(len(head))) + "|"]
    for (op, case, impl, dtype), cells in rows.items():
        base_label, values = "—", []
        for d in directions:
            b = cells.get(d)
            if b is None:
                values.append("—")
                continue
            ratio, label = ratios[b["fullname"]]
            median = fmt_time(b["stats"]["median"])
            if b.get("extra_info", {}).get("role") == "baseline":
                values.append(f"{median} · base")
                base_label = "(itself)"
            elif ratio is None:  # its group has no baseline (e.g. the baseline case failed)
                values.append(median)
            else:
                values.append(f"{median} · **{ratio:.2f}×**")
                base_label = label
        row = [op, case, impl, dtype, base_label] + values
        if with_mem:
            mem = [cells[d].get("extra_info", {}).get("peak_mem_bytes") if d in cells else None
                   for d in directions]
            row.append(" / ".join("—" if m is None else f"{m / 2**20:.0f}" for m in mem))
        if with_counts:
            info = next((b.get("extra_info", {}) for b in cells.values() if "ops" in b.get("extra_info", {})), {})
            kernel = f" ({info['kernel_ops']:,})" if "kernel_ops" in info else ""
            row.append(f"{info['ops']:,}{kernel} / {info['syncs']}" if info else "—")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render(benchmarks, machine, meta):
    ratios = speedups(benchmarks)
    by_device = OrderedDict()
    for b in benchmarks:
        device, *key, direction = _row_key(b)
        by_device.setdefault(device, {}).setdefault(tuple(key), {})[direction] = b

    names = {}
    for b in benchmarks:
        info = b.get("extra_info", {})
        names.setdefault(info.get("device", "?"), info.get("device_name"))
    title = ", ".join(f"{names[d] or d}" for d in by_device) or "no benchmarks"
    commit = meta.get("commit") or {}
    rounds = sorted({b["stats"]["rounds"] for b in benchmarks})

    out = [f"# Benchmarks: {title}", ""]
    out.append(f"- date: {meta.get('datetime') or '?'}; commit {str(commit.get('id', '?'))[:10]}"
               + (" (dirty tree)" if commit.get("dirty") else ""))
    cpu = machine.get("cpu_name") or (machine.get("cpu") or {}).get("brand_raw") or platform.processor()
    out.append(f"- cpu: {cpu} ({machine.get('torch_threads', '?')} torch threads);"
               f" cuda: {machine.get('cuda_device') or 'none'}")
    out.append(f"- torch {machine.get('torch', '?')} (CUDA {machine.get('torch_cuda') or 'none'}),"
               f" torchvision {machine.get('torchvision', '?')}, triton {machine.get('triton', '?')};"
               f" htc_fast._C loaded: {machine.get('htc_fast_C', '?')},"
               f" CUDA archs: {machine.get('htc_fast_cuda_archs') or 'none'}")
    out.append(f"- cells: median of {'/'.join(map(str, rounds))} rounds · speedup = baseline median"
               " / this median (> 1 is faster); the baseline is named per row")
    loads = [b["extra_info"]["loadavg_1m"] for b in benchmarks
             if b.get("extra_info", {}).get("device") == "cpu" and "loadavg_1m" in b["extra_info"]]
    if loads:  # others' processes on the machine skew the CPU cases: say how busy it was
        cores = (machine.get("cpu") or {}).get("count", "?")
        out.append(f"- 1-minute load average after each CPU case: {min(loads):.1f} to "
                   f"{max(loads):.1f} on {cores} cores (above the torch thread count, other "
                   "processes competed for the cores)")
    for device, rows in by_device.items():
        ordered = OrderedDict()
        for op_case in dict.fromkeys(k[:2] for k in rows):  # op/case in first-seen order
            for key in sorted((k for k in rows if k[:2] == op_case),
                              key=lambda k: _order((device, *k, ""))):
                ordered[key] = rows[key]
        out += ["", f"## {device}: {names.get(device) or device}", ""]
        out += device_table(ordered, ratios, device)
    return "\n".join(out) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output(s)")
    args = parser.parse_args(argv)
    try:
        benchmarks, machine, meta = load(args.json)
    except (OSError, ValueError) as exc:  # a missing or truncated JSON (a run cut short)
        print(f"summarize.py: cannot read benchmark JSON: {exc}", file=sys.stderr)
        return 1
    if not benchmarks:
        print(f"summarize.py: no benchmarks in {', '.join(args.json)}", file=sys.stderr)
        return 1
    sys.stdout.write(render(benchmarks, machine, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
