"""Torch reference kernels: every plan step, on any device.

These are the CPU execution path (Arch.CPU selects them) and the oracle that
every GPU test compares the TileLang kernels against, so they favour being
obviously right over being fast: compute in float32, return the input dtype,
and follow the conventions of `kernels/base.py` literally.

Sequence lengths and offsets (`cu_seqlens_*`, `kv_seqlens`, `cache_seqlens`)
are read to the host with `.tolist()` and the batch is walked in a Python
loop; each sequence's work is vectorised. That host sync is acceptable for a
reference and is the reason these kernels are not used on a GPU in production.

On CUDA the fp32 matrix products follow torch's TF32 switch
(`torch.backends.cuda.matmul.allow_tf32`, off by default); leave it off where
the reference serves as an oracle.

All four attention kernels gather one sequence's q, k and v and hand them to
`_attend_sequence`; both RoPE kernels are `_rotate` with a mode.
"""

from __future__ import annotations

from typing import ClassVar, assert_never

import torch
from typing_extensions import Unpack

from tileprefill.context import RopeMode
from tileprefill.kernels.base import (
    AttentionOptions,
    AttentionScalars,
    ContiguousAppendKernel,
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    Kernel,
    PagedAppendKernel,
    PagedAttentionKernel,
    PagedBatchKernel,
    RaggedAttentionKernel,
    RopeKernel,
    SlotAppendKernel,
)
from tileprefill.keys import AppendKey, AttentionKey, BatchKey, RopeKey, SlotAppendKey
from tileprefill.positions import paged_slots, ragged_positions, sequence_lengths

# Query rows per chunk of one sequence's attention; with the element budget it
# bounds the fp32 scores held at once (a chunk's scores are Hq x rows x keys).
_MAX_QUERY_ROWS = 2048
_SCORE_ELEMENTS_BUDGET = 1 << 26


# ---------------------------------------------------------------------------
# The batch step


class BatchPagedRefKernel(PagedBatchKernel):
    """Torch ops on the device (no host sync): positions, slots and kv lengths of the new tokens."""

    key: ClassVar[BatchKey] = BatchKey.PAGED_REF

    def __call__(
        self,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        tokens: int,
        page_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        positions = ragged_positions(cu_seqlens_q, tokens, offsets=cache_seqlens)
        slots = paged_slots(block_table, positions, cu_seqlens_q, page_size)
        kv_seqlens = (cache_seqlens + sequence_lengths(cu_seqlens_q)).to(torch.int32)
        return positions, slots, kv_seqlens


# ---------------------------------------------------------------------------
# RoPE


def _rotary_halves(mode: RopeMode, rotary_dim: int) -> tuple[slice, slice]:
    """The dims of x1 and x2 in `out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin`."""
    match mode:
        case RopeMode.NEOX:
            half = rotary_dim // 2
            return slice(0, half), slice(half, rotary_dim)
        case RopeMode.INTERLEAVED:
            return slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)
        case RopeMode.NONE:
            raise ValueError("mode: expected neox or interleaved for a RoPE kernel, got none")
        case _:
            assert_never(mode)


def _rotate(
    mode: RopeMode, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    rotary_dim = 2 * cos.shape[1]
    first, second = _rotary_halves(mode, rotary_dim)
    index = positions.long()
    # (T, 1, R/2): one angle per token and rotated pair, shared by every head.
    cos_t = cos.float()[index].unsqueeze(1)
    sin_t = sin.float()[index].unsqueeze(1)
    x1 = x[..., first].float()
    x2 = x[..., second].float()
    out = x.clone(memory_format=torch.contiguous_format)  # dims >= rotary_dim pass through
    out[..., first] = (x1 * cos_t - x2 * sin_t).to(x.dtype)
    out[..., second] = (x2 * cos_t + x1 * sin_t).to(x.dtype)
    return out


class RopeNeoxRefKernel(RopeKernel):
    key: ClassVar[RopeKey] = RopeKey.NEOX_REF

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        return _rotate(RopeMode.NEOX, x, positions, cos, sin)


class RopeInterleavedRefKernel(RopeKernel):
    key: ClassVar[RopeKey] = RopeKey.INTERLEAVED_REF

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        return _rotate(RopeMode.INTERLEAVED, x, positions, cos, sin)


# ---------------------------------------------------------------------------
# Append


class AppendContiguousRefKernel(ContiguousAppendKernel):
    key: ClassVar[AppendKey] = AppendKey.CONTIGUOUS_REF

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> None:
        new_len = k_new.shape[1]
        for b, start in enumerate(cache_seqlens.tolist()):
            k_cache[b, start : start + new_len] = k_new[b]
            v_cache[b, start : start + new_len] = v_new[b]


class AppendPagedRefKernel(PagedAppendKernel):
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
        offsets = cu_seqlens_q.tolist()
        for b, start in enumerate(cache_seqlens.tolist()):
            first, last = offsets[b], offsets[b + 1]
            positions = torch.arange(start, start + last - first, device=block_table.device)
            pages = block_table[b, positions // page_size].long()
            rows = positions % page_size
            k_pages[pages, rows] = k_new[first:last]
            v_pages[pages, rows] = v_new[first:last]


class SlotAppendRefKernel(SlotAppendKernel):
    """Token t to slot slot_mapping[t] of the pages (row slot % page_size of page slot // page_size,
    through any strides); a slot outside [0, num_pages * page_size) (-1: skip) writes nothing, as in
    the TileLang program. Torch ops on the device."""

    key: ClassVar[SlotAppendKey] = SlotAppendKey.REF

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        num_pages, page_size = k_pages.shape[:2]
        slots = slot_mapping.long()
        keep = ((slots >= 0) & (slots < num_pages * page_size)).nonzero().squeeze(1)
        pages, rows = slots[keep] // page_size, slots[keep] % page_size
        k_pages[pages, rows] = k_new[keep]
        v_pages[pages, rows] = v_new[keep]


# ---------------------------------------------------------------------------
# Attention


def _attend_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scalars: AttentionScalars,
) -> None:
    """Attention of one sequence, written into `out`, and its log-sum-exp into `lse`.

    q and out (q_len, Hq, D), k and v (kv_len, Hkv, D). Query i sees keys
    j < kv_len, and j <= kv_len - q_len + i when causal (bottom-right aligned),
    and with a sliding `window` > 0 (causal only) also j > kv_len - q_len + i - window;
    a query that sees no key is 0. A `softcap` > 0 caps the scaled scores x to
    softcap * tanh(x / softcap) before the mask and the softmax.

    `lse` (q_len, Hq) float32 gets ln(sum over visible keys of exp(x)), x the scaled (capped)
    scores; -inf for a query that sees no key, NaN where its denominator is NaN.
    """
    causal, sm_scale, window, softcap = scalars
    q_len, q_heads, head_dim = q.shape
    kv_len, kv_heads, _ = k.shape
    group = q_heads // kv_heads
    if q_len == 0:
        return
    rows_per_chunk = max(1, min(_MAX_QUERY_ROWS, _SCORE_ELEMENTS_BUDGET // (q_heads * max(kv_len, 1))))
    # (Hkv, group, q_len, D): query head h = kv_head * group + g reads kv_head.
    q_grouped = q.float().reshape(q_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
    # (Hkv, 1, kv_len, D): broadcast over the group's query heads.
    k_heads = k.float().permute(1, 0, 2).unsqueeze(1)
    v_heads = v.float().permute(1, 0, 2).unsqueeze(1)
    for row_start in range(0, q_len, rows_per_chunk):
        row_end = min(q_len, row_start + rows_per_chunk)
        # Keys any query of this chunk may see; causal chunks stop at the last row's diagonal, and
        # windowed ones start at the first row's window.
        visible = kv_len if not causal else max(0, min(kv_len, kv_len - q_len + row_end))
        first = max(0, min(visible, kv_len - q_len + row_start - window + 1)) if window else 0
        if visible == first:
            out[row_start:row_end] = 0
            lse[row_start:row_end] = float("-inf")
            continue
        keys = slice(first, visible)
        scores = torch.matmul(q_grouped[:, :, row_start:row_end], k_heads[:, :, keys].transpose(2, 3))
        scores *= sm_scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        if causal:
            rows = torch.arange(row_start, row_end, device=q.device).unsqueeze(1)
            cols = torch.arange(first, visible, device=q.device).unsqueeze(0)
            hidden = cols > kv_len - q_len + rows
            if window:
                hidden |= cols <= kv_len - q_len + rows - window
            scores.masked_fill_(hidden, float("-inf"))
        # Rows with every key masked have max -inf; shifting by 0 instead makes them all-zero weights.
        row_max = scores.amax(dim=-1, keepdim=True)
        row_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
        weights = torch.exp(scores - row_max)
        denom = weights.sum(dim=-1, keepdim=True)
        chunk = torch.matmul(weights, v_heads[:, :, keys])  # (Hkv, group, rows, D)
        # A row that saw no key (denom 0) is 0; a NaN or Inf in its inputs (denom NaN) stays NaN.
        chunk = torch.where(denom != 0, chunk / denom, torch.zeros_like(chunk))
        out[row_start:row_end] = chunk.permute(2, 0, 1, 3).reshape(row_end - row_start, q_heads, head_dim)
        # ln(sum exp(x)) = max + ln(sum exp(x - max)); a row without keys has max 0 here, ln(0) = -inf.
        row_lse = (row_max + torch.log(denom)).squeeze(-1)  # (Hkv, group, rows)
        lse[row_start:row_end] = row_lse.permute(2, 0, 1).reshape(row_end - row_start, q_heads)


class AttentionDenseRefKernel(DenseAttentionKernel):
    key: ClassVar[AttentionKey] = AttentionKey.DENSE_REF

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        return self.with_lse(q, k, v, **options)[0]

    def with_lse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        scalars = AttentionScalars(**options)
        for b in range(q.shape[0]):
            _attend_sequence(
                q[b],
                k[b],
                v[b],
                out[b],
                lse[b],
                scalars,
            )
        return out, lse


class AttentionRaggedRefKernel(RaggedAttentionKernel):
    key: ClassVar[AttentionKey] = AttentionKey.RAGGED_REF

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        return self.with_lse(q, k, v, cu_seqlens_q, cu_seqlens_kv, **options)[0]

    def with_lse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        scalars = AttentionScalars(**options)
        q_offsets = cu_seqlens_q.tolist()
        kv_offsets = cu_seqlens_kv.tolist()
        for b in range(len(q_offsets) - 1):
            q_rows = slice(q_offsets[b], q_offsets[b + 1])
            kv_rows = slice(kv_offsets[b], kv_offsets[b + 1])
            _attend_sequence(
                q[q_rows],
                k[kv_rows],
                v[kv_rows],
                out[q_rows],
                lse[q_rows],
                scalars,
            )
        return out, lse


class AttentionContiguousRefKernel(ContiguousAttentionKernel):
    key: ClassVar[AttentionKey] = AttentionKey.CONTIGUOUS_REF

    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        return self.with_lse(q, k_cache, v_cache, kv_seqlens, **options)[0]

    def with_lse(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        scalars = AttentionScalars(**options)
        for b, kv_len in enumerate(kv_seqlens.tolist()):
            _attend_sequence(
                q[b],
                k_cache[b, :kv_len],
                v_cache[b, :kv_len],
                out[b],
                lse[b],
                scalars,
            )
        return out, lse


class AttentionPagedRefKernel(PagedAttentionKernel):
    key: ClassVar[AttentionKey] = AttentionKey.PAGED_REF

    def __call__(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        return self.with_lse(q, k_pages, v_pages, block_table, kv_seqlens, cu_seqlens_q, **options)[0]

    def with_lse(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, page_size, kv_heads, head_dim = k_pages.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        scalars = AttentionScalars(**options)
        q_offsets = cu_seqlens_q.tolist()
        for b, kv_len in enumerate(kv_seqlens.tolist()):
            # Whole pages in sequence order, then cut to the valid keys.
            pages = block_table[b, : -(-kv_len // page_size)].long()
            k = k_pages[pages].reshape(-1, kv_heads, head_dim)[:kv_len]
            v = v_pages[pages].reshape(-1, kv_heads, head_dim)[:kv_len]
            q_rows = slice(q_offsets[b], q_offsets[b + 1])
            _attend_sequence(
                q[q_rows],
                k,
                v,
                out[q_rows],
                lse[q_rows],
                scalars,
            )
        return out, lse


KERNELS: tuple[type[Kernel], ...] = (
    BatchPagedRefKernel,
    RopeNeoxRefKernel,
    RopeInterleavedRefKernel,
    AppendContiguousRefKernel,
    AppendPagedRefKernel,
    SlotAppendRefKernel,
    AttentionDenseRefKernel,
    AttentionRaggedRefKernel,
    AttentionContiguousRefKernel,
    AttentionPagedRefKernel,
)
