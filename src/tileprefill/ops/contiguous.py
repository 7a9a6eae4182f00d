"""Ops over a contiguous KV cache (B, S_max, Hkv, D): read-only, append, and RoPE + append."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch

from tileprefill.context import KVLayout
from tileprefill.kernels.base import ContiguousAppendKernel, ContiguousAttentionKernel
from tileprefill.ops.base import COS, SIN, PrefillOp, RotatingOp, StepNames, required
from tileprefill.positions import batch_positions
from tileprefill.selection import Explanation, PrefillPlan
from tileprefill.validation import (
    Dims,
    DtypeRule,
    check_append_capacity,
    check_lengths,
    check_rope_positions,
    host_list,
    spec,
)


class ContiguousInputs(NamedTuple):
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    kv_seqlens: torch.Tensor | None = None
    k_new: torch.Tensor | None = None
    v_new: torch.Tensor | None = None
    cache_seqlens: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


_Q = spec("q", DtypeRule.ACTIVATION, "B, Sq, Hq, D")
_K_NEW = spec("k_new", DtypeRule.SAME_AS_Q, "B, Sq, Hkv, D")
_V_NEW = spec("v_new", DtypeRule.SAME_AS_Q, "B, Sq, Hkv, D")
_K_CACHE = spec("k_cache", DtypeRule.SAME_AS_Q, "B, Smax, Hkv, D")
_V_CACHE = spec("v_cache", DtypeRule.SAME_AS_Q, "B, Smax, Hkv, D")
_KV_SEQLENS = spec("kv_seqlens", DtypeRule.INT32, "B")
_CACHE_SEQLENS = spec("cache_seqlens", DtypeRule.INT32, "B")
_OUT = spec("out", DtypeRule.SAME_AS_Q, "B, Sq, Hq, D")


class ContiguousCacheOp(PrefillOp[ContiguousInputs]):
    """Layout CONTIGUOUS: [RoPE of q and k_new at cache_seqlens[b] + i, append,] attention.

    Append Ops write k_new[b, i] / v_new[b, i] at row cache_seqlens[b] + i of the caches
    and attend over cache_seqlens[b] + Sq keys.
    """

    kv_layout: ClassVar[KVLayout] = KVLayout.CONTIGUOUS

    def _check_layout_metadata(self, dims: Dims) -> None:
        if self.appends and dims["Sq"].value > dims["Smax"].value:
            raise ValueError(
                f"k_cache: expected S_max >= Sq = {dims['Sq'].value} (room for the new keys), "
                f"got S_max = {dims['Smax'].value}"
            )

    def _check_values(self, inputs: ContiguousInputs, dims: Dims) -> None:
        capacity = dims["Smax"].value
        if not self.appends:
            check_lengths("kv_seqlens", host_list(required(inputs.kv_seqlens)), capacity, "S_max of k_cache")
            return
        cache_lens = host_list(required(inputs.cache_seqlens))
        q_len = dims["Sq"].value
        check_append_capacity(
            "cache_seqlens", cache_lens, [q_len] * len(cache_lens), capacity, "S_max of k_cache"
        )
        if self.rotates and q_len:
            last = [n + q_len - 1 for n in cache_lens]
            check_rope_positions("cos", last, dims["P"].value, "new tokens sit at cache_seqlens[b] + i")

    def _execute(self, steps: StepNames, inputs: ContiguousInputs, dims: Dims) -> torch.Tensor:
        q = inputs.q
        if steps.append is None:
            kv_lens = required(inputs.kv_seqlens)
        else:
            cache_lens = required(inputs.cache_seqlens)
            k_new, v_new = required(inputs.k_new), required(inputs.v_new)
            if steps.rope is not None:
                cos, sin = required(inputs.cos), required(inputs.sin)
                positions = batch_positions(dims["B"].value, dims["Sq"].value, q.device, offsets=cache_lens)
                q = self._rotate(steps.rope, q, positions, cos, sin)
                k_new = self._rotate(steps.rope, k_new, positions, cos, sin)
            append = self._kernel(steps.append)
            assert isinstance(append, ContiguousAppendKernel)
            append(k_new, v_new, inputs.k_cache, inputs.v_cache, cache_lens)
            kv_lens = cache_lens + dims["Sq"].value
        attention = self._kernel(steps.attention)
        assert isinstance(attention, ContiguousAttentionKernel)
        return attention(
            q, inputs.k_cache, inputs.v_cache, kv_lens, causal=self.causal, sm_scale=self._scale(dims)
        )


class GQAContiguousCachePrefill(ContiguousCacheOp):
    """Attention of q (B, Sq, Hq, D) over the first kv_seqlens[b] rows of k_cache, v_cache
    (B, S_max, Hkv, D) -> (B, Sq, Hq, D). kv_seqlens counts the query chunk's own keys;
    causal masks are bottom-right aligned (a query that sees no key outputs 0).

    `validate=False` skips (it reads device values): kv_seqlens[b] in [0, S_max].
    """

    input_specs = (_Q, _K_CACHE, _V_CACHE, _KV_SEQLENS)
    output_spec = _OUT

    def __call__(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_seqlens: torch.Tensor
    ) -> torch.Tensor:
        return self._run(ContiguousInputs(q, k_cache, v_cache, kv_seqlens=kv_seqlens))

    def plan_for(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_seqlens: torch.Tensor
    ) -> PrefillPlan:
        return self._plan_for(ContiguousInputs(q, k_cache, v_cache, kv_seqlens=kv_seqlens))

    def explain(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_seqlens: torch.Tensor
    ) -> Explanation:
        return self._explain(ContiguousInputs(q, k_cache, v_cache, kv_seqlens=kv_seqlens))


class GQAContiguousCacheAppendPrefill(ContiguousCacheOp):
    """Append k_new, v_new (B, Sq, Hkv, D) at rows cache_seqlens[b] + i of k_cache, v_cache
    (B, S_max, Hkv, D) (in place), then attend q (B, Sq, Hq, D) over cache_seqlens[b] + Sq keys.

    cache_seqlens is not changed: the caller advances it. Every check runs before the
    first write, so a rejected call leaves the caches unchanged.
    `validate=False` skips (they read device values): cache_seqlens[b] >= 0 and
    cache_seqlens[b] + Sq <= S_max.
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_CACHE, _V_CACHE, _CACHE_SEQLENS)
    output_spec = _OUT

    def __call__(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        return self._run(ContiguousInputs(q, k_cache, v_cache, None, k_new, v_new, cache_seqlens))

    def plan_for(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> PrefillPlan:
        return self._plan_for(ContiguousInputs(q, k_cache, v_cache, None, k_new, v_new, cache_seqlens))

    def explain(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> Explanation:
        return self._explain(ContiguousInputs(q, k_cache, v_cache, None, k_new, v_new, cache_seqlens))


class GQAContiguousCacheRopeAppendPrefill(RotatingOp[ContiguousInputs], ContiguousCacheOp):
    """`GQAContiguousCacheAppendPrefill` with RoPE: q and k_new are rotated (copies) at
    positions cache_seqlens[b] + i, the rotated keys are appended, then attention.

    cos, sin float32 (P, rotary_dim // 2). `validate=False` skips (they read device
    values): the cache_seqlens checks of the append Op, and cache_seqlens[b] + Sq - 1 < P.
    """

    appends: ClassVar[bool] = True
    input_specs = (_Q, _K_NEW, _V_NEW, _K_CACHE, _V_CACHE, _CACHE_SEQLENS, COS, SIN)
    output_spec = _OUT

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
    ) -> torch.Tensor:
        return self._run(ContiguousInputs(q, k_cache, v_cache, None, k_new, v_new, cache_seqlens, cos, sin))

    def plan_for(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> PrefillPlan:
        return self._plan_for(
            ContiguousInputs(q, k_cache, v_cache, None, k_new, v_new, cache_seqlens, cos, sin)
        )

    def explain(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> Explanation:
        return self._explain(
            ContiguousInputs(q, k_cache, v_cache, None, k_new, v_new, cache_seqlens, cos, sin)
        )
