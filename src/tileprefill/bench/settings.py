"""The settings of one benchmark run (what `python -m tileprefill bench` parses its flags into)."""

from __future__ import annotations

import attrs

from tileprefill.bench.cases import Suite

#: The environment variable naming the peer process's PYTHONPATH when --peer-path is not given.
PEER_PATH_ENV = "TILEPREFILL_PEER_PATH"


@attrs.frozen(kw_only=True)
class BenchSettings:
    """Which cases to time, how, and where the outputs go. Empty `suites` / `dtypes` mean all."""

    suites: tuple[Suite, ...] = ()
    dtypes: tuple[str, ...] = ()
    quick: bool = False
    max_cases: int | None = None  # per suite, after the filters
    out_dir: str = "benchmarks/results"
    name: str | None = None  # output file stem; default <device>-<date>-<selection>
    #: The peer process's PYTHONPATH (e.g. /tmp/peer:/tmp/tl); None: no peer run.
    peer_path: str | None = None
    peer_timeout_s: float = 300.0
    peer_compile_jobs: int = 0  # > 1: compile TileOPs' kernels in that many processes first
    peer_results: str | None = None  # fold in this peer JSON instead of running the peer
    peer_only: bool = False  # time only the peer (then fold its JSON into a later run)
    warmup_ms: int = 25
    rep_ms: int = 100
    device: str = "cuda"
    dry_run: bool = False  # tiny cases on the CPU, wall-clock timing, no peer
    list_only: bool = False  # print the selected cases and counts, time nothing
    jobs: int | None = None  # prebuild worker processes (default: one per CPU, at most 16)
    merge: tuple[str, ...] = ()  # JSON files of earlier runs to combine into one set of outputs
    #: JSON files of earlier runs: leave out, per stage (ours, the peer), the cases they measured.
    resume: tuple[str, ...] = ()
    command: str = ""  # the command line, recorded in the JSON
