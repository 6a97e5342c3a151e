"""Count dispatched ops and host-synchronisation points of a block of code.

    from htc_fast.diagnostics import count_ops

    with count_ops() as c:
        loss = model(batch, targets).total()
        loss.backward()
    print(c.ops, c.syncs, c.sync_breakdown, c.top_ops(10))

What is counted
---------------
``ops``: every operator call that reaches the dispatcher below autograd (a ``TorchDispatchMode``
sees it): aten ops of the forward *and* of the backward (the autograd engine carries the mode to
the backward), and the project's custom ops (``htc_fast::*``). Composite ops count as the ops they
decompose into. On a GPU each is at least one kernel launch plus some microseconds of host work,
so this is the "launch count" of a step. It does not depend on the device or on the input size
(except through data-dependent control flow), which is why tests may pin it.

``kernel_ops``: the ops that compute: ``ops`` less the views and metadata-only ops (``detach``,
``view``, ``slice``, ``select``, ``unsqueeze``, ``expand``, ``permute``, ``t``, ``_unsafe_view``,
``lift_fresh``, ...: any op whose schema returns an alias of an input), which change a tensor's
shape or strides on the host and launch nothing on a GPU. Each kernel op launches at least one
kernel there (an allocation-only op such as ``empty`` launches none), so this is the closer
proxy for launches; ``ops`` adds the host work of the views (autograd makes one ``detach`` per
trainable tensor and per saved output).

``syncs``: points where the host must wait for the device's result (on a GPU the queue drains and
the host stops running ahead). Counted on any device with CUDA semantics in mind, so a CPU run
predicts a GPU run. A sync point is one of:

- ``item``, ``bool``, ``int``, ``float``, ``index``: a Python scalar read from a tensor
  (``t.item()``, ``if t:``, ``int(t)``, ``float(t)``, ``range(t)``; all are
  ``aten::_local_scalar_dense`` underneath); ``tolist`` / ``numpy``: a tensor read as host data
  (free on CPU, a device->host copy on CUDA). Each Python-level read counts once.
- ``nonzero``, ``unique``, ``masked_select``, ``bincount``: ops whose output size is the data's
  (the host needs the size to allocate the output).
- ``bool_mask_index``: ``x[mask]`` with a bool/uint8 mask (a nonzero inside ``aten::index``);
  ``bool_index_put``: ``x[mask] = v`` (``aten::index_put_`` with a bool mask).
- ``repeat_interleave``: ``repeat_interleave(repeats_tensor)`` without ``output_size``.
- ``masked_fill_tensor_value``: ``masked_fill`` with a tensor fill value (CUDA reads it with
  ``.item()``).
- ``equal``: ``torch.equal`` (returns a Python bool).
- ``device_to_host``: a copy from a non-CPU tensor to the CPU (``.cpu()``, ``.to("cpu")``).
- ``data_dependent_op``: a custom op whose output size depends on the data
  (``htc_fast::nms``, ``htc_fast::batched_nms``; more via ``count_ops(data_dependent_ops=...)``).
- ``cuda:<op>``: on CUDA only, any other op during which ``torch.cuda.set_sync_debug_mode``
  reports a synchronising CUDA call (syncs inside our C++/CUDA code, e.g. reading a count).

What is not counted: syncs inside custom C++ code on CPU (no way to see them there; on CUDA the
sync debug mode catches them), the allocator's own synchronisations, and anything outside the
block.
"""
import collections
import contextlib
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_ops", "OpCounts", "SyncEvent", "DATA_DEPENDENT_OPS"]

# Custom ops whose output size is the data's: calling one makes the host wait for the device.
DATA_DEPENDENT_OPS = frozenset({"htc_fast::nms", "htc_fast::batched_nms",
                                "htc_fast::nms_triton", "htc_fast::batched_nms_triton"})

# Tensor methods that read device data into Python on the host -> kind of sync.
_HOST_READS = {
    torch.Tensor.item: "item", torch.Tensor.__bool__: "bool", torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float", torch.Tensor.__index__: "index", torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
}

# aten op packets that always sync (their output size or value is read on the host).
_ALWAYS_SYNC = {
    "aten::_local_scalar_dense": "item",
    "aten::nonzero": "nonzero",
    "aten::argwhere": "nonzero",
    "aten::_unique": "unique",
    "aten::_unique2": "unique",
    "aten::unique_dim": "unique",
    "aten::unique_consecutive": "unique",
    "aten::unique_dim_consecutive": "unique",
    "aten::masked_select": "masked_select",
    "aten::bincount": "bincount",
    "aten::equal": "equal",
    "aten::is_nonzero": "bool",
}

# Ops that only make a new tensor header over the same storage but whose schema does not say it.
_METADATA_ONLY = frozenset({"aten::_unsafe_view", "aten::lift_fresh", "aten::_reshape_alias"})

_SYNC_WARNING = "synchroniz"  # torch.cuda.set_sync_debug_mode's message: "called a synchronizing CUDA operation"


@dataclass(frozen=True)
class SyncEvent:
    """One sync point: its kind, the op that caused it, and the innermost caller outside torch."""

    kind: str
    op: str
    where: str


@dataclass
class OpCounts:
    """The counts of one ``count_ops`` block (filled in while the block runs)."""

    ops: int = 0
    views: int = 0  # of ops: views and metadata-only ops (no kernel; see the module docstring)
    op_counts: collections.Counter = field(default_factory=collections.Counter)
    events: list[SyncEvent] = field(default_factory=list)
    op_sites: collections.Counter = field(default_factory=collections.Counter)  # with count_ops(op_sites=True)

    @property
    def kernel_ops(self) -> int:
        """The ops that are not views: each launches at least one kernel on a GPU (see above)."""
        return self.ops - self.views

    @property
    def syncs(self) -> int:
        return len(self.events)

    @property
    def sync_breakdown(self) -> dict[str, int]:
        """kind -> count, most frequent first."""
        return dict(collections.Counter(e.kind for e in self.events).most_common())

    def top_ops(self, n: int = 20) -> list[tuple[str, int]]:
        """The n most frequently dispatched ops as (name, count)."""
        return self.op_counts.most_common(n)

    def sync_sites(self, n: int = 20) -> list[tuple[str, int]]:
        """The n most frequent (kind @ caller) sync sites as (description, count)."""
        return collections.Counter(f"{e.kind} ({e.op}) @ {e.where}" for e in self.events).most_common(n)

    def top_op_sites(self, n: int = 20) -> list[tuple[str, int]]:
        """The n callers that dispatched the most ops, as ("file:line (function)", count); needs
        ``count_ops(op_sites=True)``. For finding what to fuse."""
        return self.op_sites.most_common(n)

    def report(self, n: int = 15) -> str:
        """A human-readable summary: totals, sync breakdown and sites, top ops."""
        lines = [f"ops={self.ops} kernel_ops={self.kernel_ops} syncs={self.syncs} breakdown={self.sync_breakdown}",
                 "sync sites:"]
        lines += [f"  {c:5d}  {s}" for s, c in self.sync_sites(n)]
        lines.append("top ops:")
        lines += [f"  {c:5d}  {name}" for name, c in self.top_ops(n)]
        if self.op_sites:
            lines.append("top op sites:")
            lines += [f"  {c:5d}  {site}" for site, c in self.top_op_sites(n)]
        return "\n".join(lines)


def _caller() -> str:
    """The innermost stack frame that is not torch's or this file's, as "file:line (function)"."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        if not ("/torch/" in name or name.endswith("diagnostics/op_counter.py") or "/contextlib.py" in name):
            parts = name.split("/")
            short = "/".join(parts[-3:]) if len(parts) >= 3 else name
            return f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _is_mask(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)


def _op_sync_kind(name: str, func, args, kwargs, data_dependent) -> Optional[str]:
    """The kind of sync this op call is, or None."""
    if name in _ALWAYS_SYNC:
        return _ALWAYS_SYNC[name]
    if name in data_dependent:
        return "data_dependent_op"
    if name == "aten::index":
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return "bool_mask_index" if any(_is_mask(i) for i in indices) else None
    if name in ("aten::index_put", "aten::index_put_", "aten::_index_put_impl"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return "bool_index_put" if any(_is_mask(i) for i in indices) else None
    if name == "aten::repeat_interleave":
        # Only the tensor-repeats overloads need the sum of repeats; output_size is keyword-only.
        if func._overloadname.startswith("self_int") or kwargs.get("output_size") is not None:
            return None
        return "repeat_interleave"
    if name in ("aten::masked_fill", "aten::masked_fill_") and func._overloadname == "Tensor":
        # A fill value on the tensor's device is read with .item() by the CUDA kernel.
        value = args[2] if len(args) > 2 else kwargs.get("value")
        if isinstance(value, torch.Tensor) and value.device == args[0].device:
            return "masked_fill_tensor_value"
    if name in ("aten::_to_copy", "aten::copy_", "aten::_copy_from"):
        src = args[1] if name == "aten::copy_" else args[0]
        dst_device = None
        if name == "aten::_to_copy":
            dst_device = kwargs.get("device")
        elif isinstance(args[0], torch.Tensor) and name == "aten::copy_":
            dst_device = args[0].device
        if (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta")
                and dst_device is not None and torch.device(dst_device).type == "cpu"):
            return "device_to_host"
    return None


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: OpCounts, state: "_State"):
        super().__init__()
        self.counts, self.state = counts, state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.counts.ops += 1
        if func.is_view or name in _METADATA_ONLY:
            self.counts.views += 1
        self.counts.op_counts[name.split("::")[-1] if name.startswith("aten::") else name] += 1
        if self.state.op_sites:
            self.counts.op_sites[_caller()] += 1
        kind = _op_sync_kind(name, func, args, kwargs, self.state.data_dependent)
        warned_before = len(self.state.warnings) if self.state.warnings is not None else 0
        out = func(*args, **kwargs)
        if kind is None and self.state.warnings is not None:
            new = self.state.warnings[warned_before:]
            if any(_SYNC_WARNING in str(w.message) for w in new):
                kind = f"cuda:{name}"
        if kind is not None:
            self.state.record(kind, name)
        return out


class _FunctionCounter(TorchFunctionMode):
    """Names Python-level host reads (item/bool/tolist/...) and counts each once, so that
    ``if t:`` is reported as "bool" rather than as the ``_local_scalar_dense`` it dispatches."""

    def __init__(self, state: "_State"):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _HOST_READS.get(func)
        if kind is None or self.state.reading is not None:
            return func(*args, **kwargs)
        self.state.reading = kind
        try:
            return func(*args, **kwargs)
        finally:
            self.state.reading = None
            self.state.record(kind, f"Tensor.{func.__name__}", force=True)


class _State:
    def __init__(self, counts: OpCounts, data_dependent, op_sites: bool = False):
        self.counts = counts
        self.op_sites = op_sites
        self.data_dependent = data_dependent
        self.reading: Optional[str] = None  # inside a Python-level host read: its op syncs are its own
        self.warnings: Optional[list] = None

    def record(self, kind: str, op: str, force: bool = False):
        if self.reading is not None and not force:
            return  # attributed to the enclosing Python-level read
        self.counts.events.append(SyncEvent(kind, op, _caller()))


@contextlib.contextmanager
def count_ops(*, data_dependent_ops: Iterable[str] = (), cuda_sync_debug: bool = True, op_sites: bool = False):
    """Count the dispatched ops and sync points of the block (see the module docstring).

    Args:
        data_dependent_ops: extra custom op names ("namespace::name") whose output size is
            data-dependent; added to ``DATA_DEPENDENT_OPS``.
        cuda_sync_debug: on a machine with CUDA, also run ``torch.cuda.set_sync_debug_mode("warn")``
            and count ops during which CUDA reports a synchronising call.
        op_sites: also record the caller of every op (``OpCounts.top_op_sites``; slower).

    Yields:
        OpCounts, filled in as the block runs (read it after the block).
    """
    counts = OpCounts()
    state = _State(counts, frozenset(DATA_DEPENDENT_OPS) | frozenset(data_dependent_ops), op_sites)
    use_cuda_debug = cuda_sync_debug and torch.cuda.is_available()
    with contextlib.ExitStack() as stack:
        if use_cuda_debug:
            stack.callback(_reissue, state)  # runs after catch_warnings has exited
            state.warnings = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            stack.callback(torch.cuda.set_sync_debug_mode, previous)
        stack.enter_context(_FunctionCounter(state))
        stack.enter_context(_DispatchCounter(counts, state))
        yield counts


def _reissue(state: _State):
    """Re-emit the warnings the block raised that were not CUDA sync reports."""
    for w in state.warnings or ():
        if _SYNC_WARNING not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
