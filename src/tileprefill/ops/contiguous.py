"""Ops over a contiguous KV cache (B, S_max, Hkv, D): read-only, append, and RoPE + append.

`plan(<lengths>, shape=ContiguousShape(...))` takes the batch's lengths; `run`
takes the data tensors of one layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, overload

import torch
from typing_extensions import Unpack

from tileprefill.context import KVLayout, KVOrder
from tileprefill.kernels.base import (
    ContiguousAppendKernel,
    ContiguousAttentionKernel,
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
from tileprefill.positions import batch_positions, contiguous_slots
from tileprefill.validation import (
    Binding,
    Dims,
    DtypeRule,
    StrideRule,
    check_append_capacity,
    check_lengths,
    check_rope_positions,
    host_values,
    kv_order_of,
    rotary_dim_of,
    spec,
)


class ContiguousShape(NamedTuple):
    """The data tensors' sizes a contiguous-cache plan is made for: q (B, Sq, Hq, D), caches
    (B, S_max, Hkv, D) (the batch comes from the lengths tensor)."""

    seq_q: int
    max_seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    rotary_dim: int = 0  # RoPE Ops built without rotary_dim: 2 * cos.shape[1]
    kv_order: KVOrder = KVOrder.NHD  # the caches' row/head order (any strides: `check_view`)


_Q = spec("q", DtypeRule.ACTIVATION, "B, Sq, Hq, D", StrideRule.VIEW)
_K_NEW = spec("k_new", DtypeRule.SAME_AS_Q, "B, Sq, Hkv, D", StrideRule.VIEW)
_V_NEW = spec("v_new", DtypeRule.SAME_AS_Q, "B, Sq, Hkv, D", StrideRule.VIEW)
_K_CACHE = spec("k_cache", DtypeRule.SAME_AS_Q, "B, Smax, Hkv, D", StrideRule.VIEW)
_V_CACHE = spec("v_cache", DtypeRule.SAME_AS_Q, "B, Smax, Hkv, D", StrideRule.VIEW)
_KV_SEQLENS = spec("kv_seqlens", DtypeRule.INT32, "B")
_CACHE_SEQLENS = spec("cache_seqlens", DtypeRule.INT32, "B")
_OUT = spec("out", DtypeRule.SAME_AS_Q, "B, Sq, Hq, D", StrideRule.VIEW)
_LSE = spec("lse", DtypeRule.FLOAT32, "B, Sq, Hq")


class ContiguousPlan(CachePlan[ResultT]):
    """A plan over a contiguous cache: the lengths, and (appending) each new token's position and slot."""

    cache_names = ("k_cache", "v_cache")


class ContiguousCacheOp(PrefillOp[ResultT]):
    """Layout CONTIGUOUS: [RoPE of q and k_new at cache_seqlens[b] + i, append,] attention.

    Append Ops write k_new[b, i] / v_new[b, i] at row cache_seqlens[b] + i of the caches
    and attend over cache_seqlens[b] + Sq keys.
    """

    plan_class: ClassVar[type[ContiguousPlan[Any]]]
    kv_layout: ClassVar[KVLayout] = KVLayout.CONTIGUOUS

    def _plan_contiguous(
        self, lengths: torch.Tensor, shape: ContiguousShape, plan_class: type[ContiguousPlan[Any]]
    ) -> ContiguousPlan[ResultT]:
        shape = shape._replace(device=self._concrete_device(shape.device))
        extra = {
            "Sq": Binding(shape.seq_q, "shape.seq_q"),
            "Smax": Binding(shape.max_seq, "shape.max_seq"),
        }
        dims = self._metadata_dims(shape, [lengths], extra)
        if self.appends and shape.seq_q > shape.max_seq:
            raise ValueError(
                f"k_cache: expected S_max >= Sq = {shape.seq_q} (room for the new keys), "
                f"got S_max = {shape.max_seq}"
            )
        context, selected = self._decide(shape, 0, shape.kv_order)
        rotary_dim = self._rotary_dim(shape) if self.rotates else 0
        if self.rotates:
            dims["R2"] = Binding(rotary_dim // 2, "rotary_dim")
        requirements = self._check_values(lengths, dims) if self.validate else []
        static = self.static_facts(context, shape, rotary_dim=rotary_dim)
        empty = torch.empty(0, dtype=torch.int32, device=shape.device)
        positions = slots = empty
        if self.appends:
            cache_seqlens = lengths
            kv_seqlens = cache_seqlens + shape.seq_q  # int32 + int: int32
            if self.rotates:
                positions = batch_positions(
                    lengths.shape[0], shape.seq_q, shape.device, offsets=cache_seqlens
                )
            if selected.rope_append is not None:
                slots = contiguous_slots(positions, lengths.shape[0], shape.seq_q, shape.max_seq)
        else:
            cache_seqlens = kv_seqlens = lengths
        attention_facts = self.attention_facts(static, shape.device)
        rope_q, rope_k = self._bind_rope(selected, static)
        launches = CacheLaunches(
            positions=positions,
            slots=slots,
            attention=self._kernel_of(selected.attention, ContiguousAttentionKernel).bind(attention_facts),
            attention_metadata=(kv_seqlens,),
            append=None
            if selected.append is None
            else self._kernel_of(selected.append, ContiguousAppendKernel).bind(static),
            append_metadata=(cache_seqlens,),
            rope_q=rope_q,
            rope_k=rope_k,
            rope_append=self._bind_rope_append(selected, static),
        )
        return plan_class(self, (context, selected), shape, dims, requirements, launches)

    def _check_values(self, lengths: torch.Tensor, dims: Dims) -> list[Requirement]:
        """The value checks (one host copy of the lengths)."""
        (values,) = host_values([lengths])
        capacity = dims["Smax"].value
        if not self.appends:
            check_lengths("kv_seqlens", values, capacity, "S_max of k_cache")
            return []
        q_len = dims["Sq"].value
        check_append_capacity("cache_seqlens", values, [q_len] * len(values), capacity, "S_max of k_cache")
        if not (self.rotates and q_len):
            return []
        last = [n + q_len - 1 for n in values]
        highest = max(last, default=-1)
        return [
            Requirement(
                "P",
                lambda rows: highest < rows,
                lambda rows: check_rope_positions(
                    "cos", last, rows, "new tokens sit at cache_seqlens[b] + i"
                ),
            )
        ]

    def _plan_call(self, tensors: Mapping[str, torch.Tensor]) -> ContiguousPlan[ResultT]:
        """The plan of one call's inputs (by name), checked as one call: errors name its inputs."""
        dims = self._check_call(tensors)
        q = tensors["q"]
        shape = ContiguousShape(
            seq_q=dims["Sq"].value,
            max_seq=dims["Smax"].value,
            heads=dims["Hq"].value,
            kv_heads=dims["Hkv"].value,
            head_dim=dims["D"].value,
            dtype=q.dtype,
            device=q.device,
            rotary_dim=rotary_dim_of(dims, self.rotary_dim) if self.rotates else 0,
            kv_order=kv_order_of(tensors["k_cache"]) or KVOrder.NHD,
        )
        self._shape_dims(shape)
        lengths = tensors["cache_seqlens" if self.appends else "kv_seqlens"]
        return self._plan_contiguous(lengths, shape, self.plan_class)

    def _call(self, tensors: Mapping[str, torch.Tensor]) -> ResultT:
        """`plan(...).run(...)` of one call's inputs."""
        plan: CachePlan[ResultT] = self._plan_call(tensors)
        return plan._run_checked([tensors[s.name] for s in self.run_specs])


# --- the public Ops ----------------------------------------------------------------------------------
#
# Generic in what their calls return, as in ops/dense.py: constructor overloads for type checkers
# bind `return_lse=True` to (out, lse); `run_into` takes what `run` returns.


class GQAContiguousCachePrefillPlan(ContiguousPlan[ResultT]):
    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> ResultT:
        """Attention of this layer's q over the first kv_seqlens[b] rows of its caches."""
        return self._run_checked((q, k_cache, v_cache))

    def run_into(
        self, out: ResultT, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k_cache, v_cache), out)


class GQAContiguousCachePrefill(ContiguousCacheOp[ResultT]):
    """Attention of q (B, Sq, Hq, D) over the first kv_seqlens[b] rows of k_cache, v_cache
    (B, S_max, Hkv, D) -> (B, Sq, Hq, D). kv_seqlens counts the query chunk's own keys;
    causal masks are bottom-right aligned (a query that sees no key outputs 0).
    `plan(kv_seqlens, shape=ContiguousShape(...))`, then `run(q, k_cache, v_cache)`.

    `validate=False` skips (it reads device values): kv_seqlens[b] in [0, S_max]. With bad values the
    output is unspecified, but no kernel writes outside it (README, "Reliability").
    """

    input_specs = (_Q, _K_CACHE, _V_CACHE, _KV_SEQLENS)
    plan_inputs = ("kv_seqlens",)
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQAContiguousCachePrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAContiguousCachePrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAContiguousCachePrefill[OutputAndLSE],
            *,
            return_lse: Literal[True],
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAContiguousCachePrefill[torch.Tensor | OutputAndLSE],
            *,
            return_lse: bool,
            **options: Unpack[OpOptions],
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[OpOptions]) -> None: ...

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_seqlens: torch.Tensor
    ) -> ResultT:
        return self._call(dict(q=q, k_cache=k_cache, v_cache=v_cache, kv_seqlens=kv_seqlens))

    def plan(
        self, kv_seqlens: torch.Tensor, *, shape: ContiguousShape
    ) -> GQAContiguousCachePrefillPlan[ResultT]:
        plan = self._plan_contiguous(kv_seqlens, shape, GQAContiguousCachePrefillPlan)
        assert isinstance(plan, GQAContiguousCachePrefillPlan)
        return plan


class GQAContiguousCacheAppendPrefillPlan(ContiguousPlan[ResultT]):
    def run(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> ResultT:
        """Append this layer's new keys and values to its caches, then attend."""
        return self._run_checked((q, k_new, v_new, k_cache, v_cache))

    def run_into(
        self,
        out: ResultT,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k_new, v_new, k_cache, v_cache), out)


class GQAContiguousCacheAppendPrefill(ContiguousCacheOp[ResultT]):
    """Append k_new, v_new (B, Sq, Hkv, D) at rows cache_seqlens[b] + i of k_cache, v_cache
    (B, S_max, Hkv, D) (in place), then attend q (B, Sq, Hq, D) over cache_seqlens[b] + Sq keys.

    cache_seqlens is not changed: the caller advances it. Every check runs before the
    first write, so a rejected call leaves the caches unchanged.
    `plan(cache_seqlens, shape=ContiguousShape(...))`, then `run(q, k_new, v_new, k_cache, v_cache)`.
    `validate=False` skips (they read device values): cache_seqlens[b] >= 0 and
    cache_seqlens[b] + Sq <= S_max. With bad values a new key whose position is outside [0, S_max)
    is skipped: nothing is written outside the caches and the output (README, "Reliability").
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_CACHE, _V_CACHE, _CACHE_SEQLENS)
    plan_inputs = ("cache_seqlens",)
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQAContiguousCacheAppendPrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAContiguousCacheAppendPrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAContiguousCacheAppendPrefill[OutputAndLSE],
            *,
            return_lse: Literal[True],
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAContiguousCacheAppendPrefill[torch.Tensor | OutputAndLSE],
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
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> ResultT:
        return self._call(
            dict(q=q, k_new=k_new, v_new=v_new, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
        )

    def plan(
        self, cache_seqlens: torch.Tensor, *, shape: ContiguousShape
    ) -> GQAContiguousCacheAppendPrefillPlan[ResultT]:
        plan = self._plan_contiguous(cache_seqlens, shape, GQAContiguousCacheAppendPrefillPlan)
        assert isinstance(plan, GQAContiguousCacheAppendPrefillPlan)
        return plan


class GQAContiguousCacheRopeAppendPrefillPlan(ContiguousPlan[ResultT]):
    def run(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        """Rotate this layer's q and new keys, append the keys and values to its caches, then attend."""
        return self._run_checked((q, k_new, v_new, k_cache, v_cache, cos, sin))

    def run_into(
        self,
        out: ResultT,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k_new, v_new, k_cache, v_cache, cos, sin), out)


class GQAContiguousCacheRopeAppendPrefill(RotatingOp[ResultT], ContiguousCacheOp[ResultT]):
    """`GQAContiguousCacheAppendPrefill` with RoPE: q and k_new are rotated (copies) at
    positions cache_seqlens[b] + i, the rotated keys are appended, then attention.

    cos, sin float32 (P, rotary_dim // 2). `plan(cache_seqlens, shape=ContiguousShape(...))`,
    then `run(q, k_new, v_new, k_cache, v_cache, cos, sin)`. `validate=False` skips (they read
    device values): the cache_seqlens checks of the append Op, and cache_seqlens[b] + Sq - 1 < P.
    With bad values a new key whose position is outside [0, S_max) is skipped: nothing is written
    outside the caches and the output (README, "Reliability").
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_CACHE, _V_CACHE, _CACHE_SEQLENS, COS, SIN)
    plan_inputs = ("cache_seqlens",)
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQAContiguousCacheRopeAppendPrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAContiguousCacheRopeAppendPrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAContiguousCacheRopeAppendPrefill[OutputAndLSE],
            *,
            return_lse: Literal[True],
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAContiguousCacheRopeAppendPrefill[torch.Tensor | OutputAndLSE],
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
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        return self._call(
            dict(
                q=q,
                k_new=k_new,
                v_new=v_new,
                k_cache=k_cache,
                v_cache=v_cache,
                cache_seqlens=cache_seqlens,
                cos=cos,
                sin=sin,
            )
        )

    def plan(
        self, cache_seqlens: torch.Tensor, *, shape: ContiguousShape
    ) -> GQAContiguousCacheRopeAppendPrefillPlan[ResultT]:
        plan = self._plan_contiguous(cache_seqlens, shape, GQAContiguousCacheRopeAppendPrefillPlan)
        assert isinstance(plan, GQAContiguousCacheRopeAppendPrefillPlan)
        return plan
