"""Fixed-capacity NMS (``max_output=K``) and the sync-free ``multiclass_nms(padded=True)``.

Definition: ``PaddedKeep(keep, num_kept)`` with keep = the data-dependent result[:K] padded with -1
and num_kept = min(len(result), K) as a 0-d int64 tensor on the boxes' device. The oracle is the
same op without ``max_output`` on the same backend (itself tested against torchvision in
test_nms.py) and, for multiclass_nms, the unpadded result. Fresh random inputs every run: clustered
detections, tied scores, many groups, no boxes.
"""
import pytest
import torch

from htc_fast import ops
from htc_fast.diagnostics import count_ops
from tests.ops.test_multiclass_nms import HTC_TEST, problem
from tests.ops.test_nms import class_scores, detections, nms_inputs
from tests.support import require_backend


def size_for(backend):
    return {"reference": 200, "cpp": 2000, "triton": 40}[backend]


def expected_padded(keep, capacity):
    out = torch.full((capacity,), -1, dtype=torch.long, device=keep.device)
    k = min(keep.shape[0], capacity)
    out[:k] = keep[:k]
    return out, k


def assert_padded(got, keep, capacity, device):
    assert isinstance(got, ops.PaddedKeep)
    assert got.keep.dtype == got.num_kept.dtype == torch.int64
    assert got.keep.shape == (capacity,) and got.num_kept.shape == ()
    assert got.keep.device.type == got.num_kept.device.type == device.type
    out, k = expected_padded(keep, capacity)
    assert torch.equal(got.keep, out) and int(got.num_kept) == k


@pytest.mark.parametrize("kind", ["clustered", "tied"])
def test_nms_padded_is_the_result_cut_and_padded(backend, device, kind):
    n = size_for(backend)
    boxes, scores = (t.to(device) for t in nms_inputs(kind, n, 0.5))
    keep = ops.nms(boxes, scores, 0.5, backend=backend)
    for capacity in (1, max(1, keep.shape[0] // 2), keep.shape[0] + 7):
        assert_padded(ops.nms(boxes, scores, 0.5, max_output=capacity, backend=backend), keep, capacity, device)


@pytest.mark.parametrize("groups", [1, 3, 80])
def test_batched_nms_padded_is_the_result_cut_and_padded(backend, device, groups):
    n = size_for(backend)
    boxes, obj = detections(n)
    scores, idxs = torch.rand(n), torch.randint(0, groups, (n,))
    scores[torch.randint(0, n, (n // 5,))] = 0.5  # ties across and within groups
    boxes, scores, idxs = boxes.to(device), scores.to(device), idxs.to(device)
    keep = ops.batched_nms(boxes, scores, idxs, 0.5, backend=backend)
    largest = int(torch.bincount(idxs.cpu()).max())
    for capacity, group_size in ((1, None), (max(1, keep.shape[0] // 3), largest), (keep.shape[0] + 5, n)):
        got = ops.batched_nms(boxes, scores, idxs, 0.5, max_output=capacity, max_group_size=group_size,
                              backend=backend)
        assert_padded(got, keep, capacity, device)


def test_groups_beyond_max_group_size_keep_their_best_boxes(backend, device):
    """A group larger than max_group_size takes part with its max_group_size best-scored boxes
    (ties by index): the result is batched_nms of those boxes (same on every backend)."""
    n, cap = size_for(backend), 3
    # Half clustered (suppression within the cap), half disjoint far away (every one would be kept:
    # so each group surely has kept boxes beyond its cap).
    clustered = detections(n - n // 2)[0]
    grid = torch.arange(n // 2, dtype=torch.float32) * 20
    disjoint = torch.stack([grid, grid, grid + 10, grid + 10], 1) + 10000
    boxes = torch.cat([clustered, disjoint])
    scores, idxs = torch.rand(n), torch.randint(0, 4, (n,))
    scores[::7] = 0.5  # ties
    by_score = torch.sort(scores, descending=True, stable=True).indices
    ranks = torch.zeros(n, dtype=torch.long)
    seen = {}
    for i in by_score.tolist():
        ranks[i] = seen.get(int(idxs[i]), 0)
        seen[int(idxs[i])] = ranks[i] + 1
    members = (ranks < cap).nonzero().squeeze(1)
    keep = members[ops.batched_nms(boxes[members], scores[members], idxs[members], 0.5, backend="reference")]
    got = ops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5, max_output=n,
                          max_group_size=cap, backend=backend)
    assert_padded(got, keep.to(device), n, device)


def test_no_boxes(backend, device):
    boxes, scores = torch.zeros(0, 4, device=device), torch.zeros(0, device=device)
    idxs = torch.zeros(0, dtype=torch.long, device=device)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    assert_padded(ops.nms(boxes, scores, 0.5, max_output=3, backend=backend), empty, 3, device)
    assert_padded(ops.batched_nms(boxes, scores, idxs, 0.5, max_output=3, backend=backend), empty, 3, device)


@pytest.mark.parametrize("backend", ["reference", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_no_host_syncs(backend):
    require_backend(backend, "cpu")
    n = 30
    boxes, obj = detections(n)
    scores, idxs = torch.rand(n), obj % 3
    with count_ops() as c:
        ops.nms(boxes, scores, 0.5, max_output=8, backend=backend)
        ops.batched_nms(boxes, scores, idxs, 0.5, max_output=8, max_group_size=n, backend=backend)
    assert c.syncs == 0, c.report()


def test_group_larger_than_max_group_size_is_reported_in_debug_mode():
    boxes, scores, idxs = detections(20)[0], torch.rand(20), torch.zeros(20, dtype=torch.long)
    idxs[:5] = 1
    ops.batched_nms(boxes, scores, idxs, 0.5, max_output=4, max_group_size=15)  # 15 boxes in group 0
    with ops.debug_checks(), pytest.raises(ops.OpArgumentError,
                                           match="group idxs == 0 holds 15 boxes, more than max_group_size = 14"):
        ops.batched_nms(boxes, scores, idxs, 0.5, max_output=4, max_group_size=14)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(max_output=0), ops.OpArgumentError, "max_output must be an int >= 1 and <= 16777216, got 0"),
    (dict(max_output=-3), ops.OpArgumentError, "max_output must be an int >= 1"),
    (dict(max_output=2 ** 40), ops.OpArgumentError,
     "max_output must be an int >= 1 and <= 16777216, got 1099511627776"),
    (dict(max_output=4, max_group_size=0), ops.OpArgumentError, "max_group_size must be an int >= 1"),
    (dict(max_output=2.5), ops.OpTypeError, "max_output must be an int, got float 2.5"),
    (dict(max_output=True), ops.OpTypeError, "max_output must be an int, got bool"),
    (dict(max_output=torch.tensor(3)), ops.OpTypeError, "max_output must be an int, got a torch.int64 tensor"),
    (dict(max_output=4, max_group_size="8"), ops.OpTypeError, "max_group_size must be an int, got str"),
    (dict(max_group_size=8), ops.OpArgumentError, "max_group_size is used only with max_output"),
])
def test_capacity_argument_errors(kwargs, error, message):
    boxes, scores, idxs = detections(6)[0], torch.rand(6), torch.zeros(6, dtype=torch.long)
    with pytest.raises(error, match=f"^batched_nms: {message}"):
        ops.batched_nms(boxes, scores, idxs, 0.5, **kwargs)
    if "max_group_size" not in kwargs:
        with pytest.raises(error, match=f"^nms: {message}"):
            ops.nms(boxes, scores, 0.5, **kwargs)


def test_compile_static_shape(fast_backend, device):
    """fullgraph, and the output shape is static: (K,) and (), with no unbacked symbol."""
    def fn(boxes, scores, idxs):
        keep, num = ops.batched_nms(boxes, scores, idxs, 0.5, max_output=16, backend=fast_backend)
        return keep, num, boxes[keep.clamp(min=0)]

    n = 24
    boxes, obj = detections(n)
    args = boxes.to(device), torch.rand(n, device=device), (obj % 3).to(device)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False)
    for got, expected in zip(compiled(*args), fn(*args)):
        assert torch.equal(got, expected)
    assert compiled(*args)[0].shape == (16,)


def test_opcheck_padded_operator(device):
    require_backend("cpp", device.type)
    boxes, obj = detections(24)
    args = (boxes.to(device), torch.rand(24, device=device), (obj % 3).to(device), 0.5, 10, 24)
    torch.library.opcheck(torch.ops.htc_fast.batched_nms_padded.default, args)


# ----------------------------------------------------------------------------- multiclass_nms

@pytest.mark.parametrize("layout", ["agnostic", "per_class"])
@pytest.mark.parametrize("max_per_image", [100, 7, 0])
def test_multiclass_padded_equals_unpadded(backend, device, layout, max_per_image):
    n, num_classes = problem(backend)
    if backend == "reference":
        n, num_classes = 60, 5  # the padded reference steps once per (row, class) pair
    boxes, obj = detections(n)
    if layout == "per_class":
        boxes = boxes[:, None] + 4 * torch.randn(n, num_classes, 4)
    scores = class_scores(obj, num_classes)
    scores[torch.randint(0, n, (3,)), torch.randint(0, num_classes, (3,))] = float("nan")
    boxes, scores = boxes.to(device), scores.to(device)
    for threshold in (0.001, 0.05, 0.3):
        args = dict(HTC_TEST, score_threshold=threshold, max_per_image=max_per_image, backend=backend)
        want = ops.multiclass_nms(boxes, scores, **args)
        got = ops.multiclass_nms(boxes, scores, **args, padded=True)
        assert isinstance(got, ops.PaddedDetections)
        capacity = max_per_image if max_per_image > 0 else n * num_classes
        assert got.boxes.shape == (capacity, 4) and got.labels.shape == (capacity,)
        m = int(got.num_dets)
        assert m == want.indices.shape[0]
        for name, g, w in zip(want._fields, got, want):
            assert torch.equal(g[:m], w), name
        assert (got.labels[m:] == -1).all() and (got.indices[m:] == -1).all()
        assert (got.scores[m:] == 0).all() and (got.boxes[m:] == 0).all()


def test_multiclass_padded_without_syncs():
    require_backend("cpp", "cpu")
    boxes, obj = detections(200)
    scores = class_scores(obj, 10)
    with count_ops() as c:
        ops.multiclass_nms(boxes, scores, **HTC_TEST, padded=True)
    assert c.syncs == 0, c.report()


def test_multiclass_padded_no_rows():
    got = ops.multiclass_nms(torch.zeros(0, 4), torch.zeros(0, 4), 0.05, 0.5, 0, padded=True)
    assert got.boxes.shape == (0, 4) and int(got.num_dets) == 0
    got = ops.multiclass_nms(torch.zeros(0, 4), torch.zeros(0, 4), 0.05, 0.5, 5, padded=True)
    assert got.boxes.shape == (5, 4) and int(got.num_dets) == 0 and (got.indices == -1).all()
