"""The documentation tells the truth about the code, and the repository names no one's machine.

- Every import in the README's Python blocks resolves, and every dotted ``htc_fast.*`` name the
  README, CONTRIBUTING.md and docs/ mention exists (a module, or an attribute of one).
- Every ``python -m htc_fast.<cli>`` command they show runs ``--help``, and every ``--option``
  it uses is one the CLI accepts; every ``--config`` value is a preset; every script or file a
  command runs exists.
- Every relative Markdown link points at a file of the repository.
- No tracked file holds an absolute path of a machine (home folders, this project's work
  folder), a default data path under /tmp, or a citation of the design notes that lived outside
  the repository.
"""
import ast
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from htc_fast.config import PRESETS

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
# Names that need a compiled or optional piece to import: documented, but not importable in every
# installation (HTC_FAST_SKIP_EXTENSION=1 has no _C).
OPTIONAL_NAMES = {"htc_fast._C"}
_FILE_EXTENSIONS = {"py", "cpp", "cu", "cuh", "h", "md", "so", "pth", "json", "txt"}


def _code_blocks(text, languages):
    return [m.group(2) for m in re.finditer(r"```(\w*)\n(.*?)```", text, re.S)
            if m.group(1) in languages]


def _inline_and_blocks(text):
    """Every command-looking line: the code blocks' lines (continuations joined) and inline code."""
    lines = []
    for block in _code_blocks(text, {"bash", "sh", ""}):
        lines += block.replace("\\\n", " ").splitlines()
    lines += re.findall(r"`([^`\n]+)`", text)
    return lines


# ----------------------------------------------------------------------------- names

def _resolve(dotted):
    """Imports the longest module prefix of `dotted`, then getattr's the rest (AssertionError
    if any of it is missing)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            found = importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj = importlib.import_module(module_name)
            for attr in parts[i:]:
                assert hasattr(obj, attr), f"{dotted}: {module_name} has no attribute {attr!r}"
                obj = getattr(obj, attr)
            return obj
    raise AssertionError(f"{dotted}: no module of that name")


def _mentioned_names():
    names = set()
    for doc in DOCS:
        # htc_fast.a.b (not torch.ops.htc_fast.x, not file paths htc_fast/a.py).
        found = re.findall(r"(?<![\w./])htc_fast(?:\.[A-Za-z_]\w*)+", doc.read_text())
        # "csrc/htc_fast.cpp" is a file, not a name.
        names |= {(doc.name, m) for m in found if m.rsplit(".", 1)[1] not in _FILE_EXTENSIONS}
    return sorted(names)


@pytest.mark.parametrize("doc,name", _mentioned_names())
def test_mentioned_names_exist(doc, name):
    if name in OPTIONAL_NAMES:
        pytest.skip(f"{name} is optional in some installations")
    _resolve(name)


def test_readme_python_blocks_import():
    blocks = _code_blocks((ROOT / "README.md").read_text(), {"python"})
    assert blocks, "the README shows no Python block"
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)
            elif isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"from {node.module} import {alias.name}"


# ----------------------------------------------------------------------------- commands

_MODULE_COMMAND = re.compile(r"-m\s+(htc_fast(?:\.\w+)+)([^`#&|;]*)")


def _cli_commands():
    """(doc, module, [tokens after it]) for each `-m htc_fast.x ...` the docs show."""
    found = []
    for doc in (ROOT / "README.md", ROOT / "CONTRIBUTING.md"):
        for line in _inline_and_blocks(doc.read_text()):
            for m in _MODULE_COMMAND.finditer(line):
                args = m.group(2).replace("[", " ").replace("]", " ")  # [--optional] flags
                found.append((doc.name, m.group(1), shlex.split(args)))
    return found


@cache
def _help(module):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"python -m {module} --help failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout


def test_the_docs_show_the_clis():
    modules = {module for _, module, _ in _cli_commands()}
    assert {"htc_fast.train", "htc_fast.evaluate", "htc_fast.predict", "htc_fast.env"} <= modules


@pytest.mark.parametrize("doc,module,tokens", _cli_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:40])
def test_cli_commands_take_their_options(doc, module, tokens):
    text = _help(module)
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            option = token.split("=")[0]
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
                f"{doc}: `python -m {module}` has no option {option}"
        if token == "--config" and i + 1 < len(tokens) and tokens[i + 1].isidentifier():
            assert tokens[i + 1] in PRESETS, f"{doc}: --config {tokens[i + 1]} is not a preset"


def test_scripts_the_docs_run_exist():
    for doc in (ROOT / "README.md", ROOT / "CONTRIBUTING.md"):
        for line in _inline_and_blocks(doc.read_text()):
            pattern = r"(?:python3?|bash)\s+((?:scripts|benchmarks|\.ci)/[\w./-]+)"
            for path in re.findall(pattern, line):
                assert (ROOT / path).is_file(), f"{doc.name} runs {path}, which does not exist"


# ----------------------------------------------------------------------------- links

def test_relative_links_resolve():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if re.match(r"\w+://", target):
                continue
            assert (doc.parent / target).exists(), \
                f"{doc.relative_to(ROOT)} links to missing {target}"


# ----------------------------------------------------------------------------- machine paths

# Written in pieces so that this file does not match itself.
# A path must start the token (not "example.org/home/..." inside a URL).
_MACHINE_PATH = re.compile("|".join([
    r"(?<![\w.-])/" + "work/",          # this project's work folder on the development machines
    r"(?<![\w.-])/" + "root/",          # a home folder: nobody else has it
    r"(?<![\w.-])/" + r"home/\w",
    r"(?<![\w.-])/" + r"Users/\w",
    r"[A-Z]:\\\\" + "Users",
    # /tmp as a default location of data (a scratch path in a shell example is fine):
    r"(?:default\s*=|environ\.get\([^)]*,|getenv\([^)]*,)\s*[rbf]?[\"']/" + "tmp/",
]))
_OUTSIDE_NOTES = re.compile(r"\b(?:DESIGN|HTC_SPEC|KERNELS)\.md\b")


def _tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout
        paths = [ROOT / p for p in out.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist): walk it
        skip = {".git", ".venv", "build", "dist", "__pycache__", "work_dirs"}
        paths = [p for p in ROOT.rglob("*")
                 if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    for path in paths:
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (images, checkpoints)
        yield path, data.decode("utf-8", errors="replace")


def test_no_absolute_machine_paths_and_no_outside_citations():
    offences = []
    for path, text in _tracked_text_files():
        for n, line in enumerate(text.splitlines(), 1):
            if _MACHINE_PATH.search(line) or _OUTSIDE_NOTES.search(line):
                offences.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not offences, \
        "machine paths or citations outside the repository:\n" + "\n".join(offences)


def test_the_path_patterns_catch_what_they_should():
    # The test above must be able to fail: each kind of offence is caught, each legitimate use not.
    bad = ['default="/' + 'work/oracle_out"', "/" + "root/.cache/x", "see /" + "home/alice/data",
           'p.add_argument("--out", default="/' + 'tmp/results")',
           'os.environ.get("X", "/' + 'tmp/x")',
           "C:\\\\" + "Users\\\\bob"]
    good = ["tempfile.mkdtemp()", "--benchmark-json=/" + "tmp/bench.json",
            "pip install --target /" + "tmp/site",
            "work_dirs/htc_tiny", "https://example.org/home/index.html"]
    assert all(_MACHINE_PATH.search(s) for s in bad)
    assert not any(_MACHINE_PATH.search(s) for s in good)
    assert _OUTSIDE_NOTES.search("see " + "HTC_SPEC" + ".md step 4")


def test_readme_model_table_matches_the_weights_table():
    from htc_fast.weights import RELEASED

    readme = (ROOT / "README.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines()
            if line.startswith("| `htc_")}
    commands = {args[args.index("--config") + 1] for _, module, args in _cli_commands()
                if module == "htc_fast.evaluate" and "released" in args and "--config" in args}
    for preset, row in RELEASED.items():
        assert preset in rows, f"README: no model-table row for {preset}"
        cells = [c.strip() for c in rows[preset].split("|")]
        assert row.url in rows[preset], f"README: {preset}'s row does not link {row.url}"
        assert cells[-3:-1] == [f"{row.box_ap:.1f}", f"{row.mask_ap:.1f}"], rows[preset]
        assert preset in commands, f"README: no evaluate command for {preset}"


def test_repository_paths_the_docs_name_exist():
    top = "htc_fast|csrc|kernels|tests|benchmarks|scripts|docs|\\.ci"
    pattern = rf"(?<![\w/.-])((?:{top})/[\w./<>*-]*)"
    for doc in DOCS:
        for path in set(re.findall(pattern, doc.read_text())):
            path = path.rstrip(".")
            if "<" in path or "my_op" in path:
                continue  # a placeholder in a recipe
            if "*" in path:
                assert list(ROOT.glob(path)), f"{doc.name} names {path}, which matches nothing"
            else:
                assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"


def test_readme_scripting_claims():
    # The README: the Python functions do not script; the operators do, inside TorchScript.
    import torch

    from htc_fast import _extension, ops

    with pytest.raises(Exception):  # noqa: B017 - TorchScript raises several types
        torch.jit.script(ops.roi_align)  # if this ever scripts, update the README's TorchScript note
    if not _extension.loaded:
        pytest.skip("htc_fast._C is not built")

    @torch.jit.script
    def pooled(x: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        return torch.ops.htc_fast.roi_align(x, rois, 0.25, 7, 7, 0, True)

    x = torch.randn(2, 3, 20, 24)
    rois = torch.tensor([[1.0, 4.0, 8.0, 60.0, 70.0], [0.0, 0.0, 0.0, 30.0, 20.0]])
    torch.testing.assert_close(pooled(x, rois), ops.roi_align(x, rois, 7, 0.25, 0, True, backend="cpp"))
