"""Runs combined: `bench --merge` (runs split by --suite, --dtype or --peer-only, one machine, into
one set of outputs; a peer JSON folded in with --peer-results) and what `bench --resume` leaves out.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tileprefill.bench import peer as peer_process
from tileprefill.bench import report
from tileprefill.bench.results import OURS, CaseResult, PeerInfo, RunResult
from tileprefill.bench.settings import BenchSettings


def settled_in(paths: Sequence[str]) -> defaultdict[str, set[str]]:
    """The names of the cases each implementation settled in these earlier runs (a figure, or a
    failure that a new attempt would repeat): what a run resumed after them leaves out. A path is a
    run's JSON or a peer process's own (`<stem>-tileops.json`, `<stem>-flashinfer.json`: rewritten
    after every case, so they survive a run cut off before it wrote its outputs)."""
    settled: defaultdict[str, set[str]] = defaultdict(set)
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "schema" in data:
            for result in RunResult.from_json(data).cases:
                for implementation, measurement in result.results.items():
                    if measurement.settled:
                        settled[implementation].add(result.case.name)
        else:
            _, peer_results = peer_process.read_results(Path(path))
            for implementation, measured in peer_results.items():
                settled[implementation] |= {name for name, m in measured.items() if m.settled}
    return settled


def merge_runs(settings: BenchSettings) -> int:
    """Combine the JSON of runs split by --suite / --dtype / --peer-only (same machine) into one set
    of outputs, and fold in a peer JSON (`--peer-results`) where one is given.

    Cases keep the order of their files. A case in several files is combined per implementation:
    a later measurement replaces an earlier one, except that a missing one ("unavailable: not
    run", a peer stopped at its deadline) never replaces a figure. Our kernel, error and first
    call come from the last file that timed our call. Of each peer, the first run where it ran
    and imported describes it.
    """
    runs = [RunResult.from_json(json.loads(Path(p).read_text())) for p in settings.merge]
    merged = runs[0]
    by_name = {c.case.name: c for c in merged.cases}
    for other in runs[1:]:
        if other.device.get("name") != merged.device.get("name"):
            print(
                f"tileprefill bench --merge: runs on different devices: {merged.device.get('name')} and "
                f"{other.device.get('name')}",
                file=sys.stderr,
            )
            return 2
        for case_result in other.cases:
            if (earlier := by_name.get(case_result.case.name)) is None:
                by_name[case_result.case.name] = case_result
            else:
                _fold(earlier, case_result)
        merged.compile.programs += other.compile.programs
        merged.compile.seconds += other.compile.seconds
        # A run cut off before its end leaves `finished` empty: the merge is then partial too.
        merged.finished = max(merged.finished, other.finished) if merged.finished and other.finished else ""
        for info in other.peers:
            _add_peer(merged, info)
    merged.cases = list(by_name.values())
    merged.command = " && ".join(r.command for r in runs)
    if settings.peer_results is not None:
        info, peer_results = folded_peer(settings.peer_results)
        merged.peers = [p for p in merged.peers if p.implementations != info.implementations] + [info]
        for case_result in merged.cases:
            for implementation, measured in peer_results.items():
                if (measurement := measured.get(case_result.case.name)) is not None:
                    case_result.results[implementation] = measurement
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = settings.name or f"{Path(settings.merge[0]).stem}-merged"
    for path in report.write_all(merged, report.OutputPaths(out_dir, stem)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_peer(run: RunResult, info: PeerInfo) -> None:
    """`info` into `run`'s peers: a peer new to it is added; one it has replaces it if it was not
    available there and is here."""
    for i, known in enumerate(run.peers):
        if known.implementations == info.implementations:
            if info.available and not known.available:
                run.peers[i] = info
            return
    run.peers.append(info)


def folded_peer(path: str) -> tuple[PeerInfo, peer_process.PeerResults]:
    """A peer JSON written by an earlier peer process (`--peer-results`), labelled as folded in."""
    info, results = peer_process.read_results(Path(path))
    info.command = f"folded in from {path}"
    return info, results


def _fold(into: CaseResult, later: CaseResult) -> None:
    """`later`'s measurements of one case into `into`'s (see `merge_runs`)."""
    for name, measurement in later.results.items():
        earlier = into.results.get(name)
        if earlier is None or measurement.ok or not earlier.ok:
            into.results[name] = measurement
    if (ours := later.results.get(OURS)) is not None and ours.ok:
        into.kernel, into.relative_error, into.first_call_s = (
            later.kernel,
            later.relative_error,
            later.first_call_s,
        )
