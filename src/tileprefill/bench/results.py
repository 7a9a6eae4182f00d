"""What a benchmark run produces: one measurement per (case, implementation), and the run around them.

Plain data with JSON round trips; `report.py` renders it, `runner.py` and
`peer.py` fill it. An implementation that cannot run a case is a measurement
too, with `error` set ("unavailable: ...").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from tileprefill.bench.cases import Case

#: Implementations, in table order, with the labels tables and plots use.
OURS, OURS_ATTENTION, SDPA_FLASH, SDPA_CUDNN, TILEOPS, FLASHINFER_FA3, FLASHINFER_FA2 = (
    "ours",
    "ours_attention",
    "sdpa_flash",
    "sdpa_cudnn",
    "tileops",
    "flashinfer_fa3",
    "flashinfer_fa2",
)
LABELS: Final[Mapping[str, str]] = {
    OURS: "ours",
    OURS_ATTENTION: "ours, attention alone",
    SDPA_FLASH: "SDPA FA2",
    SDPA_CUDNN: "SDPA cuDNN",
    TILEOPS: "TileOPs 0.1.0",
    FLASHINFER_FA3: "FlashInfer fa3",
    FLASHINFER_FA2: "FlashInfer fa2",
}
#: FlashInfer's two prefill backends, timed in one process: the targets take the better of them,
#: which a result's speedups name FLASHINFER_BEST.
FLASHINFER: Final = (FLASHINFER_FA3, FLASHINFER_FA2)
FLASHINFER_BEST: Final = "flashinfer_best"
#: The peers our figure is compared with, in table order (ratio = their time / our time).
PEERS: Final = (SDPA_FLASH, SDPA_CUDNN, TILEOPS, *FLASHINFER)
#: How the reasons of a measurement that was never taken begin: a peer stopped at its budget ("not
#: reached"), not run or not importable, one that exited or wrote nothing for the case. A failure
#: names its exception type instead (`Measurement.failed`). See `Measurement.settled`.
_NOT_MEASURED: Final = ("unavailable: not ", "unavailable: no result", "unavailable: peer process")


@dataclass(frozen=True)
class Measurement:
    """A median time in milliseconds, or why there is none."""

    ms: float | None = None
    error: str | None = None
    note: str = ""  # how the figure was obtained, where that differs from the usual

    @classmethod
    def unavailable(cls, reason: str) -> Measurement:
        return cls(error=reason if reason.startswith("unavailable") else f"unavailable: {reason}")

    @classmethod
    def failed(cls, error: BaseException) -> Measurement:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return cls.unavailable(f"{type(error).__name__}: {first}"[:600])

    @property
    def ok(self) -> bool:
        return self.ms is not None

    @property
    def settled(self) -> bool:
        """A figure, or a failure that timing the case again would repeat; not a case its
        implementation never got to (what `bench --resume` times again)."""
        return self.ok or not (self.error or "").startswith(_NOT_MEASURED)

    def tflops(self, flops: float) -> float | None:
        return None if self.ms is None or self.ms <= 0 else flops / self.ms / 1e9

    def to_json(self, flops: float) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.ms is not None:
            out |= {"ms": self.ms, "tflops": self.tflops(flops)}
        if self.error is not None:
            out["error"] = self.error
        if self.note:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Measurement:
        ms, error, note = data.get("ms"), data.get("error"), data.get("note", "")
        return cls(
            ms=float(ms) if isinstance(ms, int | float) else None,
            error=None if error is None else str(error),
            note=str(note),
        )


@dataclass
class CaseResult:
    """Every implementation's measurement of one case, and our output's error against SDPA's."""

    case: Case
    results: dict[str, Measurement] = field(default_factory=dict)
    kernel: str = ""  # the plan that served our call ("attn_dense_sm90", "rope_neox_tl -> ...")
    #: ||ours - theirs|| / ||theirs|| of the outputs, per SDPA backend that ran.
    relative_error: dict[str, float] = field(default_factory=dict)
    first_call_s: float | None = None  # our first call after the prebuild (loads the programs)

    def speedup(self, peer: str) -> float | None:
        """Ours over `peer` in speed (their time / our time), if both ran."""
        return self.best_speedup((peer,))

    def best_speedup(self, peers: Sequence[str]) -> float | None:
        """Ours over the fastest of `peers` that ran, in speed; None if ours or none of them ran."""
        ours = self.results.get(OURS)
        times = [m.ms for p in peers if (m := self.results.get(p)) is not None and m.ms is not None]
        if ours is None or ours.ms is None or ours.ms <= 0 or not times:
            return None
        return min(times) / ours.ms

    def to_json(self) -> dict[str, object]:
        flops = self.case.flops
        speedups = {p: s for p in (*PEERS, OURS_ATTENTION) if (s := self.speedup(p)) is not None}
        if (best := self.best_speedup(FLASHINFER)) is not None:
            speedups[FLASHINFER_BEST] = best
        return {
            "case": self.case.to_json(),
            "describe": self.case.describe(),
            "flops": flops,
            "kernel": self.kernel,
            "first_call_s": self.first_call_s,
            "results": {name: m.to_json(flops) for name, m in self.results.items()},
            "relative_error_vs": self.relative_error,
            "speedup": speedups,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> CaseResult:
        case, results, errors = data["case"], data.get("results", {}), data.get("relative_error_vs", {})
        assert isinstance(case, Mapping) and isinstance(results, Mapping) and isinstance(errors, Mapping)
        first = data.get("first_call_s")
        return cls(
            case=Case.from_json(case),
            results={str(k): Measurement.from_json(v) for k, v in results.items() if isinstance(v, Mapping)},
            kernel=str(data.get("kernel", "")),
            relative_error={str(k): float(v) for k, v in errors.items()},
            first_call_s=float(first) if isinstance(first, int | float) else None,
        )


@dataclass
class PeerInfo:
    """How one peer process went: whether its package imported there, and its versions."""

    name: str = "TileOPs 0.1.0"
    ran: bool = False
    available: bool = False
    reason: str = ""
    seconds: float = 0.0
    command: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    #: The result keys its figures go under (FlashInfer: one per backend).
    implementations: tuple[str, ...] = (TILEOPS,)

    def to_json(self) -> dict[str, object]:
        return vars(self) | {"implementations": list(self.implementations)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> PeerInfo:
        versions, implementations = data.get("versions", {}), data.get("implementations", [TILEOPS])
        assert isinstance(versions, Mapping) and isinstance(implementations, list)
        return cls(
            name=str(data.get("name", "TileOPs 0.1.0")),
            ran=bool(data.get("ran", False)),
            available=bool(data.get("available", False)),
            reason=str(data.get("reason", "")),
            seconds=float(_number(data.get("seconds", 0.0))),
            command=str(data.get("command", "")),
            versions={str(k): str(v) for k, v in versions.items()},
            implementations=tuple(str(i) for i in implementations),
        )


def _number(value: object) -> float:
    assert isinstance(value, int | float)
    return float(value)


@dataclass
class CompileInfo:
    """The prebuild of our programs, before any timing."""

    programs: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class RunResult:
    """One run on one machine."""

    device: dict[str, object] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    command: str = ""
    settings: dict[str, object] = field(default_factory=dict)
    timer: str = ""
    started: str = ""
    finished: str = ""  # empty while the run is under way (the JSON is rewritten after every case)
    compile: CompileInfo = field(default_factory=CompileInfo)
    peers: list[PeerInfo] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "schema": 2,
            "device": self.device,
            "versions": self.versions,
            "command": self.command,
            "settings": self.settings,
            "timer": self.timer,
            "started": self.started,
            "finished": self.finished,
            "compile": vars(self.compile),
            "peers": [p.to_json() for p in self.peers],
            "cases": {c.case.name: c.to_json() for c in self.cases},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> RunResult:
        def mapping(name: str) -> Mapping[str, object]:
            value = data.get(name, {})
            assert isinstance(value, Mapping)
            return value

        compile_, cases, versions = mapping("compile"), mapping("cases"), mapping("versions")
        # Schema 1 had one peer (TileOPs) under "peer".
        peers = data.get("peers", [data["peer"]] if "peer" in data else [])
        assert isinstance(peers, list)
        return cls(
            device=dict(mapping("device")),
            versions={str(k): str(v) for k, v in versions.items()},
            command=str(data.get("command", "")),
            settings=dict(mapping("settings")),
            timer=str(data.get("timer", "")),
            started=str(data.get("started", "")),
            finished=str(data.get("finished", "")),
            compile=CompileInfo(**compile_),  # type: ignore[arg-type]
            peers=[PeerInfo.from_json(p) for p in peers if isinstance(p, Mapping)],
            cases=[CaseResult.from_json(v) for v in cases.values() if isinstance(v, Mapping)],
        )
