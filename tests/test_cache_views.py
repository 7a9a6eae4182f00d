"""KV caches as engines store them: strided views of one storage, read and written in place.

Each engine layout (`ENGINE_LAYOUTS`) holds the same cache contents as a contiguous
(blocks, rows, Hkv, D) pair; every cache Op must give, on the views, exactly what it gives on
contiguous copies, and write through the views into the engine's storage. The GPU module
(`tests/gpu/test_cache_views_gpu.py`) runs the same cases on the TileLang kernels.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, NamedTuple

import pytest
import torch

import tileprefill as tp

if TYPE_CHECKING:
    from conftest import Oracle

HQ, HKV, D = 8, 2, 64
ROTARY = 32


class CacheViews(NamedTuple):
    """An engine's cache storage and the (blocks, rows, Hkv, D) K and V views of it."""

    storage: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def engine_views(k: torch.Tensor, v: torch.Tensor, layout: str) -> CacheViews:
    """New storage in `layout` holding the values of the contiguous caches k and v, and its views.

    - kv_first: vLLM's FlashAttention layout (2, blocks, rows, Hkv, D): contiguous halves.
    - blocks_2: vLLM's FlashInfer layout (blocks, 2, rows, Hkv, D): K and V of a block side by side.
    - hnd: FlashInfer's HND (2, blocks, Hkv, rows, D): one head's rows side by side.
    - packed_hnd: vLLM's (blocks, Hkv, rows, 2 * D): K and V halves of each row, heads first.
    """
    match layout:
        case "kv_first":
            storage = torch.stack([k, v])
            return CacheViews(storage, storage[0], storage[1])
        case "blocks_2":
            storage = torch.stack([k, v], dim=1)
            return CacheViews(storage, storage[:, 0], storage[:, 1])
        case "hnd":
            storage = torch.stack([k, v]).transpose(2, 3).contiguous()
            return CacheViews(storage, storage[0].transpose(1, 2), storage[1].transpose(1, 2))
        case "packed_hnd":
            storage = torch.cat([k, v], dim=-1).transpose(1, 2).contiguous()
            d = k.shape[-1]
            return CacheViews(storage, storage[..., :d].transpose(1, 2), storage[..., d:].transpose(1, 2))
    raise ValueError(f"layout: expected one of {ENGINE_LAYOUTS}, got {layout!r}")


ENGINE_LAYOUTS = ("kv_first", "blocks_2", "hnd", "packed_hnd")
#: The layouts whose K view is not contiguous (those the Ops rejected before cache views).
STRIDED_LAYOUTS = ("blocks_2", "hnd", "packed_hnd")


class PagedCase(NamedTuple):
    q: torch.Tensor
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    lengths: torch.Tensor
    cu_q: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor


def paged_case(oracle: Oracle, gen: torch.Generator, page_size: int, device: torch.device) -> PagedCase:
    """Random contiguous pages with room to append: q_lens with an empty and a one-token chunk."""
    q_lens, cache_lens = [9, 0, 14, 1], [0, 6, 21, 16]
    totals = [c + n for c, n in zip(cache_lens, q_lens, strict=True)]
    layout = oracle.paged_layout(
        totals, page_size, random.Random(int(torch.randint(1 << 30, (1,), generator=gen)))
    )
    pages = (layout.num_pages, page_size, HKV, D)
    tq = sum(q_lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)

    cos, sin = oracle.rope_tables(max(totals), ROTARY)
    return PagedCase(
        randn(tq, HQ, D),
        randn(tq, HKV, D),
        randn(tq, HKV, D),
        randn(*pages),
        randn(*pages),
        layout.block_table.to(device),
        torch.tensor(cache_lens, dtype=torch.int32, device=device),
        oracle.cumulative(q_lens).to(device),
        cos.to(device),
        sin.to(device),
    )


def run_paged(kind: str, case: PagedCase, k_pages: torch.Tensor, v_pages: torch.Tensor) -> torch.Tensor:
    """One paged Op of `kind` over the given cache tensors (read: over the cached keys, plus the
    appended ones' room, as kv_seqlens)."""
    c = case
    match kind:
        case "read":
            lens = c.lengths + (c.cu_q[1:] - c.cu_q[:-1])
            return tp.GQAPagedCachePrefill()(c.q, k_pages, v_pages, c.block_table, lens, c.cu_q)
        case "append":
            return tp.GQAPagedCacheAppendPrefill()(
                c.q, c.k_new, c.v_new, k_pages, v_pages, c.block_table, c.lengths, c.cu_q
            )
        case "rope_append":
            op = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, rotary_dim=ROTARY)
            return op(c.q, c.k_new, c.v_new, k_pages, v_pages, c.block_table, c.lengths, c.cu_q, c.cos, c.sin)
    raise ValueError(f"kind: expected read, append or rope_append, got {kind!r}")


def check_paged_views(
    oracle: Oracle, gen: torch.Generator, kind: str, layout: str, page_size: int, device: torch.device
) -> None:
    """The Op on an engine layout's views equals the Op on contiguous copies, output and caches, and
    writes the engine's storage in place."""
    case = paged_case(oracle, gen, page_size, device)
    k_ref, v_ref = case.k_pages.clone(), case.v_pages.clone()
    views = engine_views(case.k_pages, case.v_pages, layout)
    address = views.storage.data_ptr()
    expected = run_paged(kind, case, k_ref, v_ref)
    out = run_paged(kind, case, views.k, views.v)
    assert torch.equal(out, expected), f"{kind} on {layout}: output differs from the contiguous cache's"
    assert views.storage.data_ptr() == address
    assert torch.equal(views.k, k_ref) and torch.equal(views.v, v_ref), f"{kind} on {layout}: caches differ"
    if kind != "read":
        assert not torch.equal(k_ref, case.k_pages), "the append wrote nothing (the test proves nothing)"


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
@pytest.mark.parametrize("kind", ["read", "append", "rope_append"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_ops_read_and_write_engine_views(
    oracle: Oracle, gen: torch.Generator, kind: str, layout: str, page_size: int
) -> None:
    check_paged_views(oracle, gen, kind, layout, page_size, torch.device("cpu"))


def contiguous_case(oracle: Oracle, gen: torch.Generator, device: torch.device) -> tuple[torch.Tensor, ...]:
    """q, k_new, v_new (B, Sq, ...), caches (B, Smax, Hkv, D), cache_seqlens, cos, sin."""
    b, sq, smax = 3, 5, 24

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.bfloat16).to(device)

    cos, sin = (t.to(device) for t in oracle.rope_tables(smax, ROTARY))
    lengths = torch.tensor([0, 7, 19], dtype=torch.int32, device=device)
    return (
        randn(b, sq, HQ, D),
        randn(b, sq, HKV, D),
        randn(b, sq, HKV, D),
        randn(b, smax, HKV, D),
        randn(b, smax, HKV, D),
        lengths,
        cos,
        sin,
    )


def check_contiguous_views(oracle: Oracle, gen: torch.Generator, layout: str, device: torch.device) -> None:
    """A contiguous cache (B, Smax, Hkv, D) in an engine layout: read, then RoPE + append."""
    q, k_new, v_new, k_cache, v_cache, lengths, cos, sin = contiguous_case(oracle, gen, device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    views = engine_views(k_cache, v_cache, layout)
    read = tp.GQAContiguousCachePrefill()
    kv_lens = lengths + q.shape[1]
    assert torch.equal(read(q, views.k, views.v, kv_lens), read(q, k_ref, v_ref, kv_lens)), layout
    op = tp.GQAContiguousCacheRopeAppendPrefill(rope=tp.RopeMode.INTERLEAVED, rotary_dim=ROTARY)
    expected = op(q, k_new, v_new, k_ref, v_ref, lengths, cos, sin)
    out = op(q, k_new, v_new, views.k, views.v, lengths, cos, sin)
    assert torch.equal(out, expected), f"rope append on {layout}: output differs"
    assert torch.equal(views.k, k_ref) and torch.equal(views.v, v_ref), (
        f"rope append on {layout}: caches differ"
    )


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
def test_contiguous_cache_ops_read_and_write_engine_views(
    oracle: Oracle, gen: torch.Generator, layout: str
) -> None:
    check_contiguous_views(oracle, gen, layout, torch.device("cpu"))


def check_slot_append_views(gen: torch.Generator, layout: str, device: torch.device) -> None:
    """vLLM's reshape_and_cache_flash into an engine layout's views, -1 slots skipped."""
    num_pages, page_size, tokens = 6, 4, 9
    pages = [
        torch.randn(num_pages, page_size, HKV, D, generator=gen).to(torch.bfloat16).to(device) for _ in "kv"
    ]
    k_new, v_new = (torch.randn(tokens, HKV, D, generator=gen).to(torch.bfloat16).to(device) for _ in "kv")
    slots = torch.randperm(num_pages * page_size, generator=gen)[:tokens]
    slots[3] = -1
    slot_mapping = slots.to(device)
    k_ref, v_ref = pages[0].clone(), pages[1].clone()
    views = engine_views(pages[0], pages[1], layout)
    tp.PagedCacheSlotAppend()(k_new, v_new, k_ref, v_ref, slot_mapping)
    tp.PagedCacheSlotAppend()(k_new, v_new, views.k, views.v, slot_mapping)
    assert torch.equal(views.k, k_ref) and torch.equal(views.v, v_ref), f"slot append on {layout}"
    assert not torch.equal(k_ref, pages[0]), "the slot append wrote nothing"


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
def test_slot_append_writes_engine_views(gen: torch.Generator, layout: str) -> None:
    check_slot_append_views(gen, layout, torch.device("cpu"))


def test_the_cache_order_is_a_fact_of_the_plan(oracle: Oracle, gen: torch.Generator) -> None:
    """The one-shot call reads the order from k_pages; a plan states it in its shape, and a run on
    caches of the other order is refused, naming the argument."""
    case = paged_case(oracle, gen, 16, torch.device("cpu"))
    hnd = engine_views(case.k_pages, case.v_pages, "hnd")
    nhd = engine_views(case.k_pages, case.v_pages, "blocks_2")
    lens = case.lengths + (case.cu_q[1:] - case.cu_q[:-1])
    op = tp.GQAPagedCachePrefill()

    def shape(order: tp.KVOrder) -> tp.PagedShape:
        return tp.PagedShape(case.q.shape[0], 16, HQ, HKV, D, torch.bfloat16, case.q.device, kv_order=order)

    plan = op.plan(case.block_table, lens, case.cu_q, shape=shape(tp.KVOrder.HND))
    assert "kv_order=HND" in str(plan.explain())
    assert torch.equal(
        plan.run(case.q, hnd.k, hnd.v), op(case.q, nhd.k, nhd.v, case.block_table, lens, case.cu_q)
    )
    with pytest.raises(ValueError, match=r"k_pages: expected a HND cache .*got a NHD one"):
        plan.run(case.q, nhd.k, nhd.v)
    nhd_plan = op.plan(case.block_table, lens, case.cu_q, shape=shape(tp.KVOrder.NHD))
    with pytest.raises(ValueError, match=r"k_pages: expected a NHD cache .*got a HND one"):
        nhd_plan.run(case.q, hnd.k, hnd.v)


def rejected_views(k: torch.Tensor, v: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """Cache pairs no kernel can take as they are, with the error each must raise."""
    blocks, rows, heads, d = k.shape
    padded = torch.zeros(blocks, rows, heads, d + 4, dtype=k.dtype)[..., :d]
    return {
        "head dim not contiguous": (
            k.transpose(2, 3).contiguous().transpose(2, 3),
            v,
            r"k_pages: expected the last dim \(D\) contiguous",
        ),
        "rows not 16-byte aligned": (
            padded.copy_(k),
            v,
            r"k_pages: expected every stride a multiple of 16 bytes",
        ),
        "overlapping": (
            k[:1].expand(blocks, -1, -1, -1),
            v,
            r"k_pages: expected a view whose elements do not overlap",
        ),
        "K and V strides differ": (
            k,
            engine_views(k, v, "blocks_2").v,
            r"v_pages: expected the strides of k_pages",
        ),
    }


@pytest.mark.parametrize(
    "name", ["head dim not contiguous", "rows not 16-byte aligned", "overlapping", "K and V strides differ"]
)
def test_rejected_cache_views_change_nothing(oracle: Oracle, gen: torch.Generator, name: str) -> None:
    case = paged_case(oracle, gen, 16, torch.device("cpu"))
    k_pages, v_pages, error = rejected_views(case.k_pages, case.v_pages)[name]
    k_before, v_before = k_pages.clone(), v_pages.clone()
    with pytest.raises(ValueError, match=error):
        run_paged("append", case, k_pages, v_pages)
    assert torch.equal(k_pages, k_before) and torch.equal(v_pages, v_before), f"{name}: a rejected call wrote"


def test_slot_append_refuses_k_and_v_views_that_share_elements(gen: torch.Generator) -> None:
    """Interleaved K and V views of one storage pass (no shared element); views one row apart do not."""
    storage = torch.randn(6, 5, HKV, D, generator=gen).to(torch.bfloat16)
    k_pages, v_pages = storage[:, :4], storage[:, 1:]
    k_new, v_new = (torch.randn(3, HKV, D, generator=gen).to(torch.bfloat16) for _ in "kv")
    before = storage.clone()
    with pytest.raises(ValueError, match=r"v_pages: expected memory apart from k_pages"):
        tp.PagedCacheSlotAppend()(k_new, v_new, k_pages, v_pages, torch.tensor([0, 5, 9]))
    assert torch.equal(storage, before)


@pytest.mark.parametrize(
    ("head_dim", "padded_to", "vector_bytes"), [(128, 132, 16), (36, 38, 8), (72, 76, 16), (6, 7, 4)]
)
def test_cache_strides_follow_the_widest_vector_of_a_row(
    head_dim: int, padded_to: int, vector_bytes: int
) -> None:
    """A contiguous cache of any head dim passes; a row padded off the row's widest vector (16 bytes,
    or less where D is not a multiple of 8 elements: the programs then move narrower vectors) does not."""
    from tileprefill.validation import view_problem

    assert view_problem(torch.zeros(3, 5, 2, head_dim, dtype=torch.float16)) is None
    padded = torch.zeros(3, 5, 2, padded_to, dtype=torch.float16)[..., :head_dim]
    problem = view_problem(padded)
    assert problem is not None and f"a multiple of {vector_bytes} bytes" in problem, problem


@pytest.mark.parametrize("kind", ["append", "rope_append"])
def test_append_refuses_k_and_v_views_that_share_elements(
    oracle: Oracle, gen: torch.Generator, kind: str
) -> None:
    """K and V views one row apart in one storage: the append would write each over the other.
    Refused before any write; a read-only call over the same views is not an append and runs."""
    case = paged_case(oracle, gen, 16, torch.device("cpu"))
    blocks, rows, heads, d = case.k_pages.shape
    storage = torch.randn(blocks, rows + 1, heads, d, generator=gen).to(torch.bfloat16)
    k_pages, v_pages = storage[:, :rows], storage[:, 1:]
    before = storage.clone()
    with pytest.raises(ValueError, match=r"v_pages: expected memory apart from k_pages"):
        run_paged(kind, case, k_pages, v_pages)
    assert torch.equal(storage, before), f"{kind}: a rejected call wrote"
    run_paged("read", case, k_pages, v_pages)


def test_append_refuses_a_cache_that_shares_memory_with_the_new_rows(
    oracle: Oracle, gen: torch.Generator
) -> None:
    """New keys read from the pages they are written into: refused, nothing written."""
    case = paged_case(oracle, gen, 16, torch.device("cpu"))
    k_pages = case.k_pages.clone()
    k_new = k_pages.view(-1, *k_pages.shape[2:])[: case.k_new.shape[0]]
    before = k_pages.clone()
    with pytest.raises(ValueError, match=r"k_pages: expected memory apart from k_new"):
        tp.GQAPagedCacheAppendPrefill()(
            case.q, k_new, case.v_new, k_pages, case.v_pages, case.block_table, case.lengths, case.cu_q
        )
    assert torch.equal(k_pages, before), "a rejected call wrote"
