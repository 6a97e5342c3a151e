"""Multi-level (FPN) RoIAlign against a per-level loop over torchvision, mmdetection-style.

The oracle (``htc_fast.diagnostics.baselines``, also the demo's and the benchmarks' baseline) maps
RoIs to levels with its own copy of mmdetection's formula (``mmdet_levels``), then runs
torchvision's C++ ``roi_align`` once per level, as mmdetection's SingleRoIExtractor does.
"""
import math
import random

import pytest
import torch

from htc_fast import ops
from htc_fast.diagnostics.baselines import mmdet_levels, per_level_torchvision
from tests.ops.test_roi_align import with_layout
from tests.support import TOL, require_backend

STRIDES = (4, 8, 16, 32)
# sqrt(area) / finest_scale on and just below the level edges 2, 4, 8: levels 0, 1, 2, 2, 3.
BOUNDARY_SCALES = (1.998, 2.0, 4.0, 7.99, 8.0)


def pyramid(n, c, image_hw, strides, dtype=torch.float32, device="cpu", layouts=("contiguous",)):
    return [with_layout(torch.randn(n, c, math.ceil(image_hw[0] / s), math.ceil(image_hw[1] / s),
                                    dtype=dtype, device=device), layouts[i % len(layouts)])
            for i, s in enumerate(strides)]


def fpn_rois(n, image_hw, num_levels, per_level, finest_scale=56.0, dtype=torch.float32, device="cpu"):
    """RoIs on every level (random scale and aspect ratio), on the level boundaries, plus RoIs
    whose level is NaN (negative area) or whose coordinates are not finite. (K, 5)."""
    rows = []
    h_img, w_img = image_hw
    f = finest_scale
    for lvl in range(num_levels):
        lo = 0.0 if lvl == 0 else f * 2 ** lvl
        hi = f * 2 ** (lvl + 1) if lvl < num_levels - 1 else 1.5 * max(image_hw) + 8 * f
        for _ in range(per_level):
            scale = random.uniform(max(lo, 4.0), hi * 0.999)
            aspect = math.exp(random.uniform(-0.7, 0.7))
            w, h = scale * math.sqrt(aspect), scale / math.sqrt(aspect)
            cx, cy = random.uniform(-0.1, 1.1) * w_img, random.uniform(-0.1, 1.1) * h_img
            rows.append([random.randrange(n), cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
    for m in BOUNDARY_SCALES:
        x, y = random.uniform(0, w_img), random.uniform(0, h_img)
        rows.append([random.randrange(n), x, y, x + m * f, y + m * f])
    x, y = random.uniform(0, w_img / 2), random.uniform(0, h_img / 2)
    rows.append([n - 1, x, y, x + 4 * f, y + f])  # sqrt(area) = 2 * finest_scale, not square
    rows.append([0, x + f / 3, y, x, y + f / 2])  # negative area: level NaN -> zeros
    rows.append([0, x, y, x, y + f / 2])  # zero area: level 0
    rows.append([n - 1, x, float("nan"), x + f, y + f])  # non-finite: zeros
    rows.append([0, x, y, float("inf"), y + f])  # infinite area: last level, still zeros
    return torch.tensor(rows, dtype=dtype, device=device)


def problem(backend):
    """(N, C, image (H, W), RoIs per level, (PH, PW), finest_scale). Tiny under the Triton
    interpreter, whose cost is per sample: a smaller finest_scale keeps every level's RoIs small."""
    if backend == "triton":
        return 2, 3, (48, 64), 1, (2, 2), 14.0
    return 2, random.choice([3, 13]), (random.randint(100, 260), random.randint(100, 260)), 4, (3, 3), 56.0


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_per_level_torchvision(backend, device, aligned, sampling_ratio):
    n, c, image_hw, per_level, out, finest = problem(backend)
    feats = pyramid(n, c, image_hw, STRIDES, device=device,
                    layouts=("channels_last", "contiguous", "strided"))
    rois = fpn_rois(n, image_hw, len(STRIDES), per_level, finest, device=device)
    levels = mmdet_levels(rois, len(STRIDES), finest)
    assert all((levels == lvl).any() for lvl in range(len(STRIDES))), "every level must be hit"
    got = ops.multilevel_roi_align(feats, rois, out, strides=STRIDES, finest_scale=finest,
                                   sampling_ratio=sampling_ratio, aligned=aligned, backend=backend)
    assert got.shape == (rois.shape[0], c, *out) and got.is_contiguous()
    expected = per_level_torchvision(feats, rois, out, STRIDES, sampling_ratio, aligned, finest)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
    assert (got[-4] == 0).all() and (got[-2:] == 0).all()  # NaN level, non-finite coordinates


@pytest.mark.parametrize("strides", [(8,), (4, 8, 16, 32, 64)])
def test_level_counts(backend, device, strides):
    n, c, image_hw, per_level, out, finest = problem(backend)
    feats = pyramid(n, c, image_hw, strides, dtype=torch.float64, device=device)
    rois = fpn_rois(n, image_hw, len(strides), per_level, finest, dtype=torch.float64, device=device)
    got = ops.multilevel_roi_align(feats, rois, out, strides=strides, finest_scale=finest, backend=backend)
    expected = per_level_torchvision(feats, rois, out, strides, 0, True, finest)
    torch.testing.assert_close(got, expected, **TOL[torch.float64])
    if len(strides) == 1:  # one level is plain RoIAlign (for RoIs with a defined level)
        defined = ~torch.isnan(mmdet_levels(rois, 1, finest))
        single = ops.roi_align(feats[0], rois[defined], out, 1 / strides[0], 0, True, backend=backend)
        torch.testing.assert_close(got[defined], single, **TOL[torch.float64])


def test_map_roi_levels():
    rois = fpn_rois(2, (200, 300), 4, 5)
    levels = ops.map_roi_levels(rois, 4)
    assert levels.dtype == torch.int64 and levels.shape == (rois.shape[0],)
    expected = mmdet_levels(rois, 4)
    torch.testing.assert_close(levels, torch.nan_to_num(expected, nan=-1.0).long())
    boundary = levels[-10:-5]  # BOUNDARY_SCALES, in order
    assert boundary.tolist() == [0, 1, 2, 2, 3]
    assert levels[-5] == 1 and levels[-4] == -1 and levels[-3] == 0
    assert ops.map_roi_levels(rois, 6, finest_scale=28).max() == 5
    assert ops.map_roi_levels(rois[:0], 4).shape == (0,)


def test_gradcheck(backend, device):
    """Gradients reach every level (fast_mode: random projections, enough for a linear map)."""
    feats = [f.requires_grad_() for f in pyramid(1, 2, (40, 48), STRIDES, dtype=torch.float64, device=device)]
    rois = fpn_rois(1, (40, 48), len(STRIDES), 1, 14.0, dtype=torch.float64, device=device)
    rois = rois[[0, 1, 2, 3, -4]]  # one RoI per level and one with a NaN level

    def fn(*features):
        return ops.multilevel_roi_align(list(features), rois, (2, 1), strides=STRIDES, finest_scale=14.0,
                                        backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(feats), fast_mode=True)


def test_backward_matches_per_level_torchvision(backend, device):
    n, c, image_hw, per_level, out, finest = problem(backend)
    feats = [f.requires_grad_() for f in pyramid(n, c, image_hw, STRIDES, device=device,
                                                 layouts=("contiguous", "channels_last"))]
    rois = fpn_rois(n, image_hw, len(STRIDES), per_level, finest, device=device)
    grad_out = torch.randn(rois.shape[0], c, *out, device=device)
    got = ops.multilevel_roi_align(feats, rois, out, strides=STRIDES, finest_scale=finest, backend=backend)
    grads = torch.autograd.grad(got, feats, grad_out)
    feats_tv = [f.detach().clone().requires_grad_() for f in feats]
    expected = per_level_torchvision(feats_tv, rois, out, STRIDES, 0, True, finest)
    expected_grads = torch.autograd.grad(expected, feats_tv, grad_out)
    for g, e, f in zip(grads, expected_grads, feats):
        assert g.shape == f.shape
        torch.testing.assert_close(g, e, **TOL[torch.float32])


def test_empty_rois(backend, device):
    feats = [f.requires_grad_() for f in pyramid(2, 5, (64, 64), STRIDES, device=device)]
    y = ops.multilevel_roi_align(feats, torch.zeros(0, 5, device=device), (7, 7), strides=STRIDES,
                                 backend=backend)
    assert y.shape == (0, 5, 7, 7)
    y.sum().backward()
    assert all(f.grad is None or (f.grad == 0).all() for f in feats)


def test_opcheck(fast_backend, device):
    feats = pyramid(2, 3, (48, 64), STRIDES, device=device, layouts=("channels_last", "contiguous"))
    feats = [f.requires_grad_() for f in feats]
    # Registration, not numerics: few programs, since opcheck runs the op a dozen times.
    rois = fpn_rois(2, (48, 64), len(STRIDES), 1, 14.0, device=device)[[0, 3]]  # levels 0 and 3
    scales = [1.0 / s for s in STRIDES]
    if fast_backend == "cpp":
        forward = torch.ops.htc_fast.multilevel_roi_align
        backward = torch.ops.htc_fast.multilevel_roi_align_backward
    else:
        from htc_fast.ops.roi_align import _triton  # the kernels, with their autograd registered

        kernels = _triton()
        forward, backward = kernels.multilevel_roi_align_triton, kernels.multilevel_roi_align_backward_triton
    torch.library.opcheck(forward, (feats, rois, scales, 1, 2, 0, True, 14.0))
    grad = torch.randn(rois.shape[0], 3, 1, 2, device=device)
    heights, widths = [f.shape[2] for f in feats], [f.shape[3] for f in feats]
    torch.library.opcheck(backward, (grad, rois, scales, 1, 2, heights, widths, 2, 3, 0, True, 14.0))


def test_compile_fullgraph_cpp(device):
    require_backend("cpp", device.type)
    feats = [f.requires_grad_() for f in pyramid(2, 4, (64, 96), STRIDES, device=device)]
    rois = fpn_rois(2, (64, 96), len(STRIDES), 2, device=device)

    def fn(features, rois):
        return ops.multilevel_roi_align(features, rois, 7, strides=STRIDES, backend="cpp")

    got = torch.compile(fn, fullgraph=True)(feats, rois)
    expected = fn(feats, rois)
    torch.testing.assert_close(got, expected)
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, feats, g), torch.autograd.grad(expected, feats, g)):
        torch.testing.assert_close(a, b)
