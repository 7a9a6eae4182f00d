"""The documentation as a user meets it.

- Every ```python block of README.md runs as written, each in a fresh interpreter, on the CPU
  (the sources of this checkout first on the path; GPUs hidden, so the blocks take their CPU
  branch and compile nothing).
- The project's files speak of the project, not of how the work on it was organised: no
  numbered work sessions or tracker items in the sources, tests, docs, benchmarks and scripts, and
  no result file named after one.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: Seconds one README block may take (an interpreter start and a few small reference-kernel calls).
BLOCK_TIMEOUT_S = 180

#: What the file contents must not say, and what a results file must not be named.
PROCESS_WORDS = re.compile(r"(?i)\b(session|issue)\s+[0-9]")
PROCESS_NAMES = re.compile(r"(?i)\bsession\s+\d|\bs\d+-(handover|probe|full)")
#: Where the project's own text lives (relative to the repository root).
SCANNED = ("src", "tests", "docs", "README.md", "benchmarks", "scripts")
RESULTS = ROOT / "benchmarks" / "results"


class Block(NamedTuple):
    """One fenced ```python block of a markdown file: the line its code starts on, and the code."""

    line: int
    code: str


def python_blocks(markdown: str) -> list[Block]:
    """The ```python blocks of `markdown`, in order. A fence must close: an unclosed one is an error
    of the document, not a block to skip."""
    blocks: list[Block] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next((j for j in range(start, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"README.md:{i + 1}: a ```python block that never closes")
            blocks.append(Block(start + 1, "\n".join(lines[start:end]) + "\n"))
            i = end
        i += 1
    return blocks


README_BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_examples() -> None:
    # The README shows a runnable example of every Op family; losing them all would pass the rest.
    assert len(README_BLOCKS) >= 6, f"expected the README's python examples, found {len(README_BLOCKS)}"


@pytest.mark.parametrize("block", README_BLOCKS, ids=[f"README.md:{b.line}" for b in README_BLOCKS])
def test_readme_block_runs(block: Block, tmp_path: Path) -> None:
    if "transformers" in block.code and importlib.util.find_spec("transformers") is None:
        if os.environ.get("CI"):  # CI installs the dev extra: transformers missing there is a failure
            pytest.fail("transformers is not installed, and the README's block needs it")
        pytest.skip("transformers is not installed: pip install -e '.[transformers]'")
    script = tmp_path / f"readme_{block.line}.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU branch of every block, whatever the machine has
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, (
        f"README.md:{block.line}: the block exited {result.returncode}\n"
        f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
    )


def project_files() -> list[Path]:
    """The files under SCANNED: those git tracks (with their uncommitted edits), or, outside a git
    checkout, every file but caches and hidden folders."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", *SCANNED],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return sorted(_walk())
    paths = (ROOT / name for name in listed.decode().split("\0") if name)
    return sorted(p for p in paths if p.is_file())


def _walk() -> Iterator[Path]:
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            yield top
            continue
        for folder, dirs, files in os.walk(top):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            yield from (Path(folder) / f for f in files)


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8: plots, archives)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def process_word_hits(path: Path, text: str) -> list[str]:
    """`file:line: text` for each line of `text` that PROCESS_WORDS matches."""
    relative = path.relative_to(ROOT)
    return [
        f"{relative}:{number}: {line.strip()[:160]}"
        for number, line in enumerate(text.splitlines(), start=1)
        if PROCESS_WORDS.search(line)
    ]


def test_no_process_words_in_project_files() -> None:
    files = project_files()
    assert any(p.name == "README.md" for p in files), "the scan found no README.md: it scans nothing"
    hits: list[str] = []
    for path in files:
        text = text_of(path)
        if text is not None:
            hits += process_word_hits(path, text)
    assert not hits, (
        f"{len(hits)} lines speak of work sessions or tracker items (the project's files speak of the "
        "project; its history is in git):\n" + "\n".join(hits)
    )


def test_no_process_words_in_result_names() -> None:
    names = sorted(p.name for p in RESULTS.iterdir()) if RESULTS.is_dir() else []
    bad = [f"benchmarks/results/{name}" for name in names if PROCESS_NAMES.search(name)]
    assert not bad, "result files named after a work session, not after what they measure:\n" + "\n".join(bad)


# The scans above can only fail if their patterns match what they are for. The matching samples of
# contents spell their space as \x20, so that this file's own text passes the scan.
@pytest.mark.parametrize(
    ("pattern", "sample", "found"),
    [
        (PROCESS_WORDS, "measured in Session\x203 on an H200", True),
        (PROCESS_WORDS, "see issue\x207 for the targets", True),
        (PROCESS_WORDS, "the issue of 16-byte strides", False),
        (PROCESS_WORDS, "a plan per session of the engine", False),
        (PROCESS_NAMES, "h100-2026-12-05-s11-full.json", True),
        (PROCESS_NAMES, "h100-2026-12-05-s7-handover-probe.log", True),
        (PROCESS_NAMES, "h100-2026-12-05-full-set.json", False),
        (PROCESS_NAMES, "h200-2026-12-05-probe-d64-consumers.log", False),
    ],
)
def test_process_patterns(pattern: re.Pattern[str], sample: str, found: bool) -> None:
    assert bool(pattern.search(sample)) is found
