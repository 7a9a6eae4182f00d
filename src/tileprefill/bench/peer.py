"""The TileOPs peer in its own process: `benchmarks/bench_peer.py` with its own PYTHONPATH and budget.

TileOPs 0.1.0 needs an older TileLang than ours, so it cannot share our
process. The harness writes the selected cases to JSON, starts the peer script
with `python_path` as its whole PYTHONPATH (e.g. /tmp/peer:/tmp/tl) and its own
TileLang cache directory, and reads the JSON the script rewrites after every
case: a run cut short by the time budget still yields what it measured. The
script loads `cases.py` by path, so both processes time the same work.

TileOPs compiles its kernels one at a time on first use (through its TileLang's disk cache). With
`compile_jobs` > 1 the harness first starts that many `--compile-only` processes side by side, each
making the first calls of a shard of the cases, and waits for them for at most half the budget;
the timing process then finds the kernels in the cache.
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

from tileprefill.bench import cases as cases_module
from tileprefill.bench.cases import Case
from tileprefill.bench.results import Measurement, PeerInfo

#: benchmarks/bench_peer.py of the source tree this package lives in.
DEFAULT_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "bench_peer.py"
#: Seconds between the peer's own deadline and the kill: the script stops starting cases at its deadline.
_GRACE_S = 30.0


def run_peer(
    cases: Sequence[Case],
    *,
    python_path: str,
    timeout_s: float,
    out_json: Path,
    log: Path,
    warmup_ms: int,
    rep_ms: int,
    script: Path = DEFAULT_SCRIPT,
    python: str = sys.executable,
    compile_jobs: int = 0,
) -> tuple[PeerInfo, dict[str, Measurement]]:
    """Time `cases` in the peer process (after `compile_jobs` compile-only processes side by side,
    when > 1); its measurements by case name (cases it did not reach are missing). Never raises
    for a peer failure: the PeerInfo says what happened."""
    if not script.is_file():
        return PeerInfo(reason=f"not run: no peer script at {script}"), {}
    cases_json = out_json.with_name(out_json.stem + "-cases.json")
    # Quoted and quick cases first: a run stopped at its budget has measured those.
    ordered = sorted(cases, key=lambda c: (not c.labels, not c.quick))
    cases_json.write_text(json.dumps([c.to_json() for c in ordered], indent=1))
    out_json.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = python_path
    env["PYTHONUNBUFFERED"] = "1"
    # The peer's TileLang is another version: never share its kernel cache with ours.
    ours = os.environ.get("TILELANG_CACHE_DIR") or str(Path.home() / ".tilelang" / "cache")
    env["TILELANG_CACHE_DIR"] = ours.rstrip("/") + "-peer"

    def peer_command(out: Path, deadline_s: float, *extra: str) -> list[str]:
        return [
            python,
            str(script),
            "--cases",
            str(cases_json),
            "--cases-module",
            str(Path(cases_module.__file__).resolve()),
            "--out",
            str(out),
            "--deadline-s",
            f"{deadline_s:.0f}",
            "--warmup-ms",
            str(warmup_ms),
            "--rep-ms",
            str(rep_ms),
            *extra,
        ]

    jobs = min(compile_jobs, len(ordered))
    compiled_s = 0.0
    if jobs > 1:
        budget = timeout_s / 2
        compiled_s = _compile_side_by_side(
            [
                peer_command(
                    _beside(log, f"compile-{i}.json"), budget, "--compile-only", "--shard", f"{i}/{jobs}"
                )
                for i in range(jobs)
            ],
            budget,
            env,
            log,
        )
    remaining = timeout_s - compiled_s
    command = peer_command(out_json, max(1.0, remaining - _GRACE_S))
    start = time.perf_counter()
    timed_out = False
    print(f"peer: {' '.join(command)} (PYTHONPATH={python_path}; log {log})", file=sys.stderr, flush=True)
    tty, shown = sys.stderr.isatty(), -1
    with log.open("w") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        while process.poll() is None:
            elapsed = time.perf_counter() - start
            if elapsed > remaining:
                timed_out = True
                _stop(process)
                break
            measured = _read(out_json).get("cases", {})
            done = len(measured) if isinstance(measured, Mapping) else 0
            if done != shown or tty:
                line = f"peer: {done}/{len(cases)} cases, {elapsed:.0f}s"
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
                shown = done
            time.sleep(0.5)
    if tty:
        print(file=sys.stderr)
    seconds = time.perf_counter() - start
    info, results = read_results(out_json)
    info.ran, info.seconds = True, seconds
    info.command = f"PYTHONPATH={python_path} " + " ".join(command)
    if jobs > 1:
        info.seconds += compiled_s
        info.command += f" (after {jobs} --compile-only processes side by side: {compiled_s:.0f} s)"
    if timed_out:
        stopped = f"peer process stopped at its time budget ({timeout_s:.0f} s, --peer-timeout)"
        info.reason = "; ".join(s for s in (info.reason, stopped) if s)
    elif process.returncode:
        failed = f"peer process exited with status {process.returncode} (see {log})"
        info.reason = "; ".join(s for s in (info.reason, failed) if s)
    if info.available and timed_out:
        for case in cases:
            results.setdefault(case.name, Measurement.unavailable(f"not reached: {info.reason}"))
    return info, results


def _beside(log: Path, suffix: str) -> Path:
    return log.with_name(f"{log.stem}-{suffix}")


def _compile_side_by_side(
    commands: Sequence[list[str]], budget_s: float, env: Mapping[str, str], log: Path
) -> float:
    """Run the compile-only peer `commands` side by side for at most `budget_s`; the seconds they
    took. What counts is what they leave in TileLang's disk cache: their JSON and logs (beside
    `log`) are not read back."""
    start = time.perf_counter()
    running: list[subprocess.Popen[bytes]] = []
    for i, command in enumerate(commands):
        with _beside(log, f"compile-{i}.log").open("w") as sink:
            running.append(
                subprocess.Popen(
                    command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            )
    print(
        f"peer: compiling in {len(running)} processes side by side ({log.stem}-compile-*.log)",
        file=sys.stderr,
    )
    while any(process.poll() is None for process in running):
        if time.perf_counter() - start > budget_s:
            for process in running:
                _stop(process)
            break
        time.sleep(0.5)
    return time.perf_counter() - start


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the peer and the compilers it started (its own process group)."""
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


def read_results(path: Path) -> tuple[PeerInfo, dict[str, Measurement]]:
    """A peer JSON (as `bench_peer.py` writes it) as PeerInfo and measurements by case name."""
    data = _read(path)
    if not data:
        return PeerInfo(reason=f"no results: the peer wrote no JSON to {path}"), {}
    versions = data.get("versions", {})
    cases = data.get("cases", {})
    info = PeerInfo(
        name=str(data.get("peer", "TileOPs 0.1.0")),
        available=bool(data.get("available", True)),
        reason=str(data.get("reason", "")),
        versions={str(k): str(v) for k, v in versions.items()} if isinstance(versions, Mapping) else {},
    )
    if not info.available and not info.reason.startswith("not importable"):
        info.reason = f"not importable in its process: {info.reason}"
    results = {
        str(name): Measurement.from_json(m)
        for name, m in (cases.items() if isinstance(cases, Mapping) else [])
        if isinstance(m, Mapping)
    }
    return info, results
