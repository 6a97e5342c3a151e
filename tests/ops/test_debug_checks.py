"""The debug switch (``htc_fast.ops.debug_checks`` / ``HTC_FAST_DEBUG=1``).

Without it the ops read no tensor value on the host (0 sync points, counted with
``htc_fast.diagnostics.count_ops``) and bad values give the documented result on every backend:
  * NaN scores in nms / batched_nms rank above every number (torch.sort's order), ties by index;
  * NaN scores in multiclass_nms are never above score_threshold: those pairs are dropped;
  * a RoI batch index outside [0, N) or NaN pools zeros, a fractional one is truncated;
  * an htc_mask_probs label outside [0, C) gives an all-zero mask.
With it, each of these raises ``OpArgumentError`` naming the bad element.
"""
import os
import subprocess
import sys

import pytest
import torch

from htc_fast import ops
from htc_fast.diagnostics import count_ops
from htc_fast.ops import _debug
from tests.support import require_backend

BACKENDS = ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.fixture(autouse=True)
def _switch_off():
    with ops.debug_checks(False):
        yield


def random_boxes(n, device="cpu"):
    xy = torch.rand(n, 2, device=device) * 100
    return torch.cat([xy, xy + 5 + torch.rand(n, 2, device=device) * 40], 1)


def random_rois(k, n, size=32.0):
    xy = torch.rand(k, 2) * size
    wh = 1 + torch.rand(k, 2) * size
    return torch.cat([torch.randint(0, n, (k, 1)).float(), xy, xy + wh], 1)


# ----------------------------------------------------------------------------- the switch itself

def test_switch_setter_and_context_manager():
    assert not _debug.enabled()
    with ops.debug_checks():
        assert _debug.enabled()
        with ops.debug_checks(False):
            assert not _debug.enabled()
        assert _debug.enabled()
    assert not _debug.enabled()
    ops.debug_checks(True)  # a plain setter: stays on until set again (the fixture restores it)
    assert _debug.enabled()
    ops.debug_checks(False)
    assert not _debug.enabled()
    with pytest.raises(TypeError, match="enabled must be a bool"):
        ops.debug_checks("yes")


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False), ("", False)])
def test_environment_variable(value, expected):
    env = dict(os.environ, HTC_FAST_DEBUG=value)
    out = subprocess.run([sys.executable, "-c", "from htc_fast.ops import _debug; print(_debug.enabled())"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(expected)


def test_not_checked_while_compiling():
    """Under torch.compile the value checks are skipped (a data-dependent branch would break the
    graph); the compiled NMS then gives the defined no-switch result."""
    boxes, scores = random_boxes(20), torch.rand(20)
    scores[3] = float("nan")
    with ops.debug_checks():
        got = torch.compile(lambda b, s: ops.nms(b, s, 0.5, backend="cpp"), fullgraph=True)(boxes, scores)
    assert torch.equal(got, ops.nms(boxes, scores.nan_to_num(2.0), 0.5, backend="cpp"))


# ----------------------------------------------------------------------------- sync counts

def _calls(device):
    n = 60
    boxes, scores = random_boxes(n, device), torch.rand(n, device=device)
    idxs = torch.randint(0, 4, (n,), device=device)
    x = torch.randn(2, 4, 16, 16, device=device)
    rois = random_rois(10, 2, 64.0).to(device)
    levels = [x, x[..., ::2, ::2].contiguous()]
    logits = [torch.randn(6, 5, 8, 8, device=device) for _ in range(3)]
    labels = torch.randint(0, 5, (6,), device=device)
    cls_scores = torch.rand(n, 6, device=device).softmax(1)
    return {
        "nms": lambda: ops.nms(boxes, scores, 0.5),
        "batched_nms": lambda: ops.batched_nms(boxes, scores, idxs, 0.5),
        "multiclass_nms": lambda: ops.multiclass_nms(boxes, cls_scores, 0.05, 0.5, 100),
        "roi_align": lambda: ops.roi_align(x, rois, 7, 0.25, aligned=True),
        "multilevel_roi_align": lambda: ops.multilevel_roi_align(levels, rois, 7, strides=(4, 8)),
        "htc_mask_probs": lambda: ops.htc_mask_probs(logits, labels),
        "batched_nms_padded": lambda: ops.batched_nms(boxes, scores, idxs, 0.5, max_output=20, max_group_size=n),
        "multiclass_nms_padded": lambda: ops.multiclass_nms(boxes, cls_scores, 0.05, 0.5, 100, padded=True),
    }


def _unchecked_calls(device):
    """Ops without value checks: no sync with or without the switch."""
    x = torch.randn(1, 4, 5, 6, device=device)
    offset, weight = torch.randn(1, 18, 5, 6, device=device), torch.randn(2, 4, 3, 3, device=device)
    probs, boxes = torch.rand(3, 7, 7, device=device), random_boxes(3, device) / 4
    return {
        "deform_conv2d": lambda: ops.deform_conv2d(x, offset, weight, padding=1),
        "paste_masks": lambda: ops.paste_masks(probs, boxes, (30, 40)),
        "map_roi_levels": lambda: ops.map_roi_levels(random_rois(5, 1, 300.0).to(device), 4),
    }


@pytest.mark.parametrize("op", list(_unchecked_calls("cpu")))
def test_no_syncs_in_ops_without_value_checks(op):
    call = _unchecked_calls("cpu")[op]
    for switch in (False, True):
        with ops.debug_checks(switch), count_ops() as c:
            call()
        assert c.syncs == 0, c.report()


# What a call syncs for whatever the switch: NMS's output size is the data's; multiclass_nms
# selects its candidates with nonzero and indexes by the kept set.
INHERENT = {"nms": {"data_dependent_op": 1}, "batched_nms": {"data_dependent_op": 1},
            "multiclass_nms": {"nonzero": 1, "data_dependent_op": 1}}


@pytest.mark.parametrize("op", list(_calls("cpu")))
def test_no_value_checks_without_the_switch(op):
    """Default backends (cpp on CPU): no sync but the op's inherent ones without the switch, and
    the switch adds the value check's reads (which is all it adds)."""
    call = _calls("cpu")[op]
    with count_ops() as off:
        call()
    assert off.sync_breakdown == INHERENT.get(op, {}), off.report()
    with ops.debug_checks(), count_ops() as on:
        call()
    assert on.syncs > off.syncs, on.report()


# ----------------------------------------------------------------------------- NMS

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", [False, True])
def test_nan_scores_rank_first(backend, batched):
    require_backend(backend, "cpu")
    n = 40
    boxes, scores, idxs = random_boxes(n), torch.rand(n), torch.randint(0, 3, (n,))
    nan_at = torch.randperm(n)[:5]
    scores[nan_at] = float("nan")
    call = ((lambda s: ops.batched_nms(boxes, s, idxs, 0.5, backend=backend)) if batched
            else (lambda s: ops.nms(boxes, s, 0.5, backend=backend)))
    # NaN above every score in [0, 1), ties among the NaNs by index: as a score of 2.0 (stable sort).
    assert torch.equal(call(scores), call(scores.nan_to_num(2.0)))
    name = "batched_nms" if batched else "nms"
    message = rf"^{name}: scores\[{int(nan_at.min())}\] is NaN"
    with ops.debug_checks(), pytest.raises(ops.OpArgumentError, match=message):
        call(scores)


def test_multiclass_nms_drops_nan_pairs():
    n, c = 50, 4
    boxes, scores = random_boxes(n), torch.rand(n, c + 1).softmax(1)
    scores[torch.randint(0, n, (6,)), torch.randint(0, c, (6,))] = float("nan")
    got = ops.multiclass_nms(boxes, scores, 0.01, 0.5, 100)
    expected = ops.multiclass_nms(boxes, scores.nan_to_num(-1.0), 0.01, 0.5, 100)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    with ops.debug_checks(), pytest.raises(ops.OpArgumentError, match=r"^multiclass_nms: scores\[\d+, \d\] is NaN"):
        ops.multiclass_nms(boxes, scores, 0.01, 0.5, 100)


# ----------------------------------------------------------------------------- RoIAlign

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("multilevel", [False, True])
def test_bad_batch_index_pools_zeros(backend, multilevel):
    require_backend(backend, "cpu")
    n = 2
    x = torch.randn(n, 3, 12, 14)
    rois = random_rois(8, n, 40.0)
    rois[:5, 0] = torch.tensor([-1.0, float(n), float("nan"), 0.7, n - 0.5])
    levels = [x, x[..., ::2, ::2].contiguous()]

    def call(r):
        if multilevel:
            return ops.multilevel_roi_align(levels, r, 3, strides=(4, 8), finest_scale=8, backend=backend)
        return ops.roi_align(x, r, 3, 0.25, 2, True, backend=backend)
    got = call(rois)
    assert (got[:3] == 0).all()
    truncated = rois.clone()
    truncated[:, 0] = truncated[:, 0].trunc()
    torch.testing.assert_close(got[3:], call(truncated[3:]), rtol=0, atol=0)
    assert got[3:].abs().sum() > 0
    with ops.debug_checks(), pytest.raises(ops.OpArgumentError,
                                           match=r"rois\[0, 0\] = -1.0 is not a batch index in \[0, 2\)"):
        call(rois)
    fractional = rois[3:4]
    with ops.debug_checks(), pytest.raises(ops.OpArgumentError,
                                           match=r"rois\[0, 0\] = 0.69999\d* is not a batch index"):
        call(fractional)


# ----------------------------------------------------------------------------- htc_mask_probs

def test_out_of_range_labels_give_empty_masks():
    n, c, m = 7, 5, 6
    logits = [torch.randn(n, c, m, m) for _ in range(3)]
    labels = torch.randint(0, c, (n,))
    labels[[1, 4]] = torch.tensor([c, -1])
    got = ops.htc_mask_probs(logits, labels)
    assert (got[[1, 4]] == 0).all()
    ok = torch.tensor([0, 2, 3, 5, 6])
    # (mean over a stack of another size may round differently in the last place: 1e-7 absolute)
    torch.testing.assert_close(got[ok], ops.htc_mask_probs([t[ok] for t in logits], labels[ok]), rtol=0, atol=1e-7)
    message = rf"labels\[1\] = {c} is not a class in \[0, {c}\)"
    with ops.debug_checks(), pytest.raises(ops.OpArgumentError, match=message):
        ops.htc_mask_probs(logits, labels)
