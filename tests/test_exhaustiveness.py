"""Adding an enum member fails `mypy --strict` until every `match` handles it.

`select_plan` relies on this: every decision ends in `assert_never`. The
fixture below leaves one `RopeMode` member unhandled and mypy must reject
it; the same fixture with every member handled (the positive control) passes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tileprefill.context import RopeMode

REPO = Path(__file__).resolve().parents[1]

#: One arm per member (the positive control); the negative drops the last one.
HANDLED_CASES = {member.value: f"RopeMode.{member.name}" for member in RopeMode}
UNHANDLED = list(RopeMode)[-1]


def _fixture(cases: dict[str, str]) -> str:
    arms = "".join(f"        case {member}:\n            return {name!r}\n" for name, member in cases.items())
    return (
        textwrap.dedent(
            """
            from typing import assert_never

            from tileprefill.context import RopeMode


            def describe(mode: RopeMode) -> str:
                match mode:
            """
        )
        + arms
        + "        case _:\n            assert_never(mode)\n"
    )


@pytest.fixture(scope="module")
def mypy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config with the repo's src and typings on the path, and one cache shared by both runs."""
    directory = tmp_path_factory.mktemp("exhaustiveness")
    (directory / "mypy.ini").write_text(
        f"[mypy]\nstrict = True\nmypy_path = {REPO / 'src'}:{REPO / 'typings'}\n"
        f"cache_dir = {directory / 'cache'}\n"
        # As the repo's mypy.ini: the TileLang programs' `T.Tensor(...)` annotations are calls.
        "[mypy-tileprefill.kernels.tl.*]\ndisable_error_code = valid-type, misc\n"
    )
    return directory


def _mypy(directory: Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    (directory / name).write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(directory / "mypy.ini"), name],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unhandled_member_fails_mypy(mypy_dir: Path) -> None:
    missing = {name: arm for name, arm in HANDLED_CASES.items() if name != UNHANDLED.value}
    result = _mypy(mypy_dir, "missing_member.py", _fixture(missing))
    assert result.returncode != 0, result.stdout + result.stderr
    assert '"assert_never"' in result.stdout, result.stdout
    assert f"RopeMode.{UNHANDLED.name}" in result.stdout, result.stdout
    assert "missing_member.py:" in result.stdout


def test_every_member_handled_passes_mypy(mypy_dir: Path) -> None:
    result = _mypy(mypy_dir, "all_members.py", _fixture(HANDLED_CASES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success: no issues found in 1 source file" in result.stdout
