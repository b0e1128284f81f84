"""The documentation's examples run, so that none can rot.

Every fenced ``python`` block and every ``bash`` / ``console`` / ``sh`` block of the pages
``docs/*.md`` (and of the Markdown files they ``{include}``) runs here, page by page, in the
order of the page, in a fresh folder: the Python blocks of a page share one namespace, and
each shell line ``[VAR=value ...] python -m backprop ...`` runs through ``backprop.cli.main``
(in a subprocess of this interpreter when it sets variables or process-wide flags). The
pages are written for the CPU; they run on it whatever device the test job selected.
Outputs shown on the pages (``{command-output}``) are made by the docs build itself
(``make docs``), which also checks every reference.

A block that cannot run here is marked on the line before it, with the reason:

    <!-- doc: skip: needs an NVIDIA GPU -->       never run (the reason must be given)
    <!-- doc: requires: onnx -->                  run only where the module imports

``test_every_example_runs_or_says_why`` holds the pages to that rule; blocks of files that
are included but belong to others are listed in ``SKIPPED_ELSEWHERE`` with the reason.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

import backprop as bp
from backprop import cli, kernels

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PYTHON = {"python", "py", "python3"}
SHELL = {"bash", "console", "sh", "shell"}
MARKER = re.compile(r"<!--\s*doc:\s*(?P<kind>[\w-]+)\s*:(?P<value>.*?)-->")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")

# Blocks of pages written before the rule, or of files that other pages include, that are
# not run: (file relative to the repository, the block's first line) -> the reason.
SKIPPED_ELSEWHERE = {
    ("docs/scaling.md", "import time, numpy as np, backprop as bp"):
        "the measurement behind section 4: at least 3 s of steps per MLP, 4 MLPs",
}


@dataclass
class Block:
    path: Path            # the file the block is written in
    line: int             # 1-based line of its first code line
    lang: str
    code: str
    skip: str | None = None       # the reason it is not run
    requires: str | None = None   # a module it needs

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse(path: Path, _seen=()) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the blocks of the files it
    ``{include}``\\ s in their place (marked as the include is marked)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    marker = None
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            found = MARKER.search(lines[i])
            if found:
                assert marker is None, f"{path}:{i + 1}: two markers in a row"
                marker = (found["kind"], found["value"].strip(), i + 1)
            elif lines[i].strip() and marker is not None:
                raise AssertionError(f"{path}:{marker[2]}: a doc marker must be followed by "
                                     "a code block or an include")
            i += 1
            continue
        fence, info = match["fence"], match["info"].strip()
        end = i + 1
        while end < len(lines) and not (lines[end].startswith(fence[0] * len(fence))
                                         and not lines[end].strip(fence[0]).strip()):
            end += 1
        body = lines[i + 1:end]
        skip = requires = None
        if marker is not None:
            kind, value, at = marker
            assert kind in ("skip", "requires"), f"{path}:{at}: unknown doc marker {kind!r}"
            if kind == "skip":
                skip = value
            else:
                requires = value
            marker = None
        if info.startswith("{include}"):
            target = (path.parent / info[len("{include}"):].strip()).resolve()
            assert target not in _seen, f"{path}:{i + 1}: {target} includes itself"
            for block in parse(target, (*_seen, path)):
                block.skip = block.skip or skip
                block.requires = block.requires or requires
                blocks.append(block)
        elif not info.startswith("{"):  # a MyST directive is not an example
            lang = info.split()[0].lower() if info else ""
            blocks.append(Block(path, i + 2, lang, "\n".join(body) + "\n", skip, requires))
        i = end + 1
    assert marker is None, f"{path}:{marker[2]}: a doc marker at the end of the file"
    for block in blocks:
        first = block.code.strip().splitlines()[0] if block.code.strip() else ""
        reason = SKIPPED_ELSEWHERE.get((str(block.path.relative_to(ROOT)), first))
        if reason and block.skip is None:
            block.skip = reason
    return blocks


PAGES = sorted(DOCS.glob("*.md"))
RUNNABLE = PYTHON | SHELL
# a command with one of these flags, or with environment variables, changes settings of the
# whole process: it runs in a subprocess; every other command runs in this one (cli.main)
PROCESS_WIDE = {"--device", "--kernels", "--dtype"}


def shell_commands(block: Block):
    """``(line, env, argv)`` of each command of a shell block: continuation lines joined,
    comments and a leading ``$ `` prompt removed."""
    lines = block.code.splitlines()
    i = 0
    while i < len(lines):
        start, text = i, lines[i]
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        words = shlex.split(text.strip().removeprefix("$ "), comments=True)
        if not words:
            continue
        env = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        yield block.line + start, env, words


def runnable_command(block: Block, line: int, argv) -> list[str]:
    """The argv to run for a documented command (``python`` is this interpreter)."""
    if argv[:3] in (["python", "-m", "backprop"], ["python3", "-m", "backprop"]):
        return [sys.executable, *argv[1:]]
    if argv[:1] == ["backprop"]:
        return [sys.executable, "-m", "backprop", *argv[1:]]
    raise AssertionError(
        f"{block.where.rsplit(':', 1)[0]}:{line}: {shlex.join(argv)!r} cannot run in the "
        "tests: only 'python -m backprop ...' can; mark the block "
        "<!-- doc: skip: REASON --> if it must stay")


# ---------------------------------------------------------------------------------------
def test_the_pages_are_found():
    names = {page.name for page in PAGES}
    assert {"index.md", "quickstart.md", "equations.md", "devices.md", "checkpoints.md",
            "cli.md", "benchmarks.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_example_runs_or_says_why(page):
    """Each block in a language that can run is run, or marked with a reason; shell blocks
    that run hold only ``python -m backprop`` commands; every requirement is a module."""
    for block in parse(page):
        if block.lang not in RUNNABLE:
            continue
        if block.skip is not None:
            assert len(block.skip) >= 10, f"{block.where}: give the reason for skipping"
            continue
        if block.requires is not None:
            assert re.fullmatch(r"[\w.]+", block.requires), \
                f"{block.where}: 'requires:' takes a module name, got {block.requires!r}"
        if block.lang in SHELL:
            for line, _, argv in shell_commands(block):
                runnable_command(block, line, argv)
        else:
            compile(block.code, block.where, "exec")


@pytest.fixture
def on_the_cpu():
    """The pages' examples are written for the CPU: run them there, with the default kernel
    dispatch, whatever device the test job selected (the GPU CI selects cuda and cupy)."""
    previous = kernels.get_choice()
    if previous == "cupy":
        kernels.set_backend("auto")
    with bp.use_device("cpu"):
        yield {**os.environ, "BACKPROP_DEVICE": "cpu", "BACKPROP_KERNELS": "auto"}
    kernels.set_backend(previous)


def has_examples(page: Path) -> bool:
    try:
        return any(b.lang in RUNNABLE and b.skip is None for b in parse(page))
    except AssertionError:  # a malformed page: test_every_example_runs_or_says_why says how
        return True


@pytest.mark.parametrize("page", [p for p in PAGES if has_examples(p)], ids=lambda p: p.name)
def test_the_examples_of_the_page_run(page, tmp_path, monkeypatch, on_the_cpu):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs.{page.stem}"}
    missing = []
    for block in parse(page):
        if block.lang not in RUNNABLE or block.skip is not None:
            continue
        if block.requires and importlib.util.find_spec(block.requires) is None:
            missing.append(f"{block.where} (needs {block.requires})")
            continue
        if block.lang in PYTHON:
            # padded so that a traceback points at the line of the page
            code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
            exec(code, namespace)  # noqa: S102 - the documentation's own example
            continue
        for line, env, argv in shell_commands(block):
            command = runnable_command(block, line, argv)
            if env or PROCESS_WIDE.intersection(command):
                proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                                      env={**on_the_cpu, "MPLBACKEND": "Agg", **env})
                status, output = proc.returncode, proc.stdout + proc.stderr
            else:  # in this process: no interpreter to start, the kernels already loaded
                out = io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    status = cli.main(command[3:])
                output = out.getvalue()
            assert status == 0, (f"{block.where.rsplit(':', 1)[0]}:{line}: {shlex.join(argv)} "
                                 f"exited with {status}\n{output}")
    if missing:
        pytest.skip("the other examples ran; not run here: " + ", ".join(missing))


def test_a_failing_example_fails(tmp_path):
    """The parser sees the blocks, their markers and their lines as written."""
    page = tmp_path / "page.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\n<!-- doc: skip: needs a GPU here -->\n"
                    "```python\nraise SystemExit\n```\n\n<!-- doc: requires: onnx -->\n"
                    "```bash\npython -m backprop \\\n  info  # comment\n```\n"
                    "```{toctree}\nx\n```\n", encoding="utf-8")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        blocks = parse(page)
    finally:
        ROOT = saved
    assert [(b.lang, b.line, b.skip, b.requires) for b in blocks] == [
        ("python", 4, None, None), ("python", 9, "needs a GPU here", None),
        ("bash", 14, None, "onnx")]
    assert list(shell_commands(blocks[2])) == [(14, {}, ["python", "-m", "backprop", "info"])]


# ---------------------------------------------------------------------------------------
# The API reference covers the package
NOT_IN_API = {
    "__init__": "the package: docs/api/backprop.rst",
    "__main__": "python -m backprop",
    "cli": "documented on docs/cli.md (its docstring, and each command's --help)",
    "checks": "internal: the argument checks shared by the public entry points",
}


def test_every_module_has_an_api_page():
    modules = {p.stem for p in (ROOT / "backprop").glob("*.py")} - set(NOT_IN_API)
    pages = {p.stem for p in (DOCS / "api").glob("*.rst")} - {"index", "backprop"}
    assert sorted(modules - pages) == [], "add docs/api/<module>.rst (and to api/index.rst)"
    assert sorted(pages - modules - {"kernels"}) == [], "an API page of a module that is gone"
    index = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    listed = set(re.findall(r"^   (\w+)$", index, re.M))
    assert sorted((pages | {"backprop"}) - listed) == [], "list the page in docs/api/index.rst"


def test_every_top_level_name_is_on_the_package_page():
    text = (DOCS / "api" / "backprop.rst").read_text(encoding="utf-8")
    names = [name for name, value in vars(bp).items()
             if not name.startswith("_") and not isinstance(value, types.ModuleType)
             and not name.isupper()]
    assert sorted(n for n in names if f"`backprop.{n}`" not in text) == []
