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
  model      `model.predict` as a user runs it, on the same features: fixed-capacity proposals
             (valid rows first, equal to the compact ones: 1e-3 px, scores 1e-6), the padded
             cascade and htc_fast's own mask pasting, mask_merge="last", vs `final` (boxes
             0.01 px, scores 1e-4, labels identical, mask pixels < 0.1%)
  train      `train_check.pth`'s 2-image batch (model.train()): with the first-k sampler every
             loss of `first_k_sampler.losses` rel <= 1e-3 (acc: abs <= 0.01 percent), every
             sampler call (assignment, sampled indices, priors) against the recorded one, and
             after backward the recorded gradient norms (rel <= 1e-3), frozen parameters and
             trainable counts; with the random sampler under torch.manual_seed(0) (forward
             only) the RPN's two sampler calls: assignments and counts (htc_fast draws random
             keys, not mmdet's randperm: other indices under the same seed, the same
             distribution; the stages' candidates then differ, so they are not compared,
             nor the losses). Sampler calls are recorded by wrapping
             RandomSampler.sample (pass-through instrumentation; the real code runs); a call
             that samples the whole batch at once is recorded as one entry per image, in
             mmdet's compact candidate numbering.

Produce the data first with the oracle project (its README: it builds mmdetection 3.3.0 on CPU
and exports the state dict and reference data), then:
    python scripts/compare_oracle.py --oracle-out DIR --state-dict FILE [--images 0 1] [--skip-train]
(or set HTC_FAST_ORACLE_OUT and HTC_FAST_ORACLE_STATE_DICT instead of the two options).
Exit status 0 when every check passes, 1 otherwise. About 1-1.5 min per image and 3-4 min for
the training checks on 2 busy CPU cores (7.5 min in all) (`--cache DIR` keeps FPN features between runs while
iterating; the FPN check still runs on the cached features).

Files: this one is the command line; `oracle_inference.py` the per-image checks, `oracle_training.py`
the training checks, `oracle_helpers.py` the check table, tolerances and error measures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from oracle_helpers import Report  # noqa: E402
from oracle_inference import check_image  # noqa: E402
from oracle_training import check_train  # noqa: E402

from htc_fast.config import get_config  # noqa: E402
from htc_fast.model.checkpoint import load_checkpoint  # noqa: E402
from htc_fast.model.htc import build_htc  # noqa: E402


def load_model(state_dict_path, device):
    model = build_htc(get_config("htc_r50_fpn_1x"))
    state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    report = load_checkpoint(model, {"state_dict": state, "meta": {}}, strict=True)
    print(f"loaded {report.loaded} of {len(state)} tensors ({report.source}) from {state_dict_path}")
    return model.to(device).eval()


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
