"""Helpers of scripts/compare_oracle.py: the check table and tolerances, error measures,
proposal-set matching, mmdetection's mask pasting and COCO RLE decoding (none of this is
htc_fast code under test)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

STAT_KEYS = ("sum", "abs_sum", "sq_sum", "mean", "std", "min", "max")
# Tolerances of the checks (see scripts/compare_oracle.py's docstring): head outputs (relative),
# boxes (px), scores (absolute), pasted mask pixels (fraction differing), losses and gradient
# norms (relative).
HEAD_TOL, BOX_TOL, SCORE_TOL, MASK_PIX_TOL, LOSS_TOL = 1e-3, 0.01, 1e-4, 1e-3, 1e-3


class Report:
    """Rows (section, item, value, tolerance, ok, note), printed as one table per section."""

    def __init__(self):
        self.rows = []
        self._printed = 0

    def add(self, section, item, value, tol, ok=None, note=""):
        if ok is None:
            ok = value is not None and math.isfinite(value) and value <= tol
        self.rows.append((section, item, value, tol, bool(ok), note))
        return ok

    def flush(self, title):
        rows = self.rows[self._printed:]
        self._printed = len(self.rows)
        if not rows:
            return
        print(f"\n== {title}")
        print(f"  {'check':<44} {'value':>10} {'tol':>9}  result  note")
        for _, item, value, tol, ok, note in rows:
            v = "-" if value is None else (f"{value:10.3e}" if isinstance(value, float) else f"{value:>10}")
            t = "-" if tol is None else (f"{tol:9.1e}" if isinstance(tol, float) else f"{tol:>9}")
            print(f"  {item:<44} {v:>10} {t:>9}  {'PASS' if ok else 'FAIL'}    {note}")

    @property
    def failures(self):
        return [r for r in self.rows if not r[4]]


def rel_max(ours, ref):
    """max |ours - ref| / max |ref| (inf on shape mismatch)."""
    ours, ref = ours.detach().float().cpu(), ref.detach().float().cpu()
    if ours.shape != ref.shape:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def abs_max(ours, ref):
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    if ours.shape != ref.shape:
        return math.inf
    return float((ours - ref).abs().max()) if ref.numel() else 0.0


def tensor_stats(t):
    t = t.detach().double().cpu()
    return dict(sum=float(t.sum()), abs_sum=float(t.abs().sum()), sq_sum=float((t * t).sum()),
                mean=float(t.mean()), std=float(t.std()), min=float(t.min()), max=float(t.max()))


def compare_level(ours, ref):
    """Relative errors of a feature map against an oracle entry {stats, sampled[, full]}:
    |ours - ref| / max(|ref|, scale), scale = RMS x numel for sums, std/RMS for the others;
    sampled/full: max abs error / max |ref|."""
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
        errors["full"] = rel_max(ours, ref["full"])
    return errors


def match_sets(ours_boxes, ours_scores, ref_boxes, ref_scores, box_tol=1e-3):
    """Matches two proposal sets box to box (max-coordinate distance <= box_tol).

    Returns dict: matched (count), box_err / score_err (max over matched pairs), unmatched_ref,
    unmatched_ours, and tie_gap: the largest (score - lowest kept reference score) over unmatched
    boxes of either side (<= ~1e-6 means they only differ at the cut-off among near-ties)."""
    ob, rb = ours_boxes.double().cpu(), ref_boxes.double().cpu()
    if len(ob) == 0 or len(rb) == 0:
        return dict(matched=0, box_err=math.inf, score_err=math.inf, unmatched_ref=len(rb),
                    unmatched_ours=len(ob), tie_gap=math.inf)
    d = torch.cdist(rb, ob, p=float("inf"))  # (R, O)
    dist, j = d.min(1)
    ok = dist <= box_tol
    used = torch.zeros(len(ob), dtype=torch.bool)
    used[j[ok]] = True
    cut = float(ref_scores.min())
    gaps = [float(ref_scores[~ok].max()) - cut] if (~ok).any() else []
    if (~used).any():
        gaps.append(float(ours_scores.cpu()[~used].max()) - cut)
    return dict(matched=int(ok.sum()), box_err=float(dist[ok].max()) if ok.any() else math.inf,
                score_err=float((ours_scores.cpu()[j[ok]].double() - ref_scores[ok].double()).abs().max())
                if ok.any() else math.inf,
                unmatched_ref=int((~ok).sum()), unmatched_ours=int((~used).sum()),
                tie_gap=max(gaps) if gaps else 0.0)


def paste_masks(probs, boxes, img_h, img_w, thr=0.5):
    """mmdetection 3.3.0's FCNMaskHead._do_paste_mask on CPU (one box at a time, skip_empty),
    thresholded >= thr: the semantics of the oracle project's consume_reference_example.py."""
    out = torch.zeros(len(boxes), img_h, img_w, dtype=torch.bool)
    for i in range(len(boxes)):
        box = boxes[i:i + 1].float()
        x0i, y0i = torch.clamp(box.min(0).values.floor()[:2] - 1, min=0).to(torch.int32).tolist()
        x1i = int(torch.clamp(box[:, 2].max().ceil() + 1, max=img_w))
        y1i = int(torch.clamp(box[:, 3].max().ceil() + 1, max=img_h))
        x0, y0, x1, y1 = box[0]
        iy = torch.arange(y0i, y1i).float() + 0.5
        ix = torch.arange(x0i, x1i).float() + 0.5
        iy = (iy - y0) / (y1 - y0) * 2 - 1
        ix = (ix - x0) / (x1 - x0) * 2 - 1
        iy[torch.isinf(iy)] = 0
        ix[torch.isinf(ix)] = 0
        grid = torch.stack([ix[None, :].expand(len(iy), -1), iy[:, None].expand(-1, len(ix))], 2)[None]
        m = F.grid_sample(probs[i][None, None].float(), grid, align_corners=False)[0, 0]
        out[i, y0i:y1i, x0i:x1i] = m >= thr
    return out


def decode_rles(rles):
    from pycocotools import mask as mask_util
    if not rles:
        return torch.zeros(0, 0, 0, dtype=torch.bool)
    return torch.from_numpy(np.stack([
        mask_util.decode(dict(size=r["size"], counts=r["counts"].encode())) for r in rles]).astype(bool))
