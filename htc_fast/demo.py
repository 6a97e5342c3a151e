"""``python -m htc_fast.demo``: a quick look at what the kernels buy on this machine.

Runs the FPN RoI extractor of HTC (multi-level RoIAlign, P2-P5 at 256 channels, 512 RoIs at 7x7)
on random features with every backend available on this machine, checks each against
torchvision's per-level loop (mmdetection's way, ``htc_fast.diagnostics.baselines``), and prints
the times.
"""
import argparse
import os
import time
import warnings

import torch

import htc_fast
from htc_fast.diagnostics.baselines import per_level_torchvision
from htc_fast.ops import _backend


def random_rois(n, height, width, generator, device):
    """n boxes whose sizes spread over the FPN levels (16 to 512 px), inside the image."""
    size = 2 ** (4 + 5 * torch.rand(n, 2, generator=generator))
    centre = torch.rand(n, 2, generator=generator) * torch.tensor([width, height])
    boxes = torch.cat([centre - size / 2, centre + size / 2], 1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    return torch.cat([torch.zeros(n, 1), boxes], 1).to(device)


def timed(fn, device, repeats):
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    strides = (4, 8, 16, 32)
    height, width = 800, 1344
    features = [torch.randn(1, 256, height // s, width // s, generator=g).to(args.device) for s in strides]
    rois = random_rois(args.rois, height, width, g, args.device)
    expected, t_ref = timed(lambda: per_level_torchvision(features, rois, (7, 7), strides, 0, True),
                            args.device, args.repeats)
    print(f"htc_fast {htc_fast.__version__} on {args.device}: multi-level RoIAlign, {args.rois} RoIs, "
          f"P2-P5 256 ch, 7x7")
    print(f"  torchvision per-level loop   {t_ref * 1e3:8.2f} ms")
    for backend in _backend.BACKENDS:
        reason = _backend.unavailable_reason(backend, args.device)
        if reason is not None:
            print(f"  htc_fast {backend:<10}          skipped: {reason}")
            continue
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            print(f"  htc_fast {backend:<10}          skipped: interpreter mode is for tests, not timing")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            def run(backend=backend):
                return htc_fast.ops.multilevel_roi_align(features, rois, 7, backend=backend)

            out, t = timed(run, args.device, args.repeats)
        err = (out - expected).abs().max().item()
        print(f"  htc_fast {backend:<10}          {t * 1e3:8.2f} ms  ({t_ref / t:5.2f}x)  "
              f"max |diff| {err:.2e}")


if __name__ == "__main__":
    main()
