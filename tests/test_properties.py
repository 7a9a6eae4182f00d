"""Property tests: chunked prefill through a cache equals one dense recomputation.

For random batches (sequence lengths, chunk split points, page sizes, head
layouts, RoPE mode and rotary dim) the sequences are prefilled in two chunks
through a cache Op, the caller advancing cache_seqlens in between, and the
outputs of both chunks are compared with `GQAVarlenPrefill` /
`GQAVarlenRopePrefill` over the whole sequences. The caches must end up holding
every value exactly (and every key exactly when there is no RoPE).
"""

from __future__ import annotations

import itertools
import random
from typing import TYPE_CHECKING

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tileprefill as tp

if TYPE_CHECKING:
    from conftest import Oracle

MODES = st.sampled_from([None, tp.RopeMode.NEOX, tp.RopeMode.INTERLEAVED])
HEADS = st.sampled_from([(1, 1), (2, 1), (4, 1), (4, 2), (8, 2)])  # (Hq, Hkv)
DTYPES = st.sampled_from([torch.float16, torch.bfloat16])
PROPERTY_SETTINGS = settings(max_examples=30, deadline=None)


def cumulative(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def dense_reference(
    q: list[torch.Tensor],
    k: list[torch.Tensor],
    v: list[torch.Tensor],
    mode: tp.RopeMode | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    """One varlen call over the whole sequences: the recomputation every chunked run must equal."""
    cu = cumulative([x.shape[0] for x in q])
    inputs = (torch.cat(q), torch.cat(k), torch.cat(v), cu, cu)
    if mode is None:
        return tp.GQAVarlenPrefill()(*inputs)
    return tp.GQAVarlenRopePrefill(rope=mode)(*inputs, cos, sin)


@PROPERTY_SETTINGS
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=4),
    splits=st.lists(st.floats(0, 1), min_size=4, max_size=4),
    page_size=st.sampled_from([1, 2, 3, 5, 8, 16]),
    heads=HEADS,
    mode=MODES,
    rotary_half=st.integers(1, 8),
    dtype=DTYPES,
    seed=st.integers(0, 2**31 - 1),
)
def test_paged_chunked_prefill_equals_dense(
    oracle: Oracle,
    lengths: list[int],
    splits: list[float],
    page_size: int,
    heads: tuple[int, int],
    mode: tp.RopeMode | None,
    rotary_half: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    (hq, hkv), d = heads, 16
    prefix = [round(n * f) for n, f in zip(lengths, splits, strict=False)]
    suffix = [n - p for n, p in zip(lengths, prefix, strict=True)]
    q = [torch.randn(n, hq, d, generator=gen).to(dtype) for n in lengths]
    k = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lengths]
    v = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lengths]
    cos, sin = oracle.rope_tables(max(lengths) + 1, 2 * rotary_half)

    layout = oracle.paged_layout(lengths, page_size, random.Random(seed))
    k_pages = torch.randn(layout.num_pages, page_size, hkv, d, generator=gen).to(dtype)
    v_pages = torch.randn(layout.num_pages, page_size, hkv, d, generator=gen).to(dtype)
    if mode is None:
        op: tp.GQAPagedCacheAppendPrefill | tp.GQAPagedCacheRopeAppendPrefill = (
            tp.GQAPagedCacheAppendPrefill()
        )
    else:
        op = tp.GQAPagedCacheRopeAppendPrefill(rope=mode)
    outputs: list[list[torch.Tensor]] = [[] for _ in lengths]
    cache_seqlens = torch.zeros(len(lengths), dtype=torch.int32)
    for chunk in (prefix, suffix):
        starts = cache_seqlens.tolist()
        pick = [slice(s, s + n) for s, n in zip(starts, chunk, strict=True)]
        inputs = (
            torch.cat([x[p] for x, p in zip(q, pick, strict=True)]),
            torch.cat([x[p] for x, p in zip(k, pick, strict=True)]),
            torch.cat([x[p] for x, p in zip(v, pick, strict=True)]),
            k_pages,
            v_pages,
            layout.block_table,
            cache_seqlens,
            cumulative(chunk),
        )
        out = op(*inputs) if isinstance(op, tp.GQAPagedCacheAppendPrefill) else op(*inputs, cos, sin)
        for b, rows in enumerate(torch.split(out, chunk)):
            outputs[b].append(rows)
        cache_seqlens = cache_seqlens + torch.tensor(chunk, dtype=torch.int32)  # the caller's bookkeeping

    expected = dense_reference(q, k, v, mode, cos, sin)
    got = torch.cat([torch.cat(parts) for parts in outputs])
    if got.numel():
        assert (got.double() - expected.double()).abs().max() <= oracle.atol(dtype)
    for b, n in enumerate(lengths):
        pages = list(layout.pages[b])
        cached_v = v_pages[pages].reshape(-1, hkv, d)[:n]
        assert torch.equal(cached_v, v[b]), f"sequence {b}: values in the pages"
        if mode is None:
            assert torch.equal(k_pages[pages].reshape(-1, hkv, d)[:n], k[b]), (
                f"sequence {b}: keys in the pages"
            )


@PROPERTY_SETTINGS
@given(
    prefixes=st.lists(st.integers(0, 12), min_size=1, max_size=3),
    chunk=st.integers(1, 9),
    spare=st.integers(0, 4),
    heads=HEADS,
    mode=MODES,
    rotary_half=st.integers(1, 8),
    dtype=DTYPES,
    seed=st.integers(0, 2**31 - 1),
)
def test_contiguous_chunked_prefill_equals_dense(
    oracle: Oracle,
    prefixes: list[int],
    chunk: int,
    spare: int,
    heads: tuple[int, int],
    mode: tp.RopeMode | None,
    rotary_half: int,
    dtype: torch.dtype,
    seed: int,
) -> None:
    """Sequences of different cached lengths get one batched chunk: positions follow cache_seqlens[b]."""
    gen = torch.Generator().manual_seed(seed)
    (hq, hkv), d, batch = heads, 16, len(prefixes)
    lengths = [p + chunk for p in prefixes]
    s_max = max(lengths) + spare
    q = [torch.randn(n, hq, d, generator=gen).to(dtype) for n in lengths]
    k = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lengths]
    v = [torch.randn(n, hkv, d, generator=gen).to(dtype) for n in lengths]
    cos, sin = oracle.rope_tables(s_max, 2 * rotary_half)
    k_cache = torch.randn(batch, s_max, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(batch, s_max, hkv, d, generator=gen).to(dtype)
    op: tp.GQAContiguousCacheAppendPrefill | tp.GQAContiguousCacheRopeAppendPrefill
    op = (
        tp.GQAContiguousCacheAppendPrefill()
        if mode is None
        else tp.GQAContiguousCacheRopeAppendPrefill(rope=mode)
    )

    def run(
        q_: torch.Tensor,
        k_: torch.Tensor,
        v_: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        lens: torch.Tensor,
    ) -> torch.Tensor:
        if isinstance(op, tp.GQAContiguousCacheAppendPrefill):
            return op(q_, k_, v_, kc, vc, lens)
        return op(q_, k_, v_, kc, vc, lens, cos, sin)

    outputs: list[list[torch.Tensor]] = []
    zero = torch.zeros(1, dtype=torch.int32)
    for b, p in enumerate(prefixes):  # each prefix alone, into its row of the shared cache (a view)
        outputs.append(
            [
                run(
                    q[b][None, :p],
                    k[b][None, :p],
                    v[b][None, :p],
                    k_cache[b : b + 1],
                    v_cache[b : b + 1],
                    zero,
                )[0]
            ]
        )
    cache_seqlens = torch.tensor(prefixes, dtype=torch.int32)
    out = run(
        torch.stack([x[p:] for x, p in zip(q, prefixes, strict=True)]),
        torch.stack([x[p:] for x, p in zip(k, prefixes, strict=True)]),
        torch.stack([x[p:] for x, p in zip(v, prefixes, strict=True)]),
        k_cache,
        v_cache,
        cache_seqlens,
    )
    assert cache_seqlens.tolist() == prefixes
    for b in range(batch):
        outputs[b].append(out[b])

    expected = dense_reference(q, k, v, mode, cos, sin)
    got = torch.cat([torch.cat(parts) for parts in outputs])
    assert (got.double() - expected.double()).abs().max() <= oracle.atol(dtype)
    for b, n in enumerate(lengths):
        assert torch.equal(v_cache[b, :n], v[b]), f"sequence {b}: values in the cache"
        if mode is None:
            assert torch.equal(k_cache[b, :n], k[b]), f"sequence {b}: keys in the cache"
