"""Ops over a paged KV cache (num_pages, page_size, Hkv, D): read-only, append, RoPE + append.

q is packed token-major (Tq, Hq, D) with cu_seqlens_q; key position p of sequence b
lives at page block_table[b, p // page_size], row p % page_size.

`plan(block_table, <lengths>, cu_seqlens_q, shape=PagedShape(...))` takes the
batch's metadata; `run` takes the data tensors of one layer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, overload

import torch
from typing_extensions import Unpack

from tileprefill.context import KVLayout, KVOrder
from tileprefill.kernels.base import (
    PagedAppendKernel,
    PagedAttentionKernel,
    PagedBatchKernel,
)
from tileprefill.ops.op import (
    COS,
    SIN,
    OpOptions,
    OutputAndLSE,
    PrefillOp,
    ResultT,
    RopeOpOptions,
    RotatingOp,
)
from tileprefill.ops.plan import Requirement
from tileprefill.ops.steps import CacheLaunches, CachePlan
from tileprefill.validation import (
    Binding,
    Dims,
    DtypeRule,
    StrideRule,
    check_append_capacity,
    check_block_table,
    check_cu_seqlens,
    check_lengths,
    check_rope_positions,
    host_values,
    kv_order_of,
    rotary_dim_of,
    rows,
    spec,
)


class PagedShape(NamedTuple):
    """The data tensors' sizes a paged plan is made for (the same in every layer of the batch)."""

    tokens_q: int  # Tq: q (Tq, Hq, D)
    page_size: int  # PS: pages (num_pages, PS, Hkv, D)
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    rotary_dim: int = 0  # RoPE Ops built without rotary_dim: 2 * cos.shape[1]
    kv_order: KVOrder = KVOrder.NHD  # the pages' row/head order (any strides: `check_view`)


_Q = spec("q", DtypeRule.ACTIVATION, "Tq, Hq, D", StrideRule.VIEW)
_K_NEW = spec("k_new", DtypeRule.SAME_AS_Q, "Tq, Hkv, D", StrideRule.VIEW)
_V_NEW = spec("v_new", DtypeRule.SAME_AS_Q, "Tq, Hkv, D", StrideRule.VIEW)
_K_PAGES = spec("k_pages", DtypeRule.SAME_AS_Q, "NP, PS, Hkv, D", StrideRule.VIEW)
_V_PAGES = spec("v_pages", DtypeRule.SAME_AS_Q, "NP, PS, Hkv, D", StrideRule.VIEW)
_BLOCK_TABLE = spec("block_table", DtypeRule.INT32, "B, MP")
_KV_SEQLENS = spec("kv_seqlens", DtypeRule.INT32, "B")
_CACHE_SEQLENS = spec("cache_seqlens", DtypeRule.INT32, "B")
_CU_Q = spec("cu_seqlens_q", DtypeRule.INT32, "B + 1")
_OUT = spec("out", DtypeRule.SAME_AS_Q, "Tq, Hq, D", StrideRule.VIEW)
_LSE = spec("lse", DtypeRule.FLOAT32, "Tq, Hq")


class PagedPlan(CachePlan[ResultT]):
    """A plan over a paged cache: the block table, lengths, and (appending) each new token's position
    and slot."""

    cache_names = ("k_pages", "v_pages")


class PagedCacheOp(PrefillOp[ResultT]):
    """Layout PAGED: [RoPE of q and k_new at cache_seqlens[b] + i, append,] attention.

    Append Ops write new token i of sequence b at position cache_seqlens[b] + i and
    attend over cache_seqlens[b] + q_len_b keys (q_len_b from cu_seqlens_q, on the device).
    """

    plan_class: ClassVar[type[PagedPlan[Any]]]
    kv_layout: ClassVar[KVLayout] = KVLayout.PAGED
    ragged: ClassVar[bool] = True

    def _plan_paged(
        self,
        block_table: torch.Tensor,
        lengths: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        shape: PagedShape,
        plan_class: type[PagedPlan[Any]],
    ) -> PagedPlan[ResultT]:
        shape = shape._replace(device=self._concrete_device(shape.device))
        extra = {
            "Tq": Binding(shape.tokens_q, "shape.tokens_q"),
            "PS": Binding(shape.page_size, "shape.page_size"),
        }
        metadata = {"block_table": block_table, "cu_seqlens_q": cu_seqlens_q}
        metadata["cache_seqlens" if self.appends else "kv_seqlens"] = lengths
        dims = self._metadata_dims(shape, [metadata[s.name] for s in self.plan_specs], extra)
        if shape.page_size < 1:
            raise ValueError(f"shape.page_size: expected an integer >= 1, got {shape.page_size}")
        context, selected = self._decide(shape, shape.page_size, shape.kv_order)
        rotary_dim = self._rotary_dim(shape) if self.rotates else 0
        if self.rotates:
            dims["R2"] = Binding(rotary_dim // 2, "rotary_dim")
        requirements = self._check_values(block_table, lengths, cu_seqlens_q, dims) if self.validate else []
        static = self.static_facts(context, shape, rotary_dim=rotary_dim)
        if selected.batch is not None:
            # The batch step: one int32 buffer holds positions and slots (T each) and kv lengths (B).
            tokens, sequences = shape.tokens_q, dims["B"].value
            derived = torch.empty(2 * tokens + sequences, dtype=torch.int32, device=shape.device)
            positions, slots = derived[:tokens], derived[tokens : 2 * tokens]
            cache_seqlens, kv_seqlens = lengths, derived[2 * tokens :]
            derive = self._kernel_of(selected.batch, PagedBatchKernel).bind(static)
            derive(block_table, cache_seqlens, cu_seqlens_q, positions, slots, kv_seqlens)
        else:
            positions = slots = torch.empty(0, dtype=torch.int32, device=shape.device)
            cache_seqlens = kv_seqlens = lengths
        attention_facts = self.attention_facts(static, shape.device)
        rope_q, rope_k = self._bind_rope(selected, static)
        launches = CacheLaunches(
            positions=positions,
            slots=slots,
            attention=self._kernel_of(selected.attention, PagedAttentionKernel).bind(attention_facts),
            attention_metadata=(block_table, kv_seqlens, cu_seqlens_q),
            append=None
            if selected.append is None
            else self._kernel_of(selected.append, PagedAppendKernel).bind(static),
            append_metadata=(block_table, cache_seqlens, cu_seqlens_q),
            rope_q=rope_q,
            rope_k=rope_k,
            rope_append=self._bind_rope_append(selected, static),
        )
        return plan_class(self, (context, selected), shape, dims, requirements, launches)

    def _check_values(
        self, block_table: torch.Tensor, lengths: torch.Tensor, cu_seqlens_q: torch.Tensor, dims: Dims
    ) -> list[Requirement]:
        """The value checks (one host copy of the metadata). What depends on data sizes the plan does
        not fix (num_pages, the RoPE table's rows) is returned as requirements `run` checks."""
        table_values, length_values, cu = host_values([block_table, lengths, cu_seqlens_q])
        q_lens = check_cu_seqlens("cu_seqlens_q", cu, dims["Tq"].value, "q")
        page_size = dims["PS"].value
        capacity = dims["MP"].value * page_size
        capacity_is = f"max_pages {dims['MP'].value} * page_size {page_size}"
        requirements: list[Requirement] = []
        if self.appends:
            cache_lens = length_values
            check_append_capacity("cache_seqlens", cache_lens, q_lens, capacity, capacity_is)
            kv_lens = [c + n for c, n in zip(cache_lens, q_lens, strict=True)]
            if self.rotates:
                last = [c + n - 1 if n else -1 for c, n in zip(cache_lens, q_lens, strict=True)]
                requirements.append(_rope_rows(last))
        else:
            kv_lens = length_values
            check_lengths("kv_seqlens", kv_lens, capacity, capacity_is)
        table = rows(table_values, dims["B"].value, dims["MP"].value)
        used = [
            entry for row, n in zip(table, kv_lens, strict=True) for entry in row[: math.ceil(n / page_size)]
        ]
        if used:
            low, high = min(used), max(used)
            requirements.append(
                Requirement(
                    "NP",
                    lambda pages: 0 <= low and high < pages,
                    lambda pages: check_block_table(table, kv_lens, page_size, pages),
                )
            )
        return requirements

    # --- the one-shot call ------------------------------------------------------------------------

    def _plan_call(self, tensors: Mapping[str, torch.Tensor]) -> PagedPlan[ResultT]:
        """The plan of one call's inputs (by name), checked as one call: errors name its inputs."""
        dims = self._check_call(tensors)
        q = tensors["q"]
        shape = PagedShape(
            tokens_q=dims["Tq"].value,
            page_size=dims["PS"].value,
            heads=dims["Hq"].value,
            kv_heads=dims["Hkv"].value,
            head_dim=dims["D"].value,
            dtype=q.dtype,
            device=q.device,
            rotary_dim=rotary_dim_of(dims, self.rotary_dim) if self.rotates else 0,
            kv_order=kv_order_of(tensors["k_pages"]) or KVOrder.NHD,
        )
        self._shape_dims(shape)
        plan = self._plan_paged(
            tensors["block_table"],
            tensors["cache_seqlens" if self.appends else "kv_seqlens"],
            tensors["cu_seqlens_q"],
            shape,
            self.plan_class,
        )
        return plan

    def _call(self, tensors: Mapping[str, torch.Tensor]) -> ResultT:
        """`plan(...).run(...)` of one call's inputs."""
        plan: CachePlan[ResultT] = self._plan_call(tensors)
        return plan._run_checked([tensors[s.name] for s in self.run_specs])


def _rope_rows(last: list[int]) -> Requirement:
    """cos/sin need a row for the last position each sequence rotates (-1: none)."""
    highest = max(last, default=-1)
    return Requirement(
        "P",
        lambda rows_: highest < rows_,
        lambda rows_: check_rope_positions("cos", last, rows_, "new tokens sit at cache_seqlens[b] + i"),
    )


# --- the public Ops ----------------------------------------------------------------------------------
#
# Generic in what their calls return, as in ops/dense.py: constructor overloads for type checkers
# bind `return_lse=True` to (out, lse); `run_into` takes what `run` returns.


class GQAPagedCachePrefillPlan(PagedPlan[ResultT]):
    def run(self, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor) -> ResultT:
        """Attention of this layer's q over its pages (the plan's block table and kv_seqlens)."""
        return self._run_checked((q, k_pages, v_pages))

    def run_into(
        self, out: ResultT, q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k_pages, v_pages), out)


class GQAPagedCachePrefill(PagedCacheOp[ResultT]):
    """Attention of packed q (Tq, Hq, D) over the first kv_seqlens[b] keys of each sequence
    in k_pages, v_pages (num_pages, page_size, Hkv, D) through block_table (B, max_pages)
    -> (Tq, Hq, D). kv_seqlens counts the query chunk's own keys; causal masks are
    bottom-right aligned (a query that sees no key outputs 0). Any page_size >= 1.

    `plan(block_table, kv_seqlens, cu_seqlens_q, shape=PagedShape(...))` once per batch, then
    `run(q, k_pages, v_pages)` per layer; `op(...)` does both.
    `validate=False` skips (they read device values): cu_seqlens_q starts at 0, never
    decreases and ends at Tq; kv_seqlens[b] in [0, max_pages * page_size]; the block_table
    entries of the pages each sequence reads are in [0, num_pages). With bad values the output is
    unspecified and nothing is written outside it; the attention programs cut kv_seqlens[b] to the
    block table's capacity, max_pages * page_size (README, "Reliability").
    """

    input_specs = (_Q, _K_PAGES, _V_PAGES, _BLOCK_TABLE, _KV_SEQLENS, _CU_Q)
    plan_inputs = ("block_table", "kv_seqlens", "cu_seqlens_q")
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQAPagedCachePrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAPagedCachePrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPagedCachePrefill[OutputAndLSE],
            *,
            return_lse: Literal[True],
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPagedCachePrefill[torch.Tensor | OutputAndLSE],
            *,
            return_lse: bool,
            **options: Unpack[OpOptions],
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[OpOptions]) -> None: ...

    def __call__(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> ResultT:
        return self._call(
            dict(
                q=q,
                k_pages=k_pages,
                v_pages=v_pages,
                block_table=block_table,
                kv_seqlens=kv_seqlens,
                cu_seqlens_q=cu_seqlens_q,
            )
        )

    def plan(
        self,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        shape: PagedShape,
    ) -> GQAPagedCachePrefillPlan[ResultT]:
        plan = self._plan_paged(block_table, kv_seqlens, cu_seqlens_q, shape, GQAPagedCachePrefillPlan)
        assert isinstance(plan, GQAPagedCachePrefillPlan)
        return plan


class GQAPagedCacheAppendPrefillPlan(PagedPlan[ResultT]):
    def run(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
    ) -> ResultT:
        """Append this layer's new keys and values to its pages, then attend."""
        return self._run_checked((q, k_new, v_new, k_pages, v_pages))

    def run_into(
        self,
        out: ResultT,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k_new, v_new, k_pages, v_pages), out)


class GQAPagedCacheAppendPrefill(PagedCacheOp[ResultT]):
    """Append k_new, v_new (Tq, Hkv, D), packed by cu_seqlens_q, at positions cache_seqlens[b] + i
    of each sequence's pages (in place), then attend q (Tq, Hq, D) over cache_seqlens[b] + q_len_b keys.

    cache_seqlens is not changed: the caller advances it. The caller allocates the pages:
    block_table must cover cache_seqlens[b] + q_len_b positions. Every check runs before the
    first write, so a rejected call leaves the pages unchanged.
    `plan(block_table, cache_seqlens, cu_seqlens_q, shape=PagedShape(...))` once per batch, then
    `run(q, k_new, v_new, k_pages, v_pages)` per layer; `op(...)` does both.
    `validate=False` skips (they read device values): the cu_seqlens_q checks;
    cache_seqlens[b] >= 0 and cache_seqlens[b] + q_len_b <= max_pages * page_size; the block_table
    entries of the pages each sequence uses are in [0, num_pages). With bad values a new key whose
    destination is no valid slot (position < 0, past the block table, entry outside [0, num_pages))
    is skipped: nothing is written outside the pages and the output (README, "Reliability").
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_PAGES, _V_PAGES, _BLOCK_TABLE, _CACHE_SEQLENS, _CU_Q)
    plan_inputs = ("block_table", "cache_seqlens", "cu_seqlens_q")
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQAPagedCacheAppendPrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAPagedCacheAppendPrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPagedCacheAppendPrefill[OutputAndLSE],
            *,
            return_lse: Literal[True],
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPagedCacheAppendPrefill[torch.Tensor | OutputAndLSE],
            *,
            return_lse: bool,
            **options: Unpack[OpOptions],
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[OpOptions]) -> None: ...

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
    ) -> ResultT:
        return self._call(
            dict(
                q=q,
                k_new=k_new,
                v_new=v_new,
                k_pages=k_pages,
                v_pages=v_pages,
                block_table=block_table,
                cache_seqlens=cache_seqlens,
                cu_seqlens_q=cu_seqlens_q,
            )
        )

    def plan(
        self,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        shape: PagedShape,
    ) -> GQAPagedCacheAppendPrefillPlan[ResultT]:
        plan = self._plan_paged(
            block_table, cache_seqlens, cu_seqlens_q, shape, GQAPagedCacheAppendPrefillPlan
        )
        assert isinstance(plan, GQAPagedCacheAppendPrefillPlan)
        return plan


class GQAPagedCacheRopeAppendPrefillPlan(PagedPlan[ResultT]):
    def run(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        """Rotate this layer's q and new keys, append the keys and values to its pages, then attend."""
        return self._run_checked((q, k_new, v_new, k_pages, v_pages, cos, sin))

    def run_into(
        self,
        out: ResultT,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k_new, v_new, k_pages, v_pages, cos, sin), out)


class GQAPagedCacheRopeAppendPrefill(RotatingOp[ResultT], PagedCacheOp[ResultT]):
    """`GQAPagedCacheAppendPrefill` with RoPE: q and k_new are rotated (copies) at positions
    cache_seqlens[b] + i, the rotated keys are appended, then attention.

    cos, sin float32 (P, rotary_dim // 2). `plan(block_table, cache_seqlens, cu_seqlens_q,
    shape=PagedShape(...))` once per batch (it computes every new token's position and cache
    slot), then `run(q, k_new, v_new, k_pages, v_pages, cos, sin)` per layer; `op(...)` does both.
    `validate=False` skips (they read device values): the checks of the append Op, and
    cache_seqlens[b] + q_len_b - 1 < P. With bad values as for the append Op; an entry whose slot
    (entry * page_size + row) would overflow int32 names no slot, so nothing is written for it
    (README, "Reliability").
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_PAGES, _V_PAGES, _BLOCK_TABLE, _CACHE_SEQLENS, _CU_Q, COS, SIN)
    plan_inputs = ("block_table", "cache_seqlens", "cu_seqlens_q")
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQAPagedCacheRopeAppendPrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAPagedCacheRopeAppendPrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPagedCacheRopeAppendPrefill[OutputAndLSE],
            *,
            return_lse: Literal[True],
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPagedCacheRopeAppendPrefill[torch.Tensor | OutputAndLSE],
            *,
            return_lse: bool,
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[RopeOpOptions]) -> None: ...

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
    ) -> ResultT:
        return self._call(
            dict(
                q=q,
                k_new=k_new,
                v_new=v_new,
                k_pages=k_pages,
                v_pages=v_pages,
                block_table=block_table,
                cache_seqlens=cache_seqlens,
                cu_seqlens_q=cu_seqlens_q,
                cos=cos,
                sin=sin,
            )
        )

    def plan(
        self,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        shape: PagedShape,
    ) -> GQAPagedCacheRopeAppendPrefillPlan[ResultT]:
        plan = self._plan_paged(
            block_table, cache_seqlens, cu_seqlens_q, shape, GQAPagedCacheRopeAppendPrefillPlan
        )
        assert isinstance(plan, GQAPagedCacheRopeAppendPrefillPlan)
        return plan
