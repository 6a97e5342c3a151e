"""Downloading a weights file into the torch hub cache, with its sha256 prefix checked.

What it owns: the cache location, the atomic download, the hash check and the error messages.
What it does not own: which URL to fetch (released.py, imagenet.py) or reading the file.

A file lands in `<torch hub dir>/checkpoints/<file name>` (where torch.hub.load_state_dict_from_url
puts it, so the two share downloads) only after it was received completely and its sha256 starts
with the expected prefix: it is written to a temporary file in the same folder and renamed, so an
interrupted or rejected download leaves nothing under the final name.
Concurrent requests for one file (the ranks of a torchrun job) download it once.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import torch

# torch.hub's convention: "name-<hex>.ext" where <hex> starts the file's sha256.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.[A-Za-z0-9]+$")
_CHUNK = 1 << 20
_TIMEOUT_S = 60


class WeightsDownloadError(RuntimeError):
    """A weights file could not be fetched or did not match its published hash."""


def cache_dir() -> Path:
    """`<torch.hub.get_dir()>/checkpoints` (TORCH_HOME and torch.hub.set_dir move it)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hash_prefix_of(url: str) -> str | None:
    """The sha256 prefix published in the URL's file name, or None if it carries none."""
    match = _HASH_IN_NAME.search(_file_name(url))
    return match.group(1) if match else None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, *, directory: str | os.PathLike | None = None,
             hash_prefix: str | None = "from_name", progress: bool = True) -> Path:
    """The local path of `url`'s file, downloading it into the cache if it is not there yet.

    Args:
        url: http(s) URL of the file.
        directory: where to keep it; default `cache_dir()`.
        hash_prefix: hex digits the file's sha256 must start with; "from_name" (default) takes
            them from the file name (`...-7332cf16.pth`); None checks nothing.
        progress: print a progress line on stderr.
    Raises:
        WeightsDownloadError: network failure, incomplete transfer, or wrong hash (the message
            says which, and nothing is left in the cache).
    """
    if not isinstance(url, str) or urllib.parse.urlparse(url).scheme not in ("http", "https"):
        raise ValueError(f"download: url must be an http(s) URL, got {url!r}")
    if hash_prefix == "from_name":
        hash_prefix = hash_prefix_of(url)
    folder = Path(directory) if directory is not None else cache_dir()
    target = folder / _file_name(url)
    if target.is_file():
        _check_hash(target, hash_prefix, url, cached=True)
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _one_download_at_a_time(folder / f".{target.name}.lock"):
        if target.is_file():  # another process (a torchrun rank) fetched it while we waited
            _check_hash(target, hash_prefix, url, cached=True)
            return target
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out:
                _fetch(url, out, progress)
            _check_hash(Path(tmp_name), hash_prefix, url, cached=False)
            os.replace(tmp_name, target)  # atomic within one file system
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


@contextlib.contextmanager
def _one_download_at_a_time(lock_path: Path):
    """An advisory lock (POSIX flock) on `lock_path`: when the ranks of a torchrun job ask for the
    same file at once, one downloads it and the others wait, then find it cached. Not a
    collective (no barrier), so a single caller never waits for anyone. The empty lock file stays:
    removing it could let a late process lock a new file while another still holds the old one.
    Where flock is missing (Windows) concurrent downloads stay correct (each writes its own
    temporary file; the rename is atomic), only redundant."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _file_name(url: str) -> str:
    name = Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"download: the URL {url!r} names no file")
    return name


def _fetch(url: str, out, progress: bool) -> None:
    """Copies the body of `url` into the open file `out`; checks the length the server declared."""
    try:
        response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)  # noqa: S310 - http(s) checked
    except urllib.error.HTTPError as exc:
        raise WeightsDownloadError(
            f"could not download {url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsDownloadError(
            f"could not download {url}: {reason}. Is the network reachable? Without one, download "
            "the file elsewhere and pass its local path instead.") from exc
    with response:
        declared = response.headers.get("Content-Length")
        expected = int(declared) if declared and declared.isdigit() else None
        received = 0
        try:
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                received += len(chunk)
                if progress:
                    total = f" of {expected / 1e6:.1f}" if expected else ""
                    print(f"\rdownloading {_file_name(url)}: {received / 1e6:.1f}{total} MB",
                          end="", file=sys.stderr, flush=True)
        except (http.client.HTTPException, OSError) as exc:  # IncompleteRead, reset, timeout
            raise WeightsDownloadError(f"download of {url} broke off after {received} bytes "
                                       f"({exc!r}); nothing was kept") from exc
        finally:
            if progress:
                print(file=sys.stderr)
    if expected is not None and received != expected:
        raise WeightsDownloadError(f"download of {url} is incomplete: {received} of {expected} "
                                   "bytes; nothing was kept")


def _check_hash(path: Path, prefix: str | None, url: str, *, cached: bool) -> None:
    if prefix is None:
        return
    actual = sha256_of(path)
    if actual.startswith(prefix):
        return
    where = (f"the cached file {path} (delete it to download again)" if cached
             else f"the file downloaded from {url} (not kept)")
    raise WeightsDownloadError(f"sha256 mismatch for {where}: expected a hash starting with "
                               f"{prefix}, got {actual[:len(prefix)]}")
