"""Semantic, box and mask heads: shapes, mmdetection key layout, information flow, losses."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from htc_fast.model.box_head import BoxHead, BoxHeadOutput, box_head_loss
from htc_fast.model.mask_head import MaskHead, mask_head_loss
from htc_fast.model.semantic_head import SemanticHead

KEYS = Path(__file__).parent / "data" / "htc_r50_keys.txt"


def mmdet_keys(prefix):
    """{key without prefix: shape} of the R-50 HTC state dict entries under `prefix`."""
    out = {}
    for line in KEYS.read_text().splitlines():
        name, shape = line.split("\t")[:2]
        if name.startswith(prefix):
            out[name[len(prefix):]] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    return out


def shapes(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_head_keys_match_mmdetection():
    assert shapes(SemanticHead()) == mmdet_keys("roi_head.semantic_head.")
    for i in range(3):
        assert shapes(BoxHead()) == mmdet_keys(f"roi_head.bbox_head.{i}.")
        assert shapes(MaskHead(with_conv_res=i > 0)) == mmdet_keys(f"roi_head.mask_head.{i}.")


def test_semantic_head_fuses_levels_at_p3():
    head = SemanticHead(in_channels=8, channels=8, num_classes=5, num_convs=2)
    feats = [torch.randn(2, 8, 40 // 2 ** i, 56 // 2 ** i) for i in range(5)]
    out = head(feats)
    assert out.logits.shape == (2, 5, 20, 28) and out.feat.shape == (2, 8, 20, 28)
    assert (out.feat >= 0).all()
    # The fusion written out: resize each other level to P3 (bilinear, align_corners) then 1x1 + ReLU.
    x = head.lateral_convs[1](feats[1])
    for i in (0, 2, 3, 4):
        x = x + head.lateral_convs[i](F.interpolate(feats[i], size=(20, 28), mode="bilinear", align_corners=True))
    for conv in head.convs:
        x = conv(x)
    torch.testing.assert_close(out.feat, head.conv_embedding(x))
    with pytest.raises(ValueError, match="levels"):
        head(feats[:4])


def test_semantic_loss_ignores_label_255():
    head = SemanticHead(in_channels=4, channels=4, num_classes=3, num_convs=1, loss_weight=0.2,
                        loss_average="valid")
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 6))
    labels[0, :2] = 255
    valid = labels != 255
    expected = 0.2 * F.cross_entropy(logits.permute(0, 2, 3, 1)[valid], labels[valid])
    torch.testing.assert_close(head.loss(logits, labels), expected)
    all_ignored = head.loss(logits, torch.full((2, 5, 6), 255))
    assert all_ignored.item() == 0.0
    with pytest.raises(ValueError, match="semantic labels"):
        head.loss(logits, labels[:, :4])
    # mmdetection 3.x averages over every pixel, the ignored ones adding 0.
    all_pixels = SemanticHead(in_channels=4, channels=4, num_classes=3, num_convs=1, loss_weight=0.2)
    torch.testing.assert_close(all_pixels.loss(logits, labels), expected * valid.sum() / valid.numel())


def test_box_head_shapes_and_loss():
    head = BoxHead(in_channels=4, roi_size=3, fc_channels=16, num_classes=5)
    out = head(torch.randn(7, 4, 3, 3))
    assert out.cls_logits.shape == (7, 6) and out.deltas.shape == (7, 4)
    labels = torch.tensor([0, 5, 2, 5, 4, 5, 1])
    targets = torch.randn(7, 4)
    loss = box_head_loss(out, labels, targets, smooth_l1_beta=1.0)
    pos = labels < 5
    assert math.isclose(loss.cls.item(), F.cross_entropy(out.cls_logits, labels).item(), rel_tol=1e-6)
    expected_box = F.smooth_l1_loss(out.deltas[pos], targets[pos], beta=1.0, reduction="sum") / 7
    assert math.isclose(loss.box.item(), expected_box.item(), rel_tol=1e-6)
    (loss.cls + loss.box).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_box_loss_without_positives_or_rois():
    out = BoxHeadOutput(torch.randn(3, 6, requires_grad=True), torch.randn(3, 4, requires_grad=True))
    loss = box_head_loss(out, torch.full((3,), 5), torch.randn(3, 4))
    assert loss.box.item() == 0.0 and loss.box.requires_grad
    empty = BoxHeadOutput(torch.zeros(0, 6, requires_grad=True), torch.zeros(0, 4, requires_grad=True))
    loss = box_head_loss(empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4))
    assert loss.cls.item() == 0.0 and loss.box.item() == 0.0


def test_mask_information_flow():
    heads = [MaskHead(8, 8, num_convs=2, num_classes=3, with_conv_res=i > 0) for i in range(3)]
    x = torch.randn(5, 8, 6, 6)
    f0 = heads[0].trunk(x)
    f1 = heads[1].trunk(x, f0)
    # eq. 5 written out: the previous trunk feature goes through conv_res + ReLU and is added.
    y = x + F.relu(heads[1].conv_res.conv(f0))
    for conv in heads[1].convs:
        y = F.relu(conv.conv(y))
    torch.testing.assert_close(f1, y)
    assert heads[1].logits(f1).shape == (5, 3, 12, 12)
    with pytest.raises(ValueError, match="conv_res"):
        heads[0].trunk(x, f0)
    with pytest.raises(ValueError, match="must be equal"):
        MaskHead(4, 8, with_conv_res=True)


def test_mask_loss_picks_the_label_channel():
    logits = torch.randn(4, 3, 6, 6, requires_grad=True)
    labels = torch.tensor([2, 0, 1, 2])
    targets = (torch.rand(4, 6, 6) > 0.5).float()
    expected = F.binary_cross_entropy_with_logits(logits[torch.arange(4), labels], targets)
    torch.testing.assert_close(mask_head_loss(logits, labels, targets), expected)
    empty = mask_head_loss(torch.zeros(0, 3, 6, 6, requires_grad=True), torch.zeros(0, dtype=torch.long),
                           torch.zeros(0, 6, 6))
    assert empty.item() == 0.0 and empty.requires_grad
