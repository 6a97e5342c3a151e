"""Collate (padding, normalisation) and samplers / loaders (grouping, ranks, determinism)."""
import random
from collections import Counter

import pytest
import torch

from htc_fast.config import DataConfig
from htc_fast.data import (
    CocoDetection,
    GroupedBatchSampler,
    InferenceSampler,
    TestTransform,
    TrainBatch,
    TrainTransform,
    build_test_loader,
    build_train_loader,
    collate_train,
)
from htc_fast.data.preprocess import MEAN, STD, make_batch
from htc_fast.model.inputs import ImageBatch, Targets
from tests.data_pipeline import ANN_FILE, EMPTY_IMAGE_ID, IMAGE_DIR

SMALL = DataConfig(train_scale=(160, 100), test_scale=(160, 100))


@pytest.fixture(scope="module")
def train_set():
    return CocoDetection(ANN_FILE, IMAGE_DIR, semantic="from_instances", transform=TrainTransform(SMALL))


def test_collate_pads_images_with_zeros_and_semantic_with_255(train_set):
    k = random.randint(1, len(train_set))
    samples = [train_set[(i, 0, 0)] for i in random.sample(range(len(train_set)), k)]
    batch = collate_train(samples)
    inputs, targets = batch
    assert isinstance(inputs, ImageBatch) and isinstance(targets, Targets)
    n, c, ph, pw = inputs.images.shape
    assert (n, c) == (k, 3) and ph % 32 == 0 and pw % 32 == 0
    assert ph - 32 < max(s.image_shape[0] for s in samples) <= ph
    assert targets.semantic.shape == (k, ph, pw) and targets.semantic.dtype == torch.int64
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for j, s in enumerate(samples):
        h, w = s.image_shape
        assert tuple(inputs.image_shapes[j]) == (h, w) and inputs.scale_factors[j] == s.scale_factor
        torch.testing.assert_close(inputs.images[j, :, :h, :w], (s.image.float() - mean) / std)
        assert (inputs.images[j, :, h:] == 0).all() and (inputs.images[j, :, :, w:] == 0).all()
        assert torch.equal(targets.semantic[j, :h, :w], s.semantic.long())
        assert (targets.semantic[j, h:] == 255).all() and (targets.semantic[j, :, w:] == 255).all()
        assert targets.masks[j].shape == (len(s.boxes), h, w) and targets.masks[j].dtype == torch.bool
        assert targets.labels[j].dtype == torch.int64 and targets.boxes[j].dtype == torch.float32
    assert batch.image_ids == [s.image_id for s in samples]
    assert isinstance(batch.pin_memory(), TrainBatch) and isinstance(batch.to("cpu"), TrainBatch)


def test_collate_without_semantic():
    ds = CocoDetection(ANN_FILE, IMAGE_DIR, transform=TrainTransform(SMALL))
    assert collate_train([ds[0], ds[1]]).targets.semantic is None


def _run_epoch(flags, batch_size, world, seed, epoch):
    per_rank = []
    for rank in range(world):
        s = GroupedBatchSampler(flags, batch_size, rank, world, seed)
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        per_rank.append(batches)
    return per_rank


@pytest.mark.parametrize("divisible", [True, False])
def test_grouped_sampler_two_ranks(divisible):
    batch_size, world = 2, 2
    n0, n1 = (random.randint(3, 12) * 4, random.randint(3, 12) * 4) if divisible else \
        (random.randint(10, 40), random.randint(10, 40))
    flags = [0] * n0 + [1] * n1
    random.shuffle(flags)
    seed, epoch = random.randrange(1000), random.randrange(10)
    per_rank = _run_epoch(flags, batch_size, world, seed, epoch)
    assert len(per_rank[0]) == len(per_rank[1])  # same number of steps on every rank
    for batches in per_rank:
        for b in batches:
            assert len(b) == batch_size and len({flags[i] for i, _, _ in b}) == 1  # pure groups
            assert all((sd, ep) == (seed, epoch) for _, sd, ep in b)
    seen = [[i for b in batches for i, _, _ in b] for batches in per_rank]
    assert set(seen[0]) | set(seen[1]) == set(range(len(flags)))  # everything covered
    counts = Counter(seen[0] + seen[1])
    padding = sum(-n % (batch_size * world) for n in (n0, n1))
    assert sum(counts.values()) == len(flags) + padding
    if divisible:
        assert not set(seen[0]) & set(seen[1]) and max(counts.values()) == 1  # disjoint
    # deterministic in (seed, epoch), and a new epoch reshuffles
    assert _run_epoch(flags, batch_size, world, seed, epoch) == per_rank
    assert _run_epoch(flags, batch_size, world, seed, epoch + 1) != per_rank


def test_inference_sampler_shards():
    n, world = random.randint(0, 50), random.randint(1, 4)
    shards = [list(InferenceSampler(n, r, world)) for r in range(world)]
    assert sum(shards, []) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="rank"):
        InferenceSampler(n, world, world)


def _summary(loader):
    return [(b.image_ids, b.inputs.images, [x.clone() for x in b.targets.boxes], b.targets.semantic)
            for b in loader]


def test_train_loader_workers_are_deterministic(train_set):
    seed = random.randrange(1000)
    with_workers = build_train_loader(train_set, SMALL, batch_size=2, seed=seed, workers=2)
    in_process = build_train_loader(train_set, SMALL, batch_size=2, seed=seed, workers=0)
    for loader in (with_workers, in_process):
        loader.batch_sampler.set_epoch(3)
    a, b = _summary(with_workers), _summary(in_process)
    assert len(a) == 3  # 2 portrait + 3 landscape images, batches of 2, groups padded
    for (ids_a, img_a, box_a, sem_a), (ids_b, img_b, box_b, sem_b) in zip(a, b):
        assert ids_a == ids_b and img_a.shape == img_b.shape and torch.equal(sem_a, sem_b)
        # same draws (scale, flip); pixels within one grey level: PyTorch's bilinear resize can
        # round differently with the thread count (workers run single-threaded)
        assert (img_a - img_b).abs().max() <= 1.01 / min(STD)
        assert all(torch.equal(x, y) for x, y in zip(box_a, box_b))


def test_test_loader_keeps_ids_and_matches_inference_preprocessing():
    ds = CocoDetection(ANN_FILE, IMAGE_DIR, test_mode=True, transform=TestTransform(SMALL))
    loader = build_test_loader(ds, SMALL, batch_size=2, workers=0)
    ids = [i for batch in loader for i in batch.image_ids]
    assert ids == ds.image_ids and EMPTY_IMAGE_ID in ids
    batch = next(iter(build_test_loader(ds, SMALL, batch_size=2, rank=1, world_size=2, workers=0)))
    inputs, image_ids = batch
    assert image_ids == ds.image_ids[3:5]
    ref = make_batch([IMAGE_DIR / ds.records[i].file_name for i in (3, 4)], scale=SMALL.test_scale)
    torch.testing.assert_close(inputs.images, ref.images, rtol=0, atol=0)
    assert list(inputs.image_shapes) == list(ref.image_shapes) and list(inputs.scale_factors) == list(ref.scale_factors)


@pytest.mark.parametrize("stride", [1, 8])
def test_a_loader_batch_trains_the_model(stride):
    """End to end: the tiny HTC (80 classes, 183 semantic classes) takes a collated batch, with
    full semantic maps (downscaled by the model) or maps already at the head's stride 8."""
    import dataclasses

    from htc_fast.config import htc_tiny
    from htc_fast.model.htc import build_htc

    cfg = htc_tiny()
    model_cfg = dataclasses.replace(cfg.model, num_classes=80,
                                    semantic=dataclasses.replace(cfg.model.semantic, num_classes=183))
    model = build_htc(model_cfg).train()
    train_set = CocoDetection(ANN_FILE, IMAGE_DIR, semantic="from_instances", transform=TrainTransform(SMALL),
                              semantic_stride=stride)
    loader = build_train_loader(train_set, SMALL, batch_size=2, seed=random.randrange(1000), workers=0)
    inputs, targets = next(iter(loader))
    assert targets.semantic.shape[1:] == (inputs.images.shape[2] // stride, inputs.images.shape[3] // stride)
    loss = model(inputs, targets)
    assert loss.roi.semantic is not None and all(torch.isfinite(v) for v in loss.as_dict().values())
    loss.total().backward()


def test_train_batches_carry_uint8_and_normalise_like_batch_images(train_set):
    """The workers' batch is unpadded uint8 (padded and normalised where `inputs` is read, e.g. on
    the GPU after `to`), bit-identical to (x - mean) / std computed directly."""
    from htc_fast.data import batch_images

    samples = [train_set[(i, 1, 2)] for i in random.sample(range(len(train_set)), 3)]
    batch = collate_train(samples)
    assert len(batch.images) == 3 and all(x.dtype == torch.uint8 for x in batch.images)
    assert all(torch.equal(x, s.image) for x, s in zip(batch.images, samples))
    expected = torch.zeros(batch.inputs.images.shape)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for j, s in enumerate(samples):
        h, w = s.image_shape
        expected[j, :, :h, :w] = (s.image.float() - mean) / std  # mmdetection's formula, in float32
    for got in (batch.inputs, batch.to("cpu").inputs, batch.pin_memory().inputs, batch_images(samples)):
        assert torch.equal(got.images, expected)
        assert list(got.image_shapes) == [s.image_shape for s in samples]
        assert list(got.scale_factors) == [s.scale_factor for s in samples]
