"""Training checks of scripts/compare_oracle.py: on the oracle's 2-image batch (model.train()),
the losses, every sampler call (assignment, sampled indices, priors) and, after backward, the
gradient norms, frozen parameters and trainable counts, against ``train_check.pth``.
"""
from __future__ import annotations

import inspect
import itertools
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
    it through unchanged. Instrumentation only: the wrapped methods run as they are.

    htc_fast assigns and samples every image of the batch in one call (fixed-capacity candidate
    lists with valid flags, ground truth padded with gt_valid), mmdetection one image at a time
    over compact lists; a batched call is recorded as one entry per image, in image order (the
    oracle's order: RPN image 0, 1, then per stage the box and the mask sampling, image 0, 1)."""

    def __init__(self):
        self.calls, self._orig, self._orig_assign = [], None, None

    def __enter__(self):
        self._orig = orig = matching.RandomSampler.sample  # FirstKSampler inherits it
        self._orig_assign = orig_assign = matching.MaxIoUAssigner.assign
        calls, last = self.calls, {}

        # Arguments are read by name through the real signatures (any other argument passes
        # through untouched, so the recorder follows API additions).
        assign_sig, sample_sig = inspect.signature(orig_assign), inspect.signature(orig)

        def assign(*args, **kwargs):
            # the candidates' valid flags, (B, N) or (N,) or None
            last["valid"] = assign_sig.bind(*args, **kwargs).arguments.get("valid")
            return orig_assign(*args, **kwargs)

        def sample(*args, **kwargs):
            res = orig(*args, **kwargs)
            bound = sample_sig.bind(*args, **kwargs).arguments
            sampler, assign_result, boxes = bound["self"], bound["assign_result"], bound["boxes"]
            gt_boxes, gt_valid = bound["gt_boxes"], bound.get("gt_valid")
            valid = last.pop("valid", None)
            gt_inds = assign_result.gt_inds
            if valid is not None:  # shared by the leading dims, (N,) or (B, N)
                valid = valid.expand_as(gt_inds)
            # One entry per image, leading dims in row-major order: (images) for a batch,
            # (stages, images) for two cascade stages sampled together (stage i's mask branch,
            # then stage i + 1's box branch: the oracle's order).
            for index in itertools.product(*(range(d) for d in gt_inds.shape[:-1])):
                one = res
                for k in index:
                    one = one[k]
                calls.append(_record(sampler, one, gt_inds[index], boxes.shape[-2],
                                     None if valid is None else valid[index],
                                     None if gt_valid is None else gt_valid[index], gt_boxes.shape[-2]))
            return res

        matching.RandomSampler.sample = sample
        matching.MaxIoUAssigner.assign = assign
        return self

    def __exit__(self, *exc):
        matching.RandomSampler.sample = self._orig
        matching.MaxIoUAssigner.assign = self._orig_assign


def _record(sampler, res, gt_inds, num_boxes, valid, gt_valid, num_gt_rows):
    """One image's sampler call in mmdet's compact terms: the invalid candidates (anchors outside
    the image, padding proposals, padding ground-truth rows) dropped and the sampled indices
    renumbered. gt_inds: (N,) the assignment of the boxes; valid: (N,) or None; gt_valid: (G,)
    or None (no padding)."""
    keep = torch.ones(num_boxes, dtype=torch.bool) if valid is None else valid.cpu()
    gt_keep = torch.ones(num_gt_rows, dtype=torch.bool) if gt_valid is None else gt_valid.cpu()
    gt_inds = gt_inds.cpu()
    if sampler.add_gt_as_proposals and num_gt_rows > 0:
        gt_inds = torch.cat([torch.arange(1, num_gt_rows + 1), gt_inds])
        keep = torch.cat([gt_keep, keep])
    index = keep.long().cumsum(0) - 1
    num_priors = num_boxes if valid is None else int(valid.sum())
    return dict(num_priors_in=num_priors, num_gts=int(gt_keep.sum()), assign_gt_inds=gt_inds[keep],
                pos_inds=index[res.pos_inds.cpu()], neg_inds=index[res.neg_inds.cpu()],
                pos_is_gt=res.pos_is_gt.cpu(), pos_priors=res.pos_boxes.detach().cpu(),
                neg_priors=res.neg_boxes.detach().cpu())


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
            for j, c in enumerate(rec.calls):
                check_draws(rep, j, c)
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


def check_draws(rep, j, call):
    """Our random draws (which differ from mmdet's) are still valid samples: positives from the
    positive pool, negatives from the negative pool, no candidate twice."""
    assigned, pos, neg = call["assign_gt_inds"], call["pos_inds"], call["neg_inds"]
    ok = bool((assigned[pos] > 0).all()) and bool((assigned[neg] == 0).all()) and \
        len(torch.cat([pos, neg]).unique()) == len(pos) + len(neg)
    rep.add("sampling", f"call {j:2d} random draws from their pools", None, None, ok,
            note=f"{len(pos)} of {int((assigned > 0).sum())} positives, {len(neg)} of "
            f"{int((assigned == 0).sum())} negatives, distinct")


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
        ours = float(loss[k].detach()) if torch.is_tensor(loss[k]) else float(loss[k])
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
