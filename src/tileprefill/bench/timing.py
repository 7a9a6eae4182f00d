"""How long things take in a run: the timers, the progress line, the run's deadline and the
estimate of a run printed before it starts.

Times are medians of `triton.testing.do_bench` (CUDA events; warm-up and compile excluded) on a
GPU; a CPU run uses the wall clock.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol

import attrs
import torch

from tileprefill.bench.cases import Case, Suite
from tileprefill.bench.results import Measurement


class Timer(Protocol):
    """Median milliseconds of `fn` (a warmed-up callable); `name` says how (for the JSON)."""

    @property
    def name(self) -> str: ...

    def __call__(self, fn: Callable[[], object]) -> float: ...


@attrs.frozen
class CudaEventTimer:
    """`triton.testing.do_bench(fn, warmup, rep, return_mode="median")`: CUDA events, L2 flushed."""

    warmup_ms: int
    rep_ms: int

    @property
    def name(self) -> str:
        return f"triton.testing.do_bench median, warmup {self.warmup_ms} ms, rep {self.rep_ms} ms"

    def __call__(self, fn: Callable[[], object]) -> float:
        from triton.testing import do_bench  # type: ignore[import-not-found, unused-ignore]

        return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))


@attrs.frozen
class WallTimer:
    """Median wall time of `reps` calls after one (for CPU runs; synchronises CUDA if present)."""

    reps: int = 3

    @property
    def name(self) -> str:
        return f"wall clock median of {self.reps} calls"

    def __call__(self, fn: Callable[[], object]) -> float:
        times = []
        for _ in range(self.reps):
            synchronize()
            start = time.perf_counter()
            fn()
            synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], timer: Timer) -> Measurement:
    try:
        fn()
        synchronize()
        return Measurement(ms=timer(fn))
    except Exception as error:  # a backend that cannot run a case is a result, not a crash
        return Measurement.failed(error)


class Progress:
    """One progress line on stderr, rewritten in place on a terminal."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.start, self.done = total, what, time.perf_counter(), 0
        self.tty = sys.stderr.isatty()

    def step(self, detail: str) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        line = f"[{self.done}/{self.total}] {self.what} {elapsed:5.0f}s, ~{left:4.0f}s left: {detail}"
        print(
            ("\r\x1b[2K" if self.tty else "") + line,
            end="" if self.tty else "\n",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.tty and self.done:
            print(file=sys.stderr, flush=True)


@attrs.define
class Deadline:
    """`seconds` after `start` (perf_counter), or never (None): past it a run starts no new timing.

    Each stage of a run gets what is left but the estimates of the stages after it (time one stage
    leaves unused goes to the next); where what is left falls short of the estimates, each stage
    gets a share in proportion to its own.
    """

    seconds: float | None
    start: float = attrs.field(factory=time.perf_counter)

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def passed(self) -> bool:
        return self.left() <= 0

    def share(self, mine: float, later: float) -> float:
        """Seconds for a stage estimated at `mine` seconds, with `later` seconds of stages after it."""
        left = max(0.0, self.left())
        if math.isinf(left) or mine + later <= 0:
            return left
        return max(left - later, left * mine / (mine + later))

    def reason(self) -> str:
        """Why a case was not timed once the deadline passed (a reason `--resume` times again)."""
        return f"not reached: the run stopped timing at its deadline ({self.seconds:.0f} s, --deadline-s)"


# --- the estimate ------------------------------------------------------------------------------------

#: Seconds per program of ours per compile worker (nvcc and ptxas on one core; a Hopper attention
#: program takes 20-40 s), of a TileOPs case per compile process (its first call: the import and
#: its kernels), and of a peer process before its first case (imports, GPU warm-up, modules).
OUR_PROGRAM_S: Final = 35.0
PEER_CASE_COMPILE_S: Final = 45.0
PEER_START_S: Final = 20.0
#: Seconds per timed measurement besides do_bench's warm-up and repetitions (its estimate runs, the
#: L2 flush between repetitions, launch overheads), and per case of ours (inputs, first call,
#: output check against SDPA).
MEASUREMENT_OVERHEAD: Final = 1.25
MEASUREMENT_S: Final = 0.15
OUR_CASE_S: Final = 0.3


def program_configs(cases: Sequence[Case]) -> int:
    """About how many programs of ours `cases` need: one per static configuration of the attention
    (plus the RoPE and append programs of a rope-append configuration); sequence lengths are
    run-time values."""
    configs = {
        (c.suite, c.layout, c.dtype, c.heads, c.kv_heads, c.head_dim, c.causal, c.page_size, c.window > 0)
        for c in cases
    }
    return sum(3 if suite is Suite.ROPE_APPEND else 1 for suite, *_ in configs)


@attrs.frozen
class Estimate:
    """Seconds each stage of a run is expected to take (an upper estimate: a case a peer declines
    costs it almost nothing, and is counted as timed)."""

    compile_s: float
    ours_s: float
    peers_s: Mapping[str, float]  # by peer name

    @property
    def total_s(self) -> float:
        return self.compile_s + self.ours_s + sum(self.peers_s.values())

    def describe(self) -> str:
        peers = "".join(f", {name} ~{s:.0f} s" for name, s in self.peers_s.items())
        return (
            f"estimate: compile ~{self.compile_s:.0f} s, ours + SDPA ~{self.ours_s:.0f} s{peers}; "
            f"~{self.total_s:.0f} s in all"
        )


def estimate(
    *,
    ours: Sequence[Case],
    sdpa_backends: int,
    peers: Mapping[str, tuple[int, int, int]],
    warmup_ms: int,
    rep_ms: int,
    jobs: int,
) -> Estimate:
    """The estimate of a run timing `ours` (our Op and `sdpa_backends` SDPA backends each) and, per
    peer name, (cases, implementations, compile processes). Our compile and the peers' run side by
    side: the compile stage is the longer of the two."""
    each = (warmup_ms + rep_ms) / 1e3 * MEASUREMENT_OVERHEAD + MEASUREMENT_S
    rope = sum(c.suite is Suite.ROPE_APPEND for c in ours)
    ours_s = (len(ours) * (1 + sdpa_backends) + rope) * each + len(ours) * OUR_CASE_S
    our_compile = math.ceil(program_configs(ours) / max(1, jobs)) * OUR_PROGRAM_S if ours else 0.0
    peer_compile = max(
        (
            PEER_START_S + math.ceil(cases / processes) * PEER_CASE_COMPILE_S
            for cases, _, processes in peers.values()
            if processes > 1 and cases
        ),
        default=0.0,
    )
    peers_s = {
        name: PEER_START_S + cases * implementations * each
        for name, (cases, implementations, _) in peers.items()
        if cases
    }
    return Estimate(max(our_compile, peer_compile), ours_s, peers_s)
