"""Run every CUDA op of htc_fast once, small, forward and backward: a driver for compute-sanitizer.

    compute-sanitizer --tool memcheck  --error-exitcode 9 python benchmarks/gpu_sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python benchmarks/gpu_sanitize.py --backends cpp

Under the sanitizer every launch is instrumented (10-100x slower), so the inputs are small but
shaped to reach each kernel's edge paths: RoIs partly outside the map and empty RoIs, several FPN
levels, NMS groups of different lengths (more than 64 boxes in one, so the bit-mask spans words),
DCN with offset groups and a mask, mask paste with boxes crossing the image border, max-IoU
assignment with padding, invalid boxes and more threshold sets than one CUDA launch takes. Each op's
result is also compared with the reference backend, so a kernel that silently writes garbage
fails here even when the sanitizer stays quiet.

Exit code: 0 if every op ran and matched; 1 otherwise (the sanitizer's own exit code, set by
--error-exitcode, takes precedence when it finds an error). Prints one line per op.
"""
import argparse
import sys
import traceback

import torch

import htc_fast.ops as ops


def _rois(n, batch, height, width, gen, device):
    xy = torch.rand(n, 2, generator=gen) * torch.tensor([width * 1.2, height * 1.2]) - 8
    wh = torch.rand(n, 2, generator=gen) * 40
    wh[0] = 0  # an empty RoI
    idx = torch.randint(0, batch, (n, 1), generator=gen).float()
    return torch.cat([idx, xy, xy + wh], dim=1).to(device)


def case_roi_align(backend, device, gen):
    x = torch.randn(2, 8, 24, 32, generator=gen).to(device).requires_grad_()
    rois = _rois(40, 2, 24, 32, gen, device)
    out = ops.roi_align(x, rois, 7, 0.5, 2, True, backend=backend)
    out.square().sum().backward()
    ref = ops.roi_align(x.detach(), rois, 7, 0.5, 2, True, backend="reference")
    return [(out, ref)]


def case_multilevel_roi_align(backend, device, gen):
    feats = [torch.randn(2, 8, 32 >> i, 48 >> i, generator=gen).to(device).requires_grad_()
             for i in range(4)]
    rois = _rois(60, 2, 128, 192, gen, device)
    out = ops.multilevel_roi_align(feats, rois, 7, sampling_ratio=2, backend=backend)
    out.square().sum().backward()
    ref = ops.multilevel_roi_align([f.detach() for f in feats], rois, 7, sampling_ratio=2,
                                   backend="reference")
    return [(out, ref)]


def case_nms(backend, device, gen):
    n = 300
    xy = torch.rand(n, 2, generator=gen) * 100
    boxes = torch.cat([xy, xy + 5 + torch.rand(n, 2, generator=gen) * 30], dim=1).to(device)
    scores = torch.rand(n, generator=gen).to(device)
    idxs = (torch.rand(n, generator=gen) ** 3 * 5).long().to(device)  # unequal group lengths
    pairs = [(ops.nms(boxes, scores, 0.5, backend=backend), ops.nms(boxes, scores, 0.5, backend="reference")),
             (ops.batched_nms(boxes, scores, idxs, 0.5, backend=backend),
              ops.batched_nms(boxes, scores, idxs, 0.5, backend="reference"))]
    # Fixed capacity (the sync-free path): device segment bounds, grid-stride reduce, compaction.
    for cap, group in ((50, n), (400, 70)):
        got = ops.batched_nms(boxes, scores, idxs, 0.5, max_output=cap, max_group_size=group, backend=backend)
        want = ops.batched_nms(boxes, scores, idxs, 0.5, max_output=cap, max_group_size=group,
                               backend="reference")
        pairs += [(got.keep, want.keep), (got.num_kept, want.num_kept)]
    return pairs


def case_deform_conv2d(backend, device, gen):
    x = torch.randn(2, 8, 12, 14, generator=gen).to(device).requires_grad_()
    w = (torch.randn(16, 8, 3, 3, generator=gen) * 0.1).to(device).requires_grad_()
    offset = (torch.randn(2, 2 * 2 * 9, 12, 14, generator=gen) * 3).to(device).requires_grad_()
    mask = torch.rand(2, 2 * 9, 12, 14, generator=gen).to(device).requires_grad_()
    b = torch.randn(16, generator=gen).to(device).requires_grad_()
    out = ops.deform_conv2d(x, offset, w, b, padding=(1, 1), mask=mask, backend=backend)
    out.square().sum().backward()
    ref = ops.deform_conv2d(x.detach(), offset.detach(), w.detach(), b.detach(), padding=(1, 1),
                            mask=mask.detach(), backend="reference")
    return [(out, ref)]


def case_paste_masks(backend, device, gen):
    probs = torch.rand(30, 28, 28, generator=gen).to(device)
    xy = torch.rand(30, 2, generator=gen) * 120 - 10
    boxes = torch.cat([xy, xy + torch.rand(30, 2, generator=gen) * 60], dim=1).to(device)
    out = ops.paste_masks(probs, boxes, (100, 90), backend=backend)
    ref = ops.paste_masks(probs, boxes, (100, 90), backend="reference")
    return [(out, ref)]


def case_max_iou_assign(backend, device, gen):
    # Shared anchors (1, N, 4) and per-image boxes; padded ground truth with an image that has none;
    # invalid boxes; 5 threshold sets (the CUDA kernel takes 4 per launch: two launches); N past
    # one block of pass 1.
    xy = torch.rand(2, 700, 2, generator=gen) * 80
    boxes = torch.cat([xy, xy + 1 + torch.rand(2, 700, 2, generator=gen) * 40], dim=2)
    gt = torch.cat([boxes[:, :6], boxes[:, 6:12] + 3], dim=1)
    gt_valid = torch.ones(2, 12, dtype=torch.bool)
    gt_valid[1] = False
    gt = gt * gt_valid[..., None]
    valid = torch.rand(2, 700, generator=gen) > 0.1
    labels = torch.randint(0, 80, (2, 12), generator=gen)
    sets = [(0.5 + 0.05 * a, 0.1, 0.4, 0.3) for a in range(5)]
    pairs = []
    for candidates in (boxes[:1], boxes):
        args = [t.to(device) for t in (candidates, gt)]
        kwargs = dict(gt_labels=labels.to(device), valid=valid.to(device), gt_valid=gt_valid.to(device))
        got = ops.max_iou_assign(*args, sets, **kwargs, backend=backend)
        want = ops.max_iou_assign(*args, sets, **kwargs, backend="reference")
        pairs += list(zip(got, want))
    return pairs


CASES = {"roi_align": case_roi_align, "multilevel_roi_align": case_multilevel_roi_align,
         "nms": case_nms, "deform_conv2d": case_deform_conv2d, "paste_masks": case_paste_masks,
         "max_iou_assign": case_max_iou_assign}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cpp,triton", help="comma-separated: cpp, triton")
    parser.add_argument("--ops", default=",".join(CASES), help="comma-separated op names")
    parser.add_argument("--device", default="cuda", help="cuda; cpu checks this script itself")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device", file=sys.stderr)
        return 1
    failed = 0
    for backend in args.backends.split(","):
        for name in args.ops.split(","):
            gen = torch.Generator().manual_seed(0)
            try:
                pairs = CASES[name](backend, device, gen)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                for got, want in pairs:
                    if got.dtype == torch.bool or not got.is_floating_point():
                        ok = torch.equal(got.cpu(), want.cpu())
                    else:
                        ok = torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4)
                    if not ok:
                        raise AssertionError(f"differs from the reference backend ({tuple(got.shape)})")
                print(f"ok      {backend:7s} {name}", flush=True)
            except Exception:  # noqa: BLE001 -- report every op, then fail
                failed += 1
                print(f"FAILED  {backend:7s} {name}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
