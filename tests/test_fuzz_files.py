"""Corrupt-file fuzzer (issue 16, item 4): malformed image and checkpoint files through every entry
point that reads files, each entry point in its own subprocess so that a crash (SIGSEGV, abort)
or a hang fails the test with the file kind that caused it instead of killing pytest.

Files (generated in tmp_path from the small real images in tests/data): PNG with a bad IDAT CRC,
truncated PNG and JPEG, zero-byte file, text named .jpg, 8-bit PNG (control), 16-bit gray and RGB
PNGs (must decode to the 8-bit source exactly: value v stored as v * 257), a PNG whose IHDR claims
100000 x 100000, and seeded random byte flips of a real JPEG (replay: HTC_FAST_TEST_SEED=<seed>).
Entry points: `load_image`, `CocoDetection` (a COCO json listing the files), `python -m
htc_fast.predict`, `python -m htc_fast.evaluate` (htc_tiny, random weights), `load_checkpoint`.
Accepted: a correct decode, or a clean exception / skip message naming the file. `-s` prints
the counts (files x entry points, outcomes).
"""
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
COCO_MINI = ROOT / "tests" / "data" / "coco_mini"
REAL_JPEG = COCO_MINI / "val2017" / "000000117645.jpg"
FLIPS = 24
TIMEOUT_S = 60
SEED = int(os.environ.get("HTC_FAST_TEST_SEED") or random.SystemRandom().randrange(2 ** 31))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(array: np.ndarray, bit_depth: int, color_type: int) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): `array` (H, W[, C]) of the stored
    samples, big-endian rows with filter byte 0."""
    h, w = array.shape[:2]
    raw = array.astype(">u2" if bit_depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), raw], axis=1)
    header = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows.tobytes()))
            + _chunk(b"IEND", b""))


def _make_files(folder: Path) -> list[dict]:
    """Writes the corrupt files; returns [{"kind", "path", "expect", "ref"}] where expect is
    "decode" (ref: .npy of the exact RGB result), "error" or "either" (byte flips: JPEG has no
    checksum, a flip may decode to other pixels)."""
    rng = np.random.default_rng(SEED)
    source = np.asarray(Image.open(REAL_JPEG).convert("RGB"))[:48, :64].copy()  # small: fast PNG paths
    jpeg = REAL_JPEG.read_bytes()
    png8 = _png(source, 8, 2)
    idat = png8.index(b"IDAT") + 4  # a byte inside the IDAT payload, its CRC left as it was
    bad_crc = bytearray(png8)
    bad_crc[idat + 10] ^= 0xFF
    gray = source[:, :, 1]
    huge = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
            + png8[png8.index(b"IDAT") - 4:])
    cases = [("png_8bit_control", ".png", png8, "decode", source),
             ("png_16bit_rgb", ".png", _png(source.astype(np.uint16) * 257, 16, 2), "decode", source),
             ("png_16bit_gray", ".png", _png(gray.astype(np.uint16) * 257, 16, 0), "decode",
              np.repeat(gray[:, :, None], 3, axis=2)),
             ("png_bad_idat_crc", ".png", bytes(bad_crc), "error", None),
             ("png_truncated", ".png", png8[:len(png8) // 2], "error", None),
             ("png_huge_header", ".png", huge, "error", None),
             ("jpeg_truncated", ".jpg", jpeg[:len(jpeg) // 2], "error", None),
             ("zero_byte", ".jpg", b"", "error", None),
             ("text_named_jpg", ".jpg", b"this is not an image\n" * 20, "error", None)]
    for k in range(FLIPS):
        flipped = bytearray(jpeg)
        for pos in rng.integers(2, len(jpeg), size=int(rng.integers(1, 9))):
            flipped[pos] ^= int(rng.integers(1, 256))
        cases.append((f"jpeg_flip_{k}", ".jpg", bytes(flipped), "either", None))
    files = []
    for kind, ext, data, expect, ref in cases:
        path = folder / f"{kind}{ext}"
        path.write_bytes(data)
        ref_path = None
        if ref is not None:
            ref_path = folder / f"{kind}.ref.npy"
            np.save(ref_path, ref)
        files.append({"kind": kind, "path": str(path), "expect": expect, "ref": str(ref_path) if ref_path else None})
    return files


# Runs in a subprocess: argv = entry point, manifest json, result json. Prints "CASE <kind>" before
# each case, so that a crash names the file kind that caused it.
_WORKER = r'''
import json, sys, warnings
import numpy as np
entry, manifest, out = sys.argv[1:4]
files = json.loads(open(manifest).read())
results = []
def run(kind, fn):
    print("CASE", kind, flush=True)
    try:
        value = fn()
        results.append({"kind": kind, "outcome": "ok", "value": value})
    except Exception as exc:
        results.append({"kind": kind, "outcome": "error", "type": type(exc).__name__, "message": str(exc)})
if entry == "load_image":
    from htc_fast.data.preprocess import load_image
    def decode(f):
        image = load_image(f["path"])
        if f["ref"]:
            np.save(f["path"] + ".got.npy", image.permute(1, 2, 0).numpy())
        return [list(image.shape), str(image.dtype)]
    for f in files:
        run(f["kind"], lambda f=f: decode(f))
elif entry == "dataset":
    from htc_fast.data.coco import CocoDetection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = CocoDetection(sys.argv[4], sys.argv[5], test_mode=True)
    names = {r.file_name: i for i, r in enumerate(ds.records)}
    for f in files:
        name = f["path"].rsplit("/", 1)[-1]
        run(f["kind"], lambda name=name: list(ds.load(names[name]).image.shape))
elif entry == "checkpoint":
    from htc_fast.config import get_config
    from htc_fast.model.checkpoint import load_checkpoint
    from htc_fast.model.htc import build_htc
    model = build_htc(get_config("htc_tiny"))
    for f in files:
        run(f["kind"], lambda f=f: str(load_checkpoint(model, f["path"])))
open(out, "w").write(json.dumps(results))
'''


def _subprocess(args: list[str], what: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Runs `python *args`; pytest.fail naming the last "CASE" line on a crash, a hang or a traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        last = [ln for ln in out.splitlines() if ln.startswith("CASE")]
        pytest.fail(f"{what} hung for {timeout} s (seed {SEED}); last case: {last[-1:] or 'none'}")
    if proc.returncode < 0 or proc.returncode > 2 or "Traceback" in proc.stderr:
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("CASE")]
        pytest.fail(f"{what} crashed or raised (exit {proc.returncode}, seed {SEED}); last case: "
                    f"{last[-1:] or 'none'}\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.parametrize("script, outcome", [("import os; os.abort()", "crashed"),
                                             ("import time; time.sleep(30)", "hung")])
def test_a_crash_or_hang_fails_naming_the_case(script, outcome):
    """The isolation itself: a worker that aborts or hangs fails the test with its last case."""
    with pytest.raises(pytest.fail.Exception, match=f"{outcome}.*CASE png_example"):
        _subprocess(["-c", f"print('CASE png_example', flush=True); {script}"], "self-check", timeout=3)


def _run_worker(entry: str, files: list[dict], tmp: Path, *extra: str) -> dict[str, dict]:
    manifest, out = tmp / f"{entry}.manifest.json", tmp / f"{entry}.results.json"
    manifest.write_text(json.dumps(files))
    _subprocess(["-c", _WORKER, entry, str(manifest), str(out), *extra], f"entry point {entry}")
    return {r["kind"]: r for r in json.loads(out.read_text())}


def _report(entry: str, outcomes: dict[str, str]) -> None:
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    print(f"\n[fuzz files, seed {SEED}] {entry}: {len(outcomes)} files, "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corrupt")
    images = folder / "images"
    images.mkdir()
    files = _make_files(images)
    decoded = _run_worker("load_image", files, folder)
    return folder, files, decoded


def test_load_image_decodes_or_names_the_file(corrupt):
    _, files, decoded = corrupt
    for f in files:
        r = decoded[f["kind"]]
        if f["expect"] == "decode":
            assert r["outcome"] == "ok", f"{f['kind']}: {r}"
            got, ref = np.load(f["path"] + ".got.npy"), np.load(f["ref"])
            assert got.dtype == np.uint8 and np.array_equal(got, ref), f"{f['kind']} decodes to other pixels"
        elif f["expect"] == "error":
            assert r["outcome"] == "error", f"{f['kind']} decoded: {r}"
        if r["outcome"] == "error":
            assert r["type"] in ("ValueError", "FileNotFoundError") and f["path"] in r["message"], r
        else:
            assert r["value"][0][0] == 3 and r["value"][1] == "torch.uint8", r
    _report("load_image", {k: r["outcome"] for k, r in decoded.items()})


def _coco_json(folder: Path, files: list[dict]) -> Path:
    """The real image 117645 with its annotations (so that AP can be computed), plus one image
    entry per corrupt file, declared at the size its header claims (the source's otherwise)."""
    gt = json.loads((COCO_MINI / "annotations" / "instances_val2017_mini.json").read_text())
    real = next(im for im in gt["images"] if im["id"] == 117645)
    images = [dict(real, file_name=REAL_JPEG.name)]
    for k, f in enumerate(files):
        h, w = (48, 64) if f["kind"].startswith("png") else (real["height"], real["width"])
        if f["kind"] == "png_huge_header":
            h = w = 100000
        images.append({"id": 10 ** 7 + k, "file_name": Path(f["path"]).name, "height": h, "width": w})
    anns = [a for a in gt["annotations"] if a["image_id"] == 117645]
    path = folder / "instances_fuzz.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": gt["categories"]}))
    (folder / "images" / REAL_JPEG.name).write_bytes(REAL_JPEG.read_bytes())
    return path


def test_coco_dataset_loads_or_names_the_file(corrupt):
    folder, files, decoded = corrupt
    ann = _coco_json(folder, files)
    loaded = _run_worker("dataset", files, folder, str(ann), str(folder / "images"))
    for f in files:
        r = loaded[f["kind"]]
        assert r["outcome"] == decoded[f["kind"]]["outcome"], f"{f['kind']}: {r} vs load_image {decoded[f['kind']]}"
        if r["outcome"] == "error":
            assert r["type"] == "BadSampleError" and f["path"] in r["message"], r
    _report("CocoDetection.load", {k: r["outcome"] for k, r in loaded.items()})


def test_predict_cli_skips_and_names_unreadable_files(corrupt):
    folder, files, decoded = corrupt
    out = folder / "predict_out"
    proc = _subprocess(["-m", "htc_fast.predict", *(f["path"] for f in files), "--config", "htc_tiny", "--out",
                        str(out), "--device", "cpu", "--workers", "0"], "python -m htc_fast.predict")
    written = {json.loads(p.read_text())["image"] for p in out.glob("*.json")}
    outcomes = {}
    for f in files:
        if decoded[f["kind"]]["outcome"] == "ok":
            assert f["path"] in written, f"{f['kind']} decodes but predict wrote nothing for it"
            outcomes[f["kind"]] = "ok"
        else:
            assert f["path"] not in written and f"skipped {f['path']}" in proc.stderr, f["kind"]
            outcomes[f["kind"]] = "skipped"
    assert proc.returncode == (1 if "skipped" in outcomes.values() else 0), proc.stderr[-2000:]
    assert "DeprecationWarning" not in proc.stderr, proc.stderr[-2000:]  # issue 16: none per process
    _report("python -m htc_fast.predict", outcomes)


def test_evaluate_cli_skips_and_counts_unreadable_files(corrupt):
    folder, files, decoded = corrupt
    ann, out = _coco_json(folder, files), folder / "eval.json"
    proc = _subprocess(["-m", "htc_fast.evaluate", "--config", "htc_tiny", "--data-root", str(folder),
                        "--ann-file", str(ann), "--img-dir", str(folder / "images"), "--device", "cpu",
                        "--workers", "0", "--out", str(out)], "python -m htc_fast.evaluate")
    assert proc.returncode == 0 and "DeprecationWarning" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    skipped = " ".join(result["skipped"])
    outcomes = {}
    for f in files:
        ok = decoded[f["kind"]]["outcome"] == "ok"
        assert (f["path"] in skipped) != ok, f"{f['kind']}: skipped list {result['skipped']}"
        outcomes[f["kind"]] = "ok" if ok else "skipped"
    assert result["num_images"] == 1 + sum(v == "ok" for v in outcomes.values()), result["num_images"]
    _report("python -m htc_fast.evaluate", outcomes)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Bad checkpoint files through `load_checkpoint` (one subprocess), a valid one as control."""
    import torch

    from htc_fast.config import get_config
    from htc_fast.model.htc import build_htc

    folder = tmp_path_factory.mktemp("checkpoints")
    valid = folder / "valid.pth"
    torch.save(build_htc(get_config("htc_tiny")).state_dict(), valid)
    blob = valid.read_bytes()
    cases = {"valid_control": None, "zero_byte": b"", "text": b"not a checkpoint\n" * 10,
             "truncated": blob[:len(blob) // 2], "list_top_level": [1, 2, 3],
             "state_dict_not_a_dict": {"state_dict": 5}, "wrong_keys": {"state_dict": {"foo.weight": torch.zeros(2)}}}
    files = []
    for kind, data in cases.items():
        path = valid if data is None else folder / f"{kind}.pth"
        if isinstance(data, bytes):
            path.write_bytes(data)
        elif data is not None:
            torch.save(data, path)
        files.append({"kind": kind, "path": str(path), "expect": "decode" if data is None else "error", "ref": None})
    loaded = _run_worker("checkpoint", files, folder)
    _report("load_checkpoint", {k: r["outcome"] for k, r in loaded.items()})
    return {f["kind"]: (f, loaded[f["kind"]]) for f in files}


def _check_checkpoint(f: dict, r: dict) -> None:
    assert r["outcome"] == ("ok" if f["expect"] == "decode" else "error"), f"{f['kind']}: {r}"
    if r["outcome"] == "error":
        assert r["type"] in ("ValueError", "CheckpointMismatchError"), r
        assert f["path"] in r["message"], f"{f['kind']}: the error does not name the file: {r}"
        assert "weights_only=False" not in r["message"], f"{f['kind']}: a misleading hint: {r}"


@pytest.mark.parametrize("kind", ["valid_control", "zero_byte", "text", "truncated", "list_top_level",
                                  "state_dict_not_a_dict", "wrong_keys"])
def test_load_checkpoint_rejects_bad_files_naming_them(checkpoints, kind):
    _check_checkpoint(*checkpoints[kind])
