"""The composed HTC model: key layout per preset, the training step, inference and edge cases,
checkpoint round trip, and fast ops agreeing with the reference ops inside the model."""
from pathlib import Path

import pytest
import torch

from htc_fast.config import PRESETS, get_config
from htc_fast.model.checkpoint import load_checkpoint, save_checkpoint
from htc_fast.model.htc import build_htc
from htc_fast.model.inputs import ImageBatch, Targets
from htc_fast.ops import use_backend

KEYS = Path(__file__).parent / "data" / "htc_r50_keys.txt"


def r50_keys():
    return {line.split("\t")[0] for line in KEYS.read_text().splitlines()}


def meta_model(name):
    with torch.device("meta"):
        return build_htc(get_config(name))


def test_r50_state_dict_is_mmdetections():
    assert set(meta_model("htc_r50_fpn_1x").state_dict()) == r50_keys()


def test_presets_key_layout():
    without = set(meta_model("htc_without_semantic_r50_fpn_1x").state_dict())
    assert without == {k for k in r50_keys() if ".semantic_head." not in k}
    dcn = meta_model("htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e").state_dict()
    offsets = {k: v.shape for k, v in dcn.items() if "conv_offset" in k}
    # DCNv1 (deform_groups 1) on conv2 of every bottleneck of layer2..layer4 (4 + 23 + 3 blocks).
    assert len(offsets) == 2 * (4 + 23 + 3)
    assert all(k.startswith(("backbone.layer2.", "backbone.layer3.", "backbone.layer4.")) for k in offsets)
    assert all(s[0] == 18 for s in offsets.values())
    plain = set(meta_model("htc_x101_64x4d_fpn_16x1_20e").state_dict())
    assert set(dcn) - set(offsets) == plain
    for name in PRESETS:
        heads = {k for k in meta_model(name).state_dict() if not k.startswith("backbone.")}
        assert heads == {k for k in r50_keys() if not k.startswith("backbone.")} - \
            ({k for k in r50_keys() if ".semantic_head." in k} if "without_semantic" in name else set())


def tiny_batch(n_gt=(2, 1)):
    """Two images of a padded 128x160 batch with boxes, masks and a semantic map."""
    images = torch.randn(2, 3, 128, 160)
    batch = ImageBatch(images, [(128, 150), (120, 160)], [(1.0, 1.0), (160 / 133, 1.2)], [(128, 150), (100, 133)])
    boxes, labels, masks = [], [], []
    for g in n_gt:
        xy = torch.rand(g, 2) * torch.tensor([90.0, 70.0])
        wh = 20 + torch.rand(g, 2) * 40
        b = torch.cat([xy, xy + wh], dim=1)
        m = torch.zeros(g, 128, 160, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            m[j, y1:y2, x1:x2] = True
        boxes.append(b)
        labels.append(torch.randint(0, 4, (g,)))
        masks.append(m)
    semantic = torch.randint(0, 5, (2, 128, 160))
    semantic[:, :8] = 255
    return batch, Targets(boxes, labels, masks, semantic)


def tiny_model():
    return build_htc(get_config("htc_tiny"))


def test_training_step_reaches_every_parameter():
    model = tiny_model()
    batch, targets = tiny_batch()
    loss = model(batch, targets)
    names = set(loss.as_dict())
    assert {"loss_rpn_cls", "loss_rpn_bbox", "loss_semantic_seg", "s2.loss_mask", "s0.acc"} <= names
    total = loss.total()
    assert torch.isfinite(total)
    total.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1.")) for n in frozen)


def test_stage_weights_and_first_k_is_deterministic():
    model = tiny_model()
    batch, targets = tiny_batch()
    a = model(batch, targets, sampler="first-k").as_dict()
    b = model(batch, targets, sampler="first-k").as_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="sampler"):
        model(batch, targets, sampler="bogus")


def test_fast_ops_match_reference_ops_inside_the_model():
    model = tiny_model()
    batch, targets = tiny_batch()
    fast = model(batch, targets, sampler="first-k").as_dict()
    with use_backend("reference"):
        ref = model(batch, targets, sampler="first-k").as_dict()
    for k in fast:
        torch.testing.assert_close(fast[k], ref[k], rtol=1e-4, atol=1e-5, msg=k)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(torch.initial_seed() % 2 ** 31)
    model = tiny_model()
    batch, targets = tiny_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    losses = []
    for _ in range(6):
        loss = model(batch, targets, sampler="first-k").total()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_images_without_ground_truth():
    model = tiny_model()
    batch, _ = tiny_batch()
    empty = Targets([torch.zeros(0, 4)] * 2, [torch.zeros(0, dtype=torch.long)] * 2,
                    [torch.zeros(0, 128, 160, dtype=torch.bool)] * 2, None)
    loss = model(batch, empty)
    total = loss.total()
    assert torch.isfinite(total)
    assert loss.as_dict()["s0.loss_mask"].item() == 0.0 and loss.as_dict()["s0.loss_bbox"].item() == 0.0
    total.backward()


def test_predict_shapes_and_checkpoint_round_trip(tmp_path):
    model = tiny_model().eval()
    batch, _ = tiny_batch()
    dets = model.predict(batch, masks=None)
    assert len(dets) == 2
    for d, (h, w) in zip(dets, batch.original_shapes):
        assert d.boxes.shape[1] == 4 and len(d.boxes) == len(d.scores) == len(d.labels) <= 100
        assert (d.boxes[:, 0::2] <= w + 1e-3).all() and (d.boxes[:, 1::2] <= h + 1e-3).all()
        assert (d.scores[:-1] >= d.scores[1:]).all()
    save_checkpoint(tmp_path / "tiny.pth", model)
    other = tiny_model().eval()
    load_checkpoint(other, tmp_path / "tiny.pth")
    again = other.predict(batch, masks=None)
    for d, e in zip(dets, again):
        assert torch.equal(d.boxes, e.boxes) and torch.equal(d.scores, e.scores)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_predict_with_non_finite_input_gives_no_detections(bad):
    model = tiny_model().eval()
    batch, _ = tiny_batch()
    images = batch.images.clone()
    images[:] = bad
    batch = ImageBatch(images, batch.image_shapes, batch.scale_factors, batch.original_shapes)
    for d in model.predict(batch, masks=None):
        assert len(d.boxes) == 0 or torch.isfinite(d.boxes).all()


def test_no_proposals_gives_empty_detections():
    model = tiny_model().eval()
    batch, _ = tiny_batch()
    with torch.no_grad():
        feats = model.features(batch.images)
        dets = model.roi_head.predict(feats, [torch.zeros(0, 4)] * 2, batch.image_shapes, batch.scale_factors)
    for d in dets:
        assert d.boxes.shape == (0, 4) and d.scores.shape == (0,) and d.mask_probs.shape == (0, 28, 28)


def test_fixed_capacity_mask_branch_equals_compact():
    """The mask branch at its fixed capacity (the GPU path: padded slots with zero weight) gives
    the losses of the compact one (only the positives), and the whole step syncs nothing."""
    from htc_fast.diagnostics import count_ops

    model = tiny_model().train()
    batch, targets = tiny_batch()
    losses = {}
    for static in (False, True):
        model.roi_head.static_shapes = static
        with count_ops() as c:
            losses[static] = {k: v.detach() for k, v in model(batch, targets, sampler="first-k").as_dict().items()}
        if static:
            assert c.syncs == 0, c.report()
    for k, v in losses[False].items():
        torch.testing.assert_close(losses[True][k], v, rtol=1e-5, atol=1e-7, msg=k)


def test_padded_detections_never_leak():
    """predict_padded keeps max_per_img rows (padding: zero boxes/scores, label -1, zero masks);
    predict returns exactly the counted rows, which equal the padded ones' prefix."""
    model = tiny_model().eval()
    batch, _ = tiny_batch()
    with torch.no_grad():
        feats = model.features(batch.images)
        props = model.rpn_head.proposals(model.rpn_head(feats), batch.image_shapes, training=False, padded=True)
        args = (feats, [p.boxes for p in props], batch.image_shapes, batch.scale_factors)
        kwargs = dict(proposal_valid=[p.valid for p in props])
        padded, counts = model.roi_head.predict_padded(*args, **kwargs)
        dets = model.roi_head.predict(*args, **kwargs)
    cap = model.cfg.test.max_per_img
    for p, d, k in zip(padded, dets, counts.tolist()):
        assert p.boxes.shape == (cap, 4) and len(d.boxes) == k <= cap
        assert torch.equal(p.labels[:k], d.labels) and torch.equal(p.boxes[:k], d.boxes)
        assert (d.labels >= 0).all() and (p.labels[k:] == -1).all()
        assert (p.scores[k:] == 0).all() and (p.mask_probs[k:] == 0).all()
        assert (d.scores > model.cfg.test.score_thr).all()
