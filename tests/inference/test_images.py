"""Inputs of batched inference: folders expanded to images, unreadable and too-thin images named
(never a crash inside a loader worker), the batch's preprocessing, sharding over ranks, argument
checks."""
import shutil

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from htc_fast.data.preprocess import load_image, make_batch, rescale_size, resize
from htc_fast.inference import (
    ImageFiles,
    PreparedImage,
    Unreadable,
    build_inference_loader,
    collate_images,
    list_images,
    prepare_image,
)
from tests.inference.conftest import PHOTOS


def test_folders_expand_to_their_images_sorted(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["b.jpg", "a.PNG", "c.jpeg"]
    for name in names:
        (folder / name).write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()  # not descended into
    (folder / "sub" / "d.jpg").write_bytes(b"")
    single = tmp_path / "z.jpg"
    missing = tmp_path / "missing.jpg"  # kept: the run reports it as unreadable
    assert list_images([single, folder, missing]) == [single, folder / "a.PNG", folder / "b.jpg",
                                                      folder / "c.jpeg", missing]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*no image files"):
        list_images([empty])


def test_prepare_image_is_mmdetections_resize():
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    scale = (int(torch.randint(40, 200, ())), int(torch.randint(30, 120, ())))
    out = prepare_image(image, scale, key="k", name="img")
    size = rescale_size(37, 53, scale)
    assert out.image_shape == size and out.original_shape == (37, 53) and out.original is None
    assert torch.equal(out.image, resize(image, size))
    assert out.scale_factor == (size[1] / 53, size[0] / 37)
    kept = prepare_image(image, scale, keep_original=True)
    assert kept.original is image


@pytest.mark.parametrize("hw", [(1, 4000), (4000, 1)])
def test_too_thin_images_raise_naming_the_file(tmp_path, hw):
    path = tmp_path / f"thin_{hw[0]}x{hw[1]}.png"
    write_png(torch.full((3, *hw), 200, dtype=torch.uint8), str(path))
    with pytest.raises(ValueError, match=f"{path.name}.*{hw[0]} x {hw[1]}.*at least 1 x 1"):
        prepare_image(path, (1333, 800))
    item = ImageFiles([(path, 7)], (1333, 800))[0]
    assert isinstance(item, Unreadable) and item.key == 7 and item.name == str(path)
    assert "at least 1 x 1" in item.reason and str(item).startswith(f"{path}: ")


def test_unreadable_files_become_records_not_exceptions(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    text = tmp_path / "text.png"
    text.write_text("hello")
    data = ImageFiles([(PHOTOS[0], "ok"), (tmp_path / "missing.jpg", "gone"), (corrupt, "bad"), (text, "txt")],
                      (128, 96), keep_original=True)
    good, *bad = [data[i] for i in range(len(data))]
    assert isinstance(good, PreparedImage) and good.key == "ok"
    assert torch.equal(good.original, load_image(PHOTOS[0]))
    assert [type(b) for b in bad] == [Unreadable] * 3
    assert [b.key for b in bad] == ["gone", "bad", "txt"]
    assert all(b.name in str(b) and b.reason for b in bad)
    # Arrays and tensors are named by their position.
    array = np.zeros((20, 30, 3), dtype=np.uint8)
    assert ImageFiles([(array, 0), (torch.zeros(3, 20, 0, dtype=torch.uint8), 1)], (128, 96))[1].name == "images[1]"


def test_ranks_read_disjoint_shards_covering_every_image():
    items = [(torch.randint(0, 256, (3, 20 + k, 30), dtype=torch.uint8), k) for k in range(7)]
    keys = []
    for rank in range(3):
        loader = build_inference_loader(items, (64, 48), batch_size=2, rank=rank, world_size=3)
        keys.append([im.key for batch in loader for im in batch.images])
    assert sorted(sum(keys, [])) == list(range(7))
    assert all(keys[r] == sorted(keys[r]) for r in range(3))  # each shard in order


@pytest.mark.parametrize("kwargs, match", [(dict(batch_size=0), "batch_size"), (dict(batch_size=1.5), "batch_size"),
                                           (dict(workers=-1), "workers"), (dict(rank=2, world_size=2), "rank")])
def test_loader_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_inference_loader([(PHOTOS[0], 0)], (128, 96), **kwargs)


def test_a_folder_copy_of_real_photos_loads_in_order(tmp_path):
    for p in PHOTOS[:3]:
        shutil.copy(p, tmp_path / p.name)
    paths = list_images([tmp_path])
    assert [p.name for p in paths] == sorted(p.name for p in PHOTOS[:3])
    batches = list(build_inference_loader([(p, p) for p in paths], (128, 96), batch_size=2))
    assert [len(b.images) for b in batches] == [2, 1]
    assert [im.key for b in batches for im in b.images] == paths


def test_collated_batch_is_make_batchs_preprocessing():
    """The loader's batch (uint8 pixels from the worker, padded and normalised where they are read)
    equals htc_fast.data.preprocess.make_batch on the same images, bit for bit."""
    photos = [PHOTOS[i] for i in torch.randperm(len(PHOTOS))[:3].tolist()]
    scale = (int(torch.randint(100, 300, ())), int(torch.randint(60, 200, ())))
    batch = collate_images([prepare_image(p, scale) for p in photos])
    assert all(p.dtype == torch.uint8 for p in batch.pixels) and all(im.image is None for im in batch.images)
    want = make_batch(photos, scale)
    assert torch.equal(batch.inputs.images, want.images)
    assert list(batch.inputs.image_shapes) == list(want.image_shapes)
    assert list(batch.inputs.scale_factors) == list(want.scale_factors)
    assert list(batch.inputs.original_shapes) == list(want.original_shapes)
    assert collate_images([]).inputs is None
