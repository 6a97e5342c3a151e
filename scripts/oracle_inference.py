"""Test-time checks of scripts/compare_oracle.py: for one test image, htc_fast's backbone + FPN,
semantic head, RPN, cascade box stages (isolated on the oracle's rois), detection
post-processing (isolated on the oracle's logits), final detections end to end, and masks
(isolated, then end to end for both ``mask_merge`` settings) against the oracle's record.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time

import torch
from oracle_helpers import (
    BOX_TOL,
    HEAD_TOL,
    MASK_PIX_TOL,
    SCORE_TOL,
    STAT_KEYS,
    abs_max,
    compare_level,
    decode_rles,
    match_sets,
    paste_masks,
    rel_max,
)

from htc_fast.model.box_coder import decode_boxes
from htc_fast.model.inputs import ImageBatch
from htc_fast.ops import multiclass_nms


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

        # ---- the model's own inference path, on the features above
        check_model_predict(model, ref, feats, props, rep)
        rep.flush(f"{tag}: model.predict (fixed-capacity proposals, padded cascade, its mask pasting)")


def check_model_predict(model, ref, feats, props, rep):
    """``model.predict`` as a user runs it: fixed-capacity proposals with valid flags
    (``padded=True``), the padded cascade with one count read, and htc_fast's own mask pasting,
    with mask_merge="last" against the oracle's ``final``. The backbone is not rerun: ``features``
    returns ``feats`` (an instance attribute, restored after)."""
    meta, fin = ref["metainfo"], ref["final"]
    img_shape, ori_shape = tuple(meta["img_shape"]), tuple(meta["ori_shape"])
    padded = model.rpn_head.proposals(model.rpn_head(feats), [img_shape], training=False, padded=True)[0]
    n = int(padded.valid.sum())
    rep.add("model", "padded proposals: valid rows first, count", float(abs(n - len(props.boxes))), 0.0,
            bool(padded.valid[:n].all()) and n == len(props.boxes),
            note=f"{n} of {len(padded.valid)} rows valid, compact {len(props.boxes)}")
    rep.add("model", "padded proposals vs compact: boxes (px)", abs_max(padded.boxes[:n], props.boxes), 1e-3)
    rep.add("model", "padded proposals vs compact: scores", abs_max(padded.scores[:n], props.scores), 1e-6)
    batch = ImageBatch(ref["inputs"].to(feats[0].device), [img_shape], [tuple(meta["scale_factor"])], [ori_shape])
    set_mask_merge(model, "last")
    model.features = lambda images: feats
    try:
        t0 = time.perf_counter()
        det = model.predict(batch, masks="bitmap")[0]
        t_pred = time.perf_counter() - t0
    finally:
        del model.features
    compare_dets(rep, "model", "model.predict", det.boxes, det.scores, det.labels, fin["bboxes"], fin["scores"],
                 fin["labels"])
    ref_masks = decode_rles(fin["masks_rle"])
    if det.masks.shape != ref_masks.shape:
        rep.add("model", "model.predict: mask pixels differing", math.inf, MASK_PIX_TOL,
                note=f"masks {tuple(det.masks.shape)} vs {tuple(ref_masks.shape)}")
        return
    diff = int((det.masks.cpu() != ref_masks).sum())
    rep.add("model", "model.predict: mask pixels differing", diff / max(ref_masks.numel(), 1), MASK_PIX_TOL,
            note=f"{diff} of {ref_masks.numel()} px; predict {t_pred:.1f}s")


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
