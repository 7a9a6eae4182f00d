"""Every public Op on CPU against the float64 oracle of conftest.py, and the Op machinery.

Fresh random inputs every run (the seed is printed, pytest shows it on failure).
Cache slots and pages an Op must not read hold NaN, so reading one shows up in
the output; append Ops are checked on their whole caches, bit for bit outside
the slots they write.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, cast

import pytest
import torch

import tileprefill as tp
from tileprefill.kernels.base import (
    ContiguousAppendKernel,
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    PagedAppendKernel,
    PagedAttentionKernel,
    RopeKernel,
)
from tileprefill.kernels.reference import AttentionPagedRefKernel, AttentionRaggedRefKernel
from tileprefill.kernels.registry import kernel_family
from tileprefill.keys import AppendKey, AttentionKey, BatchKey, KernelKey, RopeAppendKey, RopeKey
from tileprefill.ops import PUBLIC_OPS, OpClass
from tileprefill.ops.dense import VarlenShape

if TYPE_CHECKING:
    from conftest import Oracle

GROUPS = [(4, 4), (4, 2), (8, 2), (8, 1)]  # (Hq, Hkv): group sizes 1, 2, 4, 8
ROPE_MODES = [tp.RopeMode.NEOX, tp.RopeMode.INTERLEAVED]


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def assert_close(out: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "output") -> None:
    assert out.shape == expected.shape, f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    assert not torch.isnan(out).any(), f"{what} has NaN: a masked or unused slot was read"
    err = float((out.double() - expected).abs().max()) if out.numel() else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3e} > {atol:.1e}"


# --- layout NONE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv", GROUPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense(
    oracle: Oracle, gen: torch.Generator, hq: int, hkv: int, causal: bool, dtype: torch.dtype
) -> None:
    d = 64
    op = tp.GQAPrefill(causal=causal)
    for s_q, s_kv in ((7, 19), (13, 13), (21, 5)):  # q shorter than, equal to, longer than kv
        q, k, v = (
            randn(gen, 2, s_q, hq, d, dtype=dtype),
            randn(gen, 2, s_kv, hkv, d, dtype=dtype),
            randn(gen, 2, s_kv, hkv, d, dtype=dtype),
        )
        before = [x.clone() for x in (q, k, v)]
        out = op(q, k, v)
        assert out.dtype == dtype
        expected = torch.stack(
            [oracle.attention(q[b], k[b], v[b], causal=causal, scale=d**-0.5) for b in range(2)]
        )
        assert_close(out, expected, oracle.atol(dtype))
        assert all(torch.equal(x, y) for x, y in zip((q, k, v), before, strict=True)), "an input changed"


def test_dense_head_dim_128_and_sm_scale(oracle: Oracle, gen: torch.Generator) -> None:
    q, k, v = randn(gen, 1, 9, 8, 128), randn(gen, 1, 30, 2, 128), randn(gen, 1, 30, 2, 128)
    out = tp.GQAPrefill(sm_scale=0.3)(q, k, v)
    assert_close(out, oracle.attention(q[0], k[0], v[0], causal=True, scale=0.3)[None], oracle.atol(q.dtype))


@pytest.mark.parametrize("hq,hkv", GROUPS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen(oracle: Oracle, gen: torch.Generator, hq: int, hkv: int, causal: bool) -> None:
    d = 64
    q_lens, kv_lens = [5, 0, 17, 3, 8], [9, 4, 17, 0, 3]  # empty q, empty kv, q > kv
    q = randn(gen, sum(q_lens), hq, d)
    k, v = randn(gen, sum(kv_lens), hkv, d), randn(gen, sum(kv_lens), hkv, d)
    cu_q, cu_kv = oracle.cumulative(q_lens), oracle.cumulative(kv_lens)
    out = tp.GQAVarlenPrefill(causal=causal)(q, k, v, cu_q, cu_kv)
    parts = [
        oracle.attention(
            q[cu_q[b] : cu_q[b + 1]],
            k[cu_kv[b] : cu_kv[b + 1]],
            v[cu_kv[b] : cu_kv[b + 1]],
            causal=causal,
            scale=d**-0.5,
        )
        for b in range(len(q_lens))
    ]
    assert_close(out, torch.cat(parts), oracle.atol(q.dtype))
    assert torch.equal(cu_q, oracle.cumulative(q_lens)) and torch.equal(cu_kv, oracle.cumulative(kv_lens))


@pytest.mark.parametrize("mode", ROPE_MODES)
@pytest.mark.parametrize("rotary_dim", [32, 64])
def test_dense_rope(oracle: Oracle, gen: torch.Generator, mode: tp.RopeMode, rotary_dim: int) -> None:
    d, s_q, s_kv = 64, 11, 23
    cos, sin = oracle.rope_tables(40, rotary_dim)
    q, k, v = randn(gen, 2, s_q, 8, d), randn(gen, 2, s_kv, 2, d), randn(gen, 2, s_kv, 2, d)
    before = [x.clone() for x in (q, k, v, cos, sin)]
    out = tp.GQARopePrefill(rope=mode)(q, k, v, cos, sin)
    expected = torch.stack(
        [
            oracle.attention(
                oracle.rope(q[b], range(s_q), cos, sin, mode),
                oracle.rope(k[b], range(s_kv), cos, sin, mode),
                v[b],
                causal=True,
                scale=d**-0.5,
            )
            for b in range(2)
        ]
    )
    assert_close(out, expected, oracle.atol(q.dtype))
    assert all(torch.equal(x, y) for x, y in zip((q, k, v, cos, sin), before, strict=True)), (
        "an input changed"
    )


@pytest.mark.parametrize("mode", ROPE_MODES)
def test_varlen_rope(oracle: Oracle, gen: torch.Generator, mode: tp.RopeMode) -> None:
    d, rotary_dim = 128, 64
    q_lens, kv_lens = [6, 0, 13], [6, 3, 21]
    cos, sin = oracle.rope_tables(32, rotary_dim)
    q = randn(gen, sum(q_lens), 4, d)
    k, v = randn(gen, sum(kv_lens), 2, d), randn(gen, sum(kv_lens), 2, d)
    cu_q, cu_kv = oracle.cumulative(q_lens), oracle.cumulative(kv_lens)
    q_before, k_before = q.clone(), k.clone()
    out = tp.GQAVarlenRopePrefill(rope=mode, rotary_dim=rotary_dim)(q, k, v, cu_q, cu_kv, cos, sin)
    parts = []
    for b, (nq, nkv) in enumerate(zip(q_lens, kv_lens, strict=True)):
        qs, ks = q[cu_q[b] : cu_q[b + 1]], k[cu_kv[b] : cu_kv[b + 1]]
        parts.append(
            oracle.attention(
                oracle.rope(qs, range(nq), cos, sin, mode),
                oracle.rope(ks, range(nkv), cos, sin, mode),
                v[cu_kv[b] : cu_kv[b + 1]],
                causal=True,
                scale=d**-0.5,
            )
        )
    assert_close(out, torch.cat(parts), oracle.atol(q.dtype))
    assert torch.equal(q, q_before) and torch.equal(k, k_before)


# --- contiguous cache ------------------------------------------------------------------------------


def nan_past(cache: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """NaN in every row of sequence b at or past lens[b]: slots an Op must not read."""
    out = cache.clone()
    for b, n in enumerate(lens):
        out[b, n:] = float("nan")
    return out


@pytest.mark.parametrize("hq,hkv", GROUPS)
@pytest.mark.parametrize("causal", [True, False])
def test_contiguous_cache(oracle: Oracle, gen: torch.Generator, hq: int, hkv: int, causal: bool) -> None:
    d, s_max, s_q = 64, 40, 9
    kv_lens = [9, 33, 4, 40]  # 4 < Sq: causal rows with no key are 0
    q = randn(gen, 4, s_q, hq, d)
    k_cache = nan_past(randn(gen, 4, s_max, hkv, d), kv_lens)
    v_cache = nan_past(randn(gen, 4, s_max, hkv, d), kv_lens)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    k_bits = oracle.bits(k_cache).clone()
    out = tp.GQAContiguousCachePrefill(causal=causal)(q, k_cache, v_cache, lens)
    expected = torch.stack(
        [
            oracle.attention(q[b], k_cache[b, :n], v_cache[b, :n], causal=causal, scale=d**-0.5)
            for b, n in enumerate(kv_lens)
        ]
    )
    assert_close(out, expected, oracle.atol(q.dtype))
    assert torch.equal(oracle.bits(k_cache), k_bits), "a read-only Op changed the cache"
    assert lens.tolist() == kv_lens


@pytest.mark.parametrize("mode", [None, *ROPE_MODES])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)])
def test_contiguous_append(
    oracle: Oracle, gen: torch.Generator, mode: tp.RopeMode | None, hq: int, hkv: int
) -> None:
    d, s_max, s_q, rotary_dim = 64, 48, 11, 32
    cache_lens = [0, 5, 37]  # 37 + 11 == S_max: the last sequence fills its cache exactly
    cos, sin = oracle.rope_tables(s_max, rotary_dim)
    q, k_new, v_new = randn(gen, 3, s_q, hq, d), randn(gen, 3, s_q, hkv, d), randn(gen, 3, s_q, hkv, d)
    # Rows to be written hold random values, rows past them NaN.
    k_cache = nan_past(randn(gen, 3, s_max, hkv, d), [n + s_q for n in cache_lens])
    v_cache = nan_past(randn(gen, 3, s_max, hkv, d), [n + s_q for n in cache_lens])
    k_before, v_before = k_cache.clone(), v_cache.clone()
    lens = torch.tensor(cache_lens, dtype=torch.int32)
    if mode is None:
        out = tp.GQAContiguousCacheAppendPrefill()(q, k_new, v_new, k_cache, v_cache, lens)
    else:
        op = tp.GQAContiguousCacheRopeAppendPrefill(rope=mode)
        out = op(q, k_new, v_new, k_cache, v_cache, lens, cos, sin)
    assert lens.tolist() == cache_lens, "the Op changed cache_seqlens"

    expected_out = []
    for b, c in enumerate(cache_lens):
        positions = range(c, c + s_q)
        q_b = q[b] if mode is None else oracle.rope(q[b], positions, cos, sin, mode)
        k_b = k_new[b].double() if mode is None else oracle.rope(k_new[b], positions, cos, sin, mode)
        keys = torch.cat([k_before[b, :c].double(), k_b])
        values = torch.cat([v_before[b, :c].double(), v_new[b].double()])
        expected_out.append(oracle.attention(q_b, keys, values, causal=True, scale=d**-0.5))
        # The written rows: the (rotated) new keys and the new values.
        assert_close(k_cache[b, c : c + s_q], k_b, 3e-2, what=f"k_cache[{b}] new rows")
        assert torch.equal(v_cache[b, c : c + s_q], v_new[b]), f"v_cache[{b}] new rows"
        if mode is None:
            assert torch.equal(k_cache[b, c : c + s_q], k_new[b]), f"k_cache[{b}] new rows"
        # Every other row is unchanged, bit for bit (NaN included).
        k_cache[b, c : c + s_q] = k_before[b, c : c + s_q]
        v_cache[b, c : c + s_q] = v_before[b, c : c + s_q]
    assert_close(out, torch.stack(expected_out), oracle.atol(q.dtype))
    assert torch.equal(oracle.bits(k_cache), oracle.bits(k_before)), "k_cache changed outside the new rows"
    assert torch.equal(oracle.bits(v_cache), oracle.bits(v_before)), "v_cache changed outside the new rows"


# --- paged cache -----------------------------------------------------------------------------------


def paged_from_sequences(
    oracle: Oracle,
    seqs: list[torch.Tensor],
    layout_pages: tuple[tuple[int, ...], ...],
    num_pages: int,
    page_size: int,
) -> torch.Tensor:
    """Pages holding seqs[b] (n_b, Hkv, D) at the positions of sequence b, NaN everywhere else."""
    _, hkv, d = seqs[0].shape
    pages = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=seqs[0].dtype)
    for seq, own in zip(seqs, layout_pages, strict=True):
        for p in range(seq.shape[0]):
            pages[own[p // page_size], p % page_size] = seq[p]
    return pages


def gather_sequence(pages: torch.Tensor, own: tuple[int, ...], n: int) -> torch.Tensor:
    page_size = pages.shape[1]
    return torch.stack([pages[own[p // page_size], p % page_size] for p in range(n)]) if n else pages[:0, 0]


@pytest.mark.parametrize("page_size", [1, 7, 16])
@pytest.mark.parametrize("hq,hkv", GROUPS)
def test_paged_cache(oracle: Oracle, gen: torch.Generator, page_size: int, hq: int, hkv: int) -> None:
    d = 64 if hq != 8 or hkv != 1 else 128
    q_lens, kv_lens = [6, 0, 11, 4], [6, 13, 30, 2]  # an empty query chunk; q_len > kv_len
    layout = oracle.paged_layout(
        kv_lens, page_size, random.Random(int(torch.randint(1 << 30, (1,), generator=gen)))
    )
    keys = [randn(gen, n, hkv, d) for n in kv_lens]
    values = [randn(gen, n, hkv, d) for n in kv_lens]
    k_pages = paged_from_sequences(oracle, keys, layout.pages, layout.num_pages, page_size)
    v_pages = paged_from_sequences(oracle, values, layout.pages, layout.num_pages, page_size)
    q = randn(gen, sum(q_lens), hq, d)
    cu_q = oracle.cumulative(q_lens)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    out = tp.GQAPagedCachePrefill()(q, k_pages, v_pages, layout.block_table, lens, cu_q)
    expected = torch.cat(
        [
            oracle.attention(q[cu_q[b] : cu_q[b + 1]], keys[b], values[b], causal=True, scale=d**-0.5)
            for b in range(len(q_lens))
        ]
    )
    assert_close(out, expected, oracle.atol(q.dtype))


@pytest.mark.parametrize("page_size", [1, 7, 16])
@pytest.mark.parametrize("mode", [None, *ROPE_MODES])
def test_paged_append(oracle: Oracle, gen: torch.Generator, page_size: int, mode: tp.RopeMode | None) -> None:
    d, hq, hkv, rotary_dim = 64, 8, 2, 48
    q_lens, cache_lens = [9, 0, 14, 1], [0, 6, 21, 16]
    totals = [c + n for c, n in zip(cache_lens, q_lens, strict=True)]
    layout = oracle.paged_layout(
        totals, page_size, random.Random(int(torch.randint(1 << 30, (1,), generator=gen)))
    )
    cos, sin = oracle.rope_tables(max(totals), rotary_dim)
    # Cached keys are random; the slots the new keys go to hold random garbage; the rest NaN.
    old_keys = [randn(gen, n, hkv, d) for n in totals]
    old_values = [randn(gen, n, hkv, d) for n in totals]
    k_pages = paged_from_sequences(oracle, old_keys, layout.pages, layout.num_pages, page_size)
    v_pages = paged_from_sequences(oracle, old_values, layout.pages, layout.num_pages, page_size)
    k_before, v_before = k_pages.clone(), v_pages.clone()
    tq = sum(q_lens)
    q, k_new, v_new = randn(gen, tq, hq, d), randn(gen, tq, hkv, d), randn(gen, tq, hkv, d)
    cu_q = oracle.cumulative(q_lens)
    lens = torch.tensor(cache_lens, dtype=torch.int32)
    table_before = layout.block_table.clone()
    if mode is None:
        out = tp.GQAPagedCacheAppendPrefill()(
            q, k_new, v_new, k_pages, v_pages, layout.block_table, lens, cu_q
        )
    else:
        op = tp.GQAPagedCacheRopeAppendPrefill(rope=mode, rotary_dim=rotary_dim)
        out = op(q, k_new, v_new, k_pages, v_pages, layout.block_table, lens, cu_q, cos, sin)
    assert lens.tolist() == cache_lens and torch.equal(layout.block_table, table_before)

    expected_out = []
    for b, (c, n) in enumerate(zip(cache_lens, q_lens, strict=True)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        positions = range(c, c + n)
        q_b = q[rows] if mode is None else oracle.rope(q[rows], positions, cos, sin, mode)
        k_b = k_new[rows].double() if mode is None else oracle.rope(k_new[rows], positions, cos, sin, mode)
        keys = torch.cat([old_keys[b][:c].double(), k_b])
        values = torch.cat([old_values[b][:c].double(), v_new[rows].double()])
        expected_out.append(oracle.attention(q_b, keys, values, causal=True, scale=d**-0.5))
        # Rotated keys land at positions cache_seqlens[b] + i of the sequence's pages.
        written_k = gather_sequence(k_pages, layout.pages[b], c + n)[c:]
        written_v = gather_sequence(v_pages, layout.pages[b], c + n)[c:]
        assert_close(written_k, k_b, 3e-2, what=f"sequence {b} appended keys")
        assert torch.equal(written_v, v_new[rows]), f"sequence {b} appended values"
        if mode is None:
            assert torch.equal(written_k, k_new[rows]), f"sequence {b} appended keys"
        for p in positions:  # restore the written slots, then everything must equal the original
            page, row = layout.pages[b][p // page_size], p % page_size
            k_pages[page, row] = k_before[page, row]
            v_pages[page, row] = v_before[page, row]
    assert_close(out, torch.cat(expected_out), oracle.atol(q.dtype))
    assert torch.equal(oracle.bits(k_pages), oracle.bits(k_before)), "k_pages changed outside the new slots"
    assert torch.equal(oracle.bits(v_pages), oracle.bits(v_before)), "v_pages changed outside the new slots"


# --- plans, explanations and kernel maps -----------------------------------------------------------


EXPECTED_CPU_PLANS: dict[str, tuple[KernelKey, ...]] = {
    "GQAPrefill": (AttentionKey.DENSE_REF,),
    "GQAVarlenPrefill": (AttentionKey.RAGGED_REF,),
    "GQARopePrefill": (RopeKey.NEOX_REF, AttentionKey.DENSE_REF),
    "GQAVarlenRopePrefill": (RopeKey.NEOX_REF, AttentionKey.RAGGED_REF),
    "GQAContiguousCachePrefill": (AttentionKey.CONTIGUOUS_REF,),
    "GQAContiguousCacheAppendPrefill": (AppendKey.CONTIGUOUS_REF, AttentionKey.CONTIGUOUS_REF),
    "GQAContiguousCacheRopeAppendPrefill": (
        RopeKey.NEOX_REF,
        AppendKey.CONTIGUOUS_REF,
        AttentionKey.CONTIGUOUS_REF,
    ),
    "GQAPagedCachePrefill": (AttentionKey.PAGED_REF,),
    "GQAPagedCacheAppendPrefill": (BatchKey.PAGED_REF, AppendKey.PAGED_REF, AttentionKey.PAGED_REF),
    "GQAPagedCacheRopeAppendPrefill": (
        BatchKey.PAGED_REF,
        RopeKey.NEOX_REF,
        AppendKey.PAGED_REF,
        AttentionKey.PAGED_REF,
    ),
}


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_plan_for_and_explain_on_cpu(oracle: Oracle, op_cls: OpClass, gen: torch.Generator) -> None:
    op = oracle.make_op(op_cls)
    inputs = oracle.inputs(op_cls, gen)
    batch_plan = oracle.plan_of(op, op_cls, inputs)
    assert batch_plan.steps == EXPECTED_CPU_PLANS[op_cls.__name__]
    plan = batch_plan.plan
    explanation = batch_plan.explain()
    assert explanation.plan == plan
    assert explanation.context.arch is tp.Arch.CPU and explanation.context.kv_layout is op_cls.kv_layout
    assert explanation.rejected and all(r.reasons for r in explanation.rejected)
    out = op(*inputs)
    assert out.shape == inputs[0].shape and out.dtype == torch.float16


def _cloned(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in inputs]


def _run_into(plan: tp.BatchPlan[Any], out: torch.Tensor, tensors: Sequence[torch.Tensor]) -> object:
    """`plan.run_into(out, *tensors)` of a plan of any Op (each plan class names its own tensors)."""
    return cast(Any, plan).run_into(out, *tensors)


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_run_into_writes_the_callers_output(oracle: Oracle, op_cls: OpClass, gen: torch.Generator) -> None:
    """`plan.run_into(out, ...)` writes what `op(...)` returns into `out` (and the same caches)."""
    op = oracle.make_op(op_cls)
    inputs = oracle.inputs(op_cls, gen)
    expected_inputs, into_inputs = _cloned(inputs), _cloned(inputs)
    expected = op(*expected_inputs)
    named = {s.name: t for s, t in zip(op_cls.input_specs, into_inputs, strict=True)}
    plan = oracle.plan_of(op, op_cls, into_inputs)
    out = torch.full_like(expected, float("nan"))
    returned = _run_into(plan, out, [named[s.name] for s in op_cls.run_specs])
    assert returned is out
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for before, after in zip(expected_inputs, into_inputs, strict=True):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


def _bad_outs(q: torch.Tensor) -> list[tuple[str, torch.Tensor, str]]:
    # Rows 4 elements (8 bytes) longer than D: a view whose rows are not 16-byte aligned.
    padded = torch.empty(*q.shape[:-1], q.shape[-1] + 4, dtype=q.dtype)
    return [
        ("dtype", torch.empty_like(q, dtype=torch.float32), "expected dtype torch.float16"),
        ("shape", torch.empty(1, *q.shape, dtype=q.dtype), "expected shape"),
        ("misaligned rows", padded[..., : q.shape[-1]], r"out: expected every stride a multiple of 16 bytes"),
        ("q itself", q, "memory shared with q"),
    ]


@pytest.mark.parametrize("case", range(4), ids=["dtype", "shape", "misaligned rows", "q itself"])
@pytest.mark.parametrize(
    "op_cls", [tp.GQAPrefill, tp.GQAPagedCacheRopeAppendPrefill], ids=lambda c: c.__name__
)
def test_run_into_rejects_a_bad_output(
    oracle: Oracle, op_cls: OpClass, gen: torch.Generator, case: int
) -> None:
    """A bad `out` is named, with the expected and actual value, before anything is written."""
    op = oracle.make_op(op_cls)
    inputs = oracle.inputs(op_cls, gen)
    named = {s.name: t for s, t in zip(op_cls.input_specs, inputs, strict=True)}
    plan = oracle.plan_of(op, op_cls, inputs)
    before = _cloned(inputs)
    _, out, message = _bad_outs(named["q"])[case]
    with pytest.raises((ValueError, TypeError), match=message):
        _run_into(plan, out, [named[s.name] for s in op_cls.run_specs])
    for old, new in zip(before, inputs, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)


def test_interleaved_plan(oracle: Oracle, gen: torch.Generator) -> None:
    op = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.INTERLEAVED)
    inputs = oracle.inputs(tp.GQAPagedCacheRopeAppendPrefill, gen)
    plan = oracle.plan_of(op, tp.GQAPagedCacheRopeAppendPrefill, inputs)
    assert plan.steps == (
        BatchKey.PAGED_REF,
        RopeKey.INTERLEAVED_REF,
        AppendKey.PAGED_REF,
        AttentionKey.PAGED_REF,
    )


ATTENTION_REF = {
    AttentionKey.DENSE_REF,
    AttentionKey.RAGGED_REF,
    AttentionKey.CONTIGUOUS_REF,
    AttentionKey.PAGED_REF,
}
ALL_ROPE: set[KernelKey] = set(RopeKey)
ROPE_APPEND: set[KernelKey] = set(RopeAppendKey)
PAGED_BATCH: set[KernelKey] = set(BatchKey)
PAGED_ATTENTION: set[KernelKey] = {
    AttentionKey.PAGED_REF,
    AttentionKey.PAGED_SM80,
    AttentionKey.PAGED_SM90,
    AttentionKey.PAGED_TILED_SM80,
    AttentionKey.PAGED_TILED_SM90,
}
CONTIGUOUS_ATTENTION: set[KernelKey] = {
    AttentionKey.CONTIGUOUS_REF,
    AttentionKey.CONTIGUOUS_SM80,
    AttentionKey.CONTIGUOUS_SM90,
}
EXPECTED_KEYS: dict[str, set[KernelKey]] = {
    "GQAPrefill": {AttentionKey.DENSE_REF, AttentionKey.DENSE_SM80, AttentionKey.DENSE_SM90},
    "GQAVarlenPrefill": {AttentionKey.RAGGED_REF, AttentionKey.RAGGED_SM80, AttentionKey.RAGGED_SM90},
    "GQARopePrefill": ALL_ROPE | {AttentionKey.DENSE_REF, AttentionKey.DENSE_SM80, AttentionKey.DENSE_SM90},
    "GQAVarlenRopePrefill": ALL_ROPE
    | {AttentionKey.RAGGED_REF, AttentionKey.RAGGED_SM80, AttentionKey.RAGGED_SM90},
    "GQAContiguousCachePrefill": CONTIGUOUS_ATTENTION,
    "GQAContiguousCacheAppendPrefill": {AppendKey.CONTIGUOUS_REF, AppendKey.CONTIGUOUS_TL}
    | CONTIGUOUS_ATTENTION,
    "GQAContiguousCacheRopeAppendPrefill": ALL_ROPE
    | ROPE_APPEND
    | {AppendKey.CONTIGUOUS_REF, AppendKey.CONTIGUOUS_TL}
    | CONTIGUOUS_ATTENTION,
    "GQAPagedCachePrefill": PAGED_ATTENTION,
    "GQAPagedCacheAppendPrefill": PAGED_BATCH | {AppendKey.PAGED_REF, AppendKey.PAGED_TL} | PAGED_ATTENTION,
    "GQAPagedCacheRopeAppendPrefill": PAGED_BATCH
    | ALL_ROPE
    | ROPE_APPEND
    | {AppendKey.PAGED_REF, AppendKey.PAGED_TL}
    | PAGED_ATTENTION,
}


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_default_kernel_map(oracle: Oracle, op_cls: OpClass) -> None:
    keys = op_cls.kernel_keys
    assert set(keys) == EXPECTED_KEYS[op_cls.__name__]
    default = op_cls.default_kernel_map
    assert set(default) <= set(keys)
    assert set(default) >= set(keys) & (
        ATTENTION_REF
        | {RopeKey.NEOX_REF, RopeKey.INTERLEAVED_REF}
        | {AppendKey.PAGED_REF, AppendKey.CONTIGUOUS_REF}
    ), "a reference kernel is missing"
    for key, cls in default.items():
        assert cls.key is key and issubclass(cls, kernel_family(key))
    op = oracle.make_op(op_cls)
    assert dict(op.kernel_map) == dict(default)


def test_kernel_map_override_is_used(oracle: Oracle, gen: torch.Generator) -> None:
    calls: list[int] = []

    class CountingPaged(AttentionPagedRefKernel):
        def __call__(
            self,
            q: torch.Tensor,
            k_pages: torch.Tensor,
            v_pages: torch.Tensor,
            block_table: torch.Tensor,
            kv_seqlens: torch.Tensor,
            cu_seqlens_q: torch.Tensor,
            *,
            causal: bool,
            sm_scale: float,
            window: int = 0,
            softcap: float = 0.0,
        ) -> torch.Tensor:
            calls.append(int(kv_seqlens.sum()))
            return super().__call__(
                q,
                k_pages,
                v_pages,
                block_table,
                kv_seqlens,
                cu_seqlens_q,
                causal=causal,
                sm_scale=sm_scale,
                window=window,
                softcap=softcap,
            )

    op = tp.GQAPagedCacheAppendPrefill(kernel_map={AttentionKey.PAGED_REF: CountingPaged})
    assert op.kernel_map[AttentionKey.PAGED_REF] is CountingPaged
    assert tp.GQAPagedCacheAppendPrefill.default_kernel_map[AttentionKey.PAGED_REF] is AttentionPagedRefKernel
    oracle.make_op(tp.GQAPagedCacheAppendPrefill, kernel_map={AttentionKey.PAGED_REF: CountingPaged})(
        *oracle.inputs(tp.GQAPagedCacheAppendPrefill, gen)
    )
    assert calls == [3 + 7 + 2 + 3], "the override did not run, or saw the wrong kv lengths"


class DenseImpostor(DenseAttentionKernel):
    """Claims the paged reference key but implements the dense family."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_REF

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        raise AssertionError("never called")


@pytest.mark.parametrize(
    "kernel_map,error,words",
    [
        (
            {AttentionKey.DENSE_REF: AttentionPagedRefKernel},
            ValueError,
            ["attn_dense_ref", "expected one of"],
        ),
        (
            {AttentionKey.PAGED_REF: AttentionRaggedRefKernel},
            ValueError,
            ["kernel_map[attn_paged_ref]", "AttentionRaggedRefKernel", "attn_ragged_ref"],
        ),
        (
            {AttentionKey.PAGED_REF: DenseImpostor},
            TypeError,
            ["kernel_map[attn_paged_ref]", "PagedAttentionKernel", "DenseImpostor"],
        ),
        (
            {AttentionKey.PAGED_REF: AttentionPagedRefKernel()},
            TypeError,
            ["kernel_map[attn_paged_ref]", "PagedAttentionKernel"],
        ),
        ({"attn_paged_ref": AttentionPagedRefKernel}, TypeError, ["kernel_map", "'attn_paged_ref'"]),
    ],
)
def test_kernel_map_override_rejected(
    kernel_map: dict[object, object], error: type[Exception], words: list[str]
) -> None:
    with pytest.raises(error) as raised:
        tp.GQAPagedCachePrefill(kernel_map=kernel_map)  # type: ignore[arg-type]
    for word in words:
        assert word in str(raised.value), f"{word!r} not in {raised.value}"


def test_missing_kernel_class_is_named(oracle: Oracle, gen: torch.Generator) -> None:
    """A plan step with no registered class fails with the key's name (CPU plans always have one)."""
    op = tp.GQAPrefill()
    op._kernels.pop(AttentionKey.DENSE_REF.value)
    with pytest.raises(LookupError, match="attn_dense_ref"):
        op(*oracle.inputs(tp.GQAPrefill, gen))


# --- torch.compile: the validate=False call path is one graph --------------------------------------


class TracedRope(RopeKernel):
    """NEOX RoPE in pure tensor ops (the reference kernels read lengths on the host; these do not)."""

    key: ClassVar[RopeKey] = RopeKey.NEOX_REF

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        half = cos.shape[1]
        c, s = cos[positions.long()][:, None, :], sin[positions.long()][:, None, :]
        x1, x2 = x[..., :half].float(), x[..., half : 2 * half].float()
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half :].float()], dim=-1).to(x.dtype)


class TracedPagedAppend(PagedAppendKernel):
    key: ClassVar[AppendKey] = AppendKey.PAGED_REF

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> None:
        page_size = k_pages.shape[1]
        tokens = torch.arange(k_new.shape[0])
        seq = torch.searchsorted(cu_seqlens_q[1:], tokens.int(), right=True).long()
        pos = cache_seqlens.long()[seq] + tokens - cu_seqlens_q.long()[seq]
        page = block_table.long()[seq, pos // page_size]
        k_pages[page, pos % page_size] = k_new
        v_pages[page, pos % page_size] = v_new


class TracedPagedAttention(PagedAttentionKernel):
    """Per token: every key position of its sequence gathered through the block table, masked."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_REF

    def __call__(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        t, hq, _ = q.shape
        page_size, hkv = k_pages.shape[1], k_pages.shape[2]
        tokens = torch.arange(t)
        seq = torch.searchsorted(cu_seqlens_q[1:], tokens.int(), right=True).long()
        i = tokens - cu_seqlens_q.long()[seq]
        q_len = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[seq]
        kv_len = kv_seqlens.long()[seq]
        pos = torch.arange(block_table.shape[1] * page_size)
        pages = block_table.long()[seq][:, pos // page_size].clamp_min(0)  # (T, L); masked where unused
        keys = k_pages[pages, pos % page_size].float().repeat_interleave(hq // hkv, dim=2)  # (T, L, Hq, D)
        values = v_pages[pages, pos % page_size].float().repeat_interleave(hq // hkv, dim=2)
        visible = pos[None, :] < kv_len[:, None]
        if causal:
            visible &= pos[None, :] <= (kv_len - q_len + i)[:, None]
        scores = torch.einsum("thd,tlhd->thl", q.float(), keys.nan_to_num()) * sm_scale
        scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return torch.einsum("thl,tlhd->thd", weights, values.nan_to_num()).to(q.dtype)


class TracedContiguousAppend(ContiguousAppendKernel):
    key: ClassVar[AppendKey] = AppendKey.CONTIGUOUS_REF

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> None:
        b, s = k_new.shape[:2]
        rows = cache_seqlens.long()[:, None] + torch.arange(s)[None, :]
        batch = torch.arange(b)[:, None].expand(b, s)
        k_cache[batch, rows] = k_new
        v_cache[batch, rows] = v_new


class TracedContiguousAttention(ContiguousAttentionKernel):
    key: ClassVar[AttentionKey] = AttentionKey.CONTIGUOUS_REF

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        _, s_q, hq, _ = q.shape
        s_max, hkv = k_cache.shape[1], k_cache.shape[2]
        keys = k_cache.float().repeat_interleave(hq // hkv, dim=2).nan_to_num()
        values = v_cache.float().repeat_interleave(hq // hkv, dim=2).nan_to_num()
        pos = torch.arange(s_max)
        kv_len = kv_seqlens.long()[:, None, None]
        visible = pos[None, None, :] < kv_len
        if causal:
            visible = visible & (pos[None, None, :] <= kv_len - s_q + torch.arange(s_q)[None, :, None])
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys) * sm_scale
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        return torch.einsum("bhqk,bkhd->bqhd", weights, values).to(q.dtype)


def test_paged_rope_append_traces_as_one_graph(oracle: Oracle, gen: torch.Generator) -> None:
    """validate=False: no host sync, no data-dependent branch between kernels (fullgraph=True)."""
    traced = tp.GQAPagedCacheRopeAppendPrefill(
        rope=tp.RopeMode.NEOX,
        validate=False,
        kernel_map={
            RopeKey.NEOX_REF: TracedRope,
            AppendKey.PAGED_REF: TracedPagedAppend,
            AttentionKey.PAGED_REF: TracedPagedAttention,
        },
    )
    inputs = oracle.inputs(tp.GQAPagedCacheRopeAppendPrefill, gen)
    compiled_inputs = [x.clone() for x in inputs]
    reference_inputs = [x.clone() for x in inputs]
    # dynamic=True: sizes are symbolic; the plan must still see concrete head dim and page size.
    out = torch.compile(traced, fullgraph=True, backend="eager", dynamic=True)(*compiled_inputs)
    expected = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX)(*reference_inputs)
    assert (out.float() - expected.float()).abs().max() < 1e-2
    assert torch.equal(compiled_inputs[3], reference_inputs[3]) and torch.equal(
        compiled_inputs[4], reference_inputs[4]
    )


def test_contiguous_rope_append_traces_as_one_graph(oracle: Oracle, gen: torch.Generator) -> None:
    traced = tp.GQAContiguousCacheRopeAppendPrefill(
        rope=tp.RopeMode.NEOX,
        validate=False,
        kernel_map={
            RopeKey.NEOX_REF: TracedRope,
            AppendKey.CONTIGUOUS_REF: TracedContiguousAppend,
            AttentionKey.CONTIGUOUS_REF: TracedContiguousAttention,
        },
    )
    inputs = oracle.inputs(tp.GQAContiguousCacheRopeAppendPrefill, gen)
    compiled_inputs = [x.clone() for x in inputs]
    reference_inputs = [x.clone() for x in inputs]
    out = torch.compile(traced, fullgraph=True, backend="eager")(*compiled_inputs)
    expected = tp.GQAContiguousCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX)(*reference_inputs)
    assert (out.float() - expected.float()).abs().max() < 1e-2
    assert torch.equal(compiled_inputs[3], reference_inputs[3]) and torch.equal(
        compiled_inputs[4], reference_inputs[4]
    )


def test_window_and_softcap_reach_the_kernels(gen: torch.Generator) -> None:
    """An Op's sliding_window and softcap are context facts (explain shows them) and static facts of
    its kernels: the Op's result is the reference kernel's with them, which differs from without."""
    q_lens, kv_lens = [5, 9], [12, 9]
    q = torch.randn(sum(q_lens), 8, 64, generator=gen).half()
    k = torch.randn(sum(kv_lens), 2, 64, generator=gen).half()
    v = torch.randn(sum(kv_lens), 2, 64, generator=gen).half()
    cu_q = torch.tensor([0, 5, 14], dtype=torch.int32)
    cu_kv = torch.tensor([0, 12, 21], dtype=torch.int32)
    op = tp.GQAVarlenPrefill(sliding_window=3, softcap=0.5)
    plan = op.plan(cu_q, cu_kv, shape=VarlenShape(14, 21, 8, 2, 64, torch.float16, torch.device("cpu")))
    assert "sliding_window=3" in str(plan.explain()) and "softcap=True" in str(plan.explain())
    out = plan.run(q, k, v)
    reference = AttentionRaggedRefKernel()
    expected = reference(q, k, v, cu_q, cu_kv, causal=True, sm_scale=0.125, window=3, softcap=0.5)
    plain = reference(q, k, v, cu_q, cu_kv, causal=True, sm_scale=0.125)
    assert torch.equal(out, expected)
    assert not torch.allclose(out.float(), plain.float(), atol=1e-2)


def test_a_call_no_gpu_kernel_serves_warns_once_on_the_cpu(gen: torch.Generator) -> None:
    """Head dim 72: the reference kernels run it on the CPU, and the Op warns, once per configuration,
    with selection's reason for each GPU arch; a head dim the GPU kernels serve does not warn."""
    from tileprefill.ops import decision

    decision.decided.cache_clear()

    def call(head_dim: int) -> None:
        q = torch.randn(1, 5, 4, head_dim, generator=gen).half()
        kv = torch.randn(1, 5, 2, head_dim, generator=gen).half()
        tp.GQAPrefill()(q, kv, kv)

    with pytest.warns(tp.NoGPUKernelWarning) as warned:
        call(72)
        call(72)
    assert len(warned) == 1 and warned[0].filename == __file__  # the caller's line
    message = str(warned[0].message)
    assert "sm90: head_dim 72 is not compiled" in message and "sm80: head_dim 72" in message, message
    assert "on the CPU the reference kernels run it" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", tp.NoGPUKernelWarning)
        call(64)
