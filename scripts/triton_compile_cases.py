"""The calls of scripts/check_triton_compile.py: each Triton op wrapper of kernels/*.py with small CPU
tensors of every dtype and layout class the op accepts, forward and backward.

A case is (variant, op, args); the op is called once per target arch. The tensors' values do not
matter (nothing runs), their dtypes, strides and alignment do: Triton specialises a kernel on
pointer alignment (16 B) and on integer arguments equal to 1 or divisible by 16, and the wrappers
pick constexprs (block sizes, flags) from shapes and dtypes. Layout classes:
- "contiguous": NCHW;
- "channels_last": NHWC memory (stride 1 on channels);
- "strided": a view starting one element into a wider tensor (unaligned pointer, odd row stride).
"""
import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
LAYOUTS = ("contiguous", "channels_last", "strided")


def feature(shape, dtype, layout):
    """(N, C, H, W) tensor of `dtype` in the layout class `layout`."""
    if layout == "strided":
        *lead, w = shape
        return torch.randn(*lead, w + 1, dtype=dtype)[..., 1:]
    x = torch.randn(shape, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


def boxes(n, size=64.0):
    xy = torch.rand(n, 2) * size
    return torch.cat([xy, xy + torch.rand(n, 2) * size / 2 + 1], 1)


def rois(n, images, size=64.0):
    return torch.cat([torch.randint(0, images, (n, 1)).float(), boxes(n, size)], 1)


def roi_align():
    from htc_fast.kernels import roi_align as ra

    cases = []
    r = rois(8, 2)
    for name, dtype in DTYPES.items():
        for layout in LAYOUTS:
            x = feature((2, 256, 16, 16), dtype, layout)
            cases.append((f"fwd {name} {layout} aligned", ra.roi_align_triton, (x, r, 0.25, 7, 7, 2, True)))
            levels = [feature((2, 256, 16 >> i, 16 >> i), dtype, layout) for i in range(4)]
            cases.append((f"multilevel fwd {name} {layout} 4 levels", ra.multilevel_roi_align_triton,
                          (levels, r, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 7, 7, 0, True, 56.0)))
        x = feature((2, 16, 16, 16), dtype, "contiguous")  # C = 16: the smallest channel block
        cases.append((f"fwd {name} C=16 not aligned", ra.roi_align_triton, (x, r, 0.25, 7, 7, 0, False)))
        g = torch.randn(8, 256, 7, 7, dtype=dtype)
        cases.append((f"bwd {name}", ra.roi_align_backward_triton, (g, r, 0.25, 7, 7, 2, 256, 16, 16, 2, True)))
        cases.append((f"bwd {name} not aligned", ra.roi_align_backward_triton,
                      (g, r, 0.25, 7, 7, 2, 256, 16, 16, 0, False)))
        cases.append((f"multilevel bwd {name} 4 levels", ra.multilevel_roi_align_backward_triton,
                      (g, r, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 7, 7, [16, 8, 4, 2], [16, 8, 4, 2], 2, 256,
                       0, True, 56.0)))
    levels = [feature((2, 256, 32 >> i, 32 >> i), torch.float32, "contiguous") for i in range(5)]
    cases.append(("multilevel fwd fp32 5 levels", ra.multilevel_roi_align_triton,
                  (levels, r, [1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64], 7, 7, 0, True, 56.0)))
    return cases


def nms():
    from htc_fast.kernels import nms as kn

    cases = []
    for name, dtype in DTYPES.items():
        b, s = boxes(200).to(dtype), torch.rand(200, dtype=dtype)
        cases.append((f"nms {name}", kn.nms_triton, (b, s, 0.5)))
        cases.append((f"batched {name}", kn.batched_nms_triton, (b, s, torch.randint(0, 5, (200,)), 0.5)))
    return cases


def mask_paste():
    from htc_fast.kernels import mask_paste as mp

    cases = []
    b = boxes(6, 40.0)
    windows = mp.paste_mask_windows_torch(b, 28, 28, 48, 64)
    sizes = (windows[:, 2] - windows[:, 0]) * (windows[:, 3] - windows[:, 1])
    offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)])
    for name, dtype in DTYPES.items():
        for layout in ("contiguous", "strided"):
            probs = feature((1, 6, 28, 28), dtype, layout)[0]
            cases.append((f"dense {name} {layout}", mp.paste_masks_triton, (probs, b, 48, 64, 0.5)))
            cases.append((f"crops {name} {layout}", mp.paste_mask_crops_triton,
                          (probs, b, windows, offsets, int(offsets[-1]), 48, 64, 0.5)))
    return cases


def deform_conv():
    from htc_fast.kernels import deform_conv as dc

    cases = []
    conv = (1, 1, 1, 1, 1, 1)  # stride, padding, dilation (h, w)
    for name, dtype in DTYPES.items():
        for layout in LAYOUTS:
            x = feature((2, 64, 10, 10), dtype, layout)
            w = torch.randn(64, 64, 3, 3, dtype=dtype)
            geometry = torch.float64 if dtype == torch.float64 else torch.float32
            off = torch.randn(2, 18, 10, 10, dtype=geometry)
            m = torch.rand(2, 9, 10, 10, dtype=geometry)
            bias = torch.randn(64, dtype=dtype)
            g = torch.randn(2, 64, 10, 10, dtype=dtype)
            cases.append((f"v2 fwd {name} {layout}", dc.deform_conv2d_triton, (x, w, off, m, bias, *conv, 1, 1)))
            cases.append((f"v2 bwd {name} {layout}", dc.deform_conv2d_backward_triton,
                          (g, x, w, off, m, *conv, 1, 1)))
        x = feature((2, 64, 10, 10), dtype, "contiguous")
        w = torch.randn(32, 32, 3, 3, dtype=dtype)  # 2 groups of 32 output channels
        off = torch.randn(2, 36, 10, 10, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        g = torch.randn(2, 32, 10, 10, dtype=dtype)
        cases.append((f"v1 fwd {name} groups=2 offset_groups=2", dc.deform_conv2d_triton,
                      (x, w, off, None, None, *conv, 2, 2)))
        cases.append((f"v1 bwd {name} groups=2 offset_groups=2", dc.deform_conv2d_backward_triton,
                      (g, x, w, off, None, *conv, 2, 2)))
    return cases


def assign():
    from htc_fast.kernels import assign as ka

    cases = []
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):  # the op's dtypes
        b, g = boxes(2 * 300).view(2, 300, 4).to(dtype), boxes(2 * 7).view(2, 7, 4).to(dtype)
        labels, valid, gt_valid = torch.randint(0, 80, (2, 7)), torch.rand(2, 300) > 0.1, torch.rand(2, 7) > 0.2
        rpn = [0.7, 0.0, 0.3, 0.3]
        stages = [0.5, 0.0, 0.5, 0.5, 0.6, 0.0, 0.6, 0.6, 0.7, 0.0, 0.7, 0.7]
        cases.append((f"rpn {name} shared boxes", ka.max_iou_assign_triton,
                      (b[:1], g, None, valid, gt_valid, rpn, True, True)))
        cases.append((f"3 sets {name} labels", ka.max_iou_assign_triton,
                      (b, g, labels, valid, gt_valid, stages, True, True)))
        cases.append((f"8 sets {name} first box only", ka.max_iou_assign_triton,
                      (b, g, labels, None, None, rpn * 8, True, False)))
        cases.append((f"1 set {name} no low quality", ka.max_iou_assign_triton,
                      (b, g, labels, valid, gt_valid, rpn, False, True)))
    return cases


CASES = {"roi_align": roi_align, "nms": nms, "mask_paste": mask_paste, "deform_conv": deform_conv,
         "assign": assign}
