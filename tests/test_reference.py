"""The torch reference kernels against deliberately different float64 formulations.

The reference is the oracle of every GPU test, so it is checked here against
code that shares none of its structure: attention over the padded batch with
materialised boolean masks, `torch.softmax` and KV heads expanded with
`repeat_interleave`; RoPE by complex multiplication (interleaved) and the
half-rotation formula (neox); appends by a per-token Python loop. Cache slots
the kernels must not read hold NaN, so reading one shows up in the output.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tileprefill.kernels.reference import (
    KERNELS,
    AppendContiguousRefKernel,
    AppendPagedRefKernel,
    AttentionContiguousRefKernel,
    AttentionDenseRefKernel,
    AttentionPagedRefKernel,
    AttentionRaggedRefKernel,
    BatchPagedRefKernel,
    RopeInterleavedRefKernel,
    RopeNeoxRefKernel,
)
from tileprefill.keys import AppendKey, AttentionKey, BatchKey, RopeKey, SlotAppendKey

DTYPES = (torch.float16, torch.bfloat16)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def _assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Within the rounding of one store in `dtype` (the reference computes in fp32)."""
    assert actual.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(actual.double(), expected, atol=tol, rtol=tol)


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


# ---------------------------------------------------------------------------
# Attention oracle


def _oracle_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    causal: bool,
    sm_scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """float64 attention over a padded batch: q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D) -> (B, Sq, Hq, D).

    Rows past q_lens[b] and rows that see no key are 0. A `window` keeps the keys whose absolute
    position is within `window` of the query's own (kv_len - q_len + i); a `softcap` caps the
    scaled scores with tanh.
    """
    batch, q_max, q_heads, _ = q.shape
    kv_max, kv_heads = k.shape[1], k.shape[2]
    k64 = k.double().repeat_interleave(q_heads // kv_heads, dim=2)
    v64 = v.double().repeat_interleave(q_heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k64) * sm_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(q_max).view(1, q_max, 1)
    j = torch.arange(kv_max).view(1, 1, kv_max)
    q_len = torch.tensor(q_lens).view(batch, 1, 1)
    kv_len = torch.tensor(kv_lens).view(batch, 1, 1)
    mask = (i < q_len) & (j < kv_len)
    if causal:
        mask &= j <= kv_len - q_len + i
    if window:
        mask &= kv_len - q_len + i - j < window
    probs = torch.softmax(scores.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)
    # softmax of an all -inf row is NaN: those rows see no key and are 0 by convention.
    probs = torch.where(mask.any(dim=-1).unsqueeze(1).unsqueeze(-1), probs, torch.zeros_like(probs))
    return torch.einsum("bhqk,bkhd->bqhd", probs, v64)


def _pad(packed: torch.Tensor, lengths: list[int], max_len: int) -> torch.Tensor:
    """(T, H, D) packed by `lengths` -> (B, max_len, H, D), zero padding."""
    out = torch.zeros(len(lengths), max_len, *packed.shape[1:], dtype=packed.dtype)
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = packed[start : start + n]
        start += n
    return out


def _unpad(padded: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    return torch.cat([padded[b, :n] for b, n in enumerate(lengths)])


def _assert_no_key_rows_are_zero(
    out: torch.Tensor, q_lens: list[int], kv_lens: list[int], *, causal: bool
) -> None:
    """Packed out: rows whose query sees no key are exactly 0, and nothing is NaN."""
    assert torch.isfinite(out).all()
    start = 0
    for q_len, kv_len in zip(q_lens, kv_lens, strict=True):
        blind = q_len if kv_len == 0 else (max(0, q_len - kv_len) if causal else 0)
        assert torch.equal(out[start : start + blind], torch.zeros_like(out[start : start + blind]))
        start += q_len


def _clones(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def _assert_unchanged(before: list[torch.Tensor], after: tuple[torch.Tensor, ...]) -> None:
    for old, new in zip(before, after, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------
# Attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_dense_attention(group: int, head_dim: int, dtype: torch.dtype) -> None:
    gen = _generator(1000 * group + head_dim)
    kv_heads, batch = 2, 2
    kernel = AttentionDenseRefKernel()
    # q_len == kv_len, q_len < kv_len (prefill onto a prefix), q_len > kv_len (rows with no key).
    for (q_len, kv_len), causal in itertools.product([(7, 7), (3, 13), (11, 4)], [False, True]):
        sm_scale = head_dim**-0.5 if causal else 0.37
        q = _randn(gen, batch, q_len, kv_heads * group, head_dim, dtype=dtype)
        k = _randn(gen, batch, kv_len, kv_heads, head_dim, dtype=dtype)
        v = _randn(gen, batch, kv_len, kv_heads, head_dim, dtype=dtype)
        before = _clones(q, k, v)
        out = kernel(q, k, v, causal=causal, sm_scale=sm_scale)
        expected = _oracle_attention(
            q, k, v, [q_len] * batch, [kv_len] * batch, causal=causal, sm_scale=sm_scale
        )
        assert out.shape == q.shape
        _assert_matches(out, expected, dtype)
        _assert_unchanged(before, (q, k, v))
        _assert_no_key_rows_are_zero(out.flatten(0, 1), [q_len] * batch, [kv_len] * batch, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("window", "softcap"), [(1, 0.0), (4, 0.0), (9, 2.5), (100, 0.0), (0, 2.5)])
def test_window_and_softcap(window: int, softcap: float, dtype: torch.dtype) -> None:
    """Sliding windows of one key, shorter than a sequence and longer than every one (no effect),
    and a softcap small enough to bend the scores, over the ragged, paged, contiguous and dense
    references."""
    gen = _generator(window * 10 + int(softcap))
    kv_heads, group, head_dim, sm_scale = 2, 4, 64, 0.3
    # q_len < kv_len, == kv_len, > kv_len (rows with no key), an empty chunk.
    q_lens = [5, 7, 9, 0]
    kv_lens = [19, 7, 4, 6]
    q = _randn(gen, sum(q_lens), kv_heads * group, head_dim, dtype=dtype)
    k = _randn(gen, sum(kv_lens), kv_heads, head_dim, dtype=dtype)
    v = _randn(gen, sum(kv_lens), kv_heads, head_dim, dtype=dtype)
    padded_q = _pad(q, q_lens, max(q_lens))
    padded_k, padded_v = _pad(k, kv_lens, max(kv_lens)), _pad(v, kv_lens, max(kv_lens))

    def oracle(q_pad: torch.Tensor, q_lens: list[int], kv_lens: list[int]) -> torch.Tensor:
        return _oracle_attention(
            q_pad,
            padded_k,
            padded_v,
            q_lens,
            kv_lens,
            causal=True,
            sm_scale=sm_scale,
            window=window,
            softcap=softcap,
        )

    expected = _unpad(oracle(padded_q, q_lens, kv_lens), q_lens)
    plain = _oracle_attention(padded_q, padded_k, padded_v, q_lens, kv_lens, causal=True, sm_scale=sm_scale)
    changed = (expected - _unpad(plain, q_lens)).abs().max().item()
    # The window or the cap changes the result, except a window longer than every sequence.
    assert changed == 0 if window >= max(kv_lens) else changed > 0.05

    cu_q, cu_kv = _offsets(q_lens), _offsets(kv_lens)
    ragged = AttentionRaggedRefKernel()(
        q, k, v, cu_q, cu_kv, causal=True, sm_scale=sm_scale, window=window, softcap=softcap
    )
    _assert_matches(ragged, expected, dtype)

    k_pages, block_table = _paged_cache(gen, list(torch.split(k, kv_lens)), 3, spare_pages=1)
    v_pages = torch.full_like(k_pages, float("nan"))
    for b, seq in enumerate(torch.split(v, kv_lens)):
        for pos in range(len(seq)):
            v_pages[block_table[b, pos // 3], pos % 3] = seq[pos]
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32)
    paged = AttentionPagedRefKernel()(
        q,
        k_pages,
        v_pages,
        block_table,
        kv_seqlens,
        cu_q,
        causal=True,
        sm_scale=sm_scale,
        window=window,
        softcap=softcap,
    )
    _assert_matches(paged, expected, dtype)

    # Contiguous and dense: one q length for the whole batch (dense: every kv length the longest).
    q_len = 5
    dense_q = padded_q[:, :q_len].contiguous()
    contiguous = AttentionContiguousRefKernel()(
        dense_q,
        padded_k,
        padded_v,
        kv_seqlens,
        causal=True,
        sm_scale=sm_scale,
        window=window,
        softcap=softcap,
    )
    _assert_matches(contiguous, oracle(dense_q, [q_len] * 4, kv_lens), dtype)
    dense = AttentionDenseRefKernel()(
        dense_q, padded_k, padded_v, causal=True, sm_scale=sm_scale, window=window, softcap=softcap
    )
    _assert_matches(dense, oracle(dense_q, [q_len] * 4, [max(kv_lens)] * 4), dtype)


def test_dense_attention_non_contiguous_inputs() -> None:
    gen = _generator(7)
    # (B, H, S, D) storage seen as (B, S, H, D), as engines often hand it over.
    q = _randn(gen, 2, 8, 9, 64, dtype=torch.float16).transpose(1, 2)
    k = _randn(gen, 2, 2, 12, 64, dtype=torch.float16).transpose(1, 2)
    v = _randn(gen, 2, 2, 12, 64, dtype=torch.float16).transpose(1, 2)
    out = AttentionDenseRefKernel()(q, k, v, causal=True, sm_scale=0.125)
    expected = _oracle_attention(q, k, v, [9, 9], [12, 12], causal=True, sm_scale=0.125)
    assert out.is_contiguous()
    _assert_matches(out, expected, torch.float16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("group", "head_dim"), [(1, 64), (4, 128), (16, 64), (8, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_ragged_attention(group: int, head_dim: int, causal: bool, dtype: torch.dtype) -> None:
    gen = _generator(group * head_dim + causal)
    kv_heads = 1 if group == 16 else 2
    # Longer prefix, empty query chunk, more queries than keys, no keys at all, equal lengths.
    q_lens = [3, 0, 9, 1, 5]
    kv_lens = [5, 4, 6, 0, 5]
    q = _randn(gen, sum(q_lens), kv_heads * group, head_dim, dtype=dtype)
    k = _randn(gen, sum(kv_lens), kv_heads, head_dim, dtype=dtype)
    v = _randn(gen, sum(kv_lens), kv_heads, head_dim, dtype=dtype)
    cu_q, cu_kv = _offsets(q_lens), _offsets(kv_lens)
    before = _clones(q, k, v, cu_q, cu_kv)
    sm_scale = head_dim**-0.5
    out = AttentionRaggedRefKernel()(q, k, v, cu_q, cu_kv, causal=causal, sm_scale=sm_scale)
    expected = _oracle_attention(
        _pad(q, q_lens, max(q_lens)),
        _pad(k, kv_lens, max(kv_lens)),
        _pad(v, kv_lens, max(kv_lens)),
        q_lens,
        kv_lens,
        causal=causal,
        sm_scale=sm_scale,
    )
    assert out.shape == q.shape
    _assert_matches(out, _unpad(expected, q_lens), dtype)
    _assert_unchanged(before, (q, k, v, cu_q, cu_kv))
    _assert_no_key_rows_are_zero(out, q_lens, kv_lens, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("group", "head_dim"), [(1, 64), (2, 128), (8, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_contiguous_attention(group: int, head_dim: int, causal: bool, dtype: torch.dtype) -> None:
    gen = _generator(group * head_dim + 2 * causal)
    kv_heads, q_len, max_len = 2, 6, 16
    kv_lens = [6, 13, 4, 16]
    q = _randn(gen, len(kv_lens), q_len, kv_heads * group, head_dim, dtype=dtype)
    k_cache = _randn(gen, len(kv_lens), max_len, kv_heads, head_dim, dtype=dtype)
    v_cache = _randn(gen, len(kv_lens), max_len, kv_heads, head_dim, dtype=dtype)
    for b, n in enumerate(kv_lens):  # rows past the length must never be read
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32)
    before = _clones(q, k_cache, v_cache, kv_seqlens)
    sm_scale = head_dim**-0.5
    out = AttentionContiguousRefKernel()(q, k_cache, v_cache, kv_seqlens, causal=causal, sm_scale=sm_scale)
    expected = _oracle_attention(
        q, k_cache.nan_to_num(), v_cache.nan_to_num(), [q_len] * 4, kv_lens, causal=causal, sm_scale=sm_scale
    )
    assert out.shape == q.shape
    _assert_matches(out, expected, dtype)
    _assert_unchanged(before, (q, k_cache, v_cache, kv_seqlens))
    _assert_no_key_rows_are_zero(out.flatten(0, 1), [q_len] * 4, kv_lens, causal=causal)


def _paged_cache(
    gen: torch.Generator, keys: list[torch.Tensor], page_size: int, spare_pages: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pages holding each sequence's keys (L_b, H, D) at shuffled pages; every other slot is NaN."""
    pages_per_seq = [math.ceil(len(seq) / page_size) for seq in keys]
    num_pages = sum(pages_per_seq) + spare_pages
    order = torch.randperm(num_pages, generator=gen).tolist()
    heads, dim = keys[0].shape[1:]
    pages = torch.full((num_pages, page_size, heads, dim), float("nan"), dtype=keys[0].dtype)
    # Unused table entries point at spare (NaN) pages.
    table = torch.full((len(keys), max(pages_per_seq) + 1), order[-1], dtype=torch.int32)
    for b, seq in enumerate(keys):
        for p in range(len(seq)):
            if p % page_size == 0:
                table[b, p // page_size] = order.pop(0)
            pages[table[b, p // page_size], p % page_size] = seq[p]
    return pages, table


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 5, 16])
@pytest.mark.parametrize(("group", "head_dim"), [(1, 128), (4, 64), (8, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_paged_attention(group: int, head_dim: int, page_size: int, causal: bool, dtype: torch.dtype) -> None:
    gen = _generator(group * head_dim + page_size + causal)
    kv_heads = 2
    q_lens = [4, 0, 7, 2, 3]
    kv_lens = [21, 3, 5, 0, 16]
    k_seqs = [_randn(gen, n, kv_heads, head_dim, dtype=dtype) for n in kv_lens]
    v_seqs = [_randn(gen, n, kv_heads, head_dim, dtype=dtype) for n in kv_lens]
    k_pages, block_table = _paged_cache(gen, k_seqs, page_size, spare_pages=2)
    # v's pages follow the same block table.
    v_pages = torch.full_like(k_pages, float("nan"))
    for b, seq in enumerate(v_seqs):
        for p in range(len(seq)):
            v_pages[block_table[b, p // page_size], p % page_size] = seq[p]
    q = _randn(gen, sum(q_lens), kv_heads * group, head_dim, dtype=dtype)
    kv_seqlens = torch.tensor(kv_lens, dtype=torch.int32)
    cu_q = _offsets(q_lens)
    before = _clones(q, k_pages, v_pages, block_table, kv_seqlens, cu_q)
    sm_scale = head_dim**-0.5
    out = AttentionPagedRefKernel()(
        q, k_pages, v_pages, block_table, kv_seqlens, cu_q, causal=causal, sm_scale=sm_scale
    )
    expected = _oracle_attention(
        _pad(q, q_lens, max(q_lens)),
        _pad(torch.cat(k_seqs), kv_lens, max(kv_lens)),
        _pad(torch.cat(v_seqs), kv_lens, max(kv_lens)),
        q_lens,
        kv_lens,
        causal=causal,
        sm_scale=sm_scale,
    )
    assert out.shape == q.shape
    _assert_matches(out, _unpad(expected, q_lens), dtype)
    _assert_unchanged(before, (q, k_pages, v_pages, block_table, kv_seqlens, cu_q))
    _assert_no_key_rows_are_zero(out, q_lens, kv_lens, causal=causal)


def test_long_sequence_is_chunked_consistently() -> None:
    """A sequence longer than one query chunk matches the oracle at the chunk seams."""
    gen = _generator(11)
    q = _randn(gen, 1, 2100, 2, 64, dtype=torch.bfloat16)
    k = _randn(gen, 1, 2150, 1, 64, dtype=torch.bfloat16)
    v = _randn(gen, 1, 2150, 1, 64, dtype=torch.bfloat16)
    out = AttentionDenseRefKernel()(q, k, v, causal=True, sm_scale=0.125)
    rows = torch.tensor([0, 1, 2046, 2047, 2048, 2049, 2099])
    expected = _oracle_attention(q, k, v, [2100], [2150], causal=True, sm_scale=0.125)
    _assert_matches(out[:, rows], expected[:, rows], torch.bfloat16)


# ---------------------------------------------------------------------------
# RoPE


def _rope_tables(max_position: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float64).unsqueeze(1) * inv_freq
    return angles.cos().float(), angles.sin().float()


def _oracle_interleaved(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Adjacent pairs as complex numbers times e^{i*angle}."""
    tokens, heads, _ = x.shape
    rotary_dim = 2 * cos.shape[1]
    pairs = torch.view_as_complex(
        x.double()[..., :rotary_dim].reshape(tokens, heads, rotary_dim // 2, 2).contiguous()
    )
    turn = torch.complex(cos.double(), sin.double())[positions.long()].unsqueeze(1)
    rotated = torch.view_as_real(pairs * turn).reshape(tokens, heads, rotary_dim)
    return torch.cat([rotated, x.double()[..., rotary_dim:]], dim=-1)


def _oracle_neox(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the rotary dims."""
    rotary_dim = 2 * cos.shape[1]
    head = x.double()[..., :rotary_dim]
    first, second = head.chunk(2, dim=-1)
    rotate_half = torch.cat([-second, first], dim=-1)
    cos_full = torch.cat([cos, cos], dim=-1).double()[positions.long()].unsqueeze(1)
    sin_full = torch.cat([sin, sin], dim=-1).double()[positions.long()].unsqueeze(1)
    return torch.cat([head * cos_full + rotate_half * sin_full, x.double()[..., rotary_dim:]], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (64, 32), (128, 128), (128, 64), (256, 256)])
@pytest.mark.parametrize("mode", ["neox", "interleaved"])
def test_rope(mode: str, head_dim: int, rotary_dim: int, dtype: torch.dtype) -> None:
    gen = _generator(head_dim + rotary_dim)
    tokens, heads, max_position = 13, 3, 40
    x = _randn(gen, tokens, heads, head_dim, dtype=dtype)
    positions = torch.randint(0, max_position, (tokens,), generator=gen, dtype=torch.int32)
    cos, sin = _rope_tables(max_position, rotary_dim)
    before = _clones(x, positions, cos, sin)
    if mode == "neox":
        out = RopeNeoxRefKernel()(x, positions, cos, sin)
        expected = _oracle_neox(x, positions, cos, sin)
    else:
        out = RopeInterleavedRefKernel()(x, positions, cos, sin)
        expected = _oracle_interleaved(x, positions, cos, sin)
    assert out.shape == x.shape
    _assert_matches(out, expected, dtype)
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:])  # partial rotary passes through
    _assert_unchanged(before, (x, positions, cos, sin))


def test_rope_modes_differ() -> None:
    """Guards the oracles: the two modes disagree on the same input, so swapping them is caught."""
    gen = _generator(3)
    x = _randn(gen, 5, 2, 64, dtype=torch.float16)
    positions = torch.arange(1, 6, dtype=torch.int32)
    cos, sin = _rope_tables(8, 64)
    neox = RopeNeoxRefKernel()(x, positions, cos, sin)
    interleaved = RopeInterleavedRefKernel()(x, positions, cos, sin)
    assert (neox.float() - interleaved.float()).abs().max() > 0.1


# ---------------------------------------------------------------------------
# Append


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("new_len", [4, 1, 0])
def test_append_contiguous(new_len: int, dtype: torch.dtype) -> None:
    gen = _generator(20 + new_len)
    batch, max_len, heads, dim = 3, 12, 2, 64
    starts = [0, 5, 12 - new_len]  # empty cache, middle, filled to capacity
    k_new = _randn(gen, batch, new_len, heads, dim, dtype=dtype)
    v_new = _randn(gen, batch, new_len, heads, dim, dtype=dtype)
    k_cache = _randn(gen, batch, max_len, heads, dim, dtype=dtype)
    v_cache = _randn(gen, batch, max_len, heads, dim, dtype=dtype)
    cache_seqlens = torch.tensor(starts, dtype=torch.int32)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    for b, start in enumerate(starts):
        for i in range(new_len):
            k_expected[b, start + i] = k_new[b, i]
            v_expected[b, start + i] = v_new[b, i]
    before = _clones(k_new, v_new, cache_seqlens)
    AppendContiguousRefKernel()(k_new, v_new, k_cache, v_cache, cache_seqlens)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)
    _assert_unchanged(before, (k_new, v_new, cache_seqlens))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_append_paged(page_size: int, dtype: torch.dtype) -> None:
    gen = _generator(40 + page_size)
    heads, dim = 2, 64
    q_lens = [3, 0, 6, 1, 17]
    starts = [4, 2, 11, 0, 0]
    totals = [s + n for s, n in zip(starts, q_lens, strict=True)]
    pages_per_seq = [math.ceil(t / page_size) for t in totals]
    num_pages = sum(pages_per_seq) + 3
    order = torch.randperm(num_pages, generator=gen).tolist()
    block_table = torch.full((len(q_lens), max(pages_per_seq) + 1), num_pages - 1, dtype=torch.int32)
    for b, n in enumerate(pages_per_seq):
        block_table[b, :n] = torch.tensor([order.pop() for _ in range(n)], dtype=torch.int32)
    k_new = _randn(gen, sum(q_lens), heads, dim, dtype=dtype)
    v_new = _randn(gen, sum(q_lens), heads, dim, dtype=dtype)
    k_pages = _randn(gen, num_pages, page_size, heads, dim, dtype=dtype)
    v_pages = _randn(gen, num_pages, page_size, heads, dim, dtype=dtype)
    cache_seqlens = torch.tensor(starts, dtype=torch.int32)
    cu_q = _offsets(q_lens)
    k_expected, v_expected = k_pages.clone(), v_pages.clone()
    token = 0  # per-token loop: the new token's page and row, one at a time
    for b, (start, n) in enumerate(zip(starts, q_lens, strict=True)):
        for i in range(n):
            position = start + i
            page = int(block_table[b, position // page_size])
            k_expected[page, position % page_size] = k_new[token]
            v_expected[page, position % page_size] = v_new[token]
            token += 1
    before = _clones(k_new, v_new, block_table, cache_seqlens, cu_q)
    AppendPagedRefKernel()(k_new, v_new, k_pages, v_pages, block_table, cache_seqlens, cu_q)
    assert torch.equal(k_pages, k_expected)
    assert torch.equal(v_pages, v_expected)
    _assert_unchanged(before, (k_new, v_new, block_table, cache_seqlens, cu_q))


def test_paged_batch_positions_slots_and_lengths() -> None:
    """Worked by hand: page size 4; sequence 0 has 2 cached keys and 3 new ones (pages 7, 2), sequence
    1 none new, sequence 2 appends at 5.. through a table whose second entry is -1 (no page)."""
    block_table = torch.tensor([[7, 2], [0, 0], [5, -1]], dtype=torch.int32)
    cache_seqlens = torch.tensor([2, 9, 3], dtype=torch.int32)
    cu_seqlens_q = torch.tensor([0, 3, 3, 6], dtype=torch.int32)
    positions, slots, kv_seqlens = BatchPagedRefKernel()(
        block_table, cache_seqlens, cu_seqlens_q, tokens=6, page_size=4
    )
    assert positions.tolist() == [2, 3, 4, 3, 4, 5]
    # 2, 3 on page 7 (rows 28 + 2, 28 + 3); 4 on page 2 (row 8); 3 on page 5 (row 23); 4, 5 have no page
    assert slots.tolist() == [30, 31, 8, 23, -1, -1]
    assert kv_seqlens.tolist() == [5, 9, 6]
    assert positions.dtype == slots.dtype == kv_seqlens.dtype == torch.int32


# ---------------------------------------------------------------------------


def test_one_reference_kernel_per_ref_key() -> None:
    ref_keys = {
        k
        for family in (BatchKey, RopeKey, AppendKey, SlotAppendKey, AttentionKey)
        for k in family
        if k.value.endswith("_ref")
    }
    assert [cls.key for cls in KERNELS] == list(dict.fromkeys(cls.key for cls in KERNELS))
    assert {cls.key for cls in KERNELS} == ref_keys


# ---------------------------------------------------------------------------
# The log-sum-exp


def _oracle_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    causal: bool,
    sm_scale: float,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """float64 torch.logsumexp of the masked scaled (capped) scores of a padded batch: (B, Sq, Hq);
    -inf for a row that sees no key (and for padding rows)."""
    batch, q_max, q_heads, _ = q.shape
    kv_max, kv_heads = k.shape[1], k.shape[2]
    k64 = k.double().repeat_interleave(q_heads // kv_heads, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k64) * sm_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(q_max).view(1, q_max, 1)
    j = torch.arange(kv_max).view(1, 1, kv_max)
    q_len = torch.tensor(q_lens).view(batch, 1, 1)
    kv_len = torch.tensor(kv_lens).view(batch, 1, 1)
    mask = (i < q_len) & (j < kv_len)
    if causal:
        mask &= j <= kv_len - q_len + i
    if window:
        mask &= kv_len - q_len + i - j < window
    masked = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
    return torch.logsumexp(masked, dim=-1).permute(0, 2, 1)  # (B, Sq, Hq)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("causal", "window", "softcap"), [(True, 0, 0.0), (False, 0, 0.0), (True, 4, 0.0), (True, 0, 2.5)]
)
def test_lse_is_the_logsumexp_of_the_scores(
    causal: bool, window: int, softcap: float, dtype: torch.dtype
) -> None:
    """`with_lse` of every reference attention kernel: its output is `__call__`'s, its LSE the float64
    torch.logsumexp of the scores, -inf exactly where a row sees no key, in the Op's token order."""
    gen = _generator(7 + window)
    kv_heads, group, head_dim, sm_scale = 2, 3, 32, 0.3
    q_lens, kv_lens = [5, 9, 0, 3], [19, 4, 6, 3]  # q_len > kv_len: causal rows with no key
    q = _randn(gen, sum(q_lens), kv_heads * group, head_dim, dtype=dtype)
    k = _randn(gen, sum(kv_lens), kv_heads, head_dim, dtype=dtype)
    v = _randn(gen, sum(kv_lens), kv_heads, head_dim, dtype=dtype)
    kw = dict(causal=causal, sm_scale=sm_scale, window=window, softcap=softcap)
    padded_q = _pad(q, q_lens, max(q_lens))
    padded_k = _pad(k, kv_lens, max(kv_lens))
    expected = _oracle_lse(padded_q, padded_k, q_lens, kv_lens, **kw)  # type: ignore[arg-type]
    expected_packed = torch.cat([expected[b, :n] for b, n in enumerate(q_lens)])
    out, lse = AttentionRaggedRefKernel().with_lse(q, k, v, _offsets(q_lens), _offsets(kv_lens), **kw)  # type: ignore[arg-type]
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert torch.equal(out, AttentionRaggedRefKernel()(q, k, v, _offsets(q_lens), _offsets(kv_lens), **kw))  # type: ignore[arg-type]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(expected_packed))
    if causal and not window:
        assert bool(torch.isneginf(lse).any()), "test setup: some row should see no key"
    seen = torch.isfinite(expected_packed)
    torch.testing.assert_close(lse[seen].double(), expected_packed[seen], rtol=0, atol=1e-4)
    # The other layouts give the same numbers for the same sequences (one per cache row / page).
    cache_k = _pad(k, kv_lens, 24)
    cache_v = _pad(v, kv_lens, 24)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    same_q = torch.stack([_pad(q, q_lens, max(q_lens))[b] for b in range(len(q_lens))])
    _, dense_cache_lse = AttentionContiguousRefKernel().with_lse(same_q, cache_k, cache_v, lens, **kw)  # type: ignore[arg-type]
    # The contiguous layout has Sq queries a sequence: sequence 1 (the longest chunk) is the same call.
    assert q_lens[1] == max(q_lens)
    torch.testing.assert_close(dense_cache_lse[1], lse[q_lens[0] : q_lens[0] + q_lens[1]], rtol=0, atol=1e-5)
    pages, table = (
        cache_k.reshape(-1, 1, kv_heads, head_dim),
        torch.arange(4 * 24, dtype=torch.int32).view(4, 24),
    )
    v_pages = cache_v.reshape(-1, 1, kv_heads, head_dim)
    _, paged_lse = AttentionPagedRefKernel().with_lse(
        q,
        pages,
        v_pages,
        table,
        lens,
        _offsets(q_lens),
        **kw,  # type: ignore[arg-type]
    )
    assert torch.equal(paged_lse, lse)


def _merge(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions over disjoint key ranges merged by their LSEs; -inf parts weigh 0."""
    (o1, l1), (o2, l2) = first, second
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1, w2 = torch.exp(l1 - safe).unsqueeze(-1), torch.exp(l2 - safe).unsqueeze(-1)
    return w1 * o1.float() + w2 * o2.float(), lse


def test_split_kv_merge_matches_the_whole() -> None:
    """Attention over the first and the second part of each sequence's cached keys (non-causal),
    merged with the two LSEs, is attention over all of them (a part with no key has LSE -inf)."""
    gen = _generator(11)
    kv_heads, group, head_dim, q_len, split = 2, 2, 32, 6, 10
    kv_lens = [23, 17, 8]  # the last has no key past the split
    q = _randn(gen, 3, q_len, kv_heads * group, head_dim, dtype=torch.float32)
    k = _randn(gen, 3, 32, kv_heads, head_dim, dtype=torch.float32)
    v = _randn(gen, 3, 32, kv_heads, head_dim, dtype=torch.float32)
    lens = torch.tensor(kv_lens, dtype=torch.int32)
    ref = AttentionContiguousRefKernel()

    def attend(k_: torch.Tensor, v_: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.with_lse(q, k_, v_, n, causal=False, sm_scale=0.2)

    whole = attend(k, v, lens)
    first = attend(k, v, lens.clamp(max=split))
    second = attend(k[:, split:].contiguous(), v[:, split:].contiguous(), (lens - split).clamp(min=0).int())
    assert bool(torch.isneginf(second[1][2]).all())
    out, lse = _merge(first, second)
    torch.testing.assert_close(lse, whole[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(out, whole[0], rtol=0, atol=1e-5)
