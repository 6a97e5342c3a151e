"""torch.ops.htc_fast.batched_nms_padded (the C++/CUDA kernel behind fixed-capacity batched NMS).

Oracle: `per_class_loop` (torchvision's nms on each group alone, merged by a stable sort; see
test_nms.py) cut to max_output and padded with -1, compared with ``torch.equal``; num_kept is
min(kept, max_output). Groups larger than max_group_size take part with their max_group_size
best-scored boxes (ties by index): the oracle then runs on exactly those boxes. Inputs are fresh
every run (random sizes, 0 boxes included, many groups, tied scores and duplicate boxes).
"""
import random

import pytest
import torch

import htc_fast.ops  # noqa: F401  (loads htc_fast._C, which registers the operator)
from tests.ops.test_nms import nms_inputs, per_class_loop, random_boxes, tied
from tests.support import require_backend

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")

padded = torch.ops.htc_fast.batched_nms_padded


@pytest.fixture
def cpp(device):
    require_backend("cpp", device.type)
    return device


def expected(boxes, scores, idxs, threshold, max_output, max_group_size=None):
    """(keep, num_kept) from the oracle, with groups cut to their max_group_size best boxes."""
    n = scores.shape[0]
    members = torch.arange(n)
    if max_group_size is not None and n:
        order = torch.sort(scores.cpu(), descending=True, stable=True).indices
        rank = torch.zeros(n, dtype=torch.long)
        seen = {}
        for i in order.tolist():
            g = int(idxs[i])
            rank[i] = seen.get(g, 0)
            seen[g] = rank[i].item() + 1
        members = (rank < max_group_size).nonzero().squeeze(1)
    kept = members[per_class_loop(boxes[members], scores[members], idxs[members], threshold, boxes.dtype)]
    count = min(len(kept), max_output)
    keep = torch.full((max_output,), -1, dtype=torch.long)
    keep[:count] = kept[:count]
    return keep, count


def check(boxes, scores, idxs, threshold, max_output, max_group_size, device, *, cut=False):
    keep, num_kept = padded(boxes.to(device), scores.to(device), idxs.to(device), threshold, max_output,
                            max_group_size)
    want_keep, want_count = expected(boxes, scores, idxs, threshold, max_output,
                                     max_group_size if cut else None)
    assert keep.dtype == torch.int64 and keep.shape == (max_output,) and keep.device.type == device.type
    assert num_kept.dtype == torch.int64 and num_kept.dim() == 0 and num_kept.device.type == device.type
    assert torch.equal(keep.cpu(), want_keep), (keep.cpu()[:20], want_keep[:20])
    assert int(num_kept) == want_count
    return want_count


def largest_group(idxs):
    return int(torch.bincount(idxs.long()).max()) if idxs.numel() else 1


@pytest.mark.parametrize("kind", ["random", "clustered", "tied", "straddle"])
@pytest.mark.parametrize("groups", [1, 3, 80])
def test_matches_batched_nms_cut_and_padded(cpp, kind, groups):
    threshold = random.choice([0.3, 0.5, 0.7])
    n = random.randint(1, 600)
    boxes, scores = nms_inputs(kind, n, threshold)
    n = scores.shape[0]
    idxs = torch.randint(0, groups, (n,))
    g = largest_group(idxs)
    full = torch.ops.htc_fast.batched_nms(boxes.to(cpp), scores.to(cpp), idxs.to(cpp), threshold).cpu()
    for max_output in sorted({0, 1, len(full) // 2, len(full), len(full) + random.randint(1, 50)}):
        for max_group_size in (g, g + random.randint(1, 100)):
            count = check(boxes, scores, idxs, threshold, max_output, max_group_size, cpp)
            keep, _ = padded(boxes.to(cpp), scores.to(cpp), idxs.to(cpp), threshold, max_output,
                             max_group_size)
            assert torch.equal(keep.cpu()[:count], full[:count])  # the existing op, cut


def test_zero_boxes(cpp):
    for max_output in (0, 5):
        keep, num_kept = padded(torch.zeros(0, 4, device=cpp), torch.zeros(0, device=cpp),
                                torch.zeros(0, dtype=torch.long, device=cpp), 0.5, max_output, 10)
        assert torch.equal(keep.cpu(), torch.full((max_output,), -1)) and int(num_kept) == 0
        assert keep.dtype == num_kept.dtype == torch.int64 and num_kept.dim() == 0


def test_ties_are_broken_by_index(cpp):
    boxes, scores = tied(400)
    idxs = torch.randint(0, 5, (400,))
    check(boxes, scores, idxs, 0.5, 500, 400, cpp)
    check(boxes, scores, idxs, 0.5, 37, 400, cpp)


def test_many_groups(cpp):
    n = 4000
    boxes, scores = random_boxes(n, canvas=400.0), torch.rand(n)
    idxs = torch.randint(0, 500, (n,))
    check(boxes, scores, idxs, 0.5, 1000, largest_group(idxs), cpp)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_idxs_dtypes(cpp, dtype):
    boxes, scores = random_boxes(300), torch.rand(300)
    idxs = torch.randint(0, 7, (300,)).to(dtype)
    check(boxes, scores, idxs, 0.5, 100, 300, cpp)


def test_groups_larger_than_max_group_size_keep_their_best_boxes(cpp):
    n = 500
    boxes, scores = random_boxes(n), torch.rand(n)
    scores[torch.randint(0, n, (n // 5,))] = 0.5  # ties at the cut: broken by index
    idxs = torch.randint(0, 4, (n,))
    for max_group_size in (1, 7, 64, 65, largest_group(idxs) - 1):
        check(boxes, scores, idxs, 0.5, n, max_group_size, cpp, cut=True)
        check(boxes, scores, idxs, 0.5, 10, max_group_size, cpp, cut=True)


def test_fp64_and_low_precision_boxes(cpp):
    n = 300
    boxes, scores = random_boxes(n), torch.rand(n)
    idxs = torch.randint(0, 3, (n,))
    check(boxes.double(), scores.double(), idxs, 0.5, 200, n, cpp)
    # fp16 boxes: IoU in fp32 on the fp16 values, as batched_nms
    b16 = boxes.half()
    keep, num_kept = padded(b16.to(cpp), scores.half().to(cpp), idxs.to(cpp), 0.5, n, n)
    full = torch.ops.htc_fast.batched_nms(b16.to(cpp), scores.half().to(cpp), idxs.to(cpp), 0.5).cpu()
    assert int(num_kept) == len(full) and torch.equal(keep.cpu()[:len(full)], full)


def test_bad_sizes_name_the_argument(cpp):
    boxes, scores = random_boxes(10).to(cpp), torch.rand(10, device=cpp)
    idxs = torch.zeros(10, dtype=torch.long, device=cpp)
    with pytest.raises(ValueError, match="max_output"):
        padded(boxes, scores, idxs, 0.5, -1, 10)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="max_group_size"):
            padded(boxes, scores, idxs, 0.5, 10, bad)
    with pytest.raises(RuntimeError, match="idxs"):
        padded(boxes, scores, idxs[:5], 0.5, 10, 10)
    with pytest.raises(RuntimeError, match="boxes"):
        padded(boxes[:, :3], scores, idxs, 0.5, 10, 10)


def test_opcheck_schema_fake_kernel_and_compile(cpp):
    """The kernels agree with the schema and with the fake kernel registered by htc_fast.ops."""
    boxes, scores, idxs = random_boxes(60).to(cpp), torch.rand(60, device=cpp), torch.randint(0, 3, (60,), device=cpp)
    for n in (60, 0):
        torch.library.opcheck(padded.default, (boxes[:n], scores[:n], idxs[:n], 0.5, 20, 60))
