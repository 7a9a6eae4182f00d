"""The demo behind `tileprefill demo`: a small engine loop (chunked prefill of several requests into
one shared paged cache with RoPE), checked against a dense recomputation; `--engine transformers`
runs a random-weight model's generate() on tileprefill, checked against SDPA."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

import attrs
import torch

from tileprefill.context import DType, RopeMode
from tileprefill.keys import (
    Code,
    code_of,
)
from tileprefill.ops import GQAPagedCacheRopeAppendPrefill, GQAVarlenRopePrefill, PagedShape, VarlenShape
from tileprefill.selection import PrefillPlan

#: (atol, rtol) the demo accepts between chunked and dense outputs: a couple of ulps of the dtype,
#: since the two runs accumulate in different orders and round independently.
DEMO_TOLERANCE = {DType.FP16: (4e-3, 4e-3), DType.BF16: (1.6e-2, 1.6e-2)}


@attrs.frozen
class DemoArgs:
    device: torch.device
    dtype: DType
    engine: str = "paged"  # or "transformers"


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
