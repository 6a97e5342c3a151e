"""Issue 16 item 2 (training): an unreadable image is skipped with a warning naming the file and
counted in the run summary, even when it is the only image of its aspect-ratio group (which used
to abort the run with BadSampleError after 11 retries of the same file). Under DDP the summary
adds up the loads skipped on every rank (checked with two gloo processes)."""
import json
import random
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from htc_fast import train
from htc_fast.data.synthetic import make_synthetic_coco
from htc_fast.engine import Dist, SkippedImages


def _corrupt_portrait_image(root):
    """Makes train image 3 a portrait image (alone in its aspect group) whose file is garbage."""
    ann_file = root / "annotations" / "instances_train.json"
    data = json.loads(ann_file.read_text())
    img = data["images"][3]
    img["height"], img["width"] = img["width"], img["height"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != img["id"]]
    data["annotations"].append(dict(id=10 ** 6, image_id=img["id"], category_id=1, iscrowd=0, area=400.0,
                                    bbox=[10.0, 10.0, 20.0, 20.0], segmentation=[[10, 10, 30, 10, 30, 30, 10, 30]]))
    ann_file.write_text(json.dumps(data))
    (root / "train" / img["file_name"]).write_bytes(b"this is not an image")
    return img["file_name"]


def test_unreadable_image_alone_in_its_group_is_skipped_and_counted(tmp_path, capsys):
    # The built-in run uses work_dir/synthetic_coco when it exists: 8 images, batch 2, so an
    # epoch is 4 landscape batches + 1 batch of the portrait image (padded with itself).
    name = _corrupt_portrait_image(make_synthetic_coco(tmp_path / "synthetic_coco", num_train=8, num_val=2))
    with pytest.warns(UserWarning, match=f"skipping a sample: .*{name}") as record:
        assert train.main(["--work-dir", str(tmp_path), "--no-eval", "--max-iters", "5", "--log-interval", "5"]) == 0
    assert sum("skipping a sample" in str(w.message) for w in record) == 1  # one warning, two skips
    out = capsys.readouterr().out
    assert f"2 unreadable image load(s) skipped (1 file(s): {name})" in out
    assert "trained 5 iterations" in out


def _skipped_images(batches) -> SkippedImages:
    """A SkippedImages fed `batches`: (requested dataset indices, delivered image ids) pairs over a
    12-image dataset whose image i has id 100 + i and file img{i}.jpg."""
    records = [SimpleNamespace(file_name=f"img{i}.jpg") for i in range(12)]
    sampler = SimpleNamespace(requested=deque())
    skipped = SkippedImages(SimpleNamespace(image_ids=[100 + i for i in range(12)], records=records), sampler)
    for asked, delivered in batches:
        sampler.requested.append(asked)
        skipped.check(delivered)
    return skipped


def _random_batches(n: int) -> list:
    """n batches of 2; each image is replaced by another of the batch with probability 0.3 (as the
    dataset does when it cannot read the file)."""
    batches = []
    for _ in range(n):
        asked = random.sample(range(12), 2)
        delivered = [100 + (asked[1 - k] if random.random() < 0.3 else i) for k, i in enumerate(asked)]
        batches.append((asked, delivered))
    return batches


def _expected(batches) -> dict:
    """File -> times skipped, counted naively from the batches."""
    out = {}
    for asked, delivered in batches:
        for i, got in zip(asked, delivered):
            if got != 100 + i:
                out[f"img{i}.jpg"] = out.get(f"img{i}.jpg", 0) + 1
    return out


def _summary_worker(rank, init_file, per_rank, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        skipped = _skipped_images(per_rank[rank])
        d = Dist(rank, 2, torch.device("cpu"))
        result = {"own": skipped.files, "total": skipped.over_ranks(d), "summary": skipped.summary(d, max_names=3)}
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_summary_adds_up_the_ranks_skipped_images(tmp_path):
    per_rank = [_random_batches(random.randint(5, 15)) for _ in range(2)]
    per_rank[1].append(([0, 1], [101, 101]))  # at least one skip, on rank 1 only (rank 0 prints)
    mp.spawn(_summary_worker, args=(str(tmp_path / "init"), per_rank, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["own"] == _expected(per_rank[0]) and r1["own"] == _expected(per_rank[1])
    total = _expected(per_rank[0] + per_rank[1])
    assert r0["total"] == r1["total"] == total  # every rank gets the sum (the collective is symmetric)
    names = sorted(total)
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    assert r0["summary"] == (f"{sum(total.values())} unreadable image load(s) skipped ({len(names)} file(s): "
                             f"{', '.join(names[:3])}{more})")


def test_summary_of_one_process():
    batches = _random_batches(10)
    skipped = _skipped_images(batches)
    one = Dist(0, 1, torch.device("cpu"))
    assert skipped.over_ranks(one) == _expected(batches) and skipped.count == sum(_expected(batches).values())
    assert _skipped_images([]).summary(one) == "no unreadable images"
