"""Ops over a paged KV cache (num_pages, page_size, Hkv, D): read-only, append, RoPE + append.

q is packed token-major (Tq, Hq, D) with cu_seqlens_q; key position p of sequence b
lives at page block_table[b, p // page_size], row p % page_size.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from tileprefill.context import KVLayout
from tileprefill.kernels.base import PagedAppendKernel, PagedAttentionKernel
from tileprefill.ops.base import COS, SIN, PrefillOp, RotatingOp, StepNames, required
from tileprefill.positions import ragged_positions, sequence_lengths
from tileprefill.selection import Explanation, PrefillPlan
from tileprefill.validation import (
    Dims,
    DtypeRule,
    check_append_capacity,
    check_block_table,
    check_cu_seqlens,
    check_lengths,
    check_rope_positions,
    host_list,
    host_table,
    spec,
)


class PagedInputs(NamedTuple):
    q: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    cu_seqlens_q: torch.Tensor
    kv_seqlens: torch.Tensor | None = None
    k_new: torch.Tensor | None = None
    v_new: torch.Tensor | None = None
    cache_seqlens: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


_Q = spec("q", DtypeRule.ACTIVATION, "Tq, Hq, D")
_K_NEW = spec("k_new", DtypeRule.SAME_AS_Q, "Tq, Hkv, D")
_V_NEW = spec("v_new", DtypeRule.SAME_AS_Q, "Tq, Hkv, D")
_K_PAGES = spec("k_pages", DtypeRule.SAME_AS_Q, "NP, PS, Hkv, D")
_V_PAGES = spec("v_pages", DtypeRule.SAME_AS_Q, "NP, PS, Hkv, D")
_BLOCK_TABLE = spec("block_table", DtypeRule.INT32, "B, MP")
_KV_SEQLENS = spec("kv_seqlens", DtypeRule.INT32, "B")
_CACHE_SEQLENS = spec("cache_seqlens", DtypeRule.INT32, "B")
_CU_Q = spec("cu_seqlens_q", DtypeRule.INT32, "B + 1")
_OUT = spec("out", DtypeRule.SAME_AS_Q, "Tq, Hq, D")


class PagedCacheOp(PrefillOp[PagedInputs]):
    """Layout PAGED: [RoPE of q and k_new at cache_seqlens[b] + i, append,] attention.

    Append Ops write new token i of sequence b at position cache_seqlens[b] + i and
    attend over cache_seqlens[b] + q_len_b keys (q_len_b from cu_seqlens_q, on the device).
    """

    kv_layout: ClassVar[KVLayout] = KVLayout.PAGED
    ragged: ClassVar[bool] = True

    def _check_layout_metadata(self, dims: Dims) -> None:
        pass  # every paged shape rule is in the specs; capacities depend on values

    def _check_values(self, inputs: PagedInputs, dims: Dims) -> None:
        q_lens = check_cu_seqlens("cu_seqlens_q", host_list(inputs.cu_seqlens_q), dims["Tq"].value, "q")
        page_size = dims["PS"].value
        capacity = dims["MP"].value * page_size
        capacity_is = f"max_pages {dims['MP'].value} * page_size {page_size}"
        if self.appends:
            cache_lens = host_list(required(inputs.cache_seqlens))
            check_append_capacity("cache_seqlens", cache_lens, q_lens, capacity, capacity_is)
            kv_lens = [c + n for c, n in zip(cache_lens, q_lens, strict=True)]
            if self.rotates:
                last = [c + n - 1 if n else -1 for c, n in zip(cache_lens, q_lens, strict=True)]
                check_rope_positions("cos", last, dims["P"].value, "new tokens sit at cache_seqlens[b] + i")
        else:
            kv_lens = host_list(required(inputs.kv_seqlens))
            check_lengths("kv_seqlens", kv_lens, capacity, capacity_is)
        check_block_table(host_table(inputs.block_table), kv_lens, page_size, dims["NP"].value)

    def _execute(self, steps: StepNames, inputs: PagedInputs, dims: Dims) -> torch.Tensor:
        q, cu_q = inputs.q, inputs.cu_seqlens_q
        if steps.append is None:
            kv_lens = required(inputs.kv_seqlens)
        else:
            cache_lens = required(inputs.cache_seqlens)
            k_new, v_new = required(inputs.k_new), required(inputs.v_new)
            if steps.rope is not None:
                cos, sin = required(inputs.cos), required(inputs.sin)
                positions = ragged_positions(cu_q, dims["Tq"].value, offsets=cache_lens)
                q = self._rotate(steps.rope, q, positions, cos, sin)
                k_new = self._rotate(steps.rope, k_new, positions, cos, sin)
            append = self._kernel(steps.append)
            assert isinstance(append, PagedAppendKernel)
            append(k_new, v_new, inputs.k_pages, inputs.v_pages, inputs.block_table, cache_lens, cu_q)
            kv_lens = cache_lens + sequence_lengths(cu_q)
        attention = self._kernel(steps.attention)
        assert isinstance(attention, PagedAttentionKernel)
        return attention(
            q,
            inputs.k_pages,
            inputs.v_pages,
            inputs.block_table,
            kv_lens,
            cu_q,
            causal=self.causal,
            sm_scale=self._scale(dims),
        )


class GQAPagedCachePrefill(PagedCacheOp):
    """Attention of packed q (Tq, Hq, D) over the first kv_seqlens[b] keys of each sequence
    in k_pages, v_pages (num_pages, page_size, Hkv, D) through block_table (B, max_pages)
    -> (Tq, Hq, D). kv_seqlens counts the query chunk's own keys; causal masks are
    bottom-right aligned (a query that sees no key outputs 0). Any page_size >= 1.

    `validate=False` skips (they read device values): cu_seqlens_q starts at 0, never
    decreases and ends at Tq; kv_seqlens[b] in [0, max_pages * page_size]; the block_table
    entries of the pages each sequence reads are in [0, num_pages).
    """

    input_specs = (_Q, _K_PAGES, _V_PAGES, _BLOCK_TABLE, _KV_SEQLENS, _CU_Q)
    output_spec = _OUT

    def __call__(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> torch.Tensor:
        return self._run(PagedInputs(q, k_pages, v_pages, block_table, cu_seqlens_q, kv_seqlens=kv_seqlens))

    def plan_for(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> PrefillPlan:
        return self._plan_for(
            PagedInputs(q, k_pages, v_pages, block_table, cu_seqlens_q, kv_seqlens=kv_seqlens)
        )

    def explain(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> Explanation:
        return self._explain(
            PagedInputs(q, k_pages, v_pages, block_table, cu_seqlens_q, kv_seqlens=kv_seqlens)
        )


class GQAPagedCacheAppendPrefill(PagedCacheOp):
    """Append k_new, v_new (Tq, Hkv, D), packed by cu_seqlens_q, at positions cache_seqlens[b] + i
    of each sequence's pages (in place), then attend q (Tq, Hq, D) over cache_seqlens[b] + q_len_b keys.

    cache_seqlens is not changed: the caller advances it. The caller allocates the pages:
    block_table must cover cache_seqlens[b] + q_len_b positions. Every check runs before the
    first write, so a rejected call leaves the pages unchanged.
    `validate=False` skips (they read device values): the cu_seqlens_q checks;
    cache_seqlens[b] >= 0 and cache_seqlens[b] + q_len_b <= max_pages * page_size; the block_table
    entries of the pages each sequence uses are in [0, num_pages).
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_PAGES, _V_PAGES, _BLOCK_TABLE, _CACHE_SEQLENS, _CU_Q)
    output_spec = _OUT

    def __call__(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> torch.Tensor:
        return self._run(
            PagedInputs(q, k_pages, v_pages, block_table, cu_seqlens_q, None, k_new, v_new, cache_seqlens)
        )

    def plan_for(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> PrefillPlan:
        return self._plan_for(
            PagedInputs(q, k_pages, v_pages, block_table, cu_seqlens_q, None, k_new, v_new, cache_seqlens)
        )

    def explain(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> Explanation:
        return self._explain(
            PagedInputs(q, k_pages, v_pages, block_table, cu_seqlens_q, None, k_new, v_new, cache_seqlens)
        )


class GQAPagedCacheRopeAppendPrefill(RotatingOp[PagedInputs], PagedCacheOp):
    """`GQAPagedCacheAppendPrefill` with RoPE: q and k_new are rotated (copies) at positions
    cache_seqlens[b] + i, the rotated keys are appended, then attention.

    cos, sin float32 (P, rotary_dim // 2). `validate=False` skips (they read device values):
    the checks of the append Op, and cache_seqlens[b] + q_len_b - 1 < P.
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_PAGES, _V_PAGES, _BLOCK_TABLE, _CACHE_SEQLENS, _CU_Q, COS, SIN)
    output_spec = _OUT

    def __call__(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        return self._run(
            PagedInputs(
                q, k_pages, v_pages, block_table, cu_seqlens_q, None, k_new, v_new, cache_seqlens, cos, sin
            )
        )

    def plan_for(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> PrefillPlan:
        return self._plan_for(
            PagedInputs(
                q, k_pages, v_pages, block_table, cu_seqlens_q, None, k_new, v_new, cache_seqlens, cos, sin
            )
        )

    def explain(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> Explanation:
        return self._explain(
            PagedInputs(
                q, k_pages, v_pages, block_table, cu_seqlens_q, None, k_new, v_new, cache_seqlens, cos, sin
            )
        )
