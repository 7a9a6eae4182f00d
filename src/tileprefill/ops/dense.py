"""Ops with no KV cache (layout NONE): k and v are inputs of the call, dense or ragged."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from tileprefill.context import KVLayout
from tileprefill.kernels.base import DenseAttentionKernel, RaggedAttentionKernel
from tileprefill.ops.base import COS, SIN, PrefillOp, RotatingOp, StepNames, required
from tileprefill.positions import batch_positions, ragged_positions
from tileprefill.selection import Explanation, PrefillPlan
from tileprefill.validation import (
    Dims,
    DtypeRule,
    check_cu_seqlens,
    check_rope_positions,
    check_rope_table_length,
    host_list,
    spec,
)


class NoCacheInputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_kv: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


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


class NoCacheOp(PrefillOp[NoCacheInputs]):
    """Layout NONE: optional RoPE of q and k (positions 0.. within each sequence), then attention."""

    kv_layout: ClassVar[KVLayout] = KVLayout.NONE

    def _check_layout_metadata(self, dims: Dims) -> None:
        if self.rotates and not self.ragged:
            needed = max(dims["Sq"].value, dims["Skv"].value)
            check_rope_table_length(dims, needed, "positions 0 .. max(Sq, Skv) - 1 are rotated")

    def _check_values(self, inputs: NoCacheInputs, dims: Dims) -> None:
        if not self.ragged:
            return
        q_lens = check_cu_seqlens(
            "cu_seqlens_q", host_list(required(inputs.cu_seqlens_q)), dims["Tq"].value, "q"
        )
        kv_lens = check_cu_seqlens(
            "cu_seqlens_kv", host_list(required(inputs.cu_seqlens_kv)), dims["Tkv"].value, "k"
        )
        if self.rotates:
            last = [max(nq, nkv) - 1 for nq, nkv in zip(q_lens, kv_lens, strict=True)]
            check_rope_positions("cos", last, dims["P"].value, "q and k tokens sit at 0 .. length - 1")

    def _execute(self, steps: StepNames, inputs: NoCacheInputs, dims: Dims) -> torch.Tensor:
        q, k, v = inputs.q, inputs.k, inputs.v
        if steps.rope is not None:
            cos, sin = required(inputs.cos), required(inputs.sin)
            if self.ragged:
                q_pos = ragged_positions(required(inputs.cu_seqlens_q), dims["Tq"].value)
                k_pos = ragged_positions(required(inputs.cu_seqlens_kv), dims["Tkv"].value)
            else:
                batch = dims["B"].value
                q_pos = batch_positions(batch, dims["Sq"].value, q.device)
                k_pos = batch_positions(batch, dims["Skv"].value, q.device)
            q = self._rotate(steps.rope, q, q_pos, cos, sin)
            k = self._rotate(steps.rope, k, k_pos, cos, sin)
        if self.ragged:
            ragged = self._kernel(steps.attention)
            assert isinstance(ragged, RaggedAttentionKernel)
            return ragged(
                q,
                k,
                v,
                required(inputs.cu_seqlens_q),
                required(inputs.cu_seqlens_kv),
                causal=self.causal,
                sm_scale=self._scale(dims),
            )
        dense = self._kernel(steps.attention)
        assert isinstance(dense, DenseAttentionKernel)
        return dense(q, k, v, causal=self.causal, sm_scale=self._scale(dims))


class GQAPrefill(NoCacheOp):
    """Attention of q (B, Sq, Hq, D) over k, v (B, Skv, Hkv, D) -> (B, Sq, Hq, D).

    Causal masks are bottom-right aligned (query i sees keys j <= Skv - Sq + i);
    a query that sees no key outputs 0. `sm_scale` defaults to D ** -0.5.
    All checks are metadata checks; `validate=False` skips nothing.
    """

    input_specs = (_Q, _K, _V)
    output_spec = _OUT

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._run(NoCacheInputs(q, k, v))

    def plan_for(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> PrefillPlan:
        return self._plan_for(NoCacheInputs(q, k, v))

    def explain(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Explanation:
        return self._explain(NoCacheInputs(q, k, v))


class GQAVarlenPrefill(NoCacheOp):
    """Attention of packed sequences: q (Tq, Hq, D), k, v (Tkv, Hkv, D) -> (Tq, Hq, D).

    Sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] over k/v[cu_seqlens_kv[b]:cu_seqlens_kv[b+1]];
    zero-length sequences are legal. Causal masks are bottom-right aligned per sequence.

    `validate=False` skips (they read device values): cu_seqlens_q and cu_seqlens_kv start at 0,
    never decrease and end at Tq and Tkv.
    """

    ragged: ClassVar[bool] = True
    input_specs = (_Q_RAGGED, _K_RAGGED, _V_RAGGED, _CU_Q, _CU_KV)
    output_spec = _OUT_RAGGED

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
    ) -> torch.Tensor:
        return self._run(NoCacheInputs(q, k, v, cu_seqlens_q, cu_seqlens_kv))

    def plan_for(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
    ) -> PrefillPlan:
        return self._plan_for(NoCacheInputs(q, k, v, cu_seqlens_q, cu_seqlens_kv))

    def explain(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
    ) -> Explanation:
        return self._explain(NoCacheInputs(q, k, v, cu_seqlens_q, cu_seqlens_kv))


class GQARopePrefill(RotatingOp[NoCacheInputs], NoCacheOp):
    """`GQAPrefill` on copies of q and k rotated by RoPE (`rope`, NEOX or INTERLEAVED).

    cos, sin float32 (P, rotary_dim // 2); the first rotary_dim dims of each head rotate,
    the rest pass through. q token i and k token j sit at positions i and j. The inputs
    are not modified. All checks (including P >= max(Sq, Skv)) are metadata checks;
    `validate=False` skips nothing.
    """

    input_specs = (_Q, _K, _V, COS, SIN)
    output_spec = _OUT

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        return self._run(NoCacheInputs(q, k, v, cos=cos, sin=sin))

    def plan_for(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> PrefillPlan:
        return self._plan_for(NoCacheInputs(q, k, v, cos=cos, sin=sin))

    def explain(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> Explanation:
        return self._explain(NoCacheInputs(q, k, v, cos=cos, sin=sin))


class GQAVarlenRopePrefill(RotatingOp[NoCacheInputs], NoCacheOp):
    """`GQAVarlenPrefill` on copies of q and k rotated by RoPE at positions 0.. within each sequence.

    `validate=False` skips (they read device values): the cu_seqlens checks of
    `GQAVarlenPrefill`, and that cos/sin have a row for every rotated position
    (max(q_len, kv_len) - 1 of each sequence).
    """

    ragged: ClassVar[bool] = True
    input_specs = (_Q_RAGGED, _K_RAGGED, _V_RAGGED, _CU_Q, _CU_KV, COS, SIN)
    output_spec = _OUT_RAGGED

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
        return self._run(NoCacheInputs(q, k, v, cu_seqlens_q, cu_seqlens_kv, cos, sin))

    def plan_for(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> PrefillPlan:
        return self._plan_for(NoCacheInputs(q, k, v, cu_seqlens_q, cu_seqlens_kv, cos, sin))

    def explain(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> Explanation:
        return self._explain(NoCacheInputs(q, k, v, cu_seqlens_q, cu_seqlens_kv, cos, sin))
