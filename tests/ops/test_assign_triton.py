"""The Triton max-IoU assignment (``htc_fast::max_iou_assign_triton``, kernels/assign.py) against the
reference (htc_fast/ops/reference/assign.py) element for element: exact ties (duplicate boxes and
ground truth, overlaps of exactly 0.5 at a 0.5 threshold), padded ground truth, invalid boxes,
shared (1, N, 4) boxes, 1 to 3 (and 8) threshold sets, infinite thresholds, both option flags,
empty sizes, float64, NaN coordinates; small block sizes so that pass 1 merges several blocks.
The general backend tests (the public function, every backend) are in test_max_iou_assign.py.
Small N: the interpreter is slow.
"""
import pytest
import torch

from htc_fast.ops.reference.assign import max_iou_assign as reference
from tests.support import require_backend
from tests.test_triton_compile import run_script

pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.fixture
def kernels(device):
    require_backend("triton", device.type)
    from htc_fast.kernels import assign

    return assign


@pytest.fixture(params=["default blocks", "small blocks"])
def blocks(request, kernels, monkeypatch):
    """Small blocks: pass 1 merges several blocks per ground truth (ties across blocks), pass 2 runs
    several programs per image, at the interpreter's small N."""
    if request.param == "small blocks":
        monkeypatch.setattr(kernels, "BLOCK_N", 16)
        monkeypatch.setattr(kernels, "BLOCK", 16)
    return request.param


def random_boxes(*shape, size=64.0):
    xy = torch.rand(*shape, 2, dtype=torch.float64) * size
    return torch.cat([xy, xy + torch.rand(*shape, 2, dtype=torch.float64) * size / 2 + 0.5], -1)


def make_case(batch, num_gts, num_boxes, dtype, shared=False, nan=False):
    """Boxes and padded ground truth with exact ties: copies of ground-truth boxes (overlap 1 with
    it), boxes covering half a ground truth's width (overlap exactly 0.5), duplicated boxes (equal
    overlaps along N), duplicated ground-truth rows (along G), degenerate boxes (the union floor)."""
    gt = random_boxes(batch, num_gts).round()
    if num_gts > 1:
        gt[:, 1] = gt[:, 0]  # a ground-truth row twice: argmax ties
    boxes = random_boxes(1 if shared else batch, num_boxes).round(decimals=1)
    if num_gts >= 3 and num_boxes >= 40:
        src = gt[:1 if shared else batch]
        boxes[:, :4] = src[:, 2:3]  # overlap 1 with ground truth 2
        half = src[:, 3:4].clone()
        half[..., 2] = (half[..., 0] + half[..., 2]) / 2  # integer corners: exactly half the area
        boxes[:, 4:8] = half  # ground truth 3's best overlap (mostly): 0.5, reached 4 times ...
        boxes[:, [20, 37]] = half[:, :2]  # ... and again later (other blocks of 16)
        dup = torch.randint(0, num_boxes, (num_boxes // 5,))
        boxes[:, -dup.shape[0]:] = boxes[:, dup]  # later copies of earlier boxes: first index wins
        boxes[:, num_boxes // 2, 2] = boxes[:, num_boxes // 2, 0]  # zero width
    if nan and num_boxes >= 4:
        boxes[:, torch.randint(0, num_boxes, (3,)), torch.randint(0, 4, (3,))] = float("nan")
        if num_gts > 2:
            gt[:, 2, torch.randint(0, 4, ())] = float("nan")
    valid = torch.rand(batch, num_boxes) > 0.2
    gt_valid = torch.rand(batch, num_gts) > 0.3
    if batch > 1:
        gt_valid[-1] = False  # an image without ground truth (padding rows only)
    labels = torch.randint(0, 80, (batch, num_gts))
    return boxes.to(dtype), gt.to(dtype), labels, valid, gt_valid


def random_thresholds(sets):
    """sets (pos, neg_lo, neg_hi, min_pos) groups; 0.5 appears (exact 0.5 overlaps sit on it)."""
    flat = []
    for _ in range(sets):
        pos = [0.5, 0.7, float(torch.rand(()) * 0.6 + 0.2)][int(torch.randint(0, 3, ()))]
        neg_hi = min(pos, [0.3, 0.5][int(torch.randint(0, 2, ()))])
        min_pos = [0.0, 0.3, 0.5, pos][int(torch.randint(0, 4, ()))]
        flat += [pos, [0.0, 0.1][int(torch.randint(0, 2, ()))], neg_hi, min_pos]
    return flat


def assert_same(got, want):
    """Exactly equal outputs; max_overlaps NaN where the reference's is (NaN != NaN for equal)."""
    inds, overlaps, labels = (t.cpu() for t in got)
    assert inds.dtype == labels.dtype == torch.long and overlaps.dtype == want[1].dtype
    assert torch.equal(inds, want[0]), (inds, want[0])
    assert torch.equal(labels, want[2]), (labels, want[2])
    nan = want[1].isnan()
    assert torch.equal(overlaps.isnan(), nan)
    assert torch.equal(overlaps.masked_fill(nan, 0), want[1].masked_fill(nan, 0)), (overlaps, want[1])


def check(kernels, device, case, thresholds, low_quality, assign_all, optional=(True, True, True)):
    boxes, gt, labels, valid, gt_valid = case
    labels, valid, gt_valid = (t if keep else None for t, keep in zip((labels, valid, gt_valid), optional))
    want = reference(boxes, gt, labels, valid, gt_valid, thresholds, low_quality, assign_all)
    on = [None if t is None else t.to(device) for t in (boxes, gt, labels, valid, gt_valid)]
    got = kernels.max_iou_assign_triton(*on, thresholds, low_quality, assign_all)
    assert all(t.device.type == device.type for t in got)
    assert_same(got, want)
    return want


@pytest.mark.parametrize("sets", [1, 2, 3])
@pytest.mark.parametrize("low_quality,assign_all", [(True, True), (True, False), (False, True)])
def test_matches_reference(kernels, device, blocks, sets, low_quality, assign_all):
    case = make_case(3, 6, 70, torch.float32)
    want = check(kernels, device, case, random_thresholds(sets), low_quality, assign_all)
    assert (want[0] > 0).any() and (want[0] == 0).any() and (want[0] == -1).any()  # a case that decides


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_boxes_and_absent_optionals(kernels, device, blocks, dtype):
    case = make_case(2, 5, 60, dtype, shared=True)
    for optional in [(True, True, True), (False, False, False), (False, True, False), (True, False, True)]:
        check(kernels, device, case, random_thresholds(2), True, bool(torch.randint(0, 2, ())), optional)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("assign_all", [True, False])
def test_nan_coordinates(kernels, device, blocks, dtype, assign_all):
    case = make_case(2, 5, 50, dtype, nan=True)
    want = check(kernels, device, case, random_thresholds(2), True, assign_all)
    assert want[1].isnan().any()  # NaN reached the maxima


def test_eight_sets_and_float64(kernels, device):
    case = make_case(2, 7, 40, torch.float64)
    check(kernels, device, case, random_thresholds(8), True, True)


def test_infinite_thresholds(kernels, device):
    """inf / -inf thresholds (no positives, every box negative, no low-quality match) become
    constants of the kernel: they must compare as the reference's."""
    inf = float("inf")
    case = make_case(2, 5, 40, torch.float32)
    want = check(kernels, device, case, [inf, -inf, inf, inf, 0.5, 0.0, 0.5, -inf], True, True)
    assert (want[0][0] == 0).any() and (want[0][0] <= 0).all()


def test_every_box_invalid_and_no_ground_truth(kernels, device):
    boxes, gt, labels, valid, gt_valid = make_case(2, 4, 30, torch.float32)
    check(kernels, device, (boxes, gt, labels, torch.zeros_like(valid), gt_valid), random_thresholds(2), True, True)
    check(kernels, device, (boxes, gt, labels, valid, torch.zeros_like(gt_valid)), random_thresholds(1), True, True)


@pytest.mark.parametrize("batch,num_gts,num_boxes", [(2, 0, 20), (2, 3, 0), (0, 3, 20), (2, 0, 0)])
def test_empty_sizes(kernels, device, batch, num_gts, num_boxes):
    case = make_case(batch, num_gts, num_boxes, torch.float32)
    got = check(kernels, device, case, random_thresholds(2), True, True)
    assert got[0].shape == (2, batch, num_boxes)


def test_bad_arguments_name_the_argument(kernels, device):
    boxes, gt, labels, valid, gt_valid = (t.to(device) for t in make_case(2, 3, 10, torch.float32))
    th = [0.5, 0.0, 0.5, 0.5]
    with pytest.raises(ValueError, match="boxes must have gt_boxes' dtype"):
        kernels.max_iou_assign_triton(boxes.double(), gt, labels, valid, gt_valid, th, True, True)
    with pytest.raises(ValueError, match="gt_boxes must be float32 or float64"):
        kernels.max_iou_assign_triton(boxes.half(), gt.half(), labels, valid, gt_valid, th, True, True)
    with pytest.raises(ValueError, match="gt_valid must be"):
        kernels.max_iou_assign_triton(boxes, gt, labels, valid, gt_valid[:, :2], th, True, True)
    with pytest.raises(ValueError, match="thresholds must hold 4 values"):
        kernels.max_iou_assign_triton(boxes, gt, labels, valid, gt_valid, th[:3], True, True)


def test_opcheck(kernels, device):
    boxes, gt, labels, valid, gt_valid = (t.to(device) for t in make_case(2, 3, 12, torch.float32))
    torch.library.opcheck(torch.ops.htc_fast.max_iou_assign_triton.default,
                          (boxes, gt, labels, valid, gt_valid, [0.5, 0.0, 0.4, 0.3], True, False))


@pytest.mark.slow
def test_assign_kernels_compile_for_sm90_within_their_ceilings():
    result = run_script("--arch", "90", "--ops", "assign")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.startswith("sm_90")]
    assert {row[1] for row in rows} == {"_gt_best_kernel", "_assign_kernel"}
    for row in rows:
        assert row[-1] == "ok" and int(row[-6]) <= int(row[-5])  # regs <= max
