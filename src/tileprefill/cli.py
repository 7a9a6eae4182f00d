"""`python -m tileprefill {explain,demo,compile,bench}`.

- explain: the plan a context gets, and why every other kernel was not chosen.
- demo: a small engine loop (chunked prefill of several requests into one shared
  paged cache with RoPE), checked against a dense recomputation; `--engine transformers`:
  a random-weight model's generate() on tileprefill, checked against SDPA.
- compile: lower and compile every TileLang kernel for one arch (no GPU needed).
- bench: time our Ops against torch SDPA and TileOPs (see tileprefill.bench).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Protocol, assert_never

import attrs
import torch

from tileprefill.bench.cases import DTYPES as BENCH_DTYPES
from tileprefill.bench.cases import Suite
from tileprefill.bench.settings import PEER_PATH_ENV, BenchSettings
from tileprefill.context import Arch, DType, KVLayout, PrefillContext, RopeMode
from tileprefill.keys import Code, code_of
from tileprefill.ops import GQAPagedCacheRopeAppendPrefill, GQAVarlenRopePrefill, PagedShape, VarlenShape
from tileprefill.selection import PrefillPlan, explain

_DTYPES = {"fp16": DType.FP16, "bf16": DType.BF16}
#: (atol, rtol) the demo accepts between chunked and dense outputs: a couple of ulps of the dtype,
#: since the two runs accumulate in different orders and round independently.
DEMO_TOLERANCE = {DType.FP16: (4e-3, 4e-3), DType.BF16: (1.6e-2, 1.6e-2)}


@attrs.frozen
class ExplainArgs:
    layout: KVLayout
    rope: RopeMode
    append: bool
    ragged: bool
    dtype: DType
    arch: Arch
    head_dim: int
    group_size: int
    page_size: int | None
    causal: bool
    sliding_window: int = 0
    softcap: float = 0.0
    slot_mapping: bool = False


@attrs.frozen
class DemoArgs:
    device: torch.device
    dtype: DType
    engine: str = "paged"  # or "transformers"


@attrs.frozen
class CompileArgs:
    arch: str
    out_dir: str | None


#: `bench`'s arguments are the run's settings record (tileprefill.bench.settings).
BenchArgs = BenchSettings

Command = ExplainArgs | DemoArgs | CompileArgs | BenchArgs


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_args(argv)
    match command:
        case ExplainArgs():
            return run_explain(command)
        case DemoArgs():
            return run_demo(command)
        case CompileArgs():
            return run_compile(command)
        case BenchSettings():
            return run_bench(command)
        case _:
            assert_never(command)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tileprefill", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    ex = commands.add_parser(
        "explain", help="print the plan of a context and why other kernels were not chosen"
    )
    ex.add_argument("--layout", required=True, choices=[m.value for m in KVLayout])
    ex.add_argument("--rope", required=True, choices=[m.value for m in RopeMode])
    ex.add_argument("--append", action="store_true", help="the call appends new keys to the cache")
    ex.add_argument("--ragged", action="store_true", help="q packed with cu_seqlens (implied by paged)")
    ex.add_argument("--dtype", required=True, choices=sorted(_DTYPES))
    ex.add_argument("--arch", required=True, choices=[m.value for m in Arch])
    ex.add_argument("--head-dim", required=True, type=int)
    ex.add_argument("--group-size", required=True, type=int, help="query heads per KV head")
    ex.add_argument("--page-size", type=int, help="tokens per page (paged layout only)")
    ex.add_argument("--non-causal", action="store_true")
    ex.add_argument("--sliding-window", type=int, default=0, help="keys a query sees, its own last (0: all)")
    ex.add_argument("--softcap", type=float, default=0.0, help="logit softcap (0: none)")
    ex.add_argument(
        "--slot-mapping",
        action="store_true",
        help="a slot-mapped cache write, no attention (PagedCacheSlotAppend; with --layout paged --append)",
    )

    demo = commands.add_parser("demo", help="chunked prefill of a few requests into a paged cache, checked")
    demo.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    demo.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    demo.add_argument(
        "--engine",
        choices=["paged", "transformers"],
        default="paged",
        help="paged: the chunked-prefill loop; transformers: a random-weight Llama's generate() vs SDPA",
    )

    comp = commands.add_parser("compile", help="compile every TileLang kernel for one arch (no GPU needed)")
    comp.add_argument("--arch", required=True, choices=["sm_80", "sm_90a"])
    comp.add_argument("--out", default=None, help="keep the .cu and .cubin files under this folder")

    bench = commands.add_parser(
        "bench",
        help="time our Ops against torch SDPA and TileOPs; JSON, markdown and plots",
        description="Time our Ops (validate=False) against torch SDPA (flash, cuDNN) and TileOPs 0.1.0 "
        "(its own process) on one machine. With no selection flag, the whole default set runs.",
    )
    bench.add_argument(
        "--suite", action="append", choices=[s.value for s in Suite], help="only this suite (repeatable)"
    )
    bench.add_argument(
        "--dtype", action="append", choices=sorted(BENCH_DTYPES), help="only this dtype (repeatable)"
    )
    bench.add_argument("--quick", action="store_true", help="a small representative subset of every suite")
    bench.add_argument("--max-cases", type=int, default=None, help="at most N cases of each suite")
    bench.add_argument("--out-dir", default="benchmarks/results", help="where the outputs go")
    bench.add_argument("--name", default=None, help="output file stem (default: <device>-<date>-<selection>)")
    bench.add_argument(
        "--peer-path",
        default=os.environ.get(PEER_PATH_ENV),
        help=f"PYTHONPATH of the TileOPs process, e.g. /tmp/peer:/tmp/tl (default ${PEER_PATH_ENV}; "
        "none: no peer run)",
    )
    bench.add_argument("--no-peer", action="store_true", help="do not run the peer")
    bench.add_argument("--peer-timeout", type=float, default=300.0, help="seconds the peer process may take")
    bench.add_argument(
        "--peer-compile-jobs",
        type=int,
        default=0,
        help="first compile TileOPs' kernels in N processes side by side (it compiles one at a time "
        "on first use); default 0: no such step (16 ran on an H100 on 2026-12-05)",
    )
    bench.add_argument(
        "--peer-results",
        default=None,
        help="fold in this peer JSON instead of running the peer (with --merge: into the merged cases)",
    )
    bench.add_argument("--peer-only", action="store_true", help="time only the peer")
    bench.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up, ms")
    bench.add_argument("--rep-ms", type=int, default=100, help="do_bench repetitions, ms")
    bench.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    bench.add_argument("--jobs", type=int, default=None, help="prebuild worker processes")
    bench.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny cases on the CPU (reference kernels, wall clock), no peer",
    )
    bench.add_argument(
        "--list", action="store_true", help="print the selected cases and counts; time nothing"
    )
    bench.add_argument(
        "--merge",
        nargs="+",
        default=(),
        metavar="JSON",
        help="combine the JSON of split runs, per implementation (a figure is never replaced by a "
        "missing one); time nothing",
    )
    bench.add_argument(
        "--resume",
        nargs="+",
        default=(),
        metavar="JSON",
        help="leave out what these earlier runs measured (per stage: ours, the peer), e.g. after a run "
        "cut off at a time limit; then --merge the runs",
    )
    return parser


def parse_args(argv: Sequence[str] | None) -> Command:
    ns = _parser().parse_args(argv)
    command: str = ns.command
    if command == "explain":
        return ExplainArgs(
            layout=KVLayout(ns.layout),
            rope=RopeMode(ns.rope),
            append=bool(ns.append),
            ragged=bool(ns.ragged),
            dtype=_DTYPES[ns.dtype],
            arch=Arch(ns.arch),
            head_dim=int(ns.head_dim),
            group_size=int(ns.group_size),
            page_size=None if ns.page_size is None else int(ns.page_size),
            causal=not ns.non_causal,
            sliding_window=int(ns.sliding_window),
            softcap=float(ns.softcap),
            slot_mapping=bool(ns.slot_mapping),
        )
    if command == "demo":
        return DemoArgs(device=torch.device(ns.device), dtype=_DTYPES[ns.dtype], engine=str(ns.engine))
    if command == "bench":
        return BenchSettings(
            suites=tuple(Suite(s) for s in ns.suite or ()),
            dtypes=tuple(str(d) for d in ns.dtype or ()),
            quick=bool(ns.quick),
            max_cases=None if ns.max_cases is None else int(ns.max_cases),
            out_dir=str(ns.out_dir),
            name=None if ns.name is None else str(ns.name),
            peer_path=None if ns.no_peer or not ns.peer_path else str(ns.peer_path),
            peer_timeout_s=float(ns.peer_timeout),
            peer_compile_jobs=int(ns.peer_compile_jobs),
            peer_results=None if ns.peer_results is None else str(ns.peer_results),
            peer_only=bool(ns.peer_only),
            warmup_ms=int(ns.warmup_ms),
            rep_ms=int(ns.rep_ms),
            device=str(ns.device),
            dry_run=bool(ns.dry_run),
            list_only=bool(ns.list),
            jobs=None if ns.jobs is None else int(ns.jobs),
            merge=tuple(str(p) for p in ns.merge),
            resume=tuple(str(p) for p in ns.resume),
            command=shlex.join(
                [sys.executable, "-m", "tileprefill", *(sys.argv[1:] if argv is None else argv)]
            ),
        )
    return CompileArgs(arch=str(ns.arch), out_dir=None if ns.out is None else str(ns.out))


# --- explain ---------------------------------------------------------------------------------------


def context_from(args: ExplainArgs) -> PrefillContext:
    """The context of `args`; raises ValueError naming the flag for impossible combinations."""
    paged = args.layout is KVLayout.PAGED
    if paged and args.page_size is None:
        raise ValueError("--page-size: expected a page size with --layout paged, got none")
    if not paged and args.page_size is not None:
        raise ValueError(
            f"--page-size: expected none with --layout {args.layout.value}, got {args.page_size}"
        )
    return PrefillContext(
        kv_layout=args.layout,
        rope=args.rope,
        append=args.append,
        q_dtype=args.dtype,
        kv_dtype=args.dtype,
        arch=args.arch,
        head_dim=args.head_dim,
        group_size=args.group_size,
        causal=args.causal,
        page_size=args.page_size if args.page_size is not None else 0,
        ragged=args.ragged or paged,
        sliding_window=args.sliding_window,
        softcap=args.softcap > 0,
        slot_mapping=args.slot_mapping,
    )


def run_explain(args: ExplainArgs) -> int:
    try:
        ctx = context_from(args)
    except ValueError as error:
        print(f"tileprefill explain: {error}", file=sys.stderr)
        return 2
    explanation = explain(ctx)
    print(explanation)
    if explanation.plan is None:
        print(
            "tileprefill explain: no plan: no kernel serves step " + ", ".join(explanation.missing_steps),
            file=sys.stderr,
        )
        return 2
    return 0


# --- demo ------------------------------------------------------------------------------------------


def kernels_kind(plan: PrefillPlan) -> str:
    codes = {code_of(key) for key in plan.steps}
    if codes == {Code.REF}:
        return "torch reference kernels"
    if Code.REF in codes:
        return "TileLang and torch reference kernels"
    return "TileLang kernels"


def rope_tables(max_position: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual cos/sin tables, float32 (max_position, rotary_dim // 2), base 10000."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


@attrs.define
class Request:
    """One request of the demo: its whole prompt, its chunks, its pages and what is cached."""

    q: torch.Tensor  # (L, Hq, D)
    k: torch.Tensor  # (L, Hkv, D), unrotated
    v: torch.Tensor
    chunks: list[int]
    pages: list[int] = attrs.field(factory=list)
    cached: int = 0  # the caller's cache_seqlens entry
    outputs: list[torch.Tensor] = attrs.field(factory=list)


def run_demo(args: DemoArgs) -> int:
    device, dtype = args.device, args.dtype.torch_dtype
    if device.type == "cuda" and not torch.cuda.is_available():
        print("tileprefill demo: --device: expected an available CUDA device, got none", file=sys.stderr)
        return 2
    if args.engine == "transformers":
        from tileprefill.integrations import transformers_demo

        return transformers_demo.run(device, dtype)
    gen = torch.Generator().manual_seed(0)
    hq, hkv, page_size = 8, 2, 16
    head_dim = 128 if device.type == "cuda" else 64  # smaller on CPU: the reference is slow
    rotary_dim = head_dim // 2  # partial rotary: the upper half of each head passes through
    # Unaligned prompt lengths, each prefilled in 2-3 chunks of unaligned sizes.
    chunk_plan = [[17, 28], [50, 47, 33], [31, 29, 17], [5, 9]]
    max_position = 256
    cos, sin = (t.to(device) for t in rope_tables(max_position, rotary_dim))

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    requests = [
        Request(rand(sum(c), hq, head_dim), rand(sum(c), hkv, head_dim), rand(sum(c), hkv, head_dim), c)
        for c in chunk_plan
    ]
    # One shared pool of pages, handed out from a shuffled free list: block tables are not contiguous.
    num_pages = sum(-(-sum(c) // page_size) for c in chunk_plan) + 3
    free_pages = torch.randperm(num_pages, generator=gen).tolist()
    k_pages = torch.zeros(num_pages, page_size, hkv, head_dim, dtype=dtype, device=device)
    v_pages = torch.zeros_like(k_pages)
    op = GQAPagedCacheRopeAppendPrefill(rope=RopeMode.NEOX, rotary_dim=rotary_dim)

    print(
        f"device: {device}; dtype: {args.dtype.value}; Hq={hq}, Hkv={hkv}, D={head_dim}, "
        f"rotary_dim={rotary_dim}"
    )
    print(f"paged cache: {num_pages} pages of {page_size}; prompts {[sum(c) for c in chunk_plan]} tokens")
    kinds: set[str] = set()
    for step in itertools.count():
        batch = [r for r in requests if step < len(r.chunks)]
        if not batch:
            break
        spans = [(r, r.cached, r.cached + r.chunks[step]) for r in batch]
        for r, _, end in spans:  # the caller allocates pages before the call
            while len(r.pages) * page_size < end:
                r.pages.append(free_pages.pop())
        max_pages = max(len(r.pages) for r in batch)
        block_table = torch.zeros(len(batch), max_pages, dtype=torch.int32)
        for b, r in enumerate(batch):
            block_table[b, : len(r.pages)] = torch.tensor(r.pages, dtype=torch.int32)
        lens = [end - start for _, start, end in spans]
        inputs = (
            torch.cat([r.q[s:e] for r, s, e in spans]),
            torch.cat([r.k[s:e] for r, s, e in spans]),
            torch.cat([r.v[s:e] for r, s, e in spans]),
            k_pages,
            v_pages,
            block_table.to(device),
            torch.tensor([r.cached for r in batch], dtype=torch.int32, device=device),
            torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device),
            cos,
            sin,
        )
        # The engine pattern: plan once per batch (metadata), run per layer (data; one layer here).
        shape = PagedShape(
            tokens_q=sum(lens),
            page_size=page_size,
            heads=hq,
            kv_heads=hkv,
            head_dim=head_dim,
            dtype=inputs[0].dtype,
            device=device,
        )
        batch_plan = op.plan(inputs[5], inputs[6], inputs[7], shape=shape)
        out = batch_plan.run(*inputs[:5], *inputs[8:])
        plan = batch_plan.plan
        kinds.add(kernels_kind(plan))
        print(
            f"chunk step {step}: {len(batch)} sequences, q lens {lens}, "
            f"cached {[start for _, start, _ in spans]}: {plan}"
        )
        offset = 0
        for (r, _, end), n in zip(spans, lens, strict=True):
            r.outputs.append(out[offset : offset + n])
            offset += n
            r.cached = end  # the caller advances cache_seqlens
    print(f"ran {' and '.join(sorted(kinds))}")

    # One dense recomputation of every whole prompt, with RoPE at positions 0.. of each prompt.
    lengths = [sum(r.chunks) for r in requests]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    dense = GQAVarlenRopePrefill(rope=RopeMode.NEOX, rotary_dim=rotary_dim)
    dense_inputs = _dense_inputs(requests, cu, cos, sin)
    expected = dense(*dense_inputs)
    chunked = torch.cat([torch.cat(r.outputs) for r in requests])
    difference = (chunked.double() - expected.double()).abs()
    error = float(difference.max())
    atol, rtol = DEMO_TOLERANCE[args.dtype]
    within = bool((difference <= atol + rtol * expected.double().abs()).all())
    # Values are appended unrotated: every one must sit in its page exactly.
    values_exact = all(
        torch.equal(v_pages[torch.tensor(r.pages, device=device)].reshape(-1, hkv, head_dim)[: len(r.v)], r.v)
        for r in requests
    )
    q, k = dense_inputs[0], dense_inputs[1]
    dense_shape = VarlenShape(
        tokens_q=q.shape[0],
        tokens_kv=k.shape[0],
        heads=q.shape[1],
        kv_heads=k.shape[1],
        head_dim=q.shape[2],
        dtype=q.dtype,
        device=device,
    )
    print(f"dense recomputation: {dense.plan(dense_inputs[3], dense_inputs[4], shape=dense_shape).plan}")
    print(
        f"max abs error chunked vs dense: {error:.3e} (within atol {atol:.1e} + rtol {rtol:.1e}: {within}); "
        f"values in pages exact: {values_exact}"
    )
    if not within or not values_exact:
        print("tileprefill demo: FAILED", file=sys.stderr)
        return 1
    print("ok")
    return 0


def _dense_inputs(
    requests: Sequence[Request], cu: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    return (
        torch.cat([r.q for r in requests]),
        torch.cat([r.k for r in requests]),
        torch.cat([r.v for r in requests]),
        cu,
        cu,
        cos,
        sin,
    )


# --- compile ---------------------------------------------------------------------------------------


class CompileMain(Protocol):
    def __call__(self, *, arch: str, out_dir: str | None) -> int: ...


def run_compile(args: CompileArgs) -> int:
    # Imported when the command runs: compile_check imports tilelang.
    compile_main: CompileMain = importlib.import_module("tileprefill.compile_check").main
    return compile_main(arch=args.arch, out_dir=args.out_dir)


# --- bench -----------------------------------------------------------------------------------------


class BenchMain(Protocol):
    def __call__(self, settings: BenchSettings) -> int: ...


def run_bench(args: BenchArgs) -> int:
    # Imported when the command runs: the runner imports the Ops' kernels, triton and matplotlib lazily.
    bench_main: BenchMain = importlib.import_module("tileprefill.bench.runner").run
    return bench_main(args)
