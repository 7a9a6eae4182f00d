"""Token positions and sequence indices, computed on the device.

RoPE kernels take one int32 position per token. These helpers build them with
torch ops only: no host synchronisation, so they run inside CUDA graphs and
trace under `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch


def sequence_index(
    cu_seqlens: torch.Tensor, total_tokens: int, tokens: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 (total_tokens,): the sequence each packed token belongs to.

    Token t belongs to the b with cu_seqlens[b] <= t < cu_seqlens[b + 1]; searching
    the sequence ends (right side) skips zero-length sequences. `tokens` is
    arange(total_tokens) as int32 if the caller has it.
    """
    if tokens is None:
        tokens = torch.arange(total_tokens, dtype=torch.int32, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True, out_int32=True)


def ragged_positions(
    cu_seqlens: torch.Tensor, total_tokens: int, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 (total_tokens,): each packed token's index within its sequence, plus `offsets[b]`.

    `offsets` (int32 (B,), e.g. cache_seqlens) shifts every token of sequence b.
    """
    tokens = torch.arange(total_tokens, dtype=torch.int32, device=cu_seqlens.device)
    seq = sequence_index(cu_seqlens, total_tokens, tokens)
    start = cu_seqlens.index_select(0, seq)
    if offsets is not None:
        start = start - offsets.index_select(0, seq)
    return tokens - start  # int32 throughout


def batch_positions(
    batch: int, seqlen: int, device: torch.device, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 (batch * seqlen,): position i of every row of a (B, S, ...) batch, plus `offsets[b]`."""
    steps = torch.arange(seqlen, dtype=torch.int32, device=device)
    if offsets is None:
        return steps.repeat(batch)
    # int32 + int32 stays int32: two launches in all.
    return torch.add(offsets[:, None], steps).view(batch * seqlen)


def sequence_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int32 (B,): the length of each packed sequence."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)


def paged_slots(
    block_table: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor, page_size: int
) -> torch.Tensor:
    """int32 (T,): the row of a paged cache viewed as (num_pages * page_size, Hkv, D) that each packed
    token at `positions` goes to, or -1 where its page is outside the block table or names no page
    (a negative entry, or one too large for an int32 row).

    An entry past the pool (>= num_pages) gives a row past the cache, which the kernels skip too.
    """
    if block_table.shape[1] == 0:
        return torch.full_like(positions, -1, dtype=torch.int32)
    seq = sequence_index(cu_seqlens, positions.shape[0])
    page = torch.div(positions, page_size, rounding_mode="floor")
    inside = (positions >= 0) & (page < block_table.shape[1])
    entry = block_table[seq.long(), page.clamp(0, block_table.shape[1] - 1).long()]
    # An entry past INT32_MAX // page_size would wrap the int32 row into the cache: it names none.
    inside &= (entry >= 0) & (entry < (2**31 - 1) // page_size)
    rows = entry * page_size + positions - page * page_size
    return torch.where(inside, rows, -1).to(torch.int32)


def contiguous_slots(positions: torch.Tensor, batch: int, seqlen: int, max_seq: int) -> torch.Tensor:
    """int32 (B * seqlen,): the row of a contiguous cache viewed as (B * max_seq, Hkv, D) that each
    new token at `positions` (int32 (B * seqlen,), sequence-major, from `batch_positions`) goes to,
    or -1 outside the cache's rows of its sequence."""
    by_sequence = positions.view(batch, seqlen)
    first_rows = torch.arange(0, batch * max_seq, max_seq, dtype=torch.int32, device=positions.device)
    inside = (by_sequence >= 0) & (by_sequence < max_seq)
    rows = torch.where(inside, by_sequence + first_rows[:, None], -1)
    return rows.view(-1).to(torch.int32)
