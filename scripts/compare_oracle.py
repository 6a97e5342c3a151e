"""Compares htc_fast's whole HTC against the mmdetection 3.3.0 oracle's exported reference data.

Builds `build_htc(get_config("htc_r50_fpn_1x"))`, loads the oracle's state dict with
`load_checkpoint` (strict), and for each test image feeds the exact network input (`inputs`):

  FPN        C2..C5, P2..P6 statistics / sampled values / full tensors       rel <= --tol (1e-4)
  semantic   semantic_feat and semantic logits (statistics, sampled values)  rel <= --tol
  RPN        raw objectness / delta maps (rel <= --tol); top-1000 proposals as a set (boxes
             within 1e-3 px; unmatched ones only among near-ties at the cut-off: score gap
             <= 1e-6); matched scores within 1e-6
  stages     per stage, on the ORACLE's rois of that stage (isolated): class logits and deltas
             rel <= 1e-3; decode(rois_i, deltas_i) vs rois_{i+1} within 0.01 px
  post-proc  on the oracle's logits/deltas (isolated): decode + softmax(mean logits) +
             multiclass_nms vs `dets_before_mask` (boxes 0.01 px, scores 1e-4, labels equal)
  final      end to end (our proposals, our heads): boxes (original pixels) 0.01 px, scores 1e-4,
             labels identical, network-input boxes vs `mask_rois`
  masks      on the oracle's mask rois and labels (isolated): per-stage mask logits at the label
             rel <= 1e-3; end to end with roi.mask_merge="last" vs `final` and "mean" vs
             `variant_avg3_masks`: merged 28x28 probabilities (abs <= 1e-4) and masks pasted here
             with mmdetection's grid_sample formulation vs the oracle's RLEs (< 0.1% of pixels)
  train      `train_check.pth`'s 2-image batch (model.train()): with the first-k sampler every
             loss of `first_k_sampler.losses` rel <= 1e-3 (acc: abs <= 0.01 percent), every
             sampler call (assignment, sampled indices, priors) against the recorded one, and
             after backward the recorded gradient norms (rel <= 1e-3), frozen parameters and
             trainable counts; with the random sampler under torch.manual_seed(0) the same
             losses and sampler calls (forward only). Sampler calls are recorded by wrapping
             RandomSampler.sample (pass-through instrumentation; the real code runs).

Produce the data first with the oracle project (its README: it builds mmdetection 3.3.0 on CPU
and exports the state dict and reference data), then:
    python scripts/compare_oracle.py --oracle-out DIR --state-dict FILE [--images 0 1] [--skip-train]
(or set HTC_FAST_ORACLE_OUT and HTC_FAST_ORACLE_STATE_DICT instead of the two options).
Exit status 0 when every check passes, 1 otherwise. About 1-1.5 min per image and 3-4 min for
the training checks on 2 busy CPU cores (7.5 min in all) (`--cache DIR` keeps FPN features between runs while
iterating; the FPN check still runs on the cached features).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_helpers import STAT_KEYS, Report, abs_max, compare_level, decode_rles, match_sets, paste_masks, rel_max  # noqa: E402

from htc_fast.config import get_config  # noqa: E402
from htc_fast.model import matching  # noqa: E402
from htc_fast.model.box_coder import decode_boxes  # noqa: E402
from htc_fast.model.checkpoint import load_checkpoint  # noqa: E402
from htc_fast.model.htc import build_htc  # noqa: E402
from htc_fast.model.inputs import ImageBatch, Targets  # noqa: E402
from htc_fast.ops import multiclass_nms  # noqa: E402

HEAD_TOL, BOX_TOL, SCORE_TOL, MASK_PIX_TOL, LOSS_TOL = 1e-3, 0.01, 1e-4, 1e-3, 1e-3


def load_model(state_dict_path, device):
    model = build_htc(get_config("htc_r50_fpn_1x"))
    state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    report = load_checkpoint(model, {"state_dict": state, "meta": {}}, strict=True)
    print(f"loaded {report.loaded} of {len(state)} tensors ({report.source}) from {state_dict_path}")
    return model.to(device).eval()


def set_mask_merge(model, merge):
    """Config switch (a frozen dataclass replaced, no code changed)."""
    model.roi_head.roi = dataclasses.replace(model.roi_head.roi, mask_merge=merge)


def features(model, images, cache, key):
    path = cache and os.path.join(cache, f"feats_{key}.pth")
    if path and os.path.exists(path):
        return torch.load(path, map_location=images.device, weights_only=True)
    with torch.no_grad():
        c = model.backbone(images)
        p = model.neck(c)
    out = {"C": list(c), "P": list(p)}
    if path:
        os.makedirs(cache, exist_ok=True)
        torch.save(out, path)
    return out


def check_image(model, i, args, rep):
    dev = torch.device(args.device)
    ref = torch.load(f"{args.oracle_out}/test_img{i}.pth", map_location="cpu", weights_only=False)
    meta = ref["metainfo"]
    img_shape, ori_shape = tuple(meta["img_shape"]), tuple(meta["ori_shape"])
    sf = tuple(meta["scale_factor"])
    tag = f"image {i} ({ref['image_name']})"
    t0 = time.perf_counter()
    f = features(model, ref["inputs"].to(dev), args.cache, f"img{i}")
    feats = f["P"]
    print(f"\n#### {tag}: input {tuple(ref['inputs'].shape)}, img_shape {img_shape}, "
          f"backbone+FPN {time.perf_counter() - t0:.1f}s")

    # ---- FPN
    for name, ours, lref in [(f"C{j + 2}", t, r) for j, (t, r) in enumerate(zip(f["C"], ref["backbone"]))] + \
                            [(f"P{j + 2}", t, r) for j, (t, r) in enumerate(zip(feats, ref["neck"]))]:
        e = compare_level(ours, lref)
        worst = max(e.values())
        rep.add("fpn", f"{name} worst of stats/sampled/full", worst, args.tol,
                note=" ".join(f"{k}={v:.1e}" for k, v in e.items() if k in STAT_KEYS[:1] + ("sampled", "full")))
    rep.flush(f"{tag}: backbone + FPN")

    with torch.no_grad():
        # ---- semantic head
        sem = model.roi_head.semantic_head(feats)
        for name, ours in (("semantic_logits", sem.logits), ("semantic_feat", sem.feat)):
            rep.add("semantic", name, max(compare_level(ours, ref[name]).values()), args.tol)
        rep.flush(f"{tag}: semantic head")

        # ---- RPN
        rpn_out = model.rpn_head(feats)
        for lvl in range(len(feats)):
            rep.add("rpn", f"rpn_cls P{lvl + 2} raw map", rel_max(rpn_out.cls_logits[lvl], ref["rpn_cls"][lvl]),
                    args.tol)
            rep.add("rpn", f"rpn_reg P{lvl + 2} raw map", rel_max(rpn_out.bbox_deltas[lvl], ref["rpn_reg"][lvl]),
                    args.tol)
        t0 = time.perf_counter()
        props = model.rpn_head.proposals(rpn_out, [img_shape], training=False)[0]
        t_props = time.perf_counter() - t0
        rp = ref["rpn_proposals"]
        m = match_sets(props.boxes, props.scores, rp["bboxes"], rp["scores"])
        rep.add("rpn", "proposals count", float(abs(len(props.boxes) - len(rp["bboxes"]))), 0.0,
                note=f"ours {len(props.boxes)}, oracle {len(rp['bboxes'])}")
        rep.add("rpn", "proposals unmatched: score gap to cut-off", m["tie_gap"], 1e-6,
                note=f"matched {m['matched']}, unmatched oracle {m['unmatched_ref']} / ours {m['unmatched_ours']}")
        rep.add("rpn", "proposals matched: max box diff (px)", m["box_err"], 1e-3)
        rep.add("rpn", "proposals matched: max score diff", m["score_err"], 1e-6)
        in_order = len(props.boxes) == len(rp["bboxes"]) and abs_max(props.boxes, rp["bboxes"]) <= 1e-3
        rep.add("rpn", "proposals in the same order (info)", None, None, True,
                note=f"{in_order}; proposals took {t_props:.2f}s")
        rep.flush(f"{tag}: RPN")

        # ---- cascade box stages, isolated on the oracle's rois
        rh = model.roi_head
        st = ref["stages"]
        for s in range(len(st)):
            rois = st[s]["rois"].to(dev)
            out = rh.bbox_head[s](rh.extract(feats, sem.feat, rois, rh.roi.box_roi_size))
            rep.add("stages", f"stage {s} cls_score (oracle rois)", rel_max(out.cls_logits, st[s]["cls_score"]),
                    HEAD_TOL)
            rep.add("stages", f"stage {s} bbox_pred (oracle rois)", rel_max(out.deltas, st[s]["bbox_pred"]),
                    HEAD_TOL)
            if s + 1 < len(st):
                cfg = rh.roi.stages[s]
                nxt = decode_boxes(st[s]["rois"][:, 1:], st[s]["bbox_pred"], cfg.target_means,
                                   cfg.target_stds, max_shape=img_shape)
                rep.add("stages", f"decode stage {s} -> rois of stage {s + 1} (px)",
                        abs_max(nxt, st[s + 1]["rois"][:, 1:]), BOX_TOL)
        rep.flush(f"{tag}: cascade box stages on the oracle's rois")

        # ---- post-processing, isolated on the oracle's logits and deltas
        last = rh.roi.stages[-1]
        boxes = decode_boxes(st[-1]["rois"][:, 1:], st[-1]["bbox_pred"], last.target_means, last.target_stds,
                             max_shape=img_shape)
        probs = torch.softmax(sum(x["cls_score"] for x in st) / float(len(st)), dim=1)
        nms = multiclass_nms(boxes, probs, rh.test.score_thr, rh.test.nms_iou, rh.test.max_per_img)
        d = ref["dets_before_mask"]
        compare_dets(rep, "post", "isolated", nms.boxes, nms.scores, nms.labels, d["bboxes"], d["scores"],
                     d["labels"])
        rep.flush(f"{tag}: detection post-processing on the oracle's logits/deltas")

        # ---- end to end
        fin = ref["final"]
        set_mask_merge(model, "last")
        t0 = time.perf_counter()
        det = rh.predict(feats, [props.boxes], [img_shape], [sf], with_masks=True)[0]
        t_pred = time.perf_counter() - t0
        compare_dets(rep, "final", "end-to-end", det.boxes, det.scores, det.labels, fin["bboxes"], fin["scores"],
                     fin["labels"])
        rep.add("final", "end-to-end network-input boxes vs mask_rois (px)",
                abs_max(det.input_boxes, ref["mask_rois"][:, 1:]), BOX_TOL, note=f"roi_head.predict {t_pred:.1f}s")
        rep.flush(f"{tag}: final detections (end to end)")

        # ---- masks, isolated on the oracle's mask rois and labels
        mrois = ref["mask_rois"].to(dev)
        labels = fin["labels"].to(dev)
        x = rh.extract(feats, sem.feat, mrois, rh.roi.mask_roi_size)
        prev = None
        idx = torch.arange(len(labels), device=dev)
        for s, head in enumerate(rh.mask_head):
            prev = head.trunk(x, prev)
            logit = head.logits(prev)[idx, labels]
            rep.add("masks", f"stage {s} mask logits at label (oracle rois)",
                    rel_max(logit, ref["mask_stage_logits_label_channel"][s]), HEAD_TOL)
        # ---- masks end to end: "last" (mmdet 3.3.0) and "mean" (avg of 3 sigmoids)
        variants = [("last", det, ref["merged_mask_probs_label_channel"], fin["masks_rle"])]
        set_mask_merge(model, "mean")  # the same detections: only the mask branch reruns
        det_mean = rh._predict_masks(feats, sem.feat, [det._replace(mask_probs=None)])[0]
        va = ref["variant_avg3_masks"]
        variants.append(("mean", det_mean, va["merged_probs_label_channel"], va["masks_rle"]))
        set_mask_merge(model, "last")
        for merge, dd, ref_probs, rles in variants:
            rep.add("masks", f'mask_merge="{merge}": merged probs (abs)', abs_max(dd.mask_probs, ref_probs), SCORE_TOL)
            ref_masks = decode_rles(rles)
            if len(dd.boxes) != len(ref_masks):
                rep.add("masks", f'mask_merge="{merge}": pasted mask pixels differing', math.inf, MASK_PIX_TOL,
                        note=f"{len(dd.boxes)} vs {len(ref_masks)} detections")
                continue
            ours = paste_masks(dd.mask_probs.cpu(), dd.boxes.cpu(), *ori_shape, rh.test.mask_thr)
            diff = int((ours != ref_masks).sum())
            rep.add("masks", f'mask_merge="{merge}": pasted mask pixels differing', diff / max(ref_masks.numel(), 1),
                    MASK_PIX_TOL, note=f"{diff} of {ref_masks.numel()} px; "
                    f"{int((ours != ref_masks).flatten(1).any(1).sum())} of {len(ref_masks)} masks touched")
        rep.flush(f"{tag}: masks")


def compare_dets(rep, section, what, boxes, scores, labels, rboxes, rscores, rlabels):
    n, rn = len(boxes), len(rboxes)
    rep.add(section, f"{what}: detection count", float(abs(n - rn)), 0.0, note=f"ours {n}, oracle {rn}")
    k = min(n, rn)
    same = torch.equal(labels[:k].cpu(), rlabels[:k])
    first = "-" if same else int((labels[:k].cpu() != rlabels[:k]).nonzero()[0])
    rep.add(section, f"{what}: labels identical", None, None, same and n == rn,
            note="" if same else f"first differing rank {first}")
    rep.add(section, f"{what}: boxes max abs diff (px)", abs_max(boxes[:k], rboxes[:k]), BOX_TOL)
    rep.add(section, f"{what}: scores max abs diff", abs_max(scores[:k], rscores[:k]), SCORE_TOL)


# --------------------------------------------------------------------------------- training

class SamplerRecorder:
    """Records every RandomSampler / FirstKSampler .sample call (assignment and result), passing
    it through unchanged. Instrumentation only: the wrapped method runs as it is."""

    def __init__(self):
        self.calls, self._orig, self._orig_assign = [], None, None

    def __enter__(self):
        self._orig = orig = matching.RandomSampler.sample  # FirstKSampler inherits it
        self._orig_assign = orig_assign = matching.MaxIoUAssigner.assign
        calls, last = self.calls, {}

        def assign(assigner, boxes, gt_boxes, gt_labels=None, gt_boxes_ignore=None, valid=None):
            last["valid"] = valid  # candidates are fixed-capacity lists with valid flags
            return orig_assign(assigner, boxes, gt_boxes, gt_labels, gt_boxes_ignore, valid=valid)

        def sample(sampler, assign_result, boxes, gt_boxes, gt_labels=None, generator=None):
            res = orig(sampler, assign_result, boxes, gt_boxes, gt_labels, generator=generator)
            # Back to mmdet's compact candidate lists: drop invalid candidates (anchors outside the
            # image, padding), renumber the sampled indices.
            valid = last.pop("valid", None)
            keep = torch.ones(len(boxes), dtype=torch.bool) if valid is None else valid.cpu()
            gt_inds = assign_result.gt_inds.cpu()
            if sampler.add_gt_as_proposals and len(gt_boxes) > 0:
                gt_inds = torch.cat([torch.arange(1, len(gt_boxes) + 1), gt_inds])
                keep = torch.cat([torch.ones(len(gt_boxes), dtype=torch.bool), keep])
            index = keep.long().cumsum(0) - 1
            calls.append(dict(num_priors_in=int(keep.sum()) - (len(keep) - len(boxes)), num_gts=len(gt_boxes),
                              assign_gt_inds=gt_inds[keep], pos_inds=index[res.pos_inds.cpu()],
                              neg_inds=index[res.neg_inds.cpu()], pos_is_gt=res.pos_is_gt.cpu(),
                              pos_priors=res.pos_boxes.detach().cpu(), neg_priors=res.neg_boxes.detach().cpu()))
            return res

        matching.RandomSampler.sample = sample
        matching.MaxIoUAssigner.assign = assign
        return self

    def __exit__(self, *exc):
        matching.RandomSampler.sample = self._orig
        matching.MaxIoUAssigner.assign = self._orig_assign


def train_batch(tc, dev):
    b = tc["batch"]
    metas = b["metainfo"]
    batch = ImageBatch(b["inputs"].to(dev), [tuple(m["img_shape"]) for m in metas],
                       [tuple(m["scale_factor"]) for m in metas], [tuple(m["ori_shape"]) for m in metas])
    targets = Targets([x.float().to(dev) for x in b["gt_bboxes"]], [x.long().to(dev) for x in b["gt_labels"]],
                      [x.to(dev) for x in b["gt_masks"]],
                      torch.stack([s[0] for s in b["gt_sem_seg"]]).long().to(dev))
    return batch, targets


def check_train(model, args, rep):
    dev = torch.device(args.device)
    tc = torch.load(f"{args.oracle_out}/train_check.pth", map_location="cpu", weights_only=False)
    batch, targets = train_batch(tc, dev)
    modes = [("first_k_sampler", "first-k", not args.skip_backward)]
    if not args.skip_random:
        modes.append(("random_sampler_seed0", "random", False))
    for key, sampler, backward in modes:
        ref = tc[key]
        model.train()
        model.zero_grad(set_to_none=True)
        orig_features = model.features
        if args.cache and not backward:  # reuse the batch's FPN features (instance attribute, dev aid only)
            cached = features(model, batch.images, args.cache, "train")["P"]
            model.features = lambda images, cached=cached: cached
        t0 = time.perf_counter()
        try:
            with torch.set_grad_enabled(backward), SamplerRecorder() as rec:
                torch.manual_seed(0)  # the oracle seeds right before model.loss
                out = model(batch, targets, sampler=sampler)
                loss = out.as_dict()
            t_fwd = time.perf_counter() - t0
            t0 = time.perf_counter()
            if backward:
                out.total().backward()
            t_bwd = time.perf_counter() - t0
        finally:
            model.features = orig_features
            model.eval()
        title = f"training, {sampler} sampler ({key}): forward {t_fwd:.1f}s" + (
            f", backward {t_bwd:.1f}s" if backward else "")
        exact = sampler == "first-k"
        if exact:
            compare_losses(rep, loss, ref)
            rep.flush(f"{title}: losses")
        else:
            # htc_fast's random sampler draws random keys (fixed capacity, no host sync) instead of
            # mmdet's randperm: the same distribution, other samples under the same seed. Only the
            # RPN calls (same candidates) compare: assignments and counts.
            rs = ref["sampling"][:2]
            rec.calls[:] = rec.calls[:2]
            for c, r in zip(rec.calls, rs):
                if len(c["pos_inds"]) != len(r["pos_inds"]) or len(c["neg_inds"]) != len(r["neg_inds"]):
                    continue  # the counts must match: reported as a difference below
                c["pos_inds"], c["neg_inds"] = r["pos_inds"], r["neg_inds"]  # draws differ by design
                c["pos_is_gt"], c["pos_priors"], c["neg_priors"] = r["pos_is_gt"], r["pos_priors"], r["neg_priors"]
            ref = dict(ref, sampling=rs)
        compare_sampling(rep, rec.calls, ref["sampling"])
        rep.flush(f"{title}: sampler calls vs the oracle's record")
        if backward:
            compare_grads(rep, model, ref["grad_norms"], args.oracle_out)
            rep.flush(f"{title}: gradient norms")
            model.zero_grad(set_to_none=True)


def compare_losses(rep, loss, ref):
    want = dict(ref["losses"])
    want["loss_rpn_cls"] = sum(want["loss_rpn_cls"])
    want["loss_rpn_bbox"] = sum(want["loss_rpn_bbox"])
    flat = {}
    for k, v in want.items():
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    for k, v in flat.items():
        if k not in loss:
            rep.add("train", k, math.inf, LOSS_TOL, note="missing in HTCLoss.as_dict()")
            continue
        ours = float(loss[k])
        if k.endswith(".acc"):
            rep.add("train", k, abs(ours - v), 0.01, note=f"ours {ours:.6g} ref {v:.6g} (abs, percent)")
        else:
            rep.add("train", k, abs(ours - v) / max(abs(v), 1e-12), LOSS_TOL, note=f"ours {ours:.6g} ref {v:.6g}")
    total = sum(float(v) for k, v in loss.items() if "loss" in k)
    rep.add("train", "total", abs(total - ref["total_loss"]) / abs(ref["total_loss"]), LOSS_TOL,
            note=f"ours {total:.6g} ref {ref['total_loss']:.6g}")


def compare_sampling(rep, calls, rs):
    rep.add("sampling", "number of sampler calls", float(abs(len(calls) - len(rs))), 0.0,
            note=f"ours {len(calls)}, oracle {len(rs)}")
    for j, (o, r) in enumerate(zip(calls, rs)):
        problems = []
        for key in ("num_priors_in", "num_gts"):
            if o[key] != r[key]:
                problems.append(f"{key} {o[key]} vs {r[key]}")
        if o["num_priors_in"] == r["num_priors_in"] and not torch.equal(o["assign_gt_inds"], r["assign_gt_inds"]):
            bad = (o["assign_gt_inds"] != r["assign_gt_inds"]).nonzero().squeeze(1)
            ours, ref = o["assign_gt_inds"][bad[:3]].tolist(), r["assign_gt_inds"][bad[:3]].tolist()
            problems.append(f"assign differs at {len(bad)} priors (first {bad[:3].tolist()}: ours {ours} ref {ref})")
        for key in ("pos_inds", "neg_inds"):
            if not torch.equal(o[key], r[key]):
                problems.append(f"{key} differ ({len(o[key])} vs {len(r[key])})")
        if not torch.equal(o["pos_is_gt"].to(torch.uint8), r["pos_is_gt"]):
            problems.append("pos_is_gt differ")
        err = 0.0
        for key in ("pos_priors", "neg_priors"):
            if o[key].shape == r[key].shape:
                err = max(err, abs_max(o[key], r[key]))
        if err > BOX_TOL:
            problems.append(f"priors differ by {err:.3g} px")
        rep.add("sampling", f"call {j:2d} {r['sampler']:<12} img {j % 2}", None, None, not problems,
                note="; ".join(problems) or f"{len(r['pos_inds'])} pos / {len(r['neg_inds'])} neg, priors "
                f"within {err:.1e} px")


def compare_grads(rep, model, ref, oracle_out):
    params = dict(model.named_parameters())
    for name, want in ref.items():
        if name.startswith("_"):
            continue
        g = params[name].grad
        if want is None or g is None:
            rep.add("grads", f"{name} (frozen: no grad)" if want is None else name, None, None,
                    (want is None) == (g is None), note=f"ours {'None' if g is None else 'a gradient'}, "
                    f"oracle {'None' if want is None else want}")
            continue
        ours = float(g.double().norm())
        rep.add("grads", f"|grad| {name}", abs(ours - want) / max(abs(want), 1e-12), LOSS_TOL,
                note=f"ours {ours:.6g} ref {want:.6g}")
    n_none = sum(1 for p in params.values() if p.requires_grad and p.grad is None)
    rep.add("grads", "trainable params without grad", float(abs(n_none - ref["_num_trainable_params_without_grad"])),
            0.0, note=f"ours {n_none}, oracle {ref['_num_trainable_params_without_grad']}")
    with open(os.path.join(oracle_out, "reference.json")) as fh:
        want = json.load(fh)["state_dict"]["trainable_param_elements"]
    n_train = sum(p.numel() for p in params.values() if p.requires_grad)
    rep.add("grads", "trainable parameter elements", float(abs(n_train - want)), 0.0,
            note=f"ours {n_train}, oracle {want}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--oracle-out", default=os.environ.get("HTC_FAST_ORACLE_OUT"),
                        required="HTC_FAST_ORACLE_OUT" not in os.environ,
                        help="the oracle's output folder (default: $HTC_FAST_ORACLE_OUT)")
    parser.add_argument("--state-dict", default=os.environ.get("HTC_FAST_ORACLE_STATE_DICT"),
                        required="HTC_FAST_ORACLE_STATE_DICT" not in os.environ,
                        help="the oracle's exported state dict (default: $HTC_FAST_ORACLE_STATE_DICT)")
    parser.add_argument("--images", type=int, nargs="*", default=[0, 1], help="test images to check (none: [])")
    parser.add_argument("--skip-train", action="store_true", help="skip the training checks")
    parser.add_argument("--skip-backward", action="store_true",
                        help="training: losses only, no backward / gradient-norm check (~2-3 min less)")
    parser.add_argument("--skip-random", action="store_true",
                        help="training: skip the random-sampler (torch.manual_seed(0)) check")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative tolerance of FPN/semantic/RPN maps")
    parser.add_argument("--cache", default=None, help="directory to cache FPN features in (iteration aid)")
    args = parser.parse_args(argv)
    model = load_model(args.state_dict, torch.device(args.device))
    rep = Report()
    start = time.perf_counter()
    for i in args.images:
        check_image(model, i, args, rep)
    if not args.skip_train:
        check_train(model, args, rep)
    fails = rep.failures
    print(f"\n==== {len(rep.rows) - len(fails)} of {len(rep.rows)} checks passed in "
          f"{time.perf_counter() - start:.0f}s: " + ("PASS" if not fails else "FAIL"))
    for section, item, value, tol, _, note in fails:
        measured = "" if value is None else f": {value:.3g} (tol {tol:.0e})"
        print(f"  FAIL [{section}] {item}{measured} {note}")
    return 0 if not fails else 1


if __name__ == "__main__":
    sys.exit(main())
