"""Weights by name (htc_fast.weights), tested without the internet.

A local HTTP server on 127.0.0.1 serves small checkpoint files: a right one, a truncated one (two
ways: the server breaks off mid-body, or serves a short file completely) and one whose published
hash is wrong. After every failure the cache folder must hold nothing (no file under the final
name, no temporary file).
"""
import hashlib
import http.server
import io
import socket
import threading
import time

import pytest
import torch

from htc_fast.config import PRESETS, get_config
from htc_fast.model.checkpoint import load_checkpoint
from htc_fast.model.htc import build_htc
from htc_fast.weights import (
    IMAGENET_URLS,
    RELEASED,
    ReleasedCheckpoint,
    WeightsDownloadError,
    download,
    hash_prefix_of,
    imagenet_name,
    resolve_weights,
)


def _checkpoint_bytes(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _named(stem, data, prefix=None):
    """`stem-<first 8 hex digits of sha256>.pth`, or with a given (wrong) prefix."""
    return f"{stem}-{prefix or hashlib.sha256(data).hexdigest()[:8]}.pth"


class _Server:
    """Serves `routes[path] = (body, declared_length)` on 127.0.0.1 and counts the requests."""

    def __init__(self):
        self.routes, self.hits, self.delay_s = {}, [], 0.0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                server.hits.append(self.path)
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, declared = server.routes[self.path]
                time.sleep(server.delay_s)
                self.send_response(200)
                self.send_header("Content-Length", str(declared))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def add(self, path, body, declared=None):
        self.routes[path] = (body, len(body) if declared is None else declared)
        return self.url(path)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def tiny_checkpoint():
    """An mmdetection-format checkpoint of a randomly initialised htc_tiny, as bytes."""
    model = build_htc(get_config("htc_tiny"))
    return model.state_dict(), _checkpoint_bytes({"state_dict": model.state_dict(), "meta": {}})


def _files(folder):
    """What a folder holds besides the downloader's (empty) lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def _assert_empty(folder):
    assert not folder.exists() or _files(folder) == []


def test_right_file_is_downloaded_checked_and_cached(server, tmp_path, tiny_checkpoint):
    state, data = tiny_checkpoint
    url = server.add("/zoo/" + _named("htc_tiny_coco_20200101", data), data)
    path = resolve_weights(url, directory=tmp_path, progress=False)
    assert path.parent == tmp_path and path.read_bytes() == data
    assert _files(tmp_path) == [path.name]  # no temporary file left
    model = build_htc(get_config("htc_tiny"))
    assert load_checkpoint(model, path).ok
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    # A second call uses the cache: no new request.
    assert resolve_weights(url, directory=tmp_path, progress=False) == path
    assert len(server.hits) == 1


def test_released_resolves_through_the_table(server, tmp_path, tiny_checkpoint, monkeypatch):
    _, data = tiny_checkpoint
    url = server.add("/" + _named("htc_tiny_coco_20200101", data), data)
    monkeypatch.setitem(RELEASED, "htc_tiny", ReleasedCheckpoint(url, 0.0, 0.0))
    path = resolve_weights("released", preset="htc_tiny", directory=tmp_path, progress=False)
    assert path.read_bytes() == data
    # An HTCConfig names its preset too.
    assert resolve_weights("released", get_config("htc_tiny"), directory=tmp_path,
                           progress=False) == path


@pytest.mark.parametrize("name,preset,wrapped", [
    ("torchvision://resnet50", "htc_r50_fpn_1x", False),  # torchvision: a bare state dict
    ("open-mmlab://resnext101_64x4d", "htc_x101_64x4d_fpn_16x1_20e", True),  # under "state_dict"
])
def test_imagenet_backbone_by_name_loads_into_the_backbone(server, tmp_path, monkeypatch, name,
                                                           preset, wrapped):
    model = build_htc(get_config("htc_tiny"))
    backbone = {k[len("backbone."):]: torch.randn_like(v) if v.is_floating_point() else v
                for k, v in model.state_dict().items() if k.startswith("backbone.")}
    backbone["fc.weight"] = torch.randn(10, 4)  # the ImageNet classifier is skipped
    data = _checkpoint_bytes({"state_dict": backbone} if wrapped else backbone)
    url = server.add("/models/" + _named(name.split("//")[1], data), data)
    monkeypatch.setitem(IMAGENET_URLS, name, url)
    path = resolve_weights(name, directory=tmp_path, progress=False)
    report = load_checkpoint(model, path, source="torchvision")
    assert report.ok and report.skipped == ["fc.weight"]
    for key, value in backbone.items():
        if key != "fc.weight":
            torch.testing.assert_close(model.state_dict()["backbone." + key], value, rtol=0, atol=0)
    # "imagenet" picks the preset's backbone name, served by the same patched URL.
    assert resolve_weights("imagenet", preset=preset, directory=tmp_path, progress=False) == path


def test_concurrent_requests_download_once(server, tmp_path, tiny_checkpoint):
    # The ranks of a torchrun job resolve the same weights at the same moment.
    _, data = tiny_checkpoint
    url = server.add("/" + _named("htc_tiny", data), data)
    server.delay_s = 0.5  # the first download is still running when the others ask
    paths = [None] * 4

    def fetch(i):
        paths[i] = download(url, directory=tmp_path, progress=False)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(server.hits) == 1
    assert all(p is not None and p.read_bytes() == data for p in paths)
    assert _files(tmp_path) == [paths[0].name]


def test_server_breaking_off_keeps_nothing(server, tmp_path, tiny_checkpoint):
    _, data = tiny_checkpoint
    url = server.add("/" + _named("htc_tiny", data), data[: len(data) // 2], declared=len(data))
    with pytest.raises(WeightsDownloadError, match="broke off|incomplete"):
        download(url, directory=tmp_path, progress=False)
    _assert_empty(tmp_path)


def test_truncated_file_fails_the_hash_and_keeps_nothing(server, tmp_path, tiny_checkpoint):
    _, data = tiny_checkpoint
    url = server.add("/" + _named("htc_tiny", data), data[:-100])  # complete response, short file
    with pytest.raises(WeightsDownloadError, match="sha256 mismatch.*not kept"):
        download(url, directory=tmp_path, progress=False)
    _assert_empty(tmp_path)


def test_wrong_hash_keeps_nothing(server, tmp_path, tiny_checkpoint):
    _, data = tiny_checkpoint
    wrong = "0" * 8 if not hashlib.sha256(data).hexdigest().startswith("0" * 8) else "f" * 8
    url = server.add("/" + _named("htc_tiny", data, prefix=wrong), data)
    with pytest.raises(WeightsDownloadError, match=f"expected a hash starting with {wrong}"):
        resolve_weights(url, directory=tmp_path, progress=False)
    _assert_empty(tmp_path)


def test_corrupted_cached_file_is_reported(server, tmp_path, tiny_checkpoint):
    _, data = tiny_checkpoint
    url = server.add("/" + _named("htc_tiny", data), data)
    (tmp_path / _named("htc_tiny", data)).write_bytes(data[:10])
    with pytest.raises(WeightsDownloadError, match="cached file .*delete it"):
        download(url, directory=tmp_path, progress=False)
    assert server.hits == []


def test_http_error_and_unreachable_network(server, tmp_path):
    with pytest.raises(WeightsDownloadError, match="HTTP 404"):
        download(server.url("/missing-12345678.pth"), directory=tmp_path, progress=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightsDownloadError, match="network reachable"):
        download(f"http://127.0.0.1:{port}/w-12345678.pth", directory=tmp_path, progress=False)
    _assert_empty(tmp_path)


def test_local_paths_and_bad_specs(tmp_path):
    local = tmp_path / "mine.pth"
    local.write_bytes(b"x")
    assert resolve_weights(str(local)) == local
    assert resolve_weights(local) == local
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resolve_weights(str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="needs a preset"):
        resolve_weights("released")
    with pytest.raises(ValueError, match="no released checkpoint"):
        resolve_weights("released", preset="htc_tiny")
    with pytest.raises(ValueError, match="no ImageNet weights"):
        resolve_weights("imagenet", preset="htc_tiny")
    with pytest.raises(ValueError, match="unknown weights name"):
        resolve_weights("open-mmlab://resnet9000")
    with pytest.raises(TypeError, match="weights spec"):
        resolve_weights(3)
    with pytest.raises(ValueError, match="http"):
        download("ftp://example.org/a-12345678.pth", directory=tmp_path)


def test_tables_cover_the_presets():
    # Every preset that mmdetection released has a row, and every row names a preset.
    released = set(PRESETS) - {"htc_tiny", "htc_without_semantic_r50_fpn_1x"}
    assert set(RELEASED) == released
    for row in RELEASED.values():
        assert len(hash_prefix_of(row.url)) == 8
    for name in IMAGENET_URLS.values():
        assert len(hash_prefix_of(name)) == 8
    # mmdetection's HTC configs: from torchvision, ResNeXt from open-mmlab.
    names = {p: imagenet_name(get_config(p).model.backbone) for p in released}
    assert names["htc_r101_fpn_20e"] == "torchvision://resnet101"
    assert names["htc_x101_32x4d_fpn_16x1_20e"] == "open-mmlab://resnext101_32x4d"
    assert names["htc_x101_64x4d_fpn_dconv_c3_c5_mstrain_400_1400_16x1_20e"] == \
        "open-mmlab://resnext101_64x4d"


def test_predictor_takes_released_and_urls(server, tmp_path, tiny_checkpoint, monkeypatch):
    from htc_fast.predict import Predictor

    state, data = tiny_checkpoint
    url = server.add("/" + _named("htc_tiny_coco_20200101", data), data)
    monkeypatch.setitem(RELEASED, "htc_tiny", ReleasedCheckpoint(url, 0.0, 0.0))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # default cache: <TORCH_HOME>/hub/checkpoints
    for checkpoint in ("released", url):
        predictor = Predictor("htc_tiny", checkpoint=checkpoint, device="cpu")
        assert predictor.report.ok
        torch.testing.assert_close(predictor.model.state_dict()["rpn_head.rpn_cls.weight"],
                                   state["rpn_head.rpn_cls.weight"], rtol=0, atol=0)
    assert len(server.hits) == 1
    assert (tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]).is_file()
