"""Time our Ops, torch SDPA and the peers (TileOPs, FlashInfer) on the same cases, in one run.

    python -m tileprefill bench [--suite S ...] [--dtype D ...] [--quick] [--max-cases N] ...
    python -m tileprefill bench --suite scoreboard      # the scoreboard: one GPU call, <= 9 minutes

Order of a run: select the cases and print the estimate of each stage; start the peers'
compile-only processes (TileOPs compiles one kernel at a time on first use) and meanwhile run each
of our calls once under `recording_builds()` to list its programs and compile them side by side
(`prebuild`, timed: the compile figure); wait for the peers' compile; then per case time our
public Op (`calls.py`) and the SDPA backends on the equivalent dense problem (`sdpa.py`), checking
our output against SDPA's; then each peer in its own process (`peer.py`), folded in; then the
plots. The JSON and markdown are rewritten after every case. With a deadline (`--deadline-s`), each
stage gets its share of the time left and no case starts past it; the outputs are written as usual.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import platform
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import torch

import tileprefill as tp
from tileprefill.bench import peer as peer_process
from tileprefill.bench import report
from tileprefill.bench.calls import our_calls, served_by
from tileprefill.bench.cases import WARM_UP_S, Case, Suite, make_inputs, warm_up_gpu
from tileprefill.bench.catalogue import default_cases, quick_cases, select, shrunk, tiny_cases
from tileprefill.bench.merging import folded_peer, merge_runs, settled_in
from tileprefill.bench.results import (
    FLASHINFER,
    OURS,
    OURS_ATTENTION,
    TILEOPS,
    CaseResult,
    Measurement,
    PeerInfo,
    RunResult,
)
from tileprefill.bench.scoreboard import scoreboard_cases
from tileprefill.bench.sdpa import time_sdpa
from tileprefill.bench.settings import FLASHINFER_PATH_ENV, PEER_PATH_ENV, BenchSettings
from tileprefill.bench.timing import (
    CudaEventTimer,
    Deadline,
    Estimate,
    Progress,
    Timer,
    WallTimer,
    estimate,
    measure,
    synchronize,
)
from tileprefill.kernels.compile import BuildRequest, prebuild, recording_builds

# --- one case ----------------------------------------------------------------------------------------


def run_case(case: Case, device: torch.device, timer: Timer, sdpa: Sequence[str]) -> CaseResult:
    """Every implementation of this process on `case`: ours and the `sdpa` backends (the peers run
    elsewhere)."""
    result = CaseResult(case)
    try:
        x = make_inputs(case, device)
    except Exception as error:
        result.results = dict.fromkeys((OURS, *sdpa), Measurement.failed(error))
        return result
    ours_out: torch.Tensor | None = None
    try:
        calls = our_calls(case, x)
    except Exception as error:
        calls = {}
        result.results[OURS] = Measurement.failed(error)
    for name, call in calls.items():
        try:
            if name == OURS:
                try:
                    result.kernel = served_by(case, call, device)
                except Exception as error:  # the figure stands without it
                    result.kernel = f"unknown ({Measurement.failed(error).error})"
                start = time.perf_counter()
                ours_out = call()
                synchronize()
                result.first_call_s = time.perf_counter() - start
            result.results[name] = measure(call.runner(), timer)
        except Exception as error:
            result.results[name] = Measurement.failed(error)
    measured, errors = time_sdpa(case, x, sdpa, timer, ours_out)
    result.results |= measured
    result.relative_error = errors
    return result


# --- the run -----------------------------------------------------------------------------------------


def selected_cases(settings: BenchSettings) -> list[Case]:
    if settings.dry_run:
        base = [shrunk(c) for c in scoreboard_cases()] if settings.scoreboard else tiny_cases()
    elif settings.scoreboard:
        base = scoreboard_cases()
    else:
        base = quick_cases() if settings.quick else default_cases()
    return select(base, suites=settings.suites, dtypes=settings.dtypes, max_cases=settings.max_cases)


def record_programs(cases: Sequence[Case], device: torch.device) -> list[BuildRequest]:
    """The programs our calls of `cases` build: each call run once under `recording_builds()`."""
    with recording_builds() as requests:
        for case in cases:
            try:
                x = make_inputs(case, device)
                for call in our_calls(case, x).values():
                    call()
            except Exception as error:  # the case reports it when it runs
                print(f"warm-up of {case.name} failed: {Measurement.failed(error).error}", file=sys.stderr)
            finally:
                x = {}
    return list(dict.fromkeys(requests))


def _summary(result: CaseResult) -> str:
    parts = []
    for name, m in result.results.items():
        tflops = m.tflops(result.case.flops)
        parts.append(f"{name} {report.number(tflops)}" if tflops is not None else f"{name} n/a")
    return f"{result.case.name}: " + ", ".join(parts) + " TFLOP/s"


def environment(device: torch.device) -> tuple[dict[str, object], dict[str, str]]:
    """The device and the versions of everything timed."""
    info: dict[str, object] = {"type": device.type}
    if device.type == "cuda":
        info |= {
            "name": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "arch": tp.Arch.of_device(device).value,
            "sms": torch.cuda.get_device_properties(device).multi_processor_count,
        }
    else:
        info |= {"name": platform.processor() or platform.machine(), "arch": "cpu"}
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    cudnn = torch.backends.cudnn.version() if torch.cuda.is_available() else None  # type: ignore[no-untyped-call]
    if cudnn is not None:
        versions["cudnn"] = str(cudnn)
    for package in ("tileprefill", "tilelang", "triton"):  # read without importing them
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return info, versions


def default_stem(settings: BenchSettings, device_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower().replace("nvidia", "")).strip("-") or "device"
    parts = [slug, datetime.date.today().isoformat()]
    if settings.dry_run:
        parts.append("dry-run")
    else:
        parts.append("scoreboard" if settings.scoreboard else "quick" if settings.quick else "all")
        parts += [s.value for s in settings.suites] + list(settings.dtypes)
    return "-".join(parts)


def peer_specs(settings: BenchSettings) -> tuple[list[peer_process.PeerSpec], list[PeerInfo]]:
    """The peers this run starts, and those it does not, each with the reason. A dry run starts
    those whose path is given (on a CPU they end with their reason, which is what it shows)."""
    if settings.peer_results is not None:
        why = f"not run: --peer-results {settings.peer_results} folded in instead"
        return [], [
            PeerInfo(name="TileOPs 0.1.0", reason=why, implementations=(TILEOPS,)),
            PeerInfo(name="FlashInfer", reason=why, implementations=FLASHINFER),
        ]
    specs, absent = [], []
    if settings.peer_path is not None:
        specs.append(peer_process.tileops(settings.peer_path, compile_jobs=settings.peer_compile_jobs))
    else:
        why = "--dry-run" if settings.dry_run else f"no --peer-path (nor ${PEER_PATH_ENV}) given"
        absent.append(PeerInfo(name="TileOPs 0.1.0", reason=f"not run: {why}", implementations=(TILEOPS,)))
    if settings.flashinfer_path is not None:
        specs.append(peer_process.flashinfer(settings.flashinfer_path, jit=settings.flashinfer_jit))
    else:
        why = "--dry-run" if settings.dry_run else f"no --flashinfer-path (nor ${FLASHINFER_PATH_ENV}) given"
        absent.append(PeerInfo(name="FlashInfer", reason=f"not run: {why}", implementations=FLASHINFER))
    return specs, absent


def run_estimate(
    settings: BenchSettings,
    ours: Sequence[Case],
    specs: Sequence[peer_process.PeerSpec],
    peer_cases: dict[str, list[Case]],
) -> Estimate:
    return estimate(
        ours=ours,
        sdpa_backends=len(settings.sdpa),
        peers={s.name: (len(peer_cases[s.slug]), len(s.implementations), s.compile_jobs) for s in specs},
        warmup_ms=settings.warmup_ms,
        rep_ms=settings.rep_ms,
        jobs=settings.jobs or 16,
    )


def _list(cases: Sequence[Case], expected: Estimate, settings: BenchSettings) -> None:
    for case in cases:
        flags = (" [quick]" if case.quick else "") + "".join(f" [{s}]" for s in case.labels)
        print(f"{case.suite.value:<12} {case.name:<48} {case.describe()}{flags}")
    counts = {s.value: sum(c.suite is s for c in cases) for s in Suite}
    print(f"{len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    deadline = f" (timing stops at {settings.deadline_s:.0f} s)" if settings.deadline_s else ""
    print(f"{expected.describe()} on one GPU host{deadline}")


def run(settings: BenchSettings, timer: Timer | None = None) -> int:
    """One benchmark run; the outputs go under `settings.out_dir`. Returns an exit status."""
    if settings.merge:
        if settings.resume:
            print("tileprefill bench: --resume: expected no --merge (it times nothing)", file=sys.stderr)
            return 2
        return merge_runs(settings)
    if settings.quick and settings.scoreboard:
        print("tileprefill bench: --quick: expected none with --suite scoreboard", file=sys.stderr)
        return 2
    deadline = Deadline(settings.deadline_s)
    cases = selected_cases(settings)
    specs, absent = peer_specs(settings)
    ours_cases = [] if settings.peer_only else cases
    peer_cases = {spec.slug: cases for spec in specs}
    if settings.list_only:
        _list(cases, run_estimate(settings, ours_cases, specs, peer_cases), settings)
        return 0
    if not cases:
        print("tileprefill bench: no case matches the selection", file=sys.stderr)
        return 2
    if settings.resume:
        try:
            settled = settled_in(settings.resume)
        except (OSError, ValueError, KeyError, AssertionError) as error:
            why = f"{type(error).__name__}: {error}"
            print(f"tileprefill bench: --resume: expected JSON written by bench, got {why}", file=sys.stderr)
            return 2
        ours_cases = [c for c in ours_cases if c.name not in settled[OURS]]
        for spec in specs:
            done = set.intersection(*(settled[i] for i in spec.implementations))
            peer_cases[spec.slug] = [c for c in cases if c.name not in done]
        left = ", ".join(f"{len(peer_cases[s.slug])} for {s.name}" for s in specs)
        print(
            f"--resume: {len(ours_cases)} cases left to time for ours{', ' if left else ''}{left}",
            file=sys.stderr,
        )
        remaining = {c.name for c in ours_cases} | {c.name for group in peer_cases.values() for c in group}
        cases = [c for c in cases if c.name in remaining]
        if not cases:
            print("tileprefill bench: --resume: every selected case is measured already", file=sys.stderr)
            return 0
    device = torch.device("cpu" if settings.dry_run else settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tileprefill bench: --device: expected an available CUDA device, got none", file=sys.stderr)
        return 2
    if timer is None:
        timer = CudaEventTimer(settings.warmup_ms, settings.rep_ms) if device.type == "cuda" else WallTimer()
    info, versions = environment(device)
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = settings.name or default_stem(settings, str(info["name"]) if device.type == "cuda" else "cpu")
    state = _Run(
        settings=settings,
        device=device,
        result=RunResult(
            device=info,
            versions=versions,
            command=settings.command or " ".join([sys.executable, *sys.argv]),
            settings=_settings_json(settings),
            timer=timer.name,
            started=_now(),
            cases=[CaseResult(c) for c in cases],
        ),
        paths=report.OutputPaths(out_dir, stem),
        deadline=deadline,
        expected=run_estimate(settings, ours_cases, specs, peer_cases),
    )
    limit = f"; timing stops at {settings.deadline_s:.0f} s" if settings.deadline_s else ""
    print(f"{len(cases)} cases on {info['name']}; writing {state.paths.json}", file=sys.stderr)
    print(f"{state.expected.describe()}{limit}", file=sys.stderr, flush=True)
    compiled = _compile(state, ours_cases, specs, peer_cases)
    state.elapsed("compiled")
    if ours_cases:
        _time_ours(state, ours_cases, timer)
        report.write_plots(state.result, state.paths)  # now, in case a peer outlives the caller's patience
    for i, spec in enumerate(specs):
        later = sum(state.expected.peers_s.get(s.name, 0.0) for s in specs[i + 1 :])
        budget = deadline.share(state.expected.peers_s.get(spec.name, 0.0), later)
        _time_peer(state, spec, peer_cases[spec.slug], min(settings.peer_timeout_s, budget), compiled)
    for info_absent in absent:
        state.fold_peer(info_absent, {}, ours_cases)
    if settings.peer_results is not None:
        folded, measured = folded_peer(settings.peer_results)
        state.result.peers = [p for p in state.result.peers if p.implementations != folded.implementations]
        state.fold_peer(folded, measured, ours_cases)
    state.result.finished = _now()
    for path in report.write_all(state.result, state.paths):
        print(f"wrote {path}", file=sys.stderr)
    state.elapsed("done")
    return 0


@attrs.frozen
class _Run:
    """What every stage of one run shares: its settings, device, results, outputs and clock."""

    settings: BenchSettings
    device: torch.device
    result: RunResult
    paths: report.OutputPaths
    deadline: Deadline
    expected: Estimate
    by_name: dict[str, CaseResult] = attrs.field(init=False)

    @by_name.default
    def _by_name(self) -> dict[str, CaseResult]:
        return {r.case.name: r for r in self.result.cases}

    def case(self, name: str) -> CaseResult:
        return self.by_name[name]

    def write(self) -> None:
        """The JSON and markdown as they stand (rewritten after every case)."""
        report.write_json(self.result, self.paths.json)
        report.write_markdown(self.result, self.paths.markdown)

    def elapsed(self, what: str) -> None:
        left = self.deadline.left()
        until = "" if left == float("inf") else f", {left:.0f} s before the deadline"
        since = time.perf_counter() - self.deadline.start
        print(f"{what}: {since:.0f} s since the start{until}", file=sys.stderr, flush=True)

    def fold_peer(self, info: PeerInfo, measured: peer_process.PeerResults, cases: Sequence[Case]) -> None:
        """One peer's measurements of `cases` into the run; a case it has none of gets why."""
        self.result.peers.append(info)
        for implementation in info.implementations:
            got = measured.get(implementation, {})
            for case in cases:
                measurement = got.get(case.name)
                if measurement is None:
                    why = info.reason if not info.available else ""
                    measurement = Measurement.unavailable(why or "no result from the peer process")
                self.case(case.name).results[implementation] = measurement


def _compile(
    state: _Run,
    ours: Sequence[Case],
    specs: Sequence[peer_process.PeerSpec],
    peer_cases: dict[str, list[Case]],
) -> dict[str, float]:
    """Our programs and the peers' kernels compiled side by side, before any timing: the seconds
    each peer's compile-only processes took, by slug."""
    settings, expected = state.settings, state.expected
    budget = state.deadline.share(expected.compile_s, expected.total_s - expected.compile_s)
    compiling = {}
    for spec in specs:
        files = state.paths.peer_files(spec.slug)
        peer_process.write_cases(peer_cases[spec.slug], files.cases)
        started = peer_process.start_compile(
            spec,
            len(peer_cases[spec.slug]),
            files,
            min(settings.peer_timeout_s / 2, budget),
            state.device.type,
        )
        if started is not None:
            compiling[spec.slug] = started
    if ours:
        # On a CPU every step runs a torch reference kernel: there is nothing to compile or record.
        requests = record_programs(ours, state.device) if state.device.type == "cuda" else []
        start = time.perf_counter()
        print(f"compiling {len(requests)} programs side by side", file=sys.stderr, flush=True)
        try:
            prebuild(requests, jobs=settings.jobs)
        except Exception as error:  # each case then compiles on first use and reports its own failure
            state.result.compile.error = Measurement.failed(error).error or ""
            print(f"prebuild failed: {state.result.compile.error}", file=sys.stderr)
        state.result.compile.programs = len(requests)
        state.result.compile.seconds = time.perf_counter() - start
    return {slug: process.wait() for slug, process in compiling.items()}


def _time_ours(state: _Run, cases: Sequence[Case], timer: Timer) -> None:
    """Ours and SDPA on `cases`, until this stage's share of the deadline runs out."""
    device, sdpa = state.device, state.settings.sdpa
    stop_at = time.perf_counter() + state.deadline.share(
        state.expected.ours_s, sum(state.expected.peers_s.values())
    )
    if device.type == "cuda":
        warm_up_gpu(device)
        state.result.timer += f"; {WARM_UP_S:g} s of bf16 matmuls before the first case (clocks up)"
    progress = Progress(len(cases), "ours + SDPA")
    for case in cases:
        into = state.case(case.name)
        if time.perf_counter() > stop_at:
            alone = (OURS_ATTENTION,) if case.suite is Suite.ROPE_APPEND else ()
            into.results |= dict.fromkeys(
                (OURS, *alone, *sdpa), Measurement.unavailable(state.deadline.reason())
            )
            continue
        result = run_case(case, device, timer, sdpa)
        into.results |= result.results
        into.kernel, into.relative_error, into.first_call_s = (
            result.kernel,
            result.relative_error,
            result.first_call_s,
        )
        progress.step(_summary(into))
        state.write()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()


def _time_peer(
    state: _Run,
    spec: peer_process.PeerSpec,
    cases: Sequence[Case],
    budget_s: float,
    compiled: dict[str, float],
) -> None:
    if state.deadline.passed():
        info = PeerInfo(name=spec.name, reason=state.deadline.reason(), implementations=spec.implementations)
        measured: peer_process.PeerResults = {}
    else:
        info, measured = peer_process.run_peer(
            spec,
            cases,
            state.paths.peer_files(spec.slug),
            timeout_s=budget_s,
            warmup_ms=state.settings.warmup_ms,
            rep_ms=state.settings.rep_ms,
            compiled_s=compiled.get(spec.slug, 0.0),
            device=state.device.type,
        )
    state.fold_peer(info, measured, cases)
    state.write()


def _settings_json(settings: BenchSettings) -> dict[str, object]:
    out: dict[str, object] = {}
    for field in attrs.fields(BenchSettings):
        value = getattr(settings, field.name)
        if field.name == "suites":
            value = [s.value for s in value]
        elif isinstance(value, tuple):
            value = list(value)
        out[field.name] = value
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
