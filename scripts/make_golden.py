"""Writes tests/model/data/htc_tiny_golden.pth: a seeded htc_tiny model, a fixed input batch with
targets, and what the model computed from them (proposals, detections, merged mask
probabilities, first-k training losses). tests/model/test_golden.py recomputes and compares, so a
change of the model's numbers is caught in CI, where the mmdetection oracle cannot run (the full
oracle comparison is scripts/compare_oracle.py). Rerun only when a change of numbers is intended.

    python scripts/make_golden.py
"""
from pathlib import Path

import torch

from htc_fast.config import get_config
from htc_fast.model.htc import build_htc
from htc_fast.model.inputs import ImageBatch, Targets

OUT = Path(__file__).resolve().parent.parent / "tests" / "model" / "data" / "htc_tiny_golden.pth"


def golden_inputs(gen):
    """A 2-image batch (padded 128x160) with boxes, masks and a semantic map."""
    images = torch.randn(2, 3, 128, 160, generator=gen).half()
    shapes = [(128, 150), (120, 160)]
    boxes = [torch.tensor([[10.0, 20.0, 70.0, 90.0], [80.0, 30.0, 140.0, 110.0], [30.0, 60.0, 60.0, 100.0]]),
             torch.tensor([[5.0, 5.0, 60.0, 50.0], [90.0, 40.0, 150.0, 115.0]])]
    labels = [torch.tensor([0, 3, 1]), torch.tensor([2, 0])]
    masks = []
    for b, (h, w) in zip(boxes, shapes):
        m = torch.zeros(len(b), h, w, dtype=torch.bool)
        for j, (x1, y1, x2, y2) in enumerate(b.long().tolist()):
            m[j, y1:y2, x1 + 3:x2 - 3] = True  # not exactly the box: non-trivial mask targets
        masks.append(m)
    semantic = torch.randint(0, 5, (2, 128, 160), generator=gen).to(torch.uint8)
    semantic[:, :8] = 255
    return dict(images=images, shapes=shapes, scales=[(1.0, 1.0), (160 / 133, 1.2)],
                originals=[(128, 150), (100, 133)], boxes=boxes, labels=labels, masks=masks, semantic=semantic)


def batch_and_targets(data):
    batch = ImageBatch(data["images"].float(), data["shapes"], data["scales"], data["originals"])
    return batch, Targets(data["boxes"], data["labels"], data["masks"], data["semantic"].long())


def compute(model, data):
    batch, targets = batch_and_targets(data)
    model.eval()
    feats = model.features(batch.images)
    proposals = model.rpn_head.proposals(model.rpn_head(feats), batch.image_shapes, training=False)
    dets = model.roi_head.predict(feats, [p.boxes for p in proposals], batch.image_shapes, batch.scale_factors)
    model.train()
    losses = {k: v.detach() for k, v in model(batch, targets, sampler="first-k").as_dict().items()}
    model.eval()
    return dict(proposals=[p.boxes[:100] for p in proposals], proposal_scores=[p.scores[:100] for p in proposals],
                boxes=[d.boxes for d in dets], scores=[d.scores for d in dets], labels=[d.labels for d in dets],
                mask_probs=[d.mask_probs for d in dets], losses=losses)


def main():
    gen = torch.Generator().manual_seed(20261125)
    torch.manual_seed(20261125)
    model = build_htc(get_config("htc_tiny"))
    # fp16 storage halves the file; the test loads the same fp16 values into fp32 (exactly).
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    data = golden_inputs(gen)
    with torch.no_grad():
        outputs = compute(model, data)
    torch.save(dict(state_dict=state, inputs=data, outputs=outputs), OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB); losses:",
          {k: round(float(v), 5) for k, v in outputs["losses"].items()})


if __name__ == "__main__":
    main()
