"""Checkpoints (issue 16 item 5): the last N kept, the one --resume uses never deleted, and a write
that fails part-way (a full disk) leaves the previous checkpoint and latest.txt intact and stops
the run with a message naming the path."""
import errno

import pytest
import torch
from torch import nn

from htc_fast import train
from htc_fast.config import TrainConfig
from htc_fast.engine import (
    Checkpoints,
    CheckpointWriteError,
    Progress,
    build_optimizer,
    iteration_checkpoints,
    latest_checkpoint,
    prune_checkpoints,
    read_resume_state,
    write_checkpoint,
)


def _model_and_optimizer():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    return model, build_optimizer(model, TrainConfig())


def _names(work_dir):
    return [p.name for p in iteration_checkpoints(work_dir)]


def _full_disk_after(n_bytes):
    """A torch.save that writes the first n_bytes of the real output and then fails like a full disk."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        import io

        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        with open(f, "wb") as out:
            out.write(buf.getvalue()[:n_bytes])
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    return save


def test_keeps_the_last_n(tmp_path):
    model, opt = _model_and_optimizer()
    ckpts = Checkpoints(tmp_path, "toy", ["train.lr=0.1"], keep=2)
    for it in (3, 6, 9, 12, 15):
        ckpts.write(model, opt, Progress(iteration=it))
    assert _names(tmp_path) == ["iter_0000012.pth", "iter_0000015.pth"]
    assert latest_checkpoint(tmp_path) == ckpts.last == tmp_path / "iter_0000015.pth"
    assert read_resume_state(ckpts.last)["progress"]["iteration"] == 15
    keep_all = Checkpoints(tmp_path, "toy", [], keep=0)
    for it in (18, 21, 24):
        keep_all.write(model, opt, Progress(iteration=it))
    assert len(_names(tmp_path)) == 5
    with pytest.raises(ValueError, match="keep_checkpoints"):
        Checkpoints(tmp_path, "toy", [], keep=-1)


def test_the_checkpoint_resume_would_use_is_never_deleted(tmp_path):
    model, opt = _model_and_optimizer()
    for it in (1, 2, 3, 4, 5):
        write_checkpoint(tmp_path, model, opt, Progress(iteration=it), "toy", [])
    (tmp_path / "latest.txt").write_text("iter_0000002.pth")  # e.g. a newer run's files were copied in
    (tmp_path / "other.pth").write_bytes(b"not ours")
    deleted = prune_checkpoints(tmp_path, keep=1)
    assert sorted(p.name for p in deleted) == ["iter_0000001.pth", "iter_0000003.pth", "iter_0000004.pth"]
    assert _names(tmp_path) == ["iter_0000002.pth", "iter_0000005.pth"]
    assert (tmp_path / "other.pth").is_file()
    assert latest_checkpoint(tmp_path).name == "iter_0000002.pth"


@pytest.mark.parametrize("written", [0, 100])
def test_a_full_disk_leaves_the_previous_checkpoint_and_pointer(tmp_path, monkeypatch, written):
    model, opt = _model_and_optimizer()
    ckpts = Checkpoints(tmp_path, "toy", [], keep=1)
    good = ckpts.write(model, opt, Progress(iteration=1))
    before = good.read_bytes()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    monkeypatch.setattr(torch, "save", _full_disk_after(written))
    with pytest.raises(CheckpointWriteError, match=r"iter_0000002\.pth.*No space left.*iter_0000001\.pth"):
        ckpts.write(model, opt, Progress(iteration=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001.pth", "latest.txt"]  # no .tmp left
    assert good.read_bytes() == before and latest_checkpoint(tmp_path) == good
    assert ckpts.last == good


def test_a_failed_pointer_write_keeps_the_old_pointer(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    write_checkpoint(tmp_path, model, opt, Progress(iteration=1), "toy", [])
    real_write_text = type(tmp_path).write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.startswith("latest.txt"):
            real_write_text(self, data[:2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "write_text", write_text)
    with pytest.raises(CheckpointWriteError, match=r"iter_0000002\.pth"):
        write_checkpoint(tmp_path, model, opt, Progress(iteration=2), "toy", [])
    assert latest_checkpoint(tmp_path).name == "iter_0000001.pth"
    assert not (tmp_path / "latest.txt.tmp").exists()


def test_training_keeps_n_checkpoints_and_stops_on_a_full_disk(tmp_path, monkeypatch):
    common = ["--no-eval", "--log-interval", "100", "--ckpt-interval", "1", "--keep-checkpoints", "2"]
    assert train.main(["--work-dir", str(tmp_path), "--max-iters", "4"] + common) == 0
    assert _names(tmp_path) == ["iter_0000003.pth", "iter_0000004.pth"]
    monkeypatch.setattr(torch, "save", _full_disk_after(1000))
    with pytest.raises(CheckpointWriteError, match=r"could not write the checkpoint .*iter_0000005\.pth"):
        train.main(["--work-dir", str(tmp_path), "--max-iters", "6", "--resume"] + common)
    assert _names(tmp_path) == ["iter_0000003.pth", "iter_0000004.pth"]
    assert read_resume_state(latest_checkpoint(tmp_path))["progress"]["iteration"] == 4


@pytest.mark.parametrize("content", [b"", b"garbage that is not a zip file", "truncated"])
def test_an_unreadable_resume_checkpoint_is_named(tmp_path, content):
    model, opt = _model_and_optimizer()
    write_checkpoint(tmp_path, model, opt, Progress(iteration=1), "toy", [])
    path = write_checkpoint(tmp_path, model, opt, Progress(iteration=2), "toy", [])
    path.write_bytes(path.read_bytes()[:200] if content == "truncated" else content)
    with pytest.raises(ValueError, match=r"cannot read the training checkpoint .*iter_0000002\.pth.*latest\.txt "
                                         r"\(there: iter_0000001\.pth\)"):
        read_resume_state(latest_checkpoint(tmp_path))
