"""Token positions and sequence indices, computed on the device.

RoPE kernels take one int32 position per token. These helpers build them with
torch ops only: no host synchronisation, so they run inside CUDA graphs and
trace under `torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import torch


def sequence_index(cu_seqlens: torch.Tensor, total_tokens: int) -> torch.Tensor:
    """int32 (total_tokens,): the sequence each packed token belongs to.

    Token t belongs to the b with cu_seqlens[b] <= t < cu_seqlens[b + 1]; searching
    the sequence ends (right side) skips zero-length sequences.
    """
    tokens = torch.arange(total_tokens, dtype=torch.int32, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True, out_int32=True)


def ragged_positions(
    cu_seqlens: torch.Tensor, total_tokens: int, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 (total_tokens,): each packed token's index within its sequence, plus `offsets[b]`.

    `offsets` (int32 (B,), e.g. cache_seqlens) shifts every token of sequence b.
    """
    seq = sequence_index(cu_seqlens, total_tokens)
    tokens = torch.arange(total_tokens, dtype=torch.int32, device=cu_seqlens.device)
    start = cu_seqlens.index_select(0, seq)
    if offsets is not None:
        start = start - offsets.index_select(0, seq)
    return (tokens - start).to(torch.int32)


def batch_positions(
    batch: int, seqlen: int, device: torch.device, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """int32 (batch * seqlen,): position i of every row of a (B, S, ...) batch, plus `offsets[b]`."""
    steps = torch.arange(seqlen, dtype=torch.int32, device=device)
    if offsets is None:
        return steps.repeat(batch)
    return (offsets[:, None] + steps[None, :]).reshape(batch * seqlen).to(torch.int32)


def sequence_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int32 (B,): the length of each packed sequence."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int32)
