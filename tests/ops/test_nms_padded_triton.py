"""Fixed-capacity batched NMS on Triton (``htc_fast::batched_nms_padded_triton``, issue 11): equal
to the reference batched NMS truncated to max_output and padded with -1, with a device count; no
host sync. Oracle: ``per_class_loop`` of test_nms.py (torchvision's nms per group, stable merge).
"""
import pytest
import torch

from tests.ops.test_nms import KINDS, THRESHOLDS, nms_inputs, per_class_loop
from tests.support import require_backend

pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")]


@pytest.fixture
def kernels(device):
    require_backend("triton", device.type)
    from htc_fast.kernels import nms

    return nms


def expected(kept, max_output):
    out = torch.full((max_output,), -1, dtype=torch.long)
    count = min(kept.shape[0], max_output)
    out[:count] = kept[:count]
    return out, count


def check(kernels, boxes, scores, idxs, threshold, max_output, max_group_size, device):
    keep, num_kept = kernels.batched_nms_padded_triton(boxes.to(device), scores.to(device),
                                                       idxs.to(device), threshold, max_output,
                                                       max_group_size)
    want, count = expected(per_class_loop(boxes, scores, idxs, threshold, torch.float32), max_output)
    assert keep.dtype == torch.long and keep.shape == (max_output,) and keep.device.type == device.type
    assert num_kept.dtype == torch.long and num_kept.dim() == 0
    assert torch.equal(keep.cpu(), want), (keep, want)
    assert int(num_kept) == count


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [1, 40])
def test_matches_batched_nms(kernels, device, kind, groups):
    threshold = THRESHOLDS[torch.randint(0, len(THRESHOLDS), ()).item()]
    n = 150
    boxes, scores = nms_inputs(kind, n, threshold)
    idxs = torch.randint(0, groups, (n,))
    full = per_class_loop(boxes, scores, idxs, threshold, torch.float32).shape[0]
    largest = int(torch.bincount(idxs).max())
    # max_output < K with the tightest capacity, > K with a loose one (the interpreter is slow)
    check(kernels, boxes, scores, idxs, threshold, max(1, full // 2), largest, device)
    check(kernels, boxes, scores, idxs, threshold, full + 7, n, device)


def test_many_groups_and_ties(kernels, device):
    n = 200
    boxes, scores = nms_inputs("tied", n, 0.5)
    idxs = torch.randint(-50, 50, (n,))  # negative ids are groups too
    check(kernels, boxes, scores, idxs, 0.5, 60, n, device)


def test_empty_and_zero_capacity(kernels, device):
    boxes, scores = nms_inputs("random", 20, 0.5)
    idxs = torch.randint(0, 3, (20,))
    check(kernels, boxes[:0], scores[:0], idxs[:0], 0.5, 10, 5, device)
    keep, num_kept = kernels.batched_nms_padded_triton(boxes.to(device), scores.to(device),
                                                       idxs.to(device), 0.5, 0, 20)
    assert keep.shape == (0,) and int(num_kept) == 0


def test_group_over_capacity_drops_the_overflow(kernels, device):
    """A group larger than max_group_size: its boxes past the first max_group_size by score are
    dropped (documented), never read out of bounds; the other groups are exact."""
    boxes, scores = nms_inputs("random", 200, 0.5)
    idxs = torch.zeros(200, dtype=torch.long)
    idxs[:10] = 1  # group 1 fits; group 0 (190 boxes) is cut at 64
    keep, num_kept = kernels.batched_nms_padded_triton(boxes.to(device), scores.to(device),
                                                       idxs.to(device), 0.5, 200, 64)
    order = torch.sort(scores, descending=True, stable=True).indices
    in_group0 = order[idxs[order] == 0]
    allowed = torch.cat([in_group0[:64], (idxs == 1).nonzero().squeeze(1)])
    sub = per_class_loop(boxes[allowed], scores[allowed], idxs[allowed], 0.5, torch.float32)
    want, count = expected(allowed[sub], 200)
    assert torch.equal(keep.cpu(), want) and int(num_kept) == count


def test_bad_capacity(kernels, device):
    boxes, scores = nms_inputs("random", 4, 0.5)
    idxs = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="max_output"):
        kernels.batched_nms_padded_triton(boxes, scores, idxs, 0.5, -1, 4)
    with pytest.raises(ValueError, match="max_group_size"):
        kernels.batched_nms_padded_triton(boxes, scores, idxs, 0.5, 4, -2)


def test_no_host_sync(kernels, device):
    if device.type != "cuda":
        pytest.skip("sync detection needs CUDA (torch.cuda.set_sync_debug_mode)")
    boxes, scores = nms_inputs("random", 100, 0.5)
    args = (boxes.to(device), scores.to(device), torch.randint(0, 5, (100,), device=device))
    kernels.batched_nms_padded_triton(*args, 0.5, 50, 100)  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.batched_nms_padded_triton(*args, 0.5, 50, 100)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_opcheck_and_compile(kernels, device):
    boxes, scores = nms_inputs("random", 40, 0.5)
    args = (boxes.to(device), scores.to(device), torch.randint(0, 4, (40,), device=device))
    torch.library.opcheck(kernels.batched_nms_padded_triton, (*args, 0.5, 16, 40))
    compiled = torch.compile(lambda b, s, i: kernels.batched_nms_padded_triton(b, s, i, 0.5, 16, 40),
                             fullgraph=True)
    keep, num_kept = compiled(*args)
    want, count = kernels.batched_nms_padded_triton(*args, 0.5, 16, 40)
    assert torch.equal(keep, want) and int(num_kept) == int(count)
