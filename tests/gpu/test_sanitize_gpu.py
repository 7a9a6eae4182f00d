"""Every TileLang kernel key under compute-sanitizer: memcheck, racecheck and synccheck.

`nox -s gpu_sanitize` (or `pytest -m sanitize tests/gpu/test_sanitize_gpu.py`). The workload is
`sanitize_workload.py` (its docstring lists the cases: every (Op, configuration) pair of the pool,
the SM80 attention kernels, and validate=False calls with out-of-range indices and lengths). First
every program it needs is compiled side by side into TileLang's disk cache (`--prebuild`, in a
process of its own, not under a sanitizer); then each tool runs ONE python process over every case
(`--run`), loading the programs from that cache, so a tool's run costs the sanitizer's slowdown of
small launches, not compiles.

A tool fails the test on any report: a nonzero error count in its summary line, a nonzero exit
(`--error-exitcode`), or a failed check of the workload itself. torch's caching allocator is off in
the sanitized process (PYTORCH_NO_CUDA_MEMORY_CACHING=1): with it, a read past a small tensor lands
in the same cached segment and memcheck cannot see it. Logs go to $TILEPREFILL_SANITIZE_LOGS
(default: pytest's tmp dir); each summary line is printed (`-s` shows it).

TILEPREFILL_SANITIZE_TIMEOUT (seconds, default 400) bounds each tool's run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.sanitize]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")


def sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.exists() else None


SANITIZER = sanitizer()
if SANITIZER is None:
    pytest.skip("needs compute-sanitizer (CUDA toolkit)", allow_module_level=True)

WORKLOAD = Path(__file__).with_name("sanitize_workload.py")
TIMEOUT = float(os.environ.get("TILEPREFILL_SANITIZE_TIMEOUT", "400"))
#: The exit code a sanitizer returns when it reported anything (distinct from the workload's 1).
REPORTED = 86

TOOLS: dict[str, list[str]] = {
    "memcheck": ["--leak-check", "no"],
    # "all": hazards of every severity (errors and warnings) are reported and counted.
    "racecheck": ["--racecheck-report", "all"],
    "synccheck": [],
}
SUMMARY = re.compile(r"(ERROR SUMMARY: .*|RACECHECK SUMMARY: .*)")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TILELANG_CACHE_DIR", os.path.abspath(".tilelang-cache"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("TILEPREFILL_SANITIZE_LOGS")
    path = Path(chosen) if chosen else tmp_path_factory.mktemp("sanitize")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def warm_cache(log_dir: Path) -> None:
    """Compile every program of the workload (a cache hit where compiled before), unsanitized."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(WORKLOAD), "--prebuild"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    (log_dir / "sanitize-prebuild.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, f"prebuild failed:\n{done.stdout[-4000:]}{done.stderr[-4000:]}"
    print(f"\n{done.stdout.strip().splitlines()[-1]} (wall {time.perf_counter() - start:.0f} s)")


def clean(summary: str) -> bool:
    """Whether a summary line reports nothing: 'ERROR SUMMARY: 0 errors' or
    'RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)'."""
    return all(int(n) == 0 for n in re.findall(r"(\d+) (?:errors?|hazards?|warnings?)", summary))


def sanitized(tool: str, log_dir: Path, *workload_args: str, label: str = "") -> None:
    """Run the workload under `tool`; fail on any report, nonzero exit or failed check."""
    assert SANITIZER is not None
    env = _env()
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    command = [
        SANITIZER,
        "--tool",
        tool,
        "--error-exitcode",
        str(REPORTED),
        "--print-limit",
        "100",
        *TOOLS[tool],
        sys.executable,
        str(WORKLOAD),
        "--run",
        *workload_args,
    ]
    log_path = log_dir / f"sanitize-{tool}{label}.log"
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log_path.write_text(out)
        cases = [line for line in out.splitlines() if line.startswith("CASE ")]
        pytest.fail(f"{tool}: no result in {TIMEOUT:.0f} s; {len(cases)} cases started, last {cases[-1:]}")
    elapsed = time.perf_counter() - start
    log = done.stdout + done.stderr
    log_path.write_text(log)
    summaries = SUMMARY.findall(log)
    workload = [line for line in log.splitlines() if line.startswith("workload:")]
    last = summaries[-1] if summaries else "no summary"
    print(f"\n{tool}{label}: {last} {workload} exit {done.returncode}, {elapsed:.0f} s")
    failed = [line for line in log.splitlines() if line.startswith("FAIL ")]
    # The case each report falls in: a report is printed between its case's CASE and ok/FAIL lines.
    reported: list[str] = []
    current = None
    for line in log.splitlines():
        if line.startswith("CASE "):
            current = line[5:]
        elif line.startswith("=========") and ("Invalid" in line or "Race" in line or "Barrier" in line):
            if current is not None and current not in reported:
                reported.append(current)
    assert summaries, f"{tool}: no summary line (exit {done.returncode}):\n{log[-3000:]}"
    assert done.returncode == 0 and clean(summaries[-1]) and not failed, (
        f"{tool}: {summaries[-1]}, exit {done.returncode}; cases with reports: {reported}; "
        f"failed checks: {failed}\n{log[-3000:]}"
    )


@pytest.mark.parametrize("tool", list(TOOLS))
def test_workload_is_clean_under(tool: str, warm_cache: None, log_dir: Path) -> None:
    """Every case but the SEPARATE groups (sanitize_workload.py), in one process per tool."""
    sanitized(tool, log_dir)


def test_lengths_past_capacity_are_memory_safe_under_memcheck(warm_cache: None, log_dir: Path) -> None:
    """validate=False lengths past the capacity (max_pages * page_size, S_max). Before the paged
    programs cut kv_seqlens[b] to max_pages * page_size, the SM90 paged attention program read
    block_table past its end here (memcheck, H200, 2026-12-01: `Invalid __global__ read of size 4
    bytes at main_paged_kernel ... 1 bytes after the nearest allocation of size 36 bytes`, the
    3 x 3 block table); clean since. The first report ends the process's CUDA context, so the
    contiguous cases run first."""
    sanitized("memcheck", log_dir, "--only", "validate-off/past-capacity/", label="-past-capacity")
