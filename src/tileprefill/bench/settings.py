"""The settings of one benchmark run (what `python -m tileprefill bench` parses its flags into)."""

from __future__ import annotations

from typing import Final

import attrs

from tileprefill.bench.cases import Suite
from tileprefill.bench.results import SDPA_CUDNN, SDPA_FLASH

#: The environment variables naming the peers' PYTHONPATHs when --peer-path / --flashinfer-path
#: are not given.
PEER_PATH_ENV: Final = "TILEPREFILL_PEER_PATH"
FLASHINFER_PATH_ENV: Final = "TILEPREFILL_FLASHINFER_PATH"
#: What `--suite` takes besides the suites: the scoreboard set.
SCOREBOARD: Final = "scoreboard"


@attrs.frozen
class SelectionDefaults:
    """The settings a selection of cases gets unless its flags say otherwise."""

    warmup_ms: int
    rep_ms: int
    peer_compile_jobs: int
    deadline_s: float | None
    sdpa: tuple[str, ...]


DEFAULTS: Final = SelectionDefaults(
    warmup_ms=25, rep_ms=100, peer_compile_jobs=0, deadline_s=None, sdpa=(SDPA_FLASH, SDPA_CUDNN)
)
#: The scoreboard's run fits one GPU call of at most 9 minutes (unpacking the archives included):
#: about 4.5 minutes estimated (`bench --suite scoreboard --list` prints the estimate), timing stops
#: at 450 s whatever happens, leaving time for the outputs. SDPA: cuDNN only (the targets' peer;
#: torch's flash backend trails it everywhere). TileOPs compiles in 16 processes, beside our own
#: prebuild.
SCOREBOARD_DEFAULTS: Final = SelectionDefaults(
    warmup_ms=50, rep_ms=200, peer_compile_jobs=16, deadline_s=450.0, sdpa=(SDPA_CUDNN,)
)


def defaults_for(*, scoreboard: bool) -> SelectionDefaults:
    return SCOREBOARD_DEFAULTS if scoreboard else DEFAULTS


@attrs.frozen(kw_only=True)
class BenchSettings:
    """Which cases to time, how, and where the outputs go. Empty `suites` / `dtypes` mean all."""

    suites: tuple[Suite, ...] = ()
    dtypes: tuple[str, ...] = ()
    quick: bool = False
    scoreboard: bool = False  # the scoreboard set (`suites` then filter it)
    max_cases: int | None = None  # per suite, after the filters
    out_dir: str = "benchmarks/results"
    name: str | None = None  # output file stem; default <device>-<date>-<selection>
    #: TileOPs' process's PYTHONPATH (e.g. /tmp/peer:/tmp/tl); None: TileOPs is not run.
    peer_path: str | None = None
    peer_timeout_s: float = 300.0  # each peer's timing process
    peer_compile_jobs: int = DEFAULTS.peer_compile_jobs  # > 1: compile TileOPs' kernels in N processes first
    #: FlashInfer's process's PYTHONPATH (e.g. /tmp/fi); None: FlashInfer is not run.
    flashinfer_path: str | None = None
    flashinfer_jit: bool = False  # let FlashInfer JIT-compile modules it has no prebuilt one of
    peer_results: str | None = None  # fold in this peer JSON instead of running the peers
    peer_only: bool = False  # time only the peers (then fold their JSON into a later run)
    warmup_ms: int = DEFAULTS.warmup_ms
    rep_ms: int = DEFAULTS.rep_ms
    sdpa: tuple[str, ...] = DEFAULTS.sdpa  # the SDPA backends timed
    #: Seconds after the start past which the run times no new case (each stage gets its share);
    #: what was measured is written as usual. None: no deadline.
    deadline_s: float | None = DEFAULTS.deadline_s
    device: str = "cuda"
    dry_run: bool = False  # tiny cases on the CPU, wall-clock timing, no peer
    list_only: bool = False  # print the selected cases, counts and the estimate; time nothing
    jobs: int | None = None  # prebuild worker processes (default: one per CPU, at most 16)
    merge: tuple[str, ...] = ()  # JSON files of earlier runs to combine into one set of outputs
    #: JSON files of earlier runs: leave out, per stage (ours, each peer), the cases they measured.
    resume: tuple[str, ...] = ()
    command: str = ""  # the command line, recorded in the JSON
