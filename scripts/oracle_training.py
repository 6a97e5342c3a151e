"""Training checks of scripts/compare_oracle.py: on the oracle's 2-image batch (model.train()),
the losses, every sampler call (assignment, sampled indices, priors) and, after backward, the
gradient norms, frozen parameters and trainable counts, against ``train_check.pth``.
"""
from __future__ import annotations

import json
import math
import os
import time

import torch
from oracle_helpers import BOX_TOL, LOSS_TOL, abs_max
from oracle_inference import features

from htc_fast.model import matching
from htc_fast.model.inputs import ImageBatch, Targets


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
