"""How the runs of a plan compose their steps, each a launch `plan` bound with the batch's metadata:

- without a cache (`NoCachePlan`): [RoPE of q and k,] attention;
- over a KV cache (`CachePlan`): [RoPE, append | RoPE + append in one,] attention.

RoPE writes new tensors (the caller's q and keys are inputs, never changed); the appends write the
caches in place, so a run first checks that the caches share no memory with what it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar, NamedTuple

import torch

from tileprefill.kernels.base import DenseAttentionLaunch, RaggedAttentionLaunch, RopeAppendLaunch, RopeLaunch
from tileprefill.ops.op import ResultT
from tileprefill.ops.plan import BatchPlan
from tileprefill.validation import check_apart, check_kv_order, check_same_strides


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` (T, heads, D) or (B, S, heads, D) as rows (N, heads, D): the launches of RoPE and appends
    see any layout's tokens so. A view of t's memory (the programs read and write it in place) where
    a sequence's rows follow the previous sequence's at t's row stride: any view of a (B, S, ...)
    allocation, a fused projection's slices included. A batch of sequences apart (a padded batch's
    slice) has no such view and is copied."""
    if t.dim() == 3:
        return t
    batch, seq = t.shape[0], t.shape[1]
    if batch == 1 or seq == 1 or t.stride(0) == seq * t.stride(1):
        return t.view(-1, *t.shape[-2:])
    return t.reshape(-1, *t.shape[-2:])


def rotate(
    rope_q: RopeLaunch,
    rope_k: RopeLaunch,
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k into new contiguous tensors (the inputs are the caller's, any views), one
    launch each."""
    rotated_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rotated_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    rope_q(as_rows(q), q_positions, cos, sin, as_rows(rotated_q))
    rope_k(as_rows(k), k_positions, cos, sin, as_rows(rotated_k))
    return rotated_q, rotated_k


def rotate_and_write(
    rope_append: RopeAppendLaunch,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """RoPE of q (into a new tensor, returned) and of k_new, and the write of the rotated keys and
    v_new into the caches (blocks, rows, Hkv, D) at `slots` (one per new token: row slot % rows of
    block slot // rows), in one launch."""
    rotated = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rope_append(
        as_rows(q),
        as_rows(k_new),
        as_rows(v_new),
        positions,
        slots,
        cos,
        sin,
        k_cache,
        v_cache,
        as_rows(rotated),
    )
    return rotated


class NoCacheLaunches(NamedTuple):
    """What the runs of a plan without a cache launch, with the plan's metadata bound."""

    cu_seqlens_q: torch.Tensor | None  # varlen only
    cu_seqlens_kv: torch.Tensor | None
    q_positions: torch.Tensor  # RoPE positions (empty without RoPE)
    k_positions: torch.Tensor
    dense: DenseAttentionLaunch | None
    ragged: RaggedAttentionLaunch | None
    rope_q: RopeLaunch | None
    rope_k: RopeLaunch | None


class NoCachePlan(BatchPlan[NoCacheLaunches, ResultT]):
    def _launch(self, tensors: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor) -> None:
        """`run`'s tensors: q, k, v[, cos, sin]."""
        q, k, v, *tables = tensors
        b = self._launches
        if b.rope_q is not None and b.rope_k is not None:
            cos, sin = tables
            q, k = rotate(b.rope_q, b.rope_k, q, k, b.q_positions, b.k_positions, cos, sin)
        if b.ragged is not None:
            assert b.cu_seqlens_q is not None and b.cu_seqlens_kv is not None
            b.ragged(q, k, v, b.cu_seqlens_q, b.cu_seqlens_kv, out, lse)
        else:
            assert b.dense is not None
            b.dense(q, k, v, out, lse)


class CacheLaunches(NamedTuple):
    """What the runs of a plan over a KV cache (contiguous or paged) launch: [RoPE, append | RoPE +
    append in one,] attention, each with the plan's metadata tensors (lengths, block table,
    cu_seqlens) that follow the caches in its launch."""

    positions: torch.Tensor  # positions of the new tokens (RoPE Ops; empty otherwise)
    slots: torch.Tensor  # cache rows of the new tokens (the fused RoPE + append step; empty otherwise)
    #: (q, k_cache, v_cache, *attention_metadata, out, lse)
    attention: Callable[..., None]
    attention_metadata: tuple[torch.Tensor, ...]
    #: (k_new, v_new, k_cache, v_cache, *append_metadata), or None
    append: Callable[..., None] | None
    append_metadata: tuple[torch.Tensor, ...]
    rope_q: RopeLaunch | None
    rope_k: RopeLaunch | None
    rope_append: RopeAppendLaunch | None


class CachePlan(BatchPlan[CacheLaunches, ResultT]):
    """A plan over a KV cache: its runs rotate and write the new keys (append Ops), then attend."""

    #: The names of the two cache inputs, for errors.
    cache_names: ClassVar[tuple[str, str]]

    def _launch(self, tensors: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor) -> None:
        """`run`'s tensors: q, [k_new, v_new,] the two caches[, cos, sin]."""
        k_new = v_new = cos = sin = None
        if len(tensors) == 3:
            q, k_cache, v_cache = tensors
        elif len(tensors) == 5:
            q, k_new, v_new, k_cache, v_cache = tensors
        else:
            q, k_new, v_new, k_cache, v_cache, cos, sin = tensors
        s = self._launches
        # The caches are views the programs read (and appends write) in place, never copies: one set
        # of strides for both, in the order the plan was made for (`check_metadata` checked each).
        k_name, v_name = self.cache_names
        check_same_strides({k_name: k_cache, v_name: v_cache})
        check_kv_order(k_name, k_cache, self._context.kv_order, "the plan's shape.kv_order")
        if k_new is not None and v_new is not None:
            # An append writes the caches in place while its launches read q and the new rows.
            check_apart({k_name: k_cache, v_name: v_cache}, {"q": q, "k_new": k_new, "v_new": v_new})
        if s.rope_append is not None:
            assert k_new is not None and v_new is not None and cos is not None and sin is not None
            q = rotate_and_write(
                s.rope_append, q, k_new, v_new, s.positions, s.slots, cos, sin, k_cache, v_cache
            )
        elif s.append is not None:
            assert k_new is not None and v_new is not None
            if s.rope_q is not None and s.rope_k is not None:
                assert cos is not None and sin is not None
                q, k_new = rotate(s.rope_q, s.rope_k, q, k_new, s.positions, s.positions, cos, sin)
            s.append(k_new, v_new, k_cache, v_cache, *s.append_metadata)
        s.attention(q, k_cache, v_cache, *s.attention_metadata, out, lse)
