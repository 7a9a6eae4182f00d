"""The peers, each timed in its own process with its own PYTHONPATH and time budget.

- TileOPs 0.1.0 (`benchmarks/bench_peer.py`) needs an older TileLang than ours, so it cannot
  share our process; it gets its own TileLang cache directory too.
- FlashInfer (`benchmarks/bench_flashinfer_peer.py`, backends fa3 and fa2) brings its own
  packages (a prefill-only site, e.g. /tmp/fi). Its prebuilt modules load at once; any other
  (dtype, head dim) would JIT-compile for minutes, so the harness turns JIT off
  (`FLASHINFER_DISABLE_JIT`) unless asked, and such cases come back declined with a note.

The harness writes the cases to JSON, starts the peer's script with the peer's path as its whole
PYTHONPATH, and reads the JSON the script rewrites after every case: a run cut short by the time
budget still yields what it measured. The scripts load `cases.py` by path, so every process times
the same work. A missing script, a package that does not import, a process that fails: each is a
result (a `PeerInfo` with its reason), never an exception.

TileOPs compiles its kernels one at a time on first use (through its TileLang's disk cache). With
`compile_jobs` > 1, `start_compile` first starts that many `--compile-only` processes side by side,
each making the first calls of a shard of the cases; the run lets them work while our own programs
compile, and waits for them before any timing. The timing process then finds the kernels in the
cache.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import attrs

from tileprefill.bench import cases as cases_module
from tileprefill.bench.cases import Case
from tileprefill.bench.results import FLASHINFER, TILEOPS, Measurement, PeerInfo

#: The benchmarks/ folder of the source tree this package lives in.
SCRIPTS: Final = Path(__file__).resolve().parents[3] / "benchmarks"
#: The most seconds between a peer's own deadline and the kill: the script stops starting cases at
#: its deadline (a quarter of a short budget).
_GRACE_S: Final = 30.0

#: Measurements by implementation, then by case name.
PeerResults = dict[str, dict[str, Measurement]]


@attrs.frozen
class PeerSpec:
    """How to start one peer's process."""

    slug: str  # its files: <stem>-<slug>.json, .log, -cases.json
    name: str  # until the process names itself (with its version)
    implementations: tuple[str, ...]
    script: Path
    python_path: str
    #: Environment variables besides PYTHONPATH (None: removed).
    env: Mapping[str, str | None] = attrs.field(factory=dict)
    compile_jobs: int = 0  # > 1: compile-only processes side by side first

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = self.python_path
        env["PYTHONUNBUFFERED"] = "1"
        for name, value in self.env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


def tileops(python_path: str, *, compile_jobs: int = 0, script: Path | None = None) -> PeerSpec:
    """TileOPs 0.1.0 on `python_path` (e.g. /tmp/peer:/tmp/tl)."""
    # The peer's TileLang is another version: never share its kernel cache with ours.
    ours = os.environ.get("TILELANG_CACHE_DIR") or str(Path.home() / ".tilelang" / "cache")
    return PeerSpec(
        slug="tileops",
        name="TileOPs 0.1.0",
        implementations=(TILEOPS,),
        script=script or SCRIPTS / "bench_peer.py",
        python_path=python_path,
        env={"TILELANG_CACHE_DIR": ours.rstrip("/") + "-peer"},
        compile_jobs=compile_jobs,
    )


def flashinfer(python_path: str, *, jit: bool = False, script: Path | None = None) -> PeerSpec:
    """FlashInfer's prefill (fa3, fa2) on `python_path` (e.g. /tmp/fi); JIT compiling only if `jit`."""
    return PeerSpec(
        slug="flashinfer",
        name="FlashInfer",
        implementations=FLASHINFER,
        script=script or SCRIPTS / "bench_flashinfer_peer.py",
        python_path=python_path,
        env={"FLASHINFER_DISABLE_JIT": None if jit else "1"},
    )


@attrs.frozen
class PeerFiles:
    """Where one peer's process reads and writes, beside a run's outputs."""

    cases: Path  # the cases it times (written by the harness)
    results: Path  # its JSON, rewritten after every case
    log: Path

    def compile_log(self, index: int, suffix: str) -> Path:
        return self.log.with_name(f"{self.log.stem}-compile-{index}{suffix}")


def write_cases(cases: Sequence[Case], path: Path) -> None:
    """`cases` as a peer reads them: reference and quick cases first (a run stopped at its budget
    has measured those)."""
    ordered = sorted(cases, key=lambda c: (not c.labels, not c.quick))
    path.write_text(json.dumps([c.to_json() for c in ordered], indent=1))


def _command(
    spec: PeerSpec, files: PeerFiles, out: Path, deadline_s: float, device: str, *extra: str
) -> list[str]:
    return [
        sys.executable,
        str(spec.script),
        "--cases",
        str(files.cases),
        "--cases-module",
        str(Path(cases_module.__file__).resolve()),
        "--out",
        str(out),
        "--deadline-s",
        f"{deadline_s:.0f}",
        "--device",
        device,
        *extra,
    ]


@attrs.define
class Compiling:
    """Compile-only processes of one peer, running side by side until `wait` (at most `budget_s`)."""

    processes: list[subprocess.Popen[bytes]]
    budget_s: float
    start: float = attrs.field(factory=time.perf_counter)

    def wait(self) -> float:
        """Wait for them (stopping any still running at the budget); the seconds since they started.
        What counts is what they leave in the peer's disk cache: their JSON and logs are not read."""
        while any(process.poll() is None for process in self.processes):
            if time.perf_counter() - self.start > self.budget_s:
                for process in self.processes:
                    _stop(process)
                break
            time.sleep(0.5)
        return time.perf_counter() - self.start


def start_compile(
    spec: PeerSpec, cases: int, files: PeerFiles, budget_s: float, device: str = "cuda"
) -> Compiling | None:
    """Start `spec.compile_jobs` compile-only processes over the `cases` cases in `files.cases`, each
    a disjoint shard; None where there is nothing to start (no script, jobs <= 1, no cases)."""
    jobs = min(spec.compile_jobs, cases)
    if jobs <= 1 or not spec.script.is_file():
        return None
    running = []
    for i in range(jobs):
        out = files.compile_log(i, ".json")
        command = _command(spec, files, out, budget_s, device, "--compile-only", "--shard", f"{i}/{jobs}")
        with files.compile_log(i, ".log").open("w") as sink:
            running.append(
                subprocess.Popen(
                    command,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    env=spec.environment(),
                    start_new_session=True,
                )
            )
    print(
        f"{spec.name}: compiling in {jobs} processes side by side ({files.log.stem}-compile-*.log)",
        file=sys.stderr,
        flush=True,
    )
    return Compiling(running, budget_s)


def run_peer(
    spec: PeerSpec,
    cases: Sequence[Case],
    files: PeerFiles,
    *,
    timeout_s: float,
    warmup_ms: int,
    rep_ms: int,
    compiled_s: float = 0.0,
    device: str = "cuda",
) -> tuple[PeerInfo, PeerResults]:
    """Time `cases` (already in `files.cases`) in the peer's process, within `timeout_s`; its
    measurements (cases it did not reach are missing, or "not reached" when its budget ran out).
    `compiled_s`: what its compile-only processes took before (added to its seconds)."""
    if not spec.script.is_file():
        return PeerInfo(name=spec.name, reason=f"not run: no script at {spec.script}"), {}
    files.results.unlink(missing_ok=True)
    grace = min(_GRACE_S, timeout_s / 4)
    command = _command(
        spec,
        files,
        files.results,
        max(1.0, timeout_s - grace),
        device,
        "--warmup-ms",
        str(warmup_ms),
        "--rep-ms",
        str(rep_ms),
    )
    start = time.perf_counter()
    timed_out = False
    print(
        f"{spec.name}: {' '.join(command)} (PYTHONPATH={spec.python_path}; log {files.log})", file=sys.stderr
    )
    tty, shown = sys.stderr.isatty(), -1
    with files.log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=spec.environment(), start_new_session=True
        )
        while process.poll() is None:
            elapsed = time.perf_counter() - start
            if elapsed > timeout_s:
                timed_out = True
                _stop(process)
                break
            done = len({name for results in read_results(files.results)[1].values() for name in results})
            if done != shown or tty:
                line = f"{spec.name}: {done}/{len(cases)} cases, {elapsed:.0f}s"
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
                shown = done
            time.sleep(0.5)
    if tty:
        print(file=sys.stderr)
    info, results = read_results(files.results, spec)
    info.ran, info.seconds = True, time.perf_counter() - start + compiled_s
    info.command = f"PYTHONPATH={spec.python_path} " + " ".join(command)
    if compiled_s:
        info.command += (
            f" (after {spec.compile_jobs} --compile-only processes side by side: {compiled_s:.0f} s)"
        )
    if timed_out:
        stopped = f"its process stopped at its time budget ({timeout_s:.0f} s)"
        info.reason = "; ".join(s for s in (info.reason, stopped) if s)
    elif process.returncode:
        failed = f"its process exited with status {process.returncode} (see {files.log.name})"
        info.reason = "; ".join(s for s in (info.reason, failed) if s)
    if info.available and timed_out:
        for implementation in spec.implementations:
            measured = results.setdefault(implementation, {})
            for case in cases:
                measured.setdefault(case.name, Measurement.unavailable(f"not reached: {info.reason}"))
    return info, results


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End a peer process and the compilers it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read(path: Path) -> Mapping[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_results(path: Path, spec: PeerSpec | None = None) -> tuple[PeerInfo, PeerResults]:
    """A peer's JSON (as the peer scripts write it) as PeerInfo and measurements.

    A peer JSON holds {"peer", "available", "reason", "versions", "implementations", "results":
    {implementation: {case name: measurement}}}; one with "cases" instead of "results" is TileOPs'
    (the format before FlashInfer joined)."""
    data = _read(path)
    name = spec.name if spec is not None else "TileOPs 0.1.0"
    if not data:
        return PeerInfo(name=name, reason=f"no results: the peer wrote no JSON to {path}"), {}
    versions = data.get("versions", {})
    raw = data.get("results", {TILEOPS: data.get("cases", {})})
    by_implementation = raw if isinstance(raw, Mapping) else {}
    listed = data.get("implementations")
    implementations = (
        tuple(str(i) for i in listed)
        if isinstance(listed, list)
        else spec.implementations
        if spec is not None
        else tuple(str(i) for i in by_implementation)
    )
    info = PeerInfo(
        name=str(data.get("peer") or name),  # a peer that did not import cannot name its version
        available=bool(data.get("available", True)),
        reason=str(data.get("reason", "")),
        versions={str(k): str(v) for k, v in versions.items()} if isinstance(versions, Mapping) else {},
        implementations=implementations,
    )
    if not info.available and not info.reason.startswith("not importable"):
        info.reason = f"not importable in its process: {info.reason}"
    results = {
        str(implementation): {
            str(case): Measurement.from_json(m) for case, m in measured.items() if isinstance(m, Mapping)
        }
        for implementation, measured in by_implementation.items()
        if isinstance(measured, Mapping)
    }
    return info, results
