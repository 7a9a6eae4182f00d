"""The log-sum-exp of every public Op (`return_lse=True`) on CPU, with the reference kernels.

The expected LSE is computed here, independently of the kernels: float64 `torch.logsumexp` of the
scaled scores each query row sees (bottom-right causal, query head h on KV head h // group), with q
and the keys rotated by conftest's float64 RoPE where the Op rotates. Every Op's output with the
LSE is bit for bit its output without; rows that see no key have an LSE of exactly -inf. Two calls
over a split key range (a non-causal prefix, then the causal rest: cascade attention), merged by
their LSEs, give the call over the whole range. tests/gpu/test_lse_gpu.py runs the same merge on
the TileLang kernels and imports the builders below.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, assert_type, cast

import attrs
import pytest
import torch

import tileprefill as tp
from tileprefill.kernels.base import DenseAttentionKernel
from tileprefill.keys import AttentionKey
from tileprefill.ops import PUBLIC_OPS, OpClass, OpOptions, PrefillOp, RopeOpOptions
from tileprefill.ops.op import RotatingOp

if TYPE_CHECKING:
    from conftest import Oracle

HEADS, KV_HEADS, HEAD_DIM, ROTARY_DIM, PAGE_SIZE = 4, 2, 64, 32, 4
SCALE = HEAD_DIM**-0.5
#: The Ops that read keys they do not write: what a split key range can be handed to.
READ_ONLY: tuple[OpClass, ...] = (
    tp.GQAPrefill,
    tp.GQAVarlenPrefill,
    tp.GQAContiguousCachePrefill,
    tp.GQAPagedCachePrefill,
)
#: What an Op built with return_lse=True is, to these tests: a call returning (out, lse).
LSECall = Callable[..., tp.OutputAndLSE]


def lse_op(op_cls: OpClass, **options: Any) -> LSECall:
    """`op_cls(return_lse=True, **options)`; RoPE Ops get NEOX unless `rope` is given."""
    if op_cls.rotates:
        options.setdefault("rope", tp.RopeMode.NEOX)
    return cast(LSECall, op_cls(return_lse=True, **options))


def visible_lse(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float = SCALE) -> torch.Tensor:
    """float64 ln(sum over the keys row i sees of exp(scale * q_i . k_j)) of q (n, Hq, D) against
    k (m, Hkv, D): (n, Hq), -inf for a row that sees no key. Causal is bottom-right aligned."""
    n, heads, _ = q.shape
    m, kv_heads, _ = k.shape
    kv_head = torch.arange(heads) // (heads // kv_heads)
    scores = torch.einsum("qhd,khd->qhk", q.double(), k.double()[:, kv_head]) * scale
    if causal:
        hidden = torch.arange(m)[None, :] > m - n + torch.arange(n)[:, None]
        scores = scores.masked_fill(hidden[:, None, :], float("-inf"))
    if m == 0:
        return torch.full((n, heads), float("-inf"), dtype=torch.float64)
    return torch.logsumexp(scores, dim=-1)


def merge(first: tp.OutputAndLSE, second: tp.OutputAndLSE) -> tuple[torch.Tensor, torch.Tensor]:
    """Two attentions of the same queries over disjoint key ranges, merged by their LSEs (flash-
    decoding's and cascade attention's combine), in float32: lse = logaddexp(lse1, lse2),
    out = exp(lse1 - lse) out1 + exp(lse2 - lse) out2. A part with no key (-inf) weighs 0."""
    (out1, lse1), (out2, lse2) = first, second
    lse = torch.logaddexp(lse1, lse2)
    shift = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)  # rows with no key at all
    w1, w2 = torch.exp(lse1 - shift).unsqueeze(-1), torch.exp(lse2 - shift).unsqueeze(-1)
    return w1 * out1.float() + w2 * out2.float(), lse


def cumulative(lens: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def pages_of(
    seqs: Sequence[torch.Tensor], block_table: torch.Tensor, num_pages: int, page_size: int
) -> torch.Tensor:
    """A page pool holding seqs[b] (n_b, Hkv, D) at the positions of sequence b, NaN elsewhere."""
    pages = torch.full((num_pages, page_size, *seqs[0].shape[1:]), float("nan"), dtype=seqs[0].dtype)
    for b, seq in enumerate(seqs):
        for p in range(seq.shape[0]):
            pages[int(block_table[b, p // page_size]), p % page_size] = seq[p]
    return pages


def read_only_inputs(
    op_cls: OpClass,
    qs: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    rng: random.Random,
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    page_size: int = PAGE_SIZE,
) -> dict[str, torch.Tensor]:
    """The inputs, by name, of a read-only Op (or a no-cache RoPE Op) attending qs[b] (n_b, Hq, D)
    over ks[b], vs[b] (m_b, Hkv, D). Dense layouts need equal lengths (the contiguous cache equal
    query lengths); cache rows and pages no sequence owns hold NaN."""
    kv_lens = [k.shape[0] for k in ks]
    if op_cls.kv_layout is tp.KVLayout.NONE and not op_cls.ragged:
        named = {"q": torch.stack(list(qs)), "k": torch.stack(list(ks)), "v": torch.stack(list(vs))}
    elif op_cls.kv_layout is tp.KVLayout.NONE:
        named = {
            "q": torch.cat(list(qs)),
            "k": torch.cat(list(ks)),
            "v": torch.cat(list(vs)),
            "cu_seqlens_q": cumulative([q.shape[0] for q in qs]),
            "cu_seqlens_kv": cumulative(kv_lens),
        }
    elif op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
        rows = max(kv_lens) + 3

        def cache(seqs: Sequence[torch.Tensor]) -> torch.Tensor:
            padded = torch.full((len(seqs), rows, *seqs[0].shape[1:]), float("nan"), dtype=seqs[0].dtype)
            for b, seq in enumerate(seqs):
                padded[b, : seq.shape[0]] = seq
            return padded

        named = {
            "q": torch.stack(list(qs)),
            "k_cache": cache(ks),
            "v_cache": cache(vs),
            "kv_seqlens": torch.tensor(kv_lens, dtype=torch.int32),
        }
    else:
        table, num_pages = _paged_layout(kv_lens, rng, page_size)
        named = {
            "q": torch.cat(list(qs)),
            "k_pages": pages_of(ks, table, num_pages, page_size),
            "v_pages": pages_of(vs, table, num_pages, page_size),
            "block_table": table,
            "kv_seqlens": torch.tensor(kv_lens, dtype=torch.int32),
            "cu_seqlens_q": cumulative([q.shape[0] for q in qs]),
        }
    if op_cls.rotates:
        assert rope_tables is not None
        named["cos"], named["sin"] = rope_tables
    return {s.name: named[s.name] for s in op_cls.input_specs}


def _paged_layout(
    capacities: Sequence[int], rng: random.Random, page_size: int = PAGE_SIZE
) -> tuple[torch.Tensor, int]:
    """A block table (-1 past each sequence's pages) over a shuffled pool with two spare pages."""
    needed = [math.ceil(n / page_size) for n in capacities]
    num_pages = sum(needed) + 2
    pool = list(range(num_pages))
    rng.shuffle(pool)
    table = torch.full((len(capacities), max([1, *needed]) + 1), -1, dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(needed):
        table[b, :n] = torch.tensor(pool[cursor : cursor + n], dtype=torch.int32)
        cursor += n
    return table, num_pages


@attrs.frozen
class Case:
    """One call of an Op: its inputs by name, and per sequence the queries and keys its attention
    sees (rotated where the Op rotates, the appended keys after the cached ones), in float64."""

    inputs: dict[str, torch.Tensor]
    queries: tuple[torch.Tensor, ...]
    keys: tuple[torch.Tensor, ...]
    packed: bool  # q (Tq, Hq, D) rather than (B, Sq, Hq, D)

    def expected_lse(self, causal: bool) -> torch.Tensor:
        parts = [visible_lse(q, k, causal=causal) for q, k in zip(self.queries, self.keys, strict=True)]
        return torch.cat(parts) if self.packed else torch.stack(parts)


def case_of(op_cls: OpClass, oracle: Oracle, gen: torch.Generator) -> Case:
    """Inputs of any public Op with unaligned lengths; read-only Ops have rows that see no key (a
    query chunk longer than its keys, causal; a sequence with no key)."""
    rng = random.Random(int(torch.randint(1 << 30, (1,), generator=gen)))
    cos, sin = oracle.rope_tables(32, ROTARY_DIM)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.float16)

    def seen(x: torch.Tensor, first: int) -> torch.Tensor:
        """x (n, H, D) as attention sees it: rotated at positions first.. where the Op rotates."""
        return (
            oracle.rope(x, range(first, first + x.shape[0]), cos, sin, tp.RopeMode.NEOX)
            if op_cls.rotates
            else x.double()
        )

    packed = op_cls.ragged or op_cls.kv_layout is tp.KVLayout.PAGED
    if not op_cls.appends:
        if op_cls.kv_layout is tp.KVLayout.NONE and not op_cls.ragged:
            q_lens, kv_lens = [6, 6], [4, 4]  # causal rows 0 and 1 see no key
        elif op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
            q_lens, kv_lens = [5, 5, 5], [9, 3, 0]
        else:
            q_lens, kv_lens = [3, 0, 6, 4], [7, 5, 4, 0]
        qs = [randn(n, HEADS, HEAD_DIM) for n in q_lens]
        ks = [randn(n, KV_HEADS, HEAD_DIM) for n in kv_lens]
        vs = [randn(n, KV_HEADS, HEAD_DIM) for n in kv_lens]
        # A cache Op's keys sit at their own positions; only no-cache RoPE Ops rotate (positions 0..).
        return Case(
            read_only_inputs(op_cls, qs, ks, vs, rng, (cos, sin)),
            tuple(seen(q, 0) for q in qs),
            tuple(seen(k, 0) for k in ks),
            packed,
        )
    if op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
        q_len, cache_lens, cache_rows = 4, [0, 3, 8], 12
        q, k_new, v_new = (randn(3, q_len, h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
        k_cache, v_cache = randn(3, cache_rows, KV_HEADS, HEAD_DIM), randn(3, cache_rows, KV_HEADS, HEAD_DIM)
        for b, c in enumerate(cache_lens):  # rows past the new keys are never read
            k_cache[b, c + q_len :] = v_cache[b, c + q_len :] = float("nan")
        named = {
            "q": q,
            "k_new": k_new,
            "v_new": v_new,
            "k_cache": k_cache,
            "v_cache": v_cache,
            "cache_seqlens": torch.tensor(cache_lens, dtype=torch.int32),
            "cos": cos,
            "sin": sin,
        }
        queries = tuple(seen(q[b], c) for b, c in enumerate(cache_lens))
        keys = tuple(
            torch.cat([k_cache[b, :c].double(), seen(k_new[b], c)]) for b, c in enumerate(cache_lens)
        )
    else:
        q_lens, cache_lens = [3, 0, 5, 2], [0, 4, 7, 9]
        cu_q = cumulative(q_lens)
        q, k_new, v_new = (randn(sum(q_lens), h, HEAD_DIM) for h in (HEADS, KV_HEADS, KV_HEADS))
        # Cached keys, then random garbage where the new keys go.
        old_k = [randn(c + n, KV_HEADS, HEAD_DIM) for c, n in zip(cache_lens, q_lens, strict=True)]
        old_v = [randn(c + n, KV_HEADS, HEAD_DIM) for c, n in zip(cache_lens, q_lens, strict=True)]
        table, num_pages = _paged_layout([c + n for c, n in zip(cache_lens, q_lens, strict=True)], rng)
        named = {
            "q": q,
            "k_new": k_new,
            "v_new": v_new,
            "k_pages": pages_of(old_k, table, num_pages, PAGE_SIZE),
            "v_pages": pages_of(old_v, table, num_pages, PAGE_SIZE),
            "block_table": table,
            "cache_seqlens": torch.tensor(cache_lens, dtype=torch.int32),
            "cu_seqlens_q": cu_q,
            "cos": cos,
            "sin": sin,
        }
        rows = [slice(int(cu_q[b]), int(cu_q[b + 1])) for b in range(len(q_lens))]
        queries = tuple(seen(q[r], c) for r, c in zip(rows, cache_lens, strict=True))
        keys = tuple(
            torch.cat([old_k[b][:c].double(), seen(k_new[r], c)])
            for b, (r, c) in enumerate(zip(rows, cache_lens, strict=True))
        )
    return Case({s.name: named[s.name] for s in op_cls.input_specs}, queries, keys, packed)


def cloned(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in named.items()}


def assert_same(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> None:
    for name, t in before.items():
        torch.testing.assert_close(after[name], t, rtol=0, atol=0, equal_nan=True, msg=f"{name} differs")


# --- every Op ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_lse_is_the_logsumexp_of_the_visible_scores(
    oracle: Oracle, gen: torch.Generator, op_cls: OpClass, causal: bool
) -> None:
    """`op(...)` returns (out, lse): out bit for bit the Op's output without the LSE (and the same
    cache writes), lse float32 of out's shape less D, the float64 logsumexp of the scaled scores
    each row sees, -inf exactly where a row sees none."""
    case = case_of(op_cls, oracle, gen)
    plain_inputs, lse_inputs = cloned(case.inputs), cloned(case.inputs)
    plain = oracle.make_op(op_cls, causal=causal)(*plain_inputs.values())
    out, lse = lse_op(op_cls, causal=causal)(*lse_inputs.values())
    assert torch.equal(out, plain), "return_lse changed the output"
    assert_same(lse_inputs, plain_inputs)  # the caches hold the same appended keys
    assert (lse.dtype, lse.shape) == (torch.float32, out.shape[:-1])
    expected = case.expected_lse(causal)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected)), "-inf rows differ"
    if causal and not op_cls.appends:
        assert bool(torch.isneginf(expected).any()), "test setup: some row should see no key"
    assert not lse.isnan().any()
    seen = torch.isfinite(expected)
    # fp16 inputs; the RoPE Ops attend q and keys rotated in fp16, the expected LSE rotates in float64.
    torch.testing.assert_close(
        lse[seen].double(), expected[seen], rtol=0, atol=1e-2 if op_cls.rotates else 1e-4
    )


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_plan_run_and_run_into_return_the_lse(oracle: Oracle, gen: torch.Generator, op_cls: OpClass) -> None:
    """`plan.run(...)` returns what `op(...)` does; `plan.run_into((out, lse), ...)` writes both of
    the caller's NaN-filled buffers whole and returns the pair it was given."""
    case = case_of(op_cls, oracle, gen)
    op = lse_op(op_cls)
    call_inputs, run_inputs, into_inputs = cloned(case.inputs), cloned(case.inputs), cloned(case.inputs)
    want_out, want_lse = op(*call_inputs.values())
    plan = cast(Any, oracle.plan_of(cast(Any, op), op_cls, list(run_inputs.values())))
    out, lse = plan.run(*[run_inputs[s.name] for s in op_cls.run_specs])
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    plan = cast(Any, oracle.plan_of(cast(Any, op), op_cls, list(into_inputs.values())))
    buffers = (torch.full_like(want_out, float("nan")), torch.full_like(want_lse, float("nan")))
    returned = plan.run_into(buffers, *[into_inputs[s.name] for s in op_cls.run_specs])
    assert returned is buffers
    assert torch.equal(buffers[0], want_out) and torch.equal(buffers[1], want_lse)
    assert_same(into_inputs, call_inputs)


def _bad_outputs(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> dict[str, tuple[object, str]]:
    """run_into's first argument, wrong in one way each, and what the error says."""
    wide = torch.empty(*lse.shape[:-1], 2 * lse.shape[-1])
    # out and lse carved from one buffer: both contiguous and aligned, their bytes shared.
    out_bytes = out.numel() * out.element_size()
    shared = torch.empty(out_bytes + lse.numel() * 4, dtype=torch.uint8)
    out_in_shared = shared[:out_bytes].view(out.dtype).view(out.shape)
    lse_in_shared = shared[: lse.numel() * 4].view(torch.float32).view(lse.shape)
    lse_in_q = q.view(-1).view(torch.float32)[: lse.numel()].view(lse.shape)
    return {
        "bare out": (out, r"out: expected the pair \(out, lse\) of tensors .*return_lse=True\), got Tensor"),
        "triple": ((out, lse, lse), r"out: expected the pair \(out, lse\).*got a tuple of 3"),
        "lse dtype": (
            (out, lse.half()),
            r"lse: expected dtype torch\.float32 \(the plan's\), got torch\.float16",
        ),
        "lse shape": ((out, lse[..., :-1]), r"lse: expected shape .* \(the plan's\), got"),
        "lse device": ((out, lse.to("meta")), r"lse: expected a tensor on cpu \(the plan's\), got meta"),
        "lse strided": ((out, wide[..., : lse.shape[-1]]), "lse: expected a contiguous tensor"),
        "lse in q": (
            (out, lse_in_q),
            "lse: expected memory apart from every input, got memory shared with q",
        ),
        "lse in out": ((out_in_shared, lse_in_shared), "lse: expected memory apart from out"),
        "lse not a tensor": ((out, [0.0]), "lse: expected a torch.Tensor, got list"),
    }


BAD_OUTPUTS = [
    "bare out",
    "triple",
    "lse dtype",
    "lse shape",
    "lse device",
    "lse strided",
    "lse in q",
    "lse in out",
    "lse not a tensor",
]


@pytest.mark.parametrize("case", BAD_OUTPUTS)
@pytest.mark.parametrize(
    "op_cls", [tp.GQAPrefill, tp.GQAPagedCacheRopeAppendPrefill], ids=lambda c: c.__name__
)
def test_run_into_rejects_bad_lse_before_any_write(
    oracle: Oracle, gen: torch.Generator, op_cls: OpClass, case: str
) -> None:
    """A bad (out, lse) is named, with the expected and the actual value; nothing is written: not
    the caches, not the caller's buffers."""
    named = case_of(op_cls, oracle, gen).inputs
    want_out, want_lse = lse_op(op_cls)(*cloned(named).values())
    plan = cast(Any, oracle.plan_of(cast(Any, lse_op(op_cls)), op_cls, list(named.values())))
    out, lse = torch.full_like(want_out, 7.0), torch.full_like(want_lse, 7.0)
    outputs, message = _bad_outputs(out, lse, named["q"])[case]
    before = cloned(named)
    buffers_before = [t.clone() for t in (out, lse)]
    with pytest.raises((TypeError, ValueError), match=message):
        plan.run_into(outputs, *[named[s.name] for s in op_cls.run_specs])
    assert_same(named, before)
    assert all(torch.equal(t, b) for t, b in zip((out, lse), buffers_before, strict=True))


def test_run_into_without_lse_rejects_a_pair(oracle: Oracle, gen: torch.Generator) -> None:
    named = case_of(tp.GQAVarlenPrefill, oracle, gen).inputs
    plan = cast(Any, oracle.plan_of(tp.GQAVarlenPrefill(), tp.GQAVarlenPrefill, list(named.values())))
    out, lse = torch.empty_like(named["q"]), torch.empty(named["q"].shape[:-1])
    with pytest.raises(
        TypeError,
        match=r"out: expected a torch\.Tensor \(the Op was built without return_lse\), got a tuple of 2",
    ):
        plan.run_into((out, lse), named["q"], named["k"], named["v"])


# --- merging partial attentions ----------------------------------------------------------------------


def split_merge_lengths(op_cls: OpClass) -> tuple[list[int], list[int], list[int]]:
    """(q_lens, kv_lens, splits) of a cascade: queries see every key before the split (the shared
    prefix, non-causal) and the rest causally (split <= kv_len - q_len). A split of 0 leaves the
    prefix empty: its LSE is -inf and the rest is the whole."""
    if op_cls.kv_layout is tp.KVLayout.NONE and not op_cls.ragged:
        return [5, 5], [13, 13], [6, 6]
    if op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
        return [4, 4, 4], [10, 4, 9], [5, 0, 5]
    return [4, 0, 7, 3], [10, 3, 7, 11], [5, 3, 0, 8]


def split_and_merge(
    op_cls: OpClass,
    qs: Sequence[torch.Tensor],
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    splits: Sequence[int],
    rng: random.Random,
    device: torch.device,
    page_size: int = PAGE_SIZE,
    before_each_call: Callable[[], None] = lambda: None,
) -> tuple[tp.OutputAndLSE, tuple[torch.Tensor, torch.Tensor]]:
    """(the causal call over all keys, the merge of the prefix call and the call over the rest),
    each call an Op built with return_lse=True on `device` (`before_each_call` runs before each:
    the GPU test poisons the allocator there)."""

    def call(causal: bool, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> tp.OutputAndLSE:
        named = read_only_inputs(op_cls, qs, keys, values, rng, page_size=page_size)
        tensors = [t.to(device) for t in named.values()]
        before_each_call()
        return lse_op(op_cls, causal=causal)(*tensors)

    whole = call(True, ks, vs)
    prefix = call(
        False,
        [k[:s] for k, s in zip(ks, splits, strict=True)],
        [v[:s] for v, s in zip(vs, splits, strict=True)],
    )
    rest = call(
        True,
        [k[s:] for k, s in zip(ks, splits, strict=True)],
        [v[s:] for v, s in zip(vs, splits, strict=True)],
    )
    return whole, merge(prefix, rest)


@pytest.mark.parametrize("op_cls", READ_ONLY, ids=lambda c: c.__name__)
def test_split_kv_merge_matches_the_whole(gen: torch.Generator, op_cls: OpClass) -> None:
    """Cascade attention: each sequence's shared prefix (non-causal) and the rest of its keys (causal),
    merged with the two LSEs, is the causal call over all its keys."""
    rng = random.Random(int(torch.randint(1 << 30, (1,), generator=gen)))
    q_lens, kv_lens, splits = split_merge_lengths(op_cls)
    qs = [torch.randn(n, HEADS, HEAD_DIM, generator=gen).half() for n in q_lens]
    ks = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).half() for n in kv_lens]
    vs = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).half() for n in kv_lens]
    (out, lse), (merged_out, merged_lse) = split_and_merge(
        op_cls, qs, ks, vs, splits, rng, torch.device("cpu")
    )
    torch.testing.assert_close(merged_lse, lse, rtol=0, atol=1e-5)
    # Each part's output is rounded to fp16 before the merge.
    torch.testing.assert_close(merged_out, out.float(), rtol=0, atol=2e-3)


# --- construction and types --------------------------------------------------------------------------


class _CallOnly(DenseAttentionKernel):
    """A kernel_map override that computes the output and not the LSE."""

    key = AttentionKey.DENSE_REF

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
        return torch.zeros_like(q)


def test_return_lse_needs_a_kernel_with_lse() -> None:
    tp.GQAPrefill(kernel_map={AttentionKey.DENSE_REF: _CallOnly})  # fine without the LSE
    with pytest.raises(
        ValueError,
        match=r"kernel_map\[attn_dense_ref\]: expected a class that implements with_lse .* got _CallOnly",
    ):
        tp.GQAPrefill(return_lse=True, kernel_map={AttentionKey.DENSE_REF: _CallOnly})
    with pytest.raises(TypeError, match="return_lse: expected a bool, got 1"):
        tp.GQAPrefill(return_lse=1)  # type: ignore[call-overload]


def test_option_dicts_are_the_constructor_parameters() -> None:
    """The typing-only constructor overloads take every parameter but return_lse through these."""
    for cls, options in ((PrefillOp, OpOptions), (RotatingOp, RopeOpOptions)):
        params = {name for name in inspect.signature(cls.__init__).parameters if name != "self"}
        assert params - {"return_lse"} == options.__required_keys__ | options.__optional_keys__


def test_the_result_type_follows_the_flag(gen: torch.Generator) -> None:
    """What mypy --strict proves of these lines (assert_type) holds when they run."""
    q, k, v = (torch.randn(1, 3, h, 16, generator=gen).half() for h in (2, 1, 1))
    shape = tp.DenseShape(1, 3, 3, 2, 1, 16, torch.float16, torch.device("cpu"))
    with_lse = tp.GQAPrefill(return_lse=True)
    assert_type(with_lse, tp.GQAPrefill[tp.OutputAndLSE])
    out, lse = assert_type(with_lse(q, k, v), tuple[torch.Tensor, torch.Tensor])
    plan = with_lse.plan(shape=shape)
    assert_type(plan.run(q, k, v), tuple[torch.Tensor, torch.Tensor])
    assert_type(plan.run_into((torch.empty_like(out), torch.empty_like(lse)), q, k, v), tp.OutputAndLSE)
    plain = tp.GQAPrefill()
    assert isinstance(assert_type(plain(q, k, v), torch.Tensor), torch.Tensor)
    assert isinstance(assert_type(plain.plan(shape=shape).run(q, k, v), torch.Tensor), torch.Tensor)
    paged = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, return_lse=True)
    assert_type(paged, tp.GQAPagedCacheRopeAppendPrefill[tp.OutputAndLSE])
    flag = bool(torch.rand(1, generator=gen) < 2)  # a bool known only at run time: the union
    assert_type(tp.GQAPrefill(return_lse=flag), tp.GQAPrefill[torch.Tensor | tp.OutputAndLSE])
