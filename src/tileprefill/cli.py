"""`python -m tileprefill {explain,demo,compile}`.

- explain: the plan a context gets, and why every other kernel was not chosen.
- demo: a small engine loop (chunked prefill of several requests into one shared
  paged cache with RoPE), checked against a dense recomputation.
- compile: lower and compile every TileLang kernel for one arch (no GPU needed).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from collections.abc import Sequence
from typing import Protocol, assert_never

import attrs
import torch

from tileprefill.context import Arch, DType, KVLayout, PrefillContext, RopeMode
from tileprefill.keys import AppendKey, AttentionKey, KernelKey, RopeKey
from tileprefill.ops import GQAPagedCacheRopeAppendPrefill, GQAVarlenRopePrefill
from tileprefill.selection import Code, PrefillPlan, append_traits, attention_traits, explain, rope_traits

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


@attrs.frozen
class DemoArgs:
    device: torch.device
    dtype: DType


@attrs.frozen
class CompileArgs:
    arch: str
    out_dir: str | None


Command = ExplainArgs | DemoArgs | CompileArgs


def main(argv: Sequence[str] | None = None) -> int:
    command = parse_args(argv)
    match command:
        case ExplainArgs():
            return run_explain(command)
        case DemoArgs():
            return run_demo(command)
        case CompileArgs():
            return run_compile(command)
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

    demo = commands.add_parser("demo", help="chunked prefill of a few requests into a paged cache, checked")
    demo.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    demo.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")

    comp = commands.add_parser("compile", help="compile every TileLang kernel for one arch (no GPU needed)")
    comp.add_argument("--arch", required=True, choices=["sm_80", "sm_90a"])
    comp.add_argument("--out", default=None, help="keep the .cu and .cubin files under this folder")
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
        )
    if command == "demo":
        return DemoArgs(device=torch.device(ns.device), dtype=_DTYPES[ns.dtype])
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


def code_of(key: KernelKey) -> Code:
    match key:
        case RopeKey():
            return rope_traits(key)[1]
        case AppendKey():
            return append_traits(key)[1]
        case AttentionKey():
            return attention_traits(key)[1]
        case _:
            assert_never(key)


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
        plan = op.plan_for(*inputs)
        out = op(*inputs)
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
    print(f"dense recomputation: {dense.plan_for(*dense_inputs)}")
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
