"""Pinned op and sync budgets of the model's hot path (issue 11), counted with
htc_fast.diagnostics.count_ops on HTC R-50, a batch of 2 images of 256x384 with 5 objects each
(htc_fast.diagnostics.workload), CPU, default backends, debug checks off, steady state (one
uncounted warm-up call fills the anchor and layout caches; the training count takes the GPU path
of the mask branch, at its fixed capacity).

What is pinned (a small margin over what the code reaches today; lower them when you remove ops,
never raise them without a reason in the commit message):

| | dispatched ops | sync points |
|---|---:|---:|
| training iteration (forward + backward, random sampler) | <= 2,400 (2,354 measured; the target: 2,500) | 0 |
| ``model.predict`` batch (bitmap masks) | <= 675 (665 measured; the target: 700) | <= 1 (the detection counts) |

Kernel ops (``OpCounts.kernel_ops``: the ops that are not views, i.e. the ones that launch a
kernel on a GPU) are pinned as well: training <= 1,560 (1,525 measured), predict <= 545 (536).

The issue's training launch target (2,500 dispatched ops, from 4,607) is its own test, reached
since the assignment became one fused op (``htc_fast.ops.max_iou_assign``).
Counts are deterministic (seeded sampler, fixed inputs), so exact pins are safe; a failure prints
the sync sites and the most frequent ops.
"""
import pytest
import torch

from htc_fast.config import get_config
from htc_fast.diagnostics.workload import count_predict, count_train_step, synthetic_batch
from htc_fast.model.htc import build_htc
from htc_fast.ops import debug_checks

TRAIN_OPS, TRAIN_SYNCS = 2400, 0
PREDICT_OPS, PREDICT_SYNCS = 675, 1
TRAIN_KERNEL_OPS, PREDICT_KERNEL_OPS = 1560, 545
TARGET_TRAIN_OPS = 2500  # issue 11's launch budget for training


@pytest.fixture(scope="module")
def counts():
    torch.manual_seed(0)
    model = build_htc(get_config("htc_r50_fpn_1x"))
    batch, targets = synthetic_batch(2, 256, 384)
    with debug_checks(False):
        train = count_train_step(model, batch, targets, generator=torch.Generator().manual_seed(0))
        predict = count_predict(model, batch)
    return train, predict


def test_training_iteration_syncs(counts):
    train, _ = counts
    assert train.syncs <= TRAIN_SYNCS, train.report()


def test_training_iteration_ops(counts):
    train, _ = counts
    assert train.ops <= TRAIN_OPS, train.report()


def test_kernel_ops(counts):
    train, predict = counts
    assert train.kernel_ops <= TRAIN_KERNEL_OPS, train.report()
    assert predict.kernel_ops <= PREDICT_KERNEL_OPS, predict.report()


def test_predict_syncs(counts):
    _, predict = counts
    assert predict.syncs <= PREDICT_SYNCS, predict.report()
    # The one allowed sync is the read of the detection counts, nothing else.
    assert set(predict.sync_breakdown) <= {"tolist"}, predict.report()


def test_predict_ops(counts):
    _, predict = counts
    assert predict.ops <= PREDICT_OPS, predict.report()


def test_training_iteration_reaches_the_launch_target(counts):
    assert counts[0].ops <= TARGET_TRAIN_OPS
