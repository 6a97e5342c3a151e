"""Triton-side fixes of issue 12 that the op tests do not cover: atomic backward kernels alert under
torch.use_deterministic_algorithms(True) (as torchvision's), and the crop paste skips windows or
offsets that do not fit instead of writing out of bounds (as the CUDA kernel)."""
import pytest
import torch

from tests.support import require_backend

pytestmark = pytest.mark.triton


def test_atomic_backwards_alert_in_deterministic_mode(device, deterministic):
    require_backend("triton", device.type)
    from htc_fast.kernels import deform_conv, roi_align

    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]], device=device)
    grad = torch.rand(1, 2, 2, 2, device=device)
    with pytest.raises(RuntimeError, match="roi_align_backward_triton"):
        roi_align.roi_align_backward_triton(grad, rois, 1.0, 2, 2, 1, 2, 8, 8, 2, True)
    with pytest.raises(RuntimeError, match="multilevel_roi_align_backward_triton"):
        roi_align.multilevel_roi_align_backward_triton(grad, rois, [1.0], 2, 2, [8], [8], 1, 2, 2,
                                                       True, 56.0)
    x = torch.rand(1, 2, 4, 4, device=device)
    with pytest.raises(RuntimeError, match="deform_conv2d_backward_triton"):
        deform_conv.deform_conv2d_backward_triton(
            torch.rand(1, 2, 4, 4, device=device), x, torch.rand(2, 2, 1, 1, device=device),
            torch.zeros(1, 2, 4, 4, device=device), None, 1, 1, 0, 0, 1, 1, 1, 1)


def test_forwards_stay_allowed_in_deterministic_mode(device, deterministic):
    require_backend("triton", device.type)
    from htc_fast.kernels import roi_align

    rois = torch.tensor([[0.0, 1.0, 1.0, 6.0, 5.0]], device=device)
    out = roi_align.roi_align_triton(torch.rand(1, 2, 8, 8, device=device), rois, 1.0, 2, 2, 2, True)
    assert out.shape == (1, 2, 2, 2)


def test_crops_that_do_not_fit_are_skipped(device):
    require_backend("triton", device.type)
    from htc_fast.kernels import mask_paste

    h, w = 12, 16
    boxes = torch.tensor([[2.0, 2.0, 9.0, 8.0]] * 5)
    probs = torch.ones(5, 7, 7)  # every pixel of a window that pastes is set
    windows = mask_paste.paste_mask_windows_torch(boxes, 7, 7, h, w)
    area = int((windows[0, 2] - windows[0, 0]) * (windows[0, 3] - windows[0, 1]))
    windows[1] = torch.tensor([-1, 0, 4, 4])          # starts outside the image
    windows[2] = torch.tensor([0, 0, w + 3, 2])       # ends outside the image
    offsets = torch.arange(6) * area
    offsets[4] = 4 * area + 1                          # crop 3 would overlap crop 4's start...
    offsets[3] = 3 * area + 2                          # ...and crop 3 no longer fits before it
    total = 5 * area
    offsets[5] = total
    # crop 4 starts at 4 * area + 1: it would end past total, so it is skipped too
    expected = mask_paste.paste_mask_crops_triton(probs[:1], boxes[:1], windows[:1], offsets[:2],
                                                  area, h, w, 0.5)
    out = mask_paste.paste_mask_crops_triton(probs.to(device), boxes.to(device), windows.to(device),
                                             offsets.to(device), total, h, w, 0.5).cpu()
    assert out.shape == (total,)
    assert torch.equal(out[:area], expected) and bool(expected.any())
    assert not out[area:].any()


def test_crop_argument_shapes_are_checked(device):
    require_backend("triton", device.type)
    from htc_fast.kernels import mask_paste

    boxes = torch.tensor([[2.0, 2.0, 9.0, 8.0]], device=device)
    probs = torch.rand(1, 7, 7, device=device)
    windows = torch.zeros(1, 4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="offsets"):
        mask_paste.paste_mask_crops_triton(probs, boxes, windows, windows[0, :1], 4, 8, 8, 0.5)
    with pytest.raises(ValueError, match="windows"):
        mask_paste.paste_mask_crops_triton(probs, boxes, windows.int(), windows[0, :2], 4, 8, 8, 0.5)


def test_device_guard_is_a_no_op_on_cpu():
    from htc_fast.kernels._device import on_device

    with on_device(torch.zeros(1)):
        assert torch.zeros(1).device.type == "cpu"


@pytest.mark.cuda
def test_launches_on_the_tensors_device():
    """Tensors on cuda:1 while cuda:0 is current: every Triton op launches on cuda:1 (a launch on
    the current device would read cuda:1 pointers from cuda:0: a fault or garbage)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    from htc_fast.kernels import mask_paste, nms, roi_align

    torch.cuda.set_device(0)
    x = torch.rand(1, 8, 16, 16)
    rois = torch.tensor([[0.0, 1.0, 1.0, 12.0, 9.0]])
    expected = roi_align.roi_align_triton(x.cuda(0), rois.cuda(0), 1.0, 3, 3, 2, True).cpu()
    got = roi_align.roi_align_triton(x.cuda(1), rois.cuda(1), 1.0, 3, 3, 2, True)
    assert got.device == torch.device("cuda", 1) and torch.equal(got.cpu(), expected)
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert nms.nms_triton(boxes.cuda(1), scores.cuda(1), 0.5).tolist() == [0, 2]
    probs = torch.rand(3, 7, 7)
    dense = mask_paste.paste_masks_triton(probs.cuda(1), boxes.cuda(1), 32, 32, 0.5)
    assert torch.equal(dense.cpu(), mask_paste.paste_masks_triton(probs.cuda(0), boxes.cuda(0), 32, 32, 0.5).cpu())
