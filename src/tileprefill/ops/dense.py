"""Ops with no KV cache (layout NONE): k and v are inputs of the call, dense or ragged.

Dense Ops plan with no tensors (`plan(shape=DenseShape(...))`); varlen Ops plan with
their cu_seqlens (`plan(cu_seqlens_q, cu_seqlens_kv, shape=VarlenShape(...))`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, overload

import torch
from typing_extensions import Unpack

from tileprefill.context import KVLayout
from tileprefill.kernels.base import (
    DenseAttentionKernel,
    RaggedAttentionKernel,
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
from tileprefill.ops.steps import NoCacheLaunches, NoCachePlan
from tileprefill.positions import batch_positions, ragged_positions
from tileprefill.validation import (
    Binding,
    DtypeRule,
    StrideRule,
    check_cu_seqlens,
    check_rope_positions,
    check_rope_table_length,
    host_values,
    rotary_dim_of,
    spec,
)


class DenseShape(NamedTuple):
    """The data tensors' sizes a dense plan is made for: q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D)."""

    batch: int
    seq_q: int
    seq_kv: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    rotary_dim: int = 0  # RoPE Ops built without rotary_dim: 2 * cos.shape[1]


class VarlenShape(NamedTuple):
    """The data tensors' sizes a varlen plan is made for: q (Tq, Hq, D), k/v (Tkv, Hkv, D)."""

    tokens_q: int
    tokens_kv: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    rotary_dim: int = 0


_Q = spec("q", DtypeRule.ACTIVATION, "B, Sq, Hq, D", StrideRule.VIEW)
_K = spec("k", DtypeRule.SAME_AS_Q, "B, Skv, Hkv, D", StrideRule.VIEW)
_V = spec("v", DtypeRule.SAME_AS_Q, "B, Skv, Hkv, D", StrideRule.VIEW)
_OUT = spec("out", DtypeRule.SAME_AS_Q, "B, Sq, Hq, D", StrideRule.VIEW)
_LSE = spec("lse", DtypeRule.FLOAT32, "B, Sq, Hq")
_Q_RAGGED = spec("q", DtypeRule.ACTIVATION, "Tq, Hq, D", StrideRule.VIEW)
_K_RAGGED = spec("k", DtypeRule.SAME_AS_Q, "Tkv, Hkv, D", StrideRule.VIEW)
_V_RAGGED = spec("v", DtypeRule.SAME_AS_Q, "Tkv, Hkv, D", StrideRule.VIEW)
_CU_Q = spec("cu_seqlens_q", DtypeRule.INT32, "B + 1")
_CU_KV = spec("cu_seqlens_kv", DtypeRule.INT32, "B + 1")
_OUT_RAGGED = spec("out", DtypeRule.SAME_AS_Q, "Tq, Hq, D", StrideRule.VIEW)
_LSE_RAGGED = spec("lse", DtypeRule.FLOAT32, "Tq, Hq")


class NoCacheOp(PrefillOp[ResultT]):
    """Layout NONE: optional RoPE of q and k (positions 0.. within each sequence), then attention."""

    plan_class: ClassVar[type[NoCachePlan[Any]]]
    kv_layout: ClassVar[KVLayout] = KVLayout.NONE

    def _plan_no_cache(
        self,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_kv: torch.Tensor | None,
        shape: DenseShape | VarlenShape,
        plan_class: type[NoCachePlan[Any]],
    ) -> NoCachePlan[ResultT]:
        shape = shape._replace(device=self._concrete_device(shape.device))
        if isinstance(shape, DenseShape):
            extra = {
                "B": Binding(shape.batch, "shape.batch"),
                "Sq": Binding(shape.seq_q, "shape.seq_q"),
                "Skv": Binding(shape.seq_kv, "shape.seq_kv"),
            }
            metadata: list[torch.Tensor] = []
        else:
            extra = {
                "Tq": Binding(shape.tokens_q, "shape.tokens_q"),
                "Tkv": Binding(shape.tokens_kv, "shape.tokens_kv"),
            }
            assert cu_seqlens_q is not None and cu_seqlens_kv is not None
            metadata = [cu_seqlens_q, cu_seqlens_kv]
        dims = self._metadata_dims(shape, metadata, extra)
        context, selected = self._decide(shape, 0)
        rotary_dim = self._rotary_dim(shape) if self.rotates else 0
        requirements: list[Requirement] = []
        if self.rotates:
            dims["R2"] = Binding(rotary_dim // 2, "rotary_dim")
            if isinstance(shape, DenseShape):
                needed = max(shape.seq_q, shape.seq_kv)
                requirements.append(
                    Requirement(
                        "P",
                        lambda rows: needed <= rows,
                        lambda rows: check_rope_table_length(
                            {"P": Binding(rows, "cos")}, needed, "positions 0 .. max(Sq, Skv) - 1 are rotated"
                        ),
                    )
                )
        if self.validate and cu_seqlens_q is not None and cu_seqlens_kv is not None:
            cu_q, cu_kv = host_values([cu_seqlens_q, cu_seqlens_kv])
            q_lens = check_cu_seqlens("cu_seqlens_q", cu_q, dims["Tq"].value, "q")
            kv_lens = check_cu_seqlens("cu_seqlens_kv", cu_kv, dims["Tkv"].value, "k")
            if self.rotates:
                last = [max(nq, nkv) - 1 for nq, nkv in zip(q_lens, kv_lens, strict=True)]
                highest = max(last, default=-1)
                requirements.append(
                    Requirement(
                        "P",
                        lambda rows: highest < rows,
                        lambda rows: check_rope_positions(
                            "cos", last, rows, "q and k tokens sit at 0 .. length - 1"
                        ),
                    )
                )
        static = self.static_facts(context, shape, rotary_dim=rotary_dim)
        attention_facts = self.attention_facts(static, shape.device)
        q_positions = k_positions = torch.empty(0, dtype=torch.int32, device=shape.device)
        if selected.rope is not None:
            # Self-attention prefill passes one length tensor (or one length) for q and k: one derivation.
            if isinstance(shape, DenseShape):
                q_positions = batch_positions(shape.batch, shape.seq_q, shape.device)
                k_positions = (
                    q_positions
                    if shape.seq_kv == shape.seq_q
                    else batch_positions(shape.batch, shape.seq_kv, shape.device)
                )
            else:
                assert cu_seqlens_q is not None and cu_seqlens_kv is not None
                q_positions = ragged_positions(cu_seqlens_q, shape.tokens_q)
                same = cu_seqlens_kv is cu_seqlens_q and shape.tokens_kv == shape.tokens_q
                k_positions = q_positions if same else ragged_positions(cu_seqlens_kv, shape.tokens_kv)
        rope_q, rope_k = self._bind_rope(selected, static)
        launches = NoCacheLaunches(
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_kv=cu_seqlens_kv,
            q_positions=q_positions,
            k_positions=k_positions,
            dense=None
            if self.ragged
            else self._kernel_of(selected.attention, DenseAttentionKernel).bind(attention_facts),
            ragged=self._kernel_of(selected.attention, RaggedAttentionKernel).bind(attention_facts)
            if self.ragged
            else None,
            rope_q=rope_q,
            rope_k=rope_k,
        )
        return plan_class(self, (context, selected), shape, dims, requirements, launches)

    def _plan_call(self, tensors: Mapping[str, torch.Tensor]) -> NoCachePlan[ResultT]:
        """The plan of one call's inputs (by name), checked as one call: errors name its inputs."""
        dims = self._check_call(tensors)
        q = tensors["q"]
        rotary_dim = rotary_dim_of(dims, self.rotary_dim) if self.rotates else 0
        # heads, kv_heads, head_dim, dtype, device, rotary_dim: the fields both shapes end with.
        common = (dims["Hq"].value, dims["Hkv"].value, dims["D"].value, q.dtype, q.device, rotary_dim)
        shape: DenseShape | VarlenShape
        if self.ragged:
            shape = VarlenShape(dims["Tq"].value, dims["Tkv"].value, *common)
        else:
            shape = DenseShape(dims["B"].value, dims["Sq"].value, dims["Skv"].value, *common)
        self._shape_dims(shape)
        cu_q, cu_kv = tensors.get("cu_seqlens_q"), tensors.get("cu_seqlens_kv")
        return self._plan_no_cache(cu_q, cu_kv, shape, self.plan_class)

    def _call(self, tensors: Mapping[str, torch.Tensor]) -> ResultT:
        """`plan(...).run(...)` of one call's inputs."""
        return self._plan_call(tensors)._run_checked([tensors[s.name] for s in self.run_specs])


# --- the public Ops ----------------------------------------------------------------------------------
#
# Each public Op is generic in what its calls return (ResultT, ops/op.py): the overloads of its
# constructor, under TYPE_CHECKING only (at run time every Op has PrefillOp's or RotatingOp's
# constructor), bind `return_lse=True` to (out, lse). `run_into` takes what `run` returns.


class GQAPrefillPlan(NoCachePlan[ResultT]):
    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ResultT:
        """Attention of this layer's q over its k, v."""
        return self._run_checked((q, k, v))

    def run_into(self, out: ResultT, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k, v), out)


class GQAPrefill(NoCacheOp[ResultT]):
    """Attention of q (B, Sq, Hq, D) over k, v (B, Skv, Hkv, D) -> (B, Sq, Hq, D).

    Causal masks are bottom-right aligned (query i sees keys j <= Skv - Sq + i);
    a query that sees no key outputs 0. `sm_scale` defaults to D ** -0.5.
    `plan(shape=DenseShape(...))` once, then `run(q, k, v)` per layer; `op(q, k, v)` does both.
    With `return_lse=True` every call returns (out, lse), lse float32 (B, Sq, Hq) (ops/op.py).
    All checks are metadata checks; `validate=False` skips nothing.
    """

    input_specs = (_Q, _K, _V)
    plan_inputs = ()
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQAPrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAPrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPrefill[OutputAndLSE], *, return_lse: Literal[True], **options: Unpack[OpOptions]
        ) -> None: ...
        @overload
        def __init__(
            self: GQAPrefill[torch.Tensor | OutputAndLSE], *, return_lse: bool, **options: Unpack[OpOptions]
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[OpOptions]) -> None: ...

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ResultT:
        return self._call(dict(q=q, k=k, v=v))

    def plan(self, *, shape: DenseShape) -> GQAPrefillPlan[ResultT]:
        plan = self._plan_no_cache(None, None, shape, GQAPrefillPlan)
        assert isinstance(plan, GQAPrefillPlan)
        return plan


class GQAVarlenPrefillPlan(NoCachePlan[ResultT]):
    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ResultT:
        """Attention of this layer's packed q over its packed k, v (the plan's cu_seqlens)."""
        return self._run_checked((q, k, v))

    def run_into(self, out: ResultT, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k, v), out)


class GQAVarlenPrefill(NoCacheOp[ResultT]):
    """Attention of packed sequences: q (Tq, Hq, D), k, v (Tkv, Hkv, D) -> (Tq, Hq, D).

    Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] over k/v[cu_seqlens_kv[b]:cu_seqlens_kv[b+1]];
    zero-length sequences are legal. Causal masks are bottom-right aligned per sequence.
    `plan(cu_seqlens_q, cu_seqlens_kv, shape=VarlenShape(...))` once per batch, then
    `run(q, k, v)` per layer; `op(...)` does both. With `return_lse=True` every call returns
    (out, lse), lse float32 (Tq, Hq) (ops/op.py).

    `validate=False` skips (they read device values): cu_seqlens_q and cu_seqlens_kv start at 0,
    never decrease and end at Tq and Tkv. With bad values the output is unspecified, but no kernel
    writes outside it (README, "Reliability: NaN/Inf policy and validate=False").
    """

    ragged: ClassVar[bool] = True
    input_specs = (_Q_RAGGED, _K_RAGGED, _V_RAGGED, _CU_Q, _CU_KV)
    plan_inputs = ("cu_seqlens_q", "cu_seqlens_kv")
    output_spec = _OUT_RAGGED
    lse_spec = _LSE_RAGGED
    plan_class = GQAVarlenPrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAVarlenPrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[OpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAVarlenPrefill[OutputAndLSE], *, return_lse: Literal[True], **options: Unpack[OpOptions]
        ) -> None: ...
        @overload
        def __init__(
            self: GQAVarlenPrefill[torch.Tensor | OutputAndLSE],
            *,
            return_lse: bool,
            **options: Unpack[OpOptions],
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[OpOptions]) -> None: ...

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
    ) -> ResultT:
        return self._call(dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv))

    def plan(
        self, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, *, shape: VarlenShape
    ) -> GQAVarlenPrefillPlan[ResultT]:
        plan = self._plan_no_cache(cu_seqlens_q, cu_seqlens_kv, shape, GQAVarlenPrefillPlan)
        assert isinstance(plan, GQAVarlenPrefillPlan)
        return plan


class GQARopePrefillPlan(NoCachePlan[ResultT]):
    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> ResultT:
        """Attention of this layer's q over its k, v, both rotated first."""
        return self._run_checked((q, k, v, cos, sin))

    def run_into(
        self,
        out: ResultT,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k, v, cos, sin), out)


class GQARopePrefill(RotatingOp[ResultT], NoCacheOp[ResultT]):
    """`GQAPrefill` on copies of q and k rotated by RoPE (`rope`, NEOX or INTERLEAVED).

    cos, sin float32 (P, rotary_dim // 2); the first rotary_dim dims of each head rotate,
    the rest pass through. q token i and k token j sit at positions i and j. The inputs
    are not modified. `plan(shape=DenseShape(...))`, then `run(q, k, v, cos, sin)`.
    With `return_lse=True` every call returns (out, lse), lse float32 (B, Sq, Hq) (ops/op.py).
    All checks (including P >= max(Sq, Skv)) are metadata checks; `validate=False` skips nothing.
    """

    input_specs = (_Q, _K, _V, COS, SIN)
    plan_inputs = ()
    output_spec = _OUT
    lse_spec = _LSE
    plan_class = GQARopePrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQARopePrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQARopePrefill[OutputAndLSE], *, return_lse: Literal[True], **options: Unpack[RopeOpOptions]
        ) -> None: ...
        @overload
        def __init__(
            self: GQARopePrefill[torch.Tensor | OutputAndLSE],
            *,
            return_lse: bool,
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[RopeOpOptions]) -> None: ...

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> ResultT:
        return self._call(dict(q=q, k=k, v=v, cos=cos, sin=sin))

    def plan(self, *, shape: DenseShape) -> GQARopePrefillPlan[ResultT]:
        plan = self._plan_no_cache(None, None, shape, GQARopePrefillPlan)
        assert isinstance(plan, GQARopePrefillPlan)
        return plan


class GQAVarlenRopePrefillPlan(NoCachePlan[ResultT]):
    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> ResultT:
        """Attention of this layer's packed q over its packed k, v, both rotated first."""
        return self._run_checked((q, k, v, cos, sin))

    def run_into(
        self,
        out: ResultT,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        """`run` into the caller's `out` (returned): a tensor, or with return_lse the pair (out, lse);
        each contiguous and sharing no memory with an input or the other."""
        return self._run_checked((q, k, v, cos, sin), out)


class GQAVarlenRopePrefill(RotatingOp[ResultT], NoCacheOp[ResultT]):
    """`GQAVarlenPrefill` on copies of q and k rotated by RoPE at positions 0.. within each sequence.

    `plan(cu_seqlens_q, cu_seqlens_kv, shape=VarlenShape(...))`, then `run(q, k, v, cos, sin)`.
    With `return_lse=True` every call returns (out, lse), lse float32 (Tq, Hq) (ops/op.py).
    `validate=False` skips (they read device values): the cu_seqlens checks of
    `GQAVarlenPrefill`, and that cos/sin have a row for every rotated position
    (max(q_len, kv_len) - 1 of each sequence). With bad values the output is unspecified, but no
    kernel writes outside it (README, "Reliability: NaN/Inf policy and validate=False").
    """

    ragged: ClassVar[bool] = True
    input_specs = (_Q_RAGGED, _K_RAGGED, _V_RAGGED, _CU_Q, _CU_KV, COS, SIN)
    plan_inputs = ("cu_seqlens_q", "cu_seqlens_kv")
    output_spec = _OUT_RAGGED
    lse_spec = _LSE_RAGGED
    plan_class = GQAVarlenRopePrefillPlan

    if TYPE_CHECKING:

        @overload
        def __init__(
            self: GQAVarlenRopePrefill[torch.Tensor],
            *,
            return_lse: Literal[False] = False,
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAVarlenRopePrefill[OutputAndLSE],
            *,
            return_lse: Literal[True],
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        @overload
        def __init__(
            self: GQAVarlenRopePrefill[torch.Tensor | OutputAndLSE],
            *,
            return_lse: bool,
            **options: Unpack[RopeOpOptions],
        ) -> None: ...
        def __init__(self, *, return_lse: bool = False, **options: Unpack[RopeOpOptions]) -> None: ...

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> ResultT:
        return self._call(
            dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, cos=cos, sin=sin)
        )

    def plan(
        self, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, *, shape: VarlenShape
    ) -> GQAVarlenRopePrefillPlan[ResultT]:
        plan = self._plan_no_cache(cu_seqlens_q, cu_seqlens_kv, shape, GQAVarlenRopePrefillPlan)
        assert isinstance(plan, GQAVarlenRopePrefillPlan)
        return plan
