"""AMP in every preset (issue 11): one training iteration and one predict of each preset under
CPU bf16 autocast (how ``--amp bf16`` runs), on a small synthetic batch. The losses and the
gradients must be finite and reach the heads; predict returns float32 detections in the image."""
import pytest
import torch

from htc_fast.config import PRESETS, get_config
from htc_fast.diagnostics.workload import synthetic_batch
from htc_fast.model.htc import build_htc

BIG = {"htc_r101_fpn_20e", "htc_x101_32x4d_fpn_16x1_20e", "htc_x101_64x4d_fpn_16x1_20e",
       "htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e"}


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in BIG and "dconv" not in p
                                    else p for p in PRESETS])
def test_bf16_autocast_train_and_predict(preset):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    cfg = get_config(preset).model
    model = build_htc(cfg)
    batch, targets = synthetic_batch(2, 128, 160, objects=2, seed=int(torch.randint(0, 2**31, ())),
                                     num_classes=cfg.num_classes, stuff_classes=cfg.semantic.num_classes)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(batch, targets).as_dict()
        total = sum(v for k, v in losses.items() if "loss" in k)
    assert all(torch.isfinite(v).all() for v in losses.values()), losses
    total.backward()
    for head in (model.rpn_head.rpn_cls, model.roi_head.bbox_head[0].fc_cls, model.roi_head.mask_head[2].conv_logits):
        assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    assert head.weight.grad.abs().sum() > 0
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dets = model.predict(batch, masks="bitmap")
    assert len(dets) == 2
    for d, (h, w) in zip(dets, batch.original_shapes):
        assert d.boxes.dtype == torch.float32 and torch.isfinite(d.boxes).all() and torch.isfinite(d.scores).all()
        assert d.masks.shape == (len(d.boxes), h, w)
        if len(d.boxes):
            assert (d.boxes[:, 0::2] <= w + 1e-3).all() and (d.boxes[:, 1::2] <= h + 1e-3).all()
