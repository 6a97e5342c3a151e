"""Typed command-line overrides of the frozen config dataclasses: "dotted.path=value".

Used by `htc_fast.config.get_config` and the command-line tools (`--set train.lr=0.01`).
"""
from __future__ import annotations

import ast
import dataclasses
import typing
from typing import Literal


def apply_overrides(cfg, overrides: typing.Sequence[str]):
    """Returns `cfg` with each "dotted.path=value" applied, type-checked against the field.

    Paths walk dataclass fields and, for tuples of dataclasses, integer indices
    (`model.roi.stages.1.iou_threshold=0.65`). Values are Python literals (`0.01`, `(8, 11)`,
    `True`); strings may be given unquoted; `true`/`false` are accepted for bools. ints are
    accepted where floats are expected. Raises ValueError naming the field on any mismatch.
    """
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form dotted.path=value")
        cfg = _set_path(cfg, key.split("."), raw.strip(), key)
    return cfg


def _set_path(obj, parts: list[str], raw: str, full: str):
    head, rest = parts[0], parts[1:]
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(type(obj))
        names = [f.name for f in dataclasses.fields(obj)]
        if head not in names:
            raise ValueError(f"override {full!r}: {type(obj).__name__} has no field {head!r} "
                             f"(fields: {', '.join(names)})")
        current = getattr(obj, head)
        if rest:
            new = _set_path(current, rest, raw, full)
        else:
            if dataclasses.is_dataclass(current):
                raise ValueError(f"override {full!r}: {head!r} is a config section; "
                                 "set one of its fields instead")
            new = _parse_value(raw, hints[head], full)
        return dataclasses.replace(obj, **{head: new})
    if isinstance(obj, tuple) and head.isdigit() and int(head) < len(obj):
        i = int(head)
        if not rest:
            raise ValueError(f"override {full!r}: set a field of element {i}, not the element")
        return obj[:i] + (_set_path(obj[i], rest, raw, full),) + obj[i + 1:]
    raise ValueError(f"override {full!r}: cannot descend into {head!r} of a "
                     f"{type(obj).__name__}")


def _parse_value(raw: str, tp, full: str):
    if tp is bool and raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if not _accepts_str(tp):
            raise ValueError(f"override {full!r}: cannot parse {raw!r} as "
                             f"{_type_name(tp)}") from None
        value = raw  # an unquoted string
    return _check_type(value, tp, full)


def _accepts_str(tp) -> bool:
    if typing.get_origin(tp) is Literal:
        return any(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _check_type(value, tp, full: str):
    """Returns `value` converted to `tp` (int -> float, list -> tuple) or raises ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ValueError(f"override {full!r}: expected {_type_name(tp)}, got {value!r} "
                     f"({type(value).__name__})")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"override {full!r}: expected one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(v, args[0], full) for v in value)
        if len(value) != len(args):
            raise ValueError(f"override {full!r}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_type(v, a, full) for v, a in zip(value, args))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if origin is typing.Union or type(tp).__name__ == "UnionType":
        for option in args:
            try:
                return _check_type(value, option, full)
            except ValueError:
                pass
        raise bad
    raise ValueError(f"override {full!r}: fields of type {_type_name(tp)} cannot be overridden")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)
