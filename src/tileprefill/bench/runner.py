"""Time our Ops, torch SDPA (flash, cuDNN) and the TileOPs peer on the same cases, in one run.

    python -m tileprefill bench [--suite S ...] [--dtype D ...] [--quick] [--max-cases N] ...

Order of a run: select the cases; run each of our calls once under
`recording_builds()` to list its programs and compile them side by side
(`prebuild`, timed: the compile figure); then per case time our public Op
(`validate=False`), the SDPA backends on the equivalent dense problem (ragged:
one SDPA call per sequence; caches gathered to dense first, untimed), check our
output against SDPA's, and write the JSON and markdown; then the peer in its
own process (`peer.py`), folded in; then the plots.

Times are medians of `triton.testing.do_bench` (CUDA events; warm-up and compile
excluded) on a GPU; a CPU run (`--dry-run`) uses the wall clock.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import math
import platform
import re
import statistics
import sys
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import attrs
import torch

import tileprefill as tp
from tileprefill.bench import peer as peer_process
from tileprefill.bench import report
from tileprefill.bench.cases import (
    WARM_UP_S,
    Case,
    Layout,
    Suite,
    default_cases,
    make_inputs,
    quick_cases,
    select,
    tiny_cases,
    warm_up_gpu,
)
from tileprefill.bench.results import (
    OURS,
    OURS_ATTENTION,
    SDPA_CUDNN,
    SDPA_FLASH,
    TILEOPS,
    CaseResult,
    Measurement,
    PeerInfo,
    RunResult,
)
from tileprefill.bench.settings import BenchSettings
from tileprefill.kernels.compile import BuildRequest, prebuild, recording_builds
from tileprefill.validation import TensorSpec

Tensors = dict[str, torch.Tensor]


# --- timing ------------------------------------------------------------------------------------------


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
            _synchronize()
            start = time.perf_counter()
            fn()
            _synchronize()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- our Ops -----------------------------------------------------------------------------------------


class AnyOp(Protocol):
    """A public Op of any class, called with its ordered tensor inputs."""

    input_specs: tuple[TensorSpec, ...]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...
    def _plan_call(self, tensors: Mapping[str, torch.Tensor]) -> tp.BatchPlan[Any]: ...


class _Run(Protocol):
    def run(self, *data: torch.Tensor) -> torch.Tensor: ...


@attrs.frozen
class OpCall:
    """One Op and the inputs of one call of it, timed as an engine calls it: `run` of a plan made once
    for the batch (the per-layer cost; `plan` is per batch)."""

    op: AnyOp
    inputs: tuple[torch.Tensor, ...]

    def plan(self) -> tp.BatchPlan[Any]:
        """The plan `op(*inputs)` makes (the Op's `plan` with the shape read off the inputs)."""
        return self.op._plan_call({s.name: t for s, t in zip(self.op.input_specs, self.inputs, strict=True)})

    def runner(self) -> Callable[[], torch.Tensor]:
        """`plan.run` of this call's data tensors on a plan made now."""
        plan = cast(_Run, self.plan())
        run_names = {s.name for s in type(self.op).run_specs}  # type: ignore[attr-defined]
        data = tuple(t for s, t in zip(self.op.input_specs, self.inputs, strict=True) if s.name in run_names)
        return lambda: plan.run(*data)

    def __call__(self) -> torch.Tensor:
        return self.op(*self.inputs)


def served_by(case: Case, call: OpCall, device: torch.device) -> str:
    """The kernels that serve our call of `case`, in plan order ("batch_paged_tl -> rope_append_neox_tl
    -> ..."): the one place the harness asks which kernels an Op runs."""
    return str(call.plan().plan)


def _op(op: object) -> AnyOp:
    return cast(AnyOp, op)


def our_calls(case: Case, x: Tensors) -> dict[str, OpCall]:
    """Our public Op(s) for `case`: OURS, and for rope-append also OURS_ATTENTION (the read-only Op on
    the same cache, attending over the same keys: attention alone)."""
    causal = case.causal
    window, softcap = case.window or None, case.softcap or None

    def args(*names: str) -> tuple[torch.Tensor, ...]:
        return tuple(x[n] for n in names)

    def paged() -> tuple[torch.Tensor, ...]:
        return args("q", "k_pages", "v_pages", "block_table", "kv_seqlens", "cu_seqlens_q")

    def contiguous() -> tuple[torch.Tensor, ...]:
        return args("q", "k_cache", "v_cache", "kv_seqlens")

    if case.suite is Suite.ROPE_APPEND:
        new = ("q", "k_new", "v_new")
        if case.layout is Layout.PAGED:
            full = OpCall(
                _op(tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, causal=causal, validate=False)),
                args(
                    *new, "k_pages", "v_pages", "block_table", "cache_seqlens", "cu_seqlens_q", "cos", "sin"
                ),
            )
            alone = OpCall(_op(tp.GQAPagedCachePrefill(causal=causal, validate=False)), paged())
        else:
            full = OpCall(
                _op(
                    tp.GQAContiguousCacheRopeAppendPrefill(
                        rope=tp.RopeMode.NEOX, causal=causal, validate=False
                    )
                ),
                args(*new, "k_cache", "v_cache", "cache_seqlens", "cos", "sin"),
            )
            alone = OpCall(_op(tp.GQAContiguousCachePrefill(causal=causal, validate=False)), contiguous())
        return {OURS: full, OURS_ATTENTION: alone}
    match case.layout:
        case Layout.DENSE:
            op = tp.GQAPrefill(causal=causal, sliding_window=window, softcap=softcap, validate=False)
            call = OpCall(_op(op), args("q", "k", "v"))
        case Layout.RAGGED:
            call = OpCall(
                _op(tp.GQAVarlenPrefill(causal=causal, validate=False)),
                args("q", "k", "v", "cu_seqlens_q", "cu_seqlens_kv"),
            )
        case Layout.CONTIGUOUS:
            call = OpCall(_op(tp.GQAContiguousCachePrefill(causal=causal, validate=False)), contiguous())
        case Layout.PAGED:
            call = OpCall(_op(tp.GQAPagedCachePrefill(causal=causal, validate=False)), paged())
    return {OURS: call}


# --- SDPA on the equivalent dense problem ------------------------------------------------------------


@attrs.frozen
class DenseProblem:
    """q (B, Sq, Hq, D) over k, v (B, Skv, Hkv, D): one SDPA call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def rotate_neox(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x (T, H, D) rotated by NeoX RoPE at `positions` (T,), computed in float32."""
    half = cos.shape[1]
    c = cos[positions.long()][:, None, :]
    s = sin[positions.long()][:, None, :]
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half : 2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x32[..., 2 * half :]], dim=-1).to(x.dtype)


def dense_problems(case: Case, x: Tensors) -> list[DenseProblem]:
    """The case as SDPA calls: one batched call where every sequence has the same lengths, else one
    call per sequence. Caches are gathered to dense (copies; the caller does not time this).

    Rope-append: q rotated as our Op rotates it, over the cache as our Op left it (call ours first).
    """
    q_lens, kv_lens = case.q_lens, case.kv_lens
    q = x["q"]
    if case.suite is Suite.ROPE_APPEND:
        cached = torch.tensor(case.cached_lens, dtype=torch.int64, device=q.device)
        steps = torch.arange(max(q_lens), device=q.device)
        if case.layout is Layout.CONTIGUOUS:
            pos = (cached[:, None] + steps[None, : q_lens[0]]).reshape(-1)
            flat = q.reshape(-1, *q.shape[2:])
            q = rotate_neox(flat, pos, x["cos"], x["sin"]).reshape(q.shape)
        else:
            pos = torch.cat(
                [c + torch.arange(n, device=q.device) for c, n in zip(cached, q_lens, strict=True)]
            )
            q = rotate_neox(q, pos, x["cos"], x["sin"])
    if case.layout in (Layout.DENSE, Layout.CONTIGUOUS):
        if case.layout is Layout.DENSE:
            k, v = x["k"], x["v"]
        else:
            k, v = (x[n][:, : kv_lens[0]].contiguous() for n in ("k_cache", "v_cache"))
        return [DenseProblem(q, k, v)]
    q_starts = [0, *_accumulate(q_lens)]
    if case.layout is Layout.RAGGED:
        kv_starts = [0, *_accumulate(kv_lens)]
        keys = [(x["k"][a : a + n], x["v"][a : a + n]) for a, n in zip(kv_starts, kv_lens, strict=False)]
    else:
        page, table = case.page_size, x["block_table"]
        keys = []
        for b, n in enumerate(kv_lens):
            pages = table[b, : math.ceil(n / page)].long()
            k = x["k_pages"][pages].reshape(-1, *x["k_pages"].shape[2:])[:n]
            v = x["v_pages"][pages].reshape(-1, *x["v_pages"].shape[2:])[:n]
            keys.append((k, v))
    queries = [q[a : a + n] for a, n in zip(q_starts, q_lens, strict=False)]
    if len(set(q_lens)) == 1 and len(set(kv_lens)) == 1:
        return [
            DenseProblem(
                torch.stack(queries), torch.stack([k for k, _ in keys]), torch.stack([v for _, v in keys])
            )
        ]
    return [
        DenseProblem(qs[None], k[None].contiguous(), v[None].contiguous())
        for qs, (k, v), n in zip(queries, keys, q_lens, strict=True)
        if n > 0
    ]


def _accumulate(lens: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in lens:
        total += n
        out.append(total)
    return out


def sdpa_call(
    problems: Sequence[DenseProblem], causal: bool, backend: object, *, expand_heads: bool = False
) -> Callable[[], list[torch.Tensor]]:
    """A callable running every problem through SDPA in `backend`; outputs (B, Sq, Hq, D) each.

    Bottom-right causal (`causal_lower_right`) where q and kv lengths differ. With `expand_heads`
    the KV heads are repeated to Hq beforehand (for a backend without `enable_gqa`).
    """
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as attend

    prepared = []
    for p in problems:
        q, k, v = (t.transpose(1, 2) for t in (p.q, p.k, p.v))  # (B, H, S, D)
        if expand_heads:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s_q, s_kv = q.shape[2], k.shape[2]
        mask = causal_lower_right(s_q, s_kv) if causal and s_q != s_kv else None
        prepared.append((q, k, v, mask, causal and s_q == s_kv))

    def run() -> list[torch.Tensor]:
        with sdpa_kernel(backend):  # type: ignore[arg-type]
            return [
                attend(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=not expand_heads)
                for q, k, v, mask, is_causal in prepared
            ]

    return run


def sdpa_output(case: Case, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """SDPA's (B, H, S, D) outputs in our output layout."""
    ours = [o.transpose(1, 2) for o in outputs]  # (B, Sq, Hq, D)
    if case.layout in (Layout.DENSE, Layout.CONTIGUOUS):
        return ours[0]
    return torch.cat([o.reshape(-1, *o.shape[2:]) for o in ours])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item())


# --- one case ----------------------------------------------------------------------------------------


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {SDPA_FLASH: SDPBackend.FLASH_ATTENTION, SDPA_CUDNN: SDPBackend.CUDNN_ATTENTION}


def measure(fn: Callable[[], object], timer: Timer) -> Measurement:
    try:
        fn()
        _synchronize()
        return Measurement(ms=timer(fn))
    except Exception as error:  # a backend that cannot run a case is a result, not a crash
        return Measurement.failed(error)


def run_case(case: Case, device: torch.device, timer: Timer) -> CaseResult:
    """Every implementation of this process on `case` (the peer runs elsewhere)."""
    result = CaseResult(case)
    try:
        x = make_inputs(case, device)
    except Exception as error:
        failed = Measurement.failed(error)
        result.results = dict.fromkeys((OURS, SDPA_FLASH, SDPA_CUDNN), failed)
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
                _synchronize()
                result.first_call_s = time.perf_counter() - start
            result.results[name] = measure(call.runner(), timer)
        except Exception as error:
            result.results[name] = Measurement.failed(error)
    if case.window or case.softcap:
        why = Measurement.unavailable("SDPA's flash and cuDNN backends take no sliding window or softcap")
        result.results |= dict.fromkeys(_sdpa_backends(), why)
        return result
    try:
        problems = dense_problems(case, x)
    except Exception as error:
        problems = []
        gather_error: Exception | None = error
    else:
        gather_error = None
    for name, backend in _sdpa_backends().items():
        if gather_error is not None:
            result.results[name] = Measurement.failed(gather_error)
            continue
        result.results[name], output = _time_sdpa(case, problems, backend, timer)
        if output is not None and ours_out is not None:
            result.relative_error[name] = relative_error(ours_out, sdpa_output(case, output))
    return result


def _time_sdpa(
    case: Case, problems: Sequence[DenseProblem], backend: object, timer: Timer
) -> tuple[Measurement, list[torch.Tensor] | None]:
    note = "" if len(problems) == 1 else f"{len(problems)} SDPA calls, one per sequence"
    if case.layout in (Layout.CONTIGUOUS, Layout.PAGED):
        note = "; ".join(s for s in ("on the cache gathered to dense (gather not timed)", note) if s)
    first_error: Exception | None = None
    for expand in (False, True):
        try:
            fn = sdpa_call(problems, case.causal, backend, expand_heads=expand)
            with warnings.catch_warnings(record=True) as caught:  # torch says why a backend declines
                warnings.simplefilter("always")
                try:
                    output = fn()
                except RuntimeError as error:
                    why = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
                    raise RuntimeError(f"{str(error).strip()} {why}".strip()[:600]) from error
            _synchronize()
            ms = timer(fn)
        except Exception as error:
            first_error = first_error or error
            continue
        if expand:
            assert first_error is not None
            note = "; ".join(
                s
                for s in (
                    note,
                    f"KV heads repeated to Hq (enable_gqa: {Measurement.failed(first_error).error})",
                )
                if s
            )
        return Measurement(ms=ms, note=note), output
    assert first_error is not None
    return Measurement.failed(first_error), None


# --- the run -----------------------------------------------------------------------------------------


def selected_cases(settings: BenchSettings) -> list[Case]:
    if settings.dry_run:
        base = tiny_cases()
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
        parts.append("quick" if settings.quick else "all")
        parts += [s.value for s in settings.suites] + list(settings.dtypes)
    return "-".join(parts)


def run(settings: BenchSettings, timer: Timer | None = None) -> int:
    """One benchmark run; the outputs go under `settings.out_dir`. Returns an exit status."""
    if settings.merge:
        if settings.resume:
            print("tileprefill bench: --resume: expected no --merge (it times nothing)", file=sys.stderr)
            return 2
        return merge_runs(settings)
    cases = selected_cases(settings)
    if settings.list_only:
        for case in cases:
            flags = (" [quick]" if case.quick else "") + "".join(f" [{s}]" for s in case.labels)
            print(f"{case.suite.value:<12} {case.name:<48} {case.describe()}{flags}")
        counts = {s.value: sum(c.suite is s for c in cases) for s in Suite}
        print(f"{len(cases)} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0
    if not cases:
        print("tileprefill bench: no case matches the selection", file=sys.stderr)
        return 2
    ours_cases = [] if settings.peer_only else cases
    times_peer = not settings.dry_run and settings.peer_results is None and settings.peer_path is not None
    peer_cases = cases if times_peer else ours_cases  # without a peer run: to mark them "not run"
    if settings.resume:
        try:
            settled = settled_in(settings.resume)
        except (OSError, ValueError, KeyError, AssertionError) as error:
            why = f"{type(error).__name__}: {error}"
            print(f"tileprefill bench: --resume: expected JSON written by bench, got {why}", file=sys.stderr)
            return 2
        ours_cases = [c for c in ours_cases if c.name not in settled[OURS]]
        peer_cases = [c for c in peer_cases if c.name not in settled[TILEOPS]] if times_peer else ours_cases
        print(
            f"--resume: {len(ours_cases)} cases left to time for ours, {len(peer_cases)} for the peer",
            file=sys.stderr,
        )
    left = {c.name for c in (*ours_cases, *peer_cases)}
    cases = [c for c in cases if c.name in left]
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
    run_result = RunResult(
        device=info,
        versions=versions,
        command=settings.command or " ".join([sys.executable, *sys.argv]),
        settings=_settings_json(settings),
        timer=timer.name,
        started=_now(),
    )
    paths = report.OutputPaths(out_dir, stem)
    print(f"{len(cases)} cases on {info['name']}; writing {paths.json}", file=sys.stderr)
    results = {c.name: CaseResult(c) for c in cases}
    run_result.cases = list(results.values())
    if ours_cases:
        _run_ours(ours_cases, device, timer, settings, run_result, results, paths)
        report.write_plots(run_result, paths)  # now, in case the peer outlives the caller's patience
    _run_peer(peer_cases, settings, run_result, results, paths)
    run_result.finished = _now()
    written = report.write_all(run_result, paths)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def settled_in(paths: Sequence[str]) -> defaultdict[str, set[str]]:
    """The names of the cases each implementation settled in these earlier runs (a figure, or a
    failure that a new attempt would repeat): what a run resumed after them leaves out. A path is a
    run's JSON or a peer process's own (`<stem>-peer.json`, rewritten after every case, so it
    survives a run cut off before it wrote its outputs)."""
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
            settled[TILEOPS] |= {name for name, measurement in peer_results.items() if measurement.settled}
    return settled


def merge_runs(settings: BenchSettings) -> int:
    """Combine the JSON of runs split by --suite / --dtype / --peer-only (same machine) into one set
    of outputs, and fold in a peer JSON (`--peer-results`) where one is given.

    Cases keep the order of their files. A case in several files is combined per implementation:
    a later measurement replaces an earlier one, except that a missing one ("unavailable: not
    run", a peer stopped at its deadline) never replaces a figure. Our kernel, error and first
    call come from the last file that timed our call.
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
        if other.peer.available and not merged.peer.available:
            merged.peer = other.peer
    merged.cases = list(by_name.values())
    merged.command = " && ".join(r.command for r in runs)
    if settings.peer_results is not None:
        merged.peer, peer_results = _folded_peer(settings.peer_results)
        for case_result in merged.cases:
            if (measurement := peer_results.get(case_result.case.name)) is not None:
                case_result.results[TILEOPS] = measurement
    out_dir = Path(settings.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = settings.name or f"{Path(settings.merge[0]).stem}-merged"
    for path in report.write_all(merged, report.OutputPaths(out_dir, stem)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _folded_peer(path: str) -> tuple[PeerInfo, dict[str, Measurement]]:
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


def _run_ours(
    cases: Sequence[Case],
    device: torch.device,
    timer: Timer,
    settings: BenchSettings,
    run_result: RunResult,
    results: dict[str, CaseResult],
    paths: report.OutputPaths,
) -> None:
    # On a CPU every step runs a torch reference kernel: there is nothing to compile or record.
    requests = record_programs(cases, device) if device.type == "cuda" else []
    start = time.perf_counter()
    print(f"compiling {len(requests)} programs side by side", file=sys.stderr, flush=True)
    try:
        prebuild(requests, jobs=settings.jobs)
    except Exception as error:  # each case then compiles on first use and reports its own failure
        run_result.compile.error = Measurement.failed(error).error or ""
        print(f"prebuild failed: {run_result.compile.error}", file=sys.stderr)
    run_result.compile.programs = len(requests)
    run_result.compile.seconds = time.perf_counter() - start
    if device.type == "cuda":
        warm_up_gpu(device)
        run_result.timer += f"; {WARM_UP_S:g} s of bf16 matmuls before the first case (clocks up)"
    progress = Progress(len(cases), "ours + SDPA")
    for case in cases:
        result = run_case(case, device, timer)
        results[case.name].results |= result.results
        results[case.name].kernel = result.kernel
        results[case.name].relative_error = result.relative_error
        results[case.name].first_call_s = result.first_call_s
        progress.step(_summary(results[case.name]))
        report.write_json(run_result, paths.json)
        report.write_markdown(run_result, paths.markdown)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    progress.close()


def _run_peer(
    cases: Sequence[Case],
    settings: BenchSettings,
    run_result: RunResult,
    results: dict[str, CaseResult],
    paths: report.OutputPaths,
) -> None:
    if settings.peer_results is not None:
        info, peer_results = _folded_peer(settings.peer_results)
    elif settings.dry_run or settings.peer_path is None:
        reason = "--dry-run" if settings.dry_run else "no --peer-path (nor $TILEPREFILL_PEER_PATH) given"
        info, peer_results = PeerInfo(reason=f"not run: {reason}"), {}
    else:
        info, peer_results = peer_process.run_peer(
            cases,
            python_path=settings.peer_path,
            timeout_s=settings.peer_timeout_s,
            out_json=paths.peer_json,
            log=paths.peer_log,
            warmup_ms=settings.warmup_ms,
            rep_ms=settings.rep_ms,
            compile_jobs=settings.peer_compile_jobs,
        )
    run_result.peer = info
    for case in cases:
        measurement = peer_results.get(case.name)
        if measurement is None:
            why = info.reason if not info.available else "no result from the peer process"
            measurement = Measurement.unavailable(why or "no result from the peer process")
        results[case.name].results[TILEOPS] = measurement


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
