"""Malformed calls to the public ops, for tests/ops/test_fuzz_ops.py (run here in a subprocess).

    python -m tests.ops.fuzz_cases --backend cpp --seed 7 --count 200 [--op roi_align] [--index 13]

Each call starts from a valid call with small random tensors and applies one or two mutations
drawn from the op's list (wrong types, dtypes, ranks, sizes, devices, non-finite or extreme
values, odd layouts). Before running a call the worker prints ``CALL <op> <index>: <what>`` and
flushes, so when the process dies the parent can name the call. A call must either raise one of
our argument errors (``OpArgumentError`` / ``OpTypeError``: "clean") or return a result; on the
"cpp" and "triton" backends that result must equal the reference backend's on the same call
(and the reference must accept the call too). Anything else is reported as ``BAD``. The last line
is a JSON summary: counts per op of clean / ok / bad.
"""
import argparse
import json
import random
import sys

import torch

from htc_fast import ops
from htc_fast.ops import OpArgumentError, OpTypeError

CLEAN = (OpArgumentError, OpTypeError)
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3),
       torch.bfloat16: (2e-2, 1e-2)}


# ----------------------------------------------------------------------------- valid calls

def _boxes(n, scale=40.0):
    xy = torch.rand(n, 2) * scale
    return torch.cat([xy, xy + 1 + torch.rand(n, 2) * scale], 1)


def _rois(k, n, scale=40.0):
    return torch.cat([torch.randint(0, n, (k, 1)).float(), _boxes(k, scale)], 1)


def valid_call(op):
    """(positional args list, kwargs dict) of a valid call of `op` with fresh small tensors."""
    if op == "roi_align":
        return [torch.randn(2, 3, 9, 11), _rois(4, 2), 2], dict(spatial_scale=0.25, sampling_ratio=2, aligned=True)
    if op == "multilevel_roi_align":
        x = torch.randn(2, 3, 12, 12)
        return [[x, x[..., ::2, ::2].contiguous()], _rois(5, 2, 60.0), 2], dict(strides=(4, 8), finest_scale=16)
    if op == "nms":
        return [_boxes(12), torch.rand(12), 0.5], {}
    if op == "batched_nms":
        return [_boxes(12), torch.rand(12), torch.randint(0, 3, (12,)), 0.5], {}
    if op == "batched_nms_padded":
        return [_boxes(12), torch.rand(12), torch.randint(0, 3, (12,)), 0.5], dict(max_output=6, max_group_size=12)
    if op == "nms_padded":
        return [_boxes(12), torch.rand(12), 0.5], dict(max_output=5)
    if op == "multiclass_nms":
        return [_boxes(8), torch.rand(8, 4).softmax(1), 0.05, 0.5, 10], {}
    if op == "multiclass_nms_padded":
        return [_boxes(8), torch.rand(8, 4).softmax(1), 0.05, 0.5, 10], dict(padded=True)
    if op == "deform_conv2d":
        return [torch.randn(1, 4, 5, 6), torch.randn(1, 18, 5, 6), torch.randn(2, 4, 3, 3)], \
            dict(bias=torch.randn(2), padding=1, mask=torch.rand(1, 9, 5, 6))
    if op in ("paste_masks", "paste_masks_rle"):
        return [torch.rand(3, 7, 7), _boxes(3, 10.0), (16, 20)], dict(threshold=0.5)
    if op == "htc_mask_probs":
        return [[torch.randn(3, 4, 5, 5) for _ in range(2)], torch.randint(0, 4, (3,))], {}
    if op == "map_roi_levels":
        return [_rois(6, 1, 300.0), 4], dict(finest_scale=56)
    if op == "max_iou_assign":
        thresholds = [(0.5, 0.0, 0.4, 0.3), (0.6, 0.1, 0.6, 0.6)]  # tuples: mutated by _mutations' own branch
        return [_boxes(10, 10.0).view(2, 5, 4), _boxes(6, 10.0).view(2, 3, 4), thresholds], \
            dict(gt_labels=torch.randint(0, 4, (2, 3)), valid=torch.rand(2, 5) > 0.2,
                 gt_valid=torch.tensor([[True, True, False], [True, False, False]]), gt_max_assign_all=False)
    raise KeyError(op)


OPS = ["roi_align", "multilevel_roi_align", "nms", "nms_padded", "batched_nms", "batched_nms_padded",
       "multiclass_nms", "multiclass_nms_padded", "deform_conv2d", "paste_masks", "paste_masks_rle",
       "htc_mask_probs", "map_roi_levels", "max_iou_assign"]
NO_BACKEND = ("htc_mask_probs", "map_roi_levels")


def run(op, args, kwargs, backend):
    fn = getattr(ops, op[:-len("_padded")] if op.endswith("_padded") else op)
    if op in NO_BACKEND:
        return fn(*args, **kwargs)
    return fn(*args, **kwargs, backend=backend)


# ----------------------------------------------------------------------------- mutations

NUMBERS = [None, "0.5", -1, 0, 1, 2.5, 1e30, -1e30, float("nan"), float("inf"), -float("inf"), 2 ** 40,
           -(2 ** 40), True, [1, 2], (1, 2, 3), (), torch.tensor(2)]


def _tensor_mutations(t):
    """(name, new value) of mutations of a tensor argument."""
    out = [("None", None), ("str", "x"), ("int", 3), ("list", t.tolist() if t.numel() < 64 else [1.0]),
           ("int64", t.long()), ("bool", t > 0), ("float16", t.half()), ("bfloat16", t.bfloat16()),
           ("float64", t.double()), ("complex", t.to(torch.complex64)), ("meta", t.to("meta")),
           ("scalar tensor", torch.tensor(1.0)), ("add a dim", t[None]), ("empty", t[:0])]
    if t.dim() > 0:
        out += [("drop a dim", t[0]), ("first dim +1", torch.cat([t, t[:1]])),
                ("expanded view", t[:1].expand_as(t)),
                ("nan", t.float().masked_fill(torch.rand(t.shape) < 0.3, float("nan")).to(t.dtype)
                 if t.is_floating_point() else t),
                ("inf", t.float().masked_fill(torch.rand(t.shape) < 0.3, float("inf")).to(t.dtype)
                 if t.is_floating_point() else t),
                ("huge values", t * 1e30 if t.is_floating_point() else t * 2 ** 40),
                ("negated", ~t if t.dtype == torch.bool else -t)]
    if t.dim() > 1:
        out += [("last dim +1", torch.cat([t, t[..., :1]], -1)), ("last dim -1", t[..., :-1]),
                ("non-contiguous", t.transpose(-1, -2).contiguous().transpose(-1, -2)),
                ("giant expanded view", t.flatten()[:1].reshape([1] * t.dim()).expand(*t.shape[:-1], 2 ** 31))]
    return out


def _mutations(value):
    if isinstance(value, torch.Tensor):
        return _tensor_mutations(value)
    if isinstance(value, list) and value and isinstance(value[0], tuple):  # max_iou_assign's threshold sets
        first = value[0]
        return [("empty list", []), ("flat", list(first)), ("9 sets", [first] * 9), ("8 sets", [first] * 8),
                ("a set of 3", [first[:3]]), ("a set of 5", [first + (0.1,)]), ("not a list", first[0])] + \
            [(f"[0][{j}] {v!r}", [first[:j] + (v,) + first[j + 1:]] + value[1:]) for j in range(4) for v in NUMBERS]
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return [("empty list", []), ("tuple", tuple(value)), ("one more", value + value[:1]),
                ("not a list", value[0])] + \
            [(f"[0] {name}", [new] + value[1:]) for name, new in _tensor_mutations(value[0])] + \
            [(f"[-1] {name}", value[:-1] + [new]) for name, new in _tensor_mutations(value[-1])]
    return [(repr(v), v) for v in NUMBERS]


# Mutations too slow to run under the Triton interpreter: RoIs scaled by 1e30 make the sampling
# loops visit ~10^3 x 10^3 candidate samples per bin (fp32 rounding at that magnitude widens the
# conservative in-map range), microseconds on a GPU but many minutes of interpreted Python.
INTERPRETER_SKIPS = {"roi_align": {"arg 1: huge values", "spatial_scale: 1e+30", "spatial_scale: 1099511627776"},
                     "multilevel_roi_align": {"arg 1: huge values"}}


def mutated_call(op, rng, skip=frozenset()):
    """(description, args, kwargs): a valid call of `op` with one or two arguments mutated; a draw
    whose description is in `skip` is replaced by the next draw."""
    while True:
        what, args, kwargs = _draw_call(op, rng)
        if not skip.intersection(what.split("; ")):
            return what, args, kwargs


def _draw_call(op, rng):
    args, kwargs = valid_call(op)
    keys = [("arg", i) for i in range(len(args))] + [("kw", k) for k in kwargs]
    if op not in NO_BACKEND:
        keys.append(("kw", "backend?"))  # not a real argument: stands for an unknown keyword
    what = []
    for kind, key in rng.sample(keys, rng.choice((1, 1, 2))):  # two distinct arguments at most
        if key == "backend?":
            kwargs["unknown_argument"] = 1
            what.append("unknown_argument=1")
            continue
        current = args[key] if kind == "arg" else kwargs[key]
        name, new = rng.choice(_mutations(current))
        if kind == "arg":
            args[key] = new
        else:
            kwargs[key] = new
        what.append(f"{'arg ' + str(key) if kind == 'arg' else key}: {name}")
    return "; ".join(what), args, kwargs


# ----------------------------------------------------------------------------- checking a result

def same(a, b):
    """None if `a` (backend) equals `b` (reference) as the ops define it, else what differs."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        for x, y in zip(a, b):
            why = same(x, y)
            if why:
                return why
        return None if len(a) == len(b) else "lengths differ"
    if isinstance(a, list):
        return None if a == b else "lists differ"
    if not isinstance(a, torch.Tensor):
        return None if a == b else f"{a!r} != {b!r}"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype} {tuple(a.shape)} vs reference {b.dtype} {tuple(b.shape)}"
    if not a.is_floating_point():
        return None if torch.equal(a, b) else "values differ"
    rtol, atol = TOL[a.dtype]
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)  # the spec lets a non-finite feature spread within its RoI / window
    if not torch.equal(torch.isfinite(a) | ~finite, torch.ones_like(finite)):
        return "non-finite where the reference is finite"
    if not bool(finite.any()):
        return None
    # Normwise: summation order is free, so the error scales with the largest value (1e30 features
    # cancel differently in two orders), not with each element.
    error, scale = float((a - b)[finite].abs().max()), float(b[finite].abs().max())
    return None if error <= atol + rtol * scale else f"max difference {error:.3g} (largest value {scale:.3g})"


def check(op, backend, args, kwargs):
    """'clean', 'ok', or 'BAD: why'."""
    try:
        out = run(op, args, kwargs, backend)
    except CLEAN:
        return "clean"
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc) and "unknown_argument" in kwargs:
            return "clean"  # Python's own refusal of an unknown keyword names it
        return f"BAD: {type(exc).__name__}: {exc}"[:400]
    except Exception as exc:  # noqa: BLE001 - the point is to report any other exception
        return f"BAD: {type(exc).__name__}: {exc}"[:400]
    if backend == "reference" or op in NO_BACKEND:
        return "ok"
    try:
        expected = run(op, args, kwargs, "reference")
    except Exception as exc:  # noqa: BLE001
        return f"BAD: {backend} accepted a call the reference refuses ({type(exc).__name__}: {exc})"[:400]
    why = same(out, expected)
    return "ok" if why is None else f"BAD: differs from the reference: {why}"


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--op", action="append")
    parser.add_argument("--index", type=int, help="run only this call (to reproduce one)")
    a = parser.parse_args(argv)
    summary = {}
    for op in a.op or OPS:
        rng = random.Random(f"{a.seed}/{op}")
        counts = summary.setdefault(op, {"clean": 0, "ok": 0, "bad": 0})
        for index in range(a.count):
            torch.manual_seed(random.Random(f"{a.seed}/{op}/{index}").randrange(2 ** 31))
            skip = INTERPRETER_SKIPS.get(op, set()) if a.backend == "triton" else set()
            what, args, kwargs = mutated_call(op, rng, frozenset(skip))
            if a.index is not None and index != a.index:
                continue
            print(f"CALL {op} {index}: {what}", flush=True)
            result = check(op, a.backend, args, kwargs)
            counts["bad" if result.startswith("BAD") else result] += 1
            if result.startswith("BAD"):
                print(f"  {result}", flush=True)
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
