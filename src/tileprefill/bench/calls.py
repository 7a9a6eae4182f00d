"""Our public Ops on a case, called as an engine calls them: `run` of a plan made once per batch.

`our_calls` is the one place the harness maps a case onto our API: the Op of its layout
(`validate=False`), and for a rope-append case also the read-only Op on the same cache
(attention alone).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import attrs
import torch

import tileprefill as tp
from tileprefill.bench.cases import Case, Layout, Suite
from tileprefill.bench.results import OURS, OURS_ATTENTION
from tileprefill.validation import TensorSpec

Tensors = Mapping[str, torch.Tensor]


class AnyOp(Protocol):
    """A public Op of any class, called with its ordered tensor inputs."""

    input_specs: tuple[TensorSpec, ...]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...
    def _plan_call(self, tensors: Mapping[str, torch.Tensor]) -> tp.BatchPlan[Any]: ...


class _Run(Protocol):
    def run(self, *data: torch.Tensor) -> torch.Tensor: ...


@attrs.frozen
class OpCall:
    """One Op and the inputs of one call of it, timed as an engine calls it: `run` of a plan made once
    for the batch (the per-layer cost; `plan` is per batch)."""

    op: AnyOp
    inputs: tuple[torch.Tensor, ...]

    def plan(self) -> tp.BatchPlan[Any]:
        """The plan `op(*inputs)` makes (the Op's `plan` with the shape read off the inputs)."""
        return self.op._plan_call({s.name: t for s, t in zip(self.op.input_specs, self.inputs, strict=True)})

    def runner(self) -> Callable[[], torch.Tensor]:
        """`plan.run` of this call's data tensors on a plan made now."""
        plan = cast(_Run, self.plan())
        run_names = {s.name for s in type(self.op).run_specs}  # type: ignore[attr-defined]
        data = tuple(t for s, t in zip(self.op.input_specs, self.inputs, strict=True) if s.name in run_names)
        return lambda: plan.run(*data)

    def __call__(self) -> torch.Tensor:
        return self.op(*self.inputs)


def served_by(case: Case, call: OpCall, device: torch.device) -> str:
    """The kernels that serve our call of `case`, in plan order ("batch_paged_tl -> rope_append_neox_tl
    -> ..."): the one place the harness asks which kernels an Op runs."""
    return str(call.plan().plan)


def _op(op: object) -> AnyOp:
    return cast(AnyOp, op)


def our_calls(case: Case, x: Tensors) -> dict[str, OpCall]:
    """Our public Op(s) for `case`: OURS, and for rope-append also OURS_ATTENTION (the read-only Op on
    the same cache, attending over the same keys: attention alone)."""
    causal = case.causal
    window, softcap = case.window or None, case.softcap or None

    def args(*names: str) -> tuple[torch.Tensor, ...]:
        return tuple(x[n] for n in names)

    def paged() -> tuple[torch.Tensor, ...]:
        return args("q", "k_pages", "v_pages", "block_table", "kv_seqlens", "cu_seqlens_q")

    def contiguous() -> tuple[torch.Tensor, ...]:
        return args("q", "k_cache", "v_cache", "kv_seqlens")

    if case.suite is Suite.ROPE_APPEND:
        new = ("q", "k_new", "v_new")
        if case.layout is Layout.PAGED:
            full = OpCall(
                _op(tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, causal=causal, validate=False)),
                args(
                    *new, "k_pages", "v_pages", "block_table", "cache_seqlens", "cu_seqlens_q", "cos", "sin"
                ),
            )
            alone = OpCall(_op(tp.GQAPagedCachePrefill(causal=causal, validate=False)), paged())
        else:
            full = OpCall(
                _op(
                    tp.GQAContiguousCacheRopeAppendPrefill(
                        rope=tp.RopeMode.NEOX, causal=causal, validate=False
                    )
                ),
                args(*new, "k_cache", "v_cache", "cache_seqlens", "cos", "sin"),
            )
            alone = OpCall(_op(tp.GQAContiguousCachePrefill(causal=causal, validate=False)), contiguous())
        return {OURS: full, OURS_ATTENTION: alone}
    match case.layout:
        case Layout.DENSE:
            op = tp.GQAPrefill(causal=causal, sliding_window=window, softcap=softcap, validate=False)
            call = OpCall(_op(op), args("q", "k", "v"))
        case Layout.RAGGED:
            call = OpCall(
                _op(tp.GQAVarlenPrefill(causal=causal, validate=False)),
                args("q", "k", "v", "cu_seqlens_q", "cu_seqlens_kv"),
            )
        case Layout.CONTIGUOUS:
            call = OpCall(_op(tp.GQAContiguousCachePrefill(causal=causal, validate=False)), contiguous())
        case Layout.PAGED:
            call = OpCall(_op(tp.GQAPagedCachePrefill(causal=causal, validate=False)), paged())
    return {OURS: call}
