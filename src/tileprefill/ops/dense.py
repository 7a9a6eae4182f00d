"""Ops with no KV cache (layout NONE): k and v are inputs of the call, dense or ragged.

Dense Ops plan with no tensors (`plan(shape=DenseShape(...))`); varlen Ops plan with
their cu_seqlens (`plan(cu_seqlens_q, cu_seqlens_kv, shape=VarlenShape(...))`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, NamedTuple

import torch

from tileprefill.context import KVLayout
from tileprefill.kernels.base import (
    NO_LSE,
    DenseAttentionKernel,
    DenseAttentionLaunch,
    RaggedAttentionKernel,
    RaggedAttentionLaunch,
    RopeKernel,
    RopeLaunch,
)
from tileprefill.ops.base import COS, SIN, BatchPlan, PrefillOp, Requirement, RotatingOp, rotate
from tileprefill.positions import batch_positions, ragged_positions
from tileprefill.validation import (
    Binding,
    DtypeRule,
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


_Q = spec("q", DtypeRule.ACTIVATION, "B, Sq, Hq, D")
_K = spec("k", DtypeRule.SAME_AS_Q, "B, Skv, Hkv, D")
_V = spec("v", DtypeRule.SAME_AS_Q, "B, Skv, Hkv, D")
_OUT = spec("out", DtypeRule.SAME_AS_Q, "B, Sq, Hq, D")
_Q_RAGGED = spec("q", DtypeRule.ACTIVATION, "Tq, Hq, D")
_K_RAGGED = spec("k", DtypeRule.SAME_AS_Q, "Tkv, Hkv, D")
_V_RAGGED = spec("v", DtypeRule.SAME_AS_Q, "Tkv, Hkv, D")
_CU_Q = spec("cu_seqlens_q", DtypeRule.INT32, "B + 1")
_CU_KV = spec("cu_seqlens_kv", DtypeRule.INT32, "B + 1")
_OUT_RAGGED = spec("out", DtypeRule.SAME_AS_Q, "Tq, Hq, D")


class _Batch(NamedTuple):
    """What a no-cache plan's runs share."""

    cu_seqlens_q: torch.Tensor | None  # varlen only
    cu_seqlens_kv: torch.Tensor | None
    q_positions: torch.Tensor  # RoPE positions (empty without RoPE)
    k_positions: torch.Tensor
    dense: DenseAttentionLaunch | None
    ragged: RaggedAttentionLaunch | None
    rope_q: RopeLaunch | None
    rope_k: RopeLaunch | None


class NoCachePlan(BatchPlan["_Batch"]):
    def _run(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        out: torch.Tensor,
    ) -> torch.Tensor:
        b = self._batch
        if b.rope_q is not None and b.rope_k is not None:
            assert cos is not None and sin is not None
            q, k = rotate(b.rope_q, b.rope_k, q, k, b.q_positions, b.k_positions, cos, sin)
        if b.ragged is not None:
            assert b.cu_seqlens_q is not None and b.cu_seqlens_kv is not None
            b.ragged(q, k, v, b.cu_seqlens_q, b.cu_seqlens_kv, out, NO_LSE)
        else:
            assert b.dense is not None
            b.dense(q, k, v, out, NO_LSE)
        return out


class NoCacheOp(PrefillOp):
    """Layout NONE: optional RoPE of q and k (positions 0.. within each sequence), then attention."""

    plan_class: ClassVar[type[NoCachePlan]]
    kv_layout: ClassVar[KVLayout] = KVLayout.NONE

    def _plan_no_cache(
        self,
        cu_seqlens_q: torch.Tensor | None,
        cu_seqlens_kv: torch.Tensor | None,
        shape: DenseShape | VarlenShape,
        plan_class: type[NoCachePlan],
    ) -> NoCachePlan:
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
        facts = self._facts(shape, 0)
        steps = self._select(facts)
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
        static = self.static_facts(facts, steps, shape, rotary_dim=rotary_dim)
        q_positions = k_positions = torch.empty(0, dtype=torch.int32, device=shape.device)
        if steps.rope is not None:
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
        batch = _Batch(
            cu_seqlens_q=cu_seqlens_q,
            cu_seqlens_kv=cu_seqlens_kv,
            q_positions=q_positions,
            k_positions=k_positions,
            dense=None
            if self.ragged
            else self._kernel_of(steps.attention, DenseAttentionKernel).bind(static),
            ragged=self._kernel_of(steps.attention, RaggedAttentionKernel).bind(static)
            if self.ragged
            else None,
            rope_q=None if steps.rope is None else self._kernel_of(steps.rope, RopeKernel).bind(static),
            rope_k=(
                None
                if steps.rope is None
                else self._kernel_of(steps.rope, RopeKernel).bind(static._replace(heads=shape.kv_heads))
            ),
        )
        return plan_class(self, steps, facts, dims, requirements, batch)

    def _plan_call(self, tensors: Mapping[str, torch.Tensor]) -> NoCachePlan:
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

    def _call(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`plan(...).run(...)` of one call's inputs."""
        plan = self._plan_call(tensors)
        plan._check([tensors[s.name] for s in self.run_specs])
        q = tensors["q"]
        return plan._run(
            q, tensors["k"], tensors["v"], tensors.get("cos"), tensors.get("sin"), torch.empty_like(q)
        )


# --- the public Ops ----------------------------------------------------------------------------------


class GQAPrefillPlan(NoCachePlan):
    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of this layer's q over its k, v."""
        self._check((q, k, v))
        return self._run(q, k, v, None, None, torch.empty_like(q))

    def run_into(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`run` into the caller's `out` (returned; contiguous, sharing no memory with an input)."""
        self._check((q, k, v))
        self._check_out(out, (q, k, v))
        return self._run(q, k, v, None, None, out)


class GQAPrefill(NoCacheOp):
    """Attention of q (B, Sq, Hq, D) over k, v (B, Skv, Hkv, D) -> (B, Sq, Hq, D).

    Causal masks are bottom-right aligned (query i sees keys j <= Skv - Sq + i);
    a query that sees no key outputs 0. `sm_scale` defaults to D ** -0.5.
    `plan(shape=DenseShape(...))` once, then `run(q, k, v)` per layer; `op(q, k, v)` does both.
    All checks are metadata checks; `validate=False` skips nothing.
    """

    input_specs = (_Q, _K, _V)
    plan_inputs = ()
    output_spec = _OUT
    plan_class = GQAPrefillPlan

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._call(dict(q=q, k=k, v=v))

    def plan(self, *, shape: DenseShape) -> GQAPrefillPlan:
        plan = self._plan_no_cache(None, None, shape, GQAPrefillPlan)
        assert isinstance(plan, GQAPrefillPlan)
        return plan


class GQAVarlenPrefillPlan(NoCachePlan):
    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of this layer's packed q over its packed k, v (the plan's cu_seqlens)."""
        self._check((q, k, v))
        return self._run(q, k, v, None, None, torch.empty_like(q))

    def run_into(self, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """`run` into the caller's `out` (returned; contiguous, sharing no memory with an input)."""
        self._check((q, k, v))
        self._check_out(out, (q, k, v))
        return self._run(q, k, v, None, None, out)


class GQAVarlenPrefill(NoCacheOp):
    """Attention of packed sequences: q (Tq, Hq, D), k, v (Tkv, Hkv, D) -> (Tq, Hq, D).

    Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] over k/v[cu_seqlens_kv[b]:cu_seqlens_kv[b+1]];
    zero-length sequences are legal. Causal masks are bottom-right aligned per sequence.
    `plan(cu_seqlens_q, cu_seqlens_kv, shape=VarlenShape(...))` once per batch, then
    `run(q, k, v)` per layer; `op(...)` does both.

    `validate=False` skips (they read device values): cu_seqlens_q and cu_seqlens_kv start at 0,
    never decrease and end at Tq and Tkv. With bad values the output is unspecified, but no kernel
    writes outside it (README, "Reliability: NaN/Inf policy and validate=False").
    """

    ragged: ClassVar[bool] = True
    input_specs = (_Q_RAGGED, _K_RAGGED, _V_RAGGED, _CU_Q, _CU_KV)
    plan_inputs = ("cu_seqlens_q", "cu_seqlens_kv")
    output_spec = _OUT_RAGGED
    plan_class = GQAVarlenPrefillPlan

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
    ) -> torch.Tensor:
        return self._call(dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv))

    def plan(
        self, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, *, shape: VarlenShape
    ) -> GQAVarlenPrefillPlan:
        plan = self._plan_no_cache(cu_seqlens_q, cu_seqlens_kv, shape, GQAVarlenPrefillPlan)
        assert isinstance(plan, GQAVarlenPrefillPlan)
        return plan


class GQARopePrefillPlan(NoCachePlan):
    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Attention of this layer's q over its k, v, both rotated first."""
        self._check((q, k, v, cos, sin))
        return self._run(q, k, v, cos, sin, torch.empty_like(q))

    def run_into(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """`run` into the caller's `out` (returned; contiguous, sharing no memory with an input)."""
        self._check((q, k, v, cos, sin))
        self._check_out(out, (q, k, v, cos, sin))
        return self._run(q, k, v, cos, sin, out)


class GQARopePrefill(RotatingOp, NoCacheOp):
    """`GQAPrefill` on copies of q and k rotated by RoPE (`rope`, NEOX or INTERLEAVED).

    cos, sin float32 (P, rotary_dim // 2); the first rotary_dim dims of each head rotate,
    the rest pass through. q token i and k token j sit at positions i and j. The inputs
    are not modified. `plan(shape=DenseShape(...))`, then `run(q, k, v, cos, sin)`.
    All checks (including P >= max(Sq, Skv)) are metadata checks; `validate=False` skips nothing.
    """

    input_specs = (_Q, _K, _V, COS, SIN)
    plan_inputs = ()
    output_spec = _OUT
    plan_class = GQARopePrefillPlan

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        return self._call(dict(q=q, k=k, v=v, cos=cos, sin=sin))

    def plan(self, *, shape: DenseShape) -> GQARopePrefillPlan:
        plan = self._plan_no_cache(None, None, shape, GQARopePrefillPlan)
        assert isinstance(plan, GQARopePrefillPlan)
        return plan


class GQAVarlenRopePrefillPlan(NoCachePlan):
    def run(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Attention of this layer's packed q over its packed k, v, both rotated first."""
        self._check((q, k, v, cos, sin))
        return self._run(q, k, v, cos, sin, torch.empty_like(q))

    def run_into(
        self,
        out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """`run` into the caller's `out` (returned; contiguous, sharing no memory with an input)."""
        self._check((q, k, v, cos, sin))
        self._check_out(out, (q, k, v, cos, sin))
        return self._run(q, k, v, cos, sin, out)


class GQAVarlenRopePrefill(RotatingOp, NoCacheOp):
    """`GQAVarlenPrefill` on copies of q and k rotated by RoPE at positions 0.. within each sequence.

    `plan(cu_seqlens_q, cu_seqlens_kv, shape=VarlenShape(...))`, then `run(q, k, v, cos, sin)`.
    `validate=False` skips (they read device values): the cu_seqlens checks of
    `GQAVarlenPrefill`, and that cos/sin have a row for every rotated position
    (max(q_len, kv_len) - 1 of each sequence). With bad values the output is unspecified, but no
    kernel writes outside it (README, "Reliability: NaN/Inf policy and validate=False").
    """

    ragged: ClassVar[bool] = True
    input_specs = (_Q_RAGGED, _K_RAGGED, _V_RAGGED, _CU_Q, _CU_KV, COS, SIN)
    plan_inputs = ("cu_seqlens_q", "cu_seqlens_kv")
    output_spec = _OUT_RAGGED
    plan_class = GQAVarlenRopePrefillPlan

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        return self._call(
            dict(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, cos=cos, sin=sin)
        )

    def plan(
        self, cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor, *, shape: VarlenShape
    ) -> GQAVarlenRopePrefillPlan:
        plan = self._plan_no_cache(cu_seqlens_q, cu_seqlens_kv, shape, GQAVarlenRopePrefillPlan)
        assert isinstance(plan, GQAVarlenRopePrefillPlan)
        return plan
