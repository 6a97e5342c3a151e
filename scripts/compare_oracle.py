"""Compares htc_fast against the mmdetection oracle's exported reference data, stage by stage.

Covers so far: the R-50 backbone (C2..C5) and the FPN (P2..P6). It builds them from the
`htc_r50_fpn_1x` preset, loads the oracle's state dict (`backbone.*` and `neck.*` keys) with
`load_checkpoint`, feeds each test image's exact network input (`inputs`), and compares every
level with the exported statistics (sum, abs_sum, sq_sum, mean, std, min, max, in float64), the
4096 sampled values, and the full tensor where the oracle stored one (P5, P6).

Error measure: for statistics, |ours - ref| / max(|ref|, scale) where scale is the reference's
RMS x numel for sums (so that a sum near zero is judged against the size of its terms) and its
std for the others; for values, max |ours - ref| / max |ref|. A level passes when every measure
is <= --tol.

Produce the data first (see /work/shared/oracle/README.md):
    bash /work/shared/oracle/setup_oracle.sh
    /tmp/oracle_venv/bin/python /work/shared/oracle/export_reference.py /work/oracle_out \\
        --state-dict-dir /work/oracle_sd
then:
    python scripts/compare_oracle.py [--oracle-out DIR] [--state-dict FILE] [--device cuda]
Exit status 0 when everything is within tolerance, 1 otherwise.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from torch import nn

from htc_fast.config import get_config
from htc_fast.model.backbone import ResNet
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.fpn import FPN

STAT_KEYS = ("sum", "abs_sum", "sq_sum", "mean", "std", "min", "max")


class BackboneNeck(nn.Module):
    """The part of HTC covered so far, with mmdetection's top-level names."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = ResNet.from_config(cfg.backbone)
        self.neck = FPN.from_config(cfg.fpn, self.backbone.out_channels)


def tensor_stats(t: torch.Tensor) -> dict[str, float]:
    t = t.detach().double().cpu()
    return dict(sum=float(t.sum()), abs_sum=float(t.abs().sum()), sq_sum=float((t * t).sum()),
                mean=float(t.mean()), std=float(t.std()), min=float(t.min()), max=float(t.max()))


def compare_level(ours: torch.Tensor, ref: dict) -> dict[str, float]:
    """Relative errors of one feature map against an oracle entry {stats, sampled[, full]}."""
    rs = ref["stats"]
    if list(ours.shape) != list(rs["shape"]):
        return {"shape": math.inf}
    st = tensor_stats(ours)
    n = ours.numel()
    rms = math.sqrt(rs["sq_sum"] / n)
    scales = dict(sum=rms * n, abs_sum=rms * n, sq_sum=rs["sq_sum"], mean=rms, std=rs["std"],
                  min=rms, max=rms)
    errors = {k: abs(st[k] - rs[k]) / max(abs(rs[k]), scales[k], 1e-30) for k in STAT_KEYS}
    flat = ours.detach().reshape(-1).float().cpu()
    ref_values = ref["sampled"]["values"]
    errors["sampled"] = float((flat[ref["sampled"]["flat_idx"]] - ref_values).abs().max()
                              / ref_values.abs().max().clamp_min(1e-30))
    if ref.get("full") is not None:
        full = ref["full"]
        errors["full"] = float((ours.detach().float().cpu() - full).abs().max()
                               / full.abs().max().clamp_min(1e-30))
    return errors


def load_model(state_dict_path: str, device: torch.device) -> BackboneNeck:
    cfg = get_config("htc_r50_fpn_1x").model
    model = BackboneNeck(cfg)
    state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    covered = {k: v for k, v in state.items() if k.startswith(("backbone.", "neck."))}
    report = load_checkpoint(model, {"state_dict": covered, "meta": {}}, strict=True)
    print(f"loaded {report.loaded} tensors ({report.source}) of {len(state)} in "
          f"{state_dict_path}; not covered yet: {len(state) - len(covered)} "
          f"(rpn_head, roi_head)")
    return model.to(device).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracle-out", default="/work/oracle_out")
    parser.add_argument("--state-dict", default="/work/oracle_sd/htc_r50_state_dict.pth")
    parser.add_argument("--images", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    model = load_model(args.state_dict, device)

    worst, failed = 0.0, []
    for i in args.images:
        ref = torch.load(f"{args.oracle_out}/test_img{i}.pth", map_location="cpu",
                         weights_only=True)
        start = time.perf_counter()
        with torch.no_grad():
            feats = model.backbone(ref["inputs"].to(device))
            pyramid = model.neck(feats)
        print(f"\nimage {i} ({ref['image_name']}), input {tuple(ref['inputs'].shape)}, "
              f"backbone+FPN {time.perf_counter() - start:.1f}s on {device}")
        print(f"  {'level':<6} {'shape':<22} " + " ".join(f"{k:>8}" for k in STAT_KEYS)
              + f" {'sampled':>8} {'full':>8}")
        rows = [(f"C{j + 2}", t, r) for j, (t, r) in enumerate(zip(feats, ref["backbone"]))]
        rows += [(f"P{j + 2}", t, r) for j, (t, r) in enumerate(zip(pyramid, ref["neck"]))]
        for name, ours, level_ref in rows:
            errors = compare_level(ours, level_ref)
            level_worst = max(errors.values())
            worst = max(worst, level_worst)
            if level_worst > args.tol:
                failed.append(f"image {i} {name}")
            cells = " ".join(f"{errors[k]:8.1e}" if k in errors else f"{'-':>8}"
                             for k in STAT_KEYS + ("sampled", "full"))
            print(f"  {name:<6} {str(tuple(ours.shape)):<22} {cells}"
                  f"{'' if level_worst <= args.tol else '  FAIL'}")
    print(f"\nworst relative error {worst:.2e} (tolerance {args.tol:.0e}): "
          + ("PASS" if not failed else "FAIL: " + ", ".join(failed)))
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
