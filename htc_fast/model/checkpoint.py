"""Loading and saving weights: mmdetection checkpoints, htc_fast checkpoints, ImageNet backbones.

What it owns: recognising the three checkpoint formats, mapping their keys onto a model whose
state-dict keys follow mmdetection's names (`backbone.*`, `neck.*`, `rpn_head.*`, `roi_head.*`),
comparing keys and shapes, and reporting (or, in strict mode, refusing) every difference.
What it does not own: building the model, optimizer state, the training loop's resume logic.

Formats:
  "mmdet"       `{"state_dict": {...}, "meta": {...}, ...}` as released by mmdetection (a bare
                state dict with mmdet keys is accepted too). Keys are used as they are.
  "htc_fast"    `{"model": {...}, "meta": {"format": "htc_fast", ...}, ...}`, written by
                `save_checkpoint` (and the training loop). Keys are used as they are.
  "torchvision" ImageNet ResNet/ResNeXt weights with torchvision's names (`conv1.weight`,
                `layer1.0.bn1.running_mean`, `fc.weight`, ...), bare or wrapped in
                `{"state_dict": ...}` (open-mmlab's ResNeXt files). Mapped to `backbone.<key>`
                (or used as they are when the model is a bare backbone); `fc.*` is skipped; only
                the model's backbone keys are expected, and DCN offset convs keep their zero init.
A leading `module.` (DistributedDataParallel) is stripped in every format, and mmdetection v1's
DCN offset keys (`layer2.0.conv2_offset.weight`) are renamed to mmcv's current layout
(`layer2.0.conv2.conv_offset.weight`) when the model has the latter.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

SOURCES = ("auto", "mmdet", "htc_fast", "torchvision")
_MAX_LISTED = 20  # keys listed per category in an error message


@dataclasses.dataclass
class LoadReport:
    """What `load_checkpoint` found.

    missing: model keys the checkpoint should have provided but did not.
    unexpected: checkpoint keys (after mapping) that the model does not have.
    shape_mismatches: (key, checkpoint shape, model shape) for keys present in both.
    skipped: checkpoint keys deliberately not loaded (the ImageNet classifier `fc.*`).
    kept_init: model keys deliberately left at their initial value (DCN offsets when loading
        ImageNet weights; `num_batches_tracked` absent from old checkpoints is filled with 0).
    renamed: (old, new) legacy keys renamed (mmdetection v1 DCN offsets `conv2_offset.*`).
    loaded: number of tensors copied into the model.
    """
    source: str
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
        default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    kept_init: list[str] = dataclasses.field(default_factory=list)
    renamed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def describe(self) -> str:
        lines = [f"checkpoint ({self.source}): {self.loaded} tensors loaded"]
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                             ("shape mismatch", [f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}"
                                                 for k, a, b in self.shape_mismatches])):
            if items:
                lines.append(f"  {len(items)} {title} key(s):")
                lines += [f"    {k}" for k in items[:_MAX_LISTED]]
                if len(items) > _MAX_LISTED:
                    lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
        return "\n".join(lines)


class CheckpointMismatchError(ValueError):
    """Raised by `load_checkpoint(strict=True)`; `.report` holds the full LoadReport, `path` the
    file it was read from (None for an already-loaded dict)."""

    def __init__(self, report: LoadReport, path: str | os.PathLike | None = None):
        super().__init__(report.describe() if path is None else f"{os.fspath(path)}: {report.describe()}")
        self.report, self.path = report, path


def load_checkpoint(model: nn.Module, path_or_dict: str | os.PathLike | Mapping[str, Any], *,
                    strict: bool = True, source: str = "auto",
                    weights_only: bool = True) -> LoadReport:
    """Loads weights into `model` in place and returns a LoadReport.

    Args:
        model: any module whose state-dict keys follow mmdetection's names (a full HTC, a
            container with `backbone`/`neck` children, or a bare backbone).
        path_or_dict: a file written by torch.save, or the already-loaded object.
        strict: raise CheckpointMismatchError (listing missing, unexpected and shape-mismatched
            keys) before touching the model if anything differs. Non-strict loads every key
            whose shape matches and reports the rest.
        source: "auto" (detect, see the module docstring), "mmdet", "htc_fast" or "torchvision".
        weights_only: passed to torch.load. mmdetection 3.x checkpoints pickle mmengine objects
            in their `message_hub`; load those with weights_only=False only if you trust the file.
    """
    if source not in SOURCES:
        raise ValueError(f"load_checkpoint: source must be one of {SOURCES}, got {source!r}")
    obj = path_or_dict
    if isinstance(path_or_dict, (str, os.PathLike)):
        try:
            obj = torch.load(path_or_dict, map_location="cpu", weights_only=weights_only)
        except Exception as exc:  # noqa: BLE001 - re-raised with the hint that matters
            if not weights_only:
                raise
            # the hint only where the weights-only unpickler refused a class ("Unsupported global"),
            # not for an empty, truncated or foreign file (EOFError, KeyError, zip reader errors,
            # "Unsupported operand": garbage read as pickle opcodes)
            hint = ("If the file is trusted, pass weights_only=False." if "Unsupported global" in str(exc)
                    else "Is it empty, truncated or not written by torch.save?")
            raise ValueError(f"load_checkpoint: torch.load({str(path_or_dict)!r}, weights_only=True) failed "
                             f"({type(exc).__name__}: {exc}). {hint}") from exc
    model_state = model.state_dict()
    try:
        state, source = _extract_state_dict(obj, source, model_state)
    except ValueError as exc:  # a file of the wrong structure: say which file
        if obj is path_or_dict:
            raise
        raise ValueError(f"{exc} (in {os.fspath(path_or_dict)})") from exc

    report = LoadReport(source=source)
    prefix = ""  # every model key is expected, except for backbone-only weights
    if source == "torchvision":
        state, report.skipped, prefix = _map_torchvision(state, model_state)
    state, report.renamed = _rename_legacy_offsets(state, model_state)
    expected = {k for k in model_state if k.startswith(prefix)}
    if source == "torchvision":
        # DCN layers have no ImageNet counterpart: their offsets start at zero (regular conv).
        report.kept_init += sorted(k for k in expected if ".conv_offset." in k and k not in state)
    kept = set(report.kept_init)
    for key in sorted(expected - set(state) - kept):
        # FrozenBatchNorm2d fills a missing counter with 0, as BatchNorm2d does for old files.
        (report.kept_init if key.endswith("num_batches_tracked") else report.missing).append(key)
    report.unexpected = sorted(set(state) - set(model_state))
    loadable = {}
    for key, value in state.items():
        if key not in model_state:
            continue
        if tuple(value.shape) != tuple(model_state[key].shape):
            report.shape_mismatches.append((key, tuple(value.shape),
                                            tuple(model_state[key].shape)))
        else:
            loadable[key] = value
    report.shape_mismatches.sort()

    if strict and not report.ok:
        raise CheckpointMismatchError(report, None if obj is path_or_dict else path_or_dict)
    model.load_state_dict(loadable, strict=False)
    report.loaded = len(loadable)
    return report


def save_checkpoint(path: str | os.PathLike, model: nn.Module, **extra: Any) -> None:
    """Writes `{"model": model.state_dict(), "meta": {"format": "htc_fast"}, **extra}`.

    `extra` carries what the caller wants to resume from (optimizer state, iteration, config as
    a dict); `load_checkpoint` reads only "model".
    """
    meta = {"format": "htc_fast", "torch": str(torch.__version__)}
    meta.update(extra.pop("meta", {}))
    torch.save({"model": model.state_dict(), "meta": meta, **extra}, path)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_module(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _looks_like_torchvision(state: Mapping[str, torch.Tensor]) -> bool:
    # ImageNet ResNet names at the top level (no detector prefixes such as "backbone.").
    return "conv1.weight" in state and "layer1.0.conv1.weight" in state and \
        not any(k.startswith("backbone.") for k in state)


def _extract_state_dict(obj: Any, source: str, model_state: Mapping[str, torch.Tensor]
                        ) -> tuple[dict[str, torch.Tensor], str]:
    """Returns (state dict with `module.` stripped, resolved source name)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"load_checkpoint: expected a dict, got {type(obj).__name__}")
    if source == "htc_fast" or (source == "auto" and "model" in obj and
                                _is_state_dict(obj["model"])):
        if not _is_state_dict(obj.get("model")):
            raise ValueError("load_checkpoint: an htc_fast checkpoint needs a 'model' entry "
                             f"holding a state dict; top-level keys: {sorted(obj)[:10]}")
        return _strip_module(obj["model"]), "htc_fast"
    inner = obj.get("state_dict", obj)
    if not _is_state_dict(inner):
        raise ValueError("load_checkpoint: no state dict found (looked for 'state_dict', "
                         f"'model' or a flat name->tensor dict); top-level keys: "
                         f"{sorted(map(str, obj))[:10]}")
    state = _strip_module(inner)
    if source == "auto":
        source = "torchvision" if _looks_like_torchvision(state) else "mmdet"
    return state, source


def _map_torchvision(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
                     ) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """torchvision ResNet keys -> the model's backbone keys. Returns (mapped, skipped, prefix)."""
    prefix = "backbone." if any(k.startswith("backbone.") for k in model_state) else ""
    mapped, skipped = {}, []
    for key, value in state.items():
        if key.startswith("fc."):
            skipped.append(key)
        else:
            mapped[prefix + key] = value
    return mapped, sorted(skipped), prefix


def _rename_legacy_offsets(state: dict[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
                           ) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """`<layer>_offset.{weight,bias}` -> `<layer>.conv_offset.{weight,bias}` where the model
    has the new key and the checkpoint lacks it. Done here rather than left to the DCN module's
    own load hook so that the key comparison sees the final names."""
    renamed = []
    for key in list(state):
        head, sep, name = key.rpartition("_offset.")
        new = f"{head}.conv_offset.{name}"
        if sep and name in ("weight", "bias") and new in model_state and new not in state:
            state[new] = state.pop(key)
            renamed.append((key, new))
    return state, sorted(renamed)
