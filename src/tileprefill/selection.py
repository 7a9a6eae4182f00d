"""Kernel selection: one pure, finite decision from a context to a plan.

`select_plan(ctx)` reads only the context. Each step (RoPE, append,
attention) walks its keys in preference order and takes the first one with
no rejection reasons; a call that rotates and appends first looks for a fused
RoPE + append kernel, which then stands in for both steps. A slot-mapped cache write
(`ctx.slot_mapping`) plans one slot-append step and nothing else. `rejections(key, ctx)`
is the single statement of what each key's kernel can serve. Every `match` ends in `assert_never`, so a new
enum member fails `mypy --strict` until every decision here handles it.
Nothing falls back silently: when a step has no kernel, `select_plan` raises
`UnsupportedContextError` carrying every candidate's reasons.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import TypeVar, assert_never

import attrs

from tileprefill.context import Arch, KVLayout, KVOrder, PrefillContext, RopeMode
from tileprefill.keys import (
    AppendKey,
    AttentionKey,
    BatchKey,
    Code,
    KernelKey,
    RopeAppendKey,
    RopeKey,
    SlotAppendKey,
    append_traits,
    attention_traits,
    batch_traits,
    code_of,
    rope_append_traits,
    rope_traits,
    slot_append_traits,
)
from tileprefill.tiles import HEAD_DIMS, KVSource, describe, pages_tile_evenly, sm80_config, sm90_config

K = TypeVar("K", BatchKey, RopeKey, AppendKey, RopeAppendKey, SlotAppendKey, AttentionKey)

#: Head dims the TileLang attention kernels are compiled for (each has a tile config per arch).
TL_ATTENTION_HEAD_DIMS: tuple[int, ...] = HEAD_DIMS


@attrs.frozen
class PrefillPlan:
    """The ordered steps of one call: the batch step (once per plan), RoPE, then append (or both fused
    in `rope_append`), then attention; or, for a slot-mapped cache write, `slot_append` alone
    (`attention` is None only then)."""

    rope: RopeKey | None
    append: AppendKey | None
    attention: AttentionKey | None
    rope_append: RopeAppendKey | None = None
    batch: BatchKey | None = None
    slot_append: SlotAppendKey | None = None

    @property
    def steps(self) -> tuple[KernelKey, ...]:
        ordered = (self.batch, self.rope, self.append, self.rope_append, self.slot_append, self.attention)
        return tuple(k for k in ordered if k is not None)

    def __str__(self) -> str:
        return " -> ".join(k.value for k in self.steps)


@attrs.frozen
class Rejection:
    key: KernelKey
    reasons: tuple[str, ...]


@attrs.frozen
class Explanation:
    """The chosen plan (None if some step has no kernel) and why every other key was not chosen."""

    context: PrefillContext
    plan: PrefillPlan | None
    rejected: tuple[Rejection, ...]
    missing_steps: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"context: {_describe(self.context)}"]
        if self.plan is None:
            lines.append("plan: none (no kernel serves step " + ", ".join(self.missing_steps) + ")")
        else:
            lines.append(f"plan: {self.plan}")
            attention = self.plan.attention
            config = None if attention is None else attention_config(attention, self.context)
            if config is not None:
                lines.append(f"attention config: {config}")
            if self.context.kv_layout is not KVLayout.NONE:
                lines.append(
                    f"cache order: {self.context.kv_order.value}, read (and written) in place through the "
                    "caches' strides by every step above"
                )
        lines.append("not chosen:")
        for rejection in self.rejected:
            lines.append(f"  {rejection.key.value}: " + "; ".join(rejection.reasons))
        return "\n".join(lines)


class UnsupportedContextError(ValueError):
    """No kernel serves some step of this context; `explanation` says why for every candidate."""

    def __init__(self, explanation: Explanation) -> None:
        self.explanation = explanation
        super().__init__(
            "no kernel serves step " + ", ".join(explanation.missing_steps) + "\n" + str(explanation)
        )


# Preference order within each step; rejections() decides which are possible.
ROPE_PREFERENCE: tuple[RopeKey, ...] = (
    RopeKey.NEOX_TL,
    RopeKey.INTERLEAVED_TL,
    RopeKey.NEOX_REF,
    RopeKey.INTERLEAVED_REF,
)
BATCH_PREFERENCE: tuple[BatchKey, ...] = (BatchKey.PAGED_TL, BatchKey.PAGED_REF)
ROPE_APPEND_PREFERENCE: tuple[RopeAppendKey, ...] = (
    RopeAppendKey.NEOX_TL,
    RopeAppendKey.INTERLEAVED_TL,
)
APPEND_PREFERENCE: tuple[AppendKey, ...] = (
    AppendKey.CONTIGUOUS_TL,
    AppendKey.PAGED_TL,
    AppendKey.CONTIGUOUS_REF,
    AppendKey.PAGED_REF,
)
SLOT_APPEND_PREFERENCE: tuple[SlotAppendKey, ...] = (SlotAppendKey.TL, SlotAppendKey.REF)
ATTENTION_PREFERENCE: tuple[AttentionKey, ...] = (
    AttentionKey.DENSE_SM90,
    AttentionKey.RAGGED_SM90,
    AttentionKey.CONTIGUOUS_SM90,
    AttentionKey.PAGED_TILED_SM90,
    AttentionKey.PAGED_SM90,
    AttentionKey.DENSE_SM80,
    AttentionKey.RAGGED_SM80,
    AttentionKey.CONTIGUOUS_SM80,
    AttentionKey.PAGED_TILED_SM80,
    AttentionKey.PAGED_SM80,
    AttentionKey.DENSE_REF,
    AttentionKey.RAGGED_REF,
    AttentionKey.CONTIGUOUS_REF,
    AttentionKey.PAGED_REF,
)


#: The preference order of each step, by the name `Explanation.missing_steps` gives it.
_PREFERENCES: dict[str, tuple[KernelKey, ...]] = {
    "batch": BATCH_PREFERENCE,
    "rope": ROPE_PREFERENCE,
    "append": APPEND_PREFERENCE,
    "slot_append": SLOT_APPEND_PREFERENCE,
    "attention": ATTENTION_PREFERENCE,
}


def select_plan(ctx: PrefillContext) -> PrefillPlan:
    """The plan for `ctx`; raises `UnsupportedContextError` if a step has no kernel."""
    explanation = explain(ctx)
    if explanation.plan is None:
        raise UnsupportedContextError(explanation)
    return explanation.plan


def explain(ctx: PrefillContext) -> Explanation:
    batch = _first_supported(BATCH_PREFERENCE, ctx) if needs_batch_step(ctx) else None
    fused = _first_supported(ROPE_APPEND_PREFERENCE, ctx) if needs_rope_step(ctx) and ctx.append else None
    rope = _first_supported(ROPE_PREFERENCE, ctx) if needs_rope_step(ctx) and fused is None else None
    append = _first_supported(APPEND_PREFERENCE, ctx) if needs_append_step(ctx) and fused is None else None
    slot_append = _first_supported(SLOT_APPEND_PREFERENCE, ctx) if ctx.slot_mapping else None
    attention = _first_supported(ATTENTION_PREFERENCE, ctx) if needs_attention_step(ctx) else None
    missing: list[str] = []
    if needs_batch_step(ctx) and batch is None:
        missing.append("batch")
    if needs_rope_step(ctx) and rope is None and fused is None:
        missing.append("rope")
    if needs_append_step(ctx) and append is None and fused is None:
        missing.append("append")
    if ctx.slot_mapping and slot_append is None:
        missing.append("slot_append")
    if needs_attention_step(ctx) and attention is None:
        missing.append("attention")
    chosen = {batch, rope, append, fused, slot_append, attention}
    candidates: tuple[KernelKey, ...] = (
        *BATCH_PREFERENCE,
        *ROPE_APPEND_PREFERENCE,
        *ROPE_PREFERENCE,
        *APPEND_PREFERENCE,
        *SLOT_APPEND_PREFERENCE,
        *ATTENTION_PREFERENCE,
    )
    rejected = tuple(
        Rejection(
            key, rejections(key, ctx) or ("supported, but a kernel earlier in preference order serves",)
        )
        for key in candidates
        if key not in chosen
    )
    if fused is not None:
        # The fused kernel serves both steps: the separate ones were not looked for.
        rejected = tuple(
            Rejection(r.key, (f"{fused.value} rotates and appends in one kernel",))
            if isinstance(r.key, RopeKey | AppendKey) and not rejections(r.key, ctx)
            else r
            for r in rejected
        )
    plan = None if missing else PrefillPlan(rope, append, attention, fused, batch, slot_append)
    return Explanation(ctx, plan, rejected, tuple(missing))


#: The arches with GPU kernels, newest first.
GPU_ARCHS: tuple[Arch, ...] = (Arch.SM90, Arch.SM80)


def gpu_gaps(ctx: PrefillContext) -> tuple[str, ...]:
    """Why the GPU kernels would not serve a call like `ctx` (read on any arch, usually the CPU), one
    line per GPU arch without a plan: for each step it has no kernel for, the reasons of that step's
    nearest kernel for the arch (the one with the fewest). Empty when every GPU arch has a plan."""
    gaps: list[str] = []
    for arch in GPU_ARCHS:
        on_gpu = attrs.evolve(ctx, arch=arch)
        explanation = explain(on_gpu)
        reasons: list[str] = []
        for step in explanation.missing_steps:
            candidates = [key for key in _PREFERENCES[step] if arch in code_of(key).serves]
            nearest = min((rejections(key, on_gpu) for key in candidates), key=len, default=())
            reasons.extend(reason for reason in nearest if reason not in reasons)
        if explanation.plan is None:
            gaps.append(
                f"{arch.value}: "
                + "; ".join(reasons or ["no kernel serves step " + ", ".join(explanation.missing_steps)])
            )
    return tuple(gaps)


def needs_batch_step(ctx: PrefillContext) -> bool:
    """An append into a paged cache derives each new token's position and slot once per plan (a slot
    mapping gives them)."""
    return ctx.append and ctx.kv_layout is KVLayout.PAGED and not ctx.slot_mapping


def needs_append_step(ctx: PrefillContext) -> bool:
    """An append that finds each new token's row from the lengths (a slot mapping names the rows)."""
    return ctx.append and not ctx.slot_mapping


def needs_attention_step(ctx: PrefillContext) -> bool:
    """Every call attends but a slot-mapped cache write."""
    return not ctx.slot_mapping


def needs_rope_step(ctx: PrefillContext) -> bool:
    match ctx.rope:
        case RopeMode.NONE:
            return False
        case RopeMode.NEOX | RopeMode.INTERLEAVED:
            return True
        case _:
            assert_never(ctx.rope)


def _first_supported(keys: Sequence[K], ctx: PrefillContext) -> K | None:
    for key in keys:
        if not rejections(key, ctx):
            return key
    return None


def rejections(key: KernelKey, ctx: PrefillContext) -> tuple[str, ...]:
    """Why the kernel of `key` cannot serve `ctx`; empty when it can."""
    match key:
        case BatchKey():
            code = batch_traits(key)
            reasons = [] if needs_batch_step(ctx) else [_no_batch_step(ctx)]
            return (*reasons, *_code_rejections(code, ctx))
        case RopeKey():
            mode, code = rope_traits(key)
            reasons = [] if ctx.rope is mode else [f"rope is {ctx.rope.value}, this kernel does {mode.value}"]
            return (*reasons, *_code_rejections(code, ctx))
        case AppendKey():
            layout, code = append_traits(key)
            reasons = [] if ctx.append else ["the call appends nothing"]
            if ctx.slot_mapping:
                reasons.append(
                    "the call names each new token's row with a slot mapping; this kernel finds the rows "
                    "from cache_seqlens"
                )
            if ctx.kv_layout is not layout:
                reasons.append(f"kv_layout is {ctx.kv_layout.value}, this kernel appends to {layout.value}")
            return (*reasons, *_code_rejections(code, ctx))
        case RopeAppendKey():
            mode, code = rope_append_traits(key)
            reasons = [] if ctx.rope is mode else [f"rope is {ctx.rope.value}, this kernel does {mode.value}"]
            if not ctx.append:
                reasons.append("the call appends nothing")
            return (*reasons, *_code_rejections(code, ctx))
        case SlotAppendKey():
            code = slot_append_traits(key)
            reasons = [] if ctx.slot_mapping else ["the call has no slot mapping"]
            return (*reasons, *_code_rejections(code, ctx))
        case AttentionKey():
            return _attention_rejections(key, ctx)
        case _:
            assert_never(key)


def _no_batch_step(ctx: PrefillContext) -> str:
    if ctx.slot_mapping:
        return "the call's slot mapping names every new token's row"
    return "the call appends nothing to a paged cache"


def source_of(ctx: PrefillContext) -> tuple[KVSource, ...]:
    """The sources that can serve `ctx`'s layout, most specific first."""
    match ctx.kv_layout:
        case KVLayout.NONE:
            return (KVSource.RAGGED,) if ctx.ragged else (KVSource.DENSE,)
        case KVLayout.CONTIGUOUS:
            return (KVSource.CONTIGUOUS,)
        case KVLayout.PAGED:
            return (KVSource.PAGED_TILED, KVSource.PAGED)
        case _:
            assert_never(ctx.kv_layout)


def orders_read(source: KVSource) -> tuple[KVOrder, ...]:
    """The cache orders a source's kernels read: a cache's K and V are strided views whatever their
    order (`kernels/tl/views.py`), so every cache source reads both; inputs without a cache
    are token-major (NHD)."""
    match source:
        case KVSource.DENSE | KVSource.RAGGED:
            return (KVOrder.NHD,)
        case KVSource.CONTIGUOUS | KVSource.PAGED | KVSource.PAGED_TILED:
            return (KVOrder.NHD, KVOrder.HND)
        case _:
            assert_never(source)


def _attention_rejections(key: AttentionKey, ctx: PrefillContext) -> tuple[str, ...]:
    source, code = attention_traits(key)
    reasons: list[str] = []
    if not needs_attention_step(ctx):
        reasons.append("the call only writes the cache by its slot mapping; it attends nothing")
    if source not in source_of(ctx):
        shape = "ragged" if ctx.ragged else "dense"
        reasons.append(
            f"the call reads {shape} q with kv_layout {ctx.kv_layout.value}; "
            f"this kernel reads {source.description}"
        )
    if source in source_of(ctx) and ctx.kv_order not in orders_read(source):
        reasons.append(f"this kernel reads no {ctx.kv_order.value} cache")
    if (
        source is KVSource.PAGED_TILED
        and ctx.kv_layout is KVLayout.PAGED
        and not pages_tile_evenly(ctx.page_size)
    ):
        reasons.append(
            f"page_size {ctx.page_size} is not a power of two >= 16, so pages do not tile the KV block"
        )
    if code is not Code.REF and ctx.head_dim not in TL_ATTENTION_HEAD_DIMS:
        reasons.append(
            f"head_dim {ctx.head_dim} is not compiled for {code.value} "
            f"(compiled: {', '.join(map(str, TL_ATTENTION_HEAD_DIMS))})"
        )
    return (*reasons, *_code_rejections(code, ctx))


def attention_config(key: AttentionKey, ctx: PrefillContext) -> str | None:
    """The tile configuration the TileLang attention kernel of `key` runs `ctx` with, in words (None
    for a reference kernel)."""
    source, code = attention_traits(key)
    match code:
        case Code.REF:
            return None
        case Code.SM90:
            return "sm90 " + describe(sm90_config(source, ctx.head_dim))
        case Code.SM80 | Code.TL:
            return "sm80 " + describe(sm80_config(ctx.head_dim))
        case _:
            assert_never(code)


def _code_rejections(code: Code, ctx: PrefillContext) -> tuple[str, ...]:
    if ctx.arch in code.serves:
        return ()
    served = " or ".join(a.value for a in code.serves)
    return (f"{code.value} code serves arch {served}; the call's arch is {ctx.arch.value}",)


def _describe(ctx: PrefillContext) -> str:
    return ", ".join(f"{a.name}={_show(getattr(ctx, a.name))}" for a in attrs.fields(PrefillContext))


def _show(value: object) -> str:
    return value.value if isinstance(value, enum.Enum) else str(value)
