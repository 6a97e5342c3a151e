"""Diagnostics for the hot path: ``count_ops`` counts dispatched ops and host syncs of a block."""
from htc_fast.diagnostics.op_counter import DATA_DEPENDENT_OPS, OpCounts, SyncEvent, count_ops

__all__ = ["count_ops", "OpCounts", "SyncEvent", "DATA_DEPENDENT_OPS"]
