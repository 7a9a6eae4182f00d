"""The programs a model's Ops can need: selection's plan for every call they can make, bound.

For each arch, dtype and Op family of a build, and each variant of its calls (the model's layer
windows, the page sizes, with and without the LSE, the SM counts, the slot-mapping dtypes), the
context an Op builds (`PrefillContext`) goes through `select_plan`, and every step's kernel is bound
with the static facts that Op gives it, under `recording_builds()`: what would compile is written
down, nothing compiles. The facts are those `PrefillOp.static_facts` / `attention_facts` and
`PagedCacheSlotAppend.plan` make (tests/test_aot.py plans the real Ops and compares).
Token counts, batch sizes, sequence lengths, page counts and cache sizes are dynamic in every
program, so a model needs the same programs for every request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, assert_never

import attrs

from tileprefill.aot.models import OP_CLASSES, BuildOptions, ModelConfig, model_config
from tileprefill.context import Arch, DType, KVLayout, PrefillContext, RopeMode
from tileprefill.kernels.base import StaticFacts
from tileprefill.kernels.compile import BuildRequest, recording_builds
from tileprefill.kernels.registry import ALL_KERNELS
from tileprefill.keys import (
    AppendKey,
    AttentionKey,
    BatchKey,
    Code,
    KernelKey,
    RopeAppendKey,
    RopeKey,
    SlotAppendKey,
    attention_traits,
)
from tileprefill.ops import PagedCacheSlotAppend, PrefillOp
from tileprefill.selection import UnsupportedContextError, gpu_gaps, select_plan
from tileprefill.tiles import sm90_config


@attrs.frozen
class ProgramSpec:
    """One program a model needs: the kernel key that builds it, the build request (factory, static
    arguments, arch), its static facts in words, and the Op families whose calls need it."""

    key: KernelKey
    request: BuildRequest
    description: str
    ops: tuple[str, ...]

    @property
    def arch(self) -> Arch:
        return self.request.arch


def programs_for(model: str | ModelConfig, options: BuildOptions | None = None) -> tuple[ProgramSpec, ...]:
    """Every program the calls of `model` (a `ModelConfig` or a preset's name) through the Op
    families of `options` can need, once each, in a stable order (arch, then the order found).

    Raises ValueError naming the Op, arch and reason when a call of the model has no kernel on an
    arch of the build (a head dim the TileLang programs are not compiled for, say).
    """
    config = model_config(model)
    options = BuildOptions() if options is None else options
    found: dict[BuildRequest, ProgramSpec] = {}
    for arch in options.archs:
        for dtype in config.dtypes:
            for name in options.op_names(config):
                for key, facts in _bound_steps(name, config, options, arch, dtype):
                    with recording_builds() as requests:
                        ALL_KERNELS[key]().bind(facts)  # type: ignore[attr-defined]
                    for request in requests:
                        known = found.get(request)
                        if known is None:
                            found[request] = ProgramSpec(key, request, describe(key, facts), (name,))
                        elif name not in known.ops:
                            found[request] = attrs.evolve(known, ops=(*known.ops, name))
    return tuple(found.values())


def _bound_steps(
    name: str, config: ModelConfig, options: BuildOptions, arch: Arch, dtype: DType
) -> Iterator[tuple[KernelKey, StaticFacts]]:
    """Every plan step of Op family `name`'s calls for `config` on `arch` in `dtype`, with the static
    facts the Op binds its kernel with."""
    cls = OP_CLASSES[name]
    if cls is PagedCacheSlotAppend:
        yield from _slot_append_steps(config, options, arch, dtype)
        return
    assert issubclass(cls, PrefillOp)
    rotates = bool(cls.rotates)
    if rotates and config.rope is RopeMode.NONE:
        raise ValueError(f"ops: {name} rotates with RoPE, but the model's rope is none")
    paged = cls.kv_layout is KVLayout.PAGED
    for window in config.windows:
        for page_size in options.page_sizes if paged else (0,):
            context = _context(
                name,
                kv_layout=cls.kv_layout,
                rope=config.rope if rotates else RopeMode.NONE,
                append=cls.appends,
                q_dtype=dtype,
                kv_dtype=dtype,
                arch=arch,
                head_dim=config.head_dim,
                group_size=config.heads // config.kv_heads,
                causal=config.causal,
                page_size=page_size,
                ragged=cls.ragged,
                sliding_window=window,
                softcap=config.softcap > 0,
            )
            static = StaticFacts(
                arch=arch,
                dtype=dtype,
                heads=config.heads,
                kv_heads=config.kv_heads,
                head_dim=config.head_dim,
                causal=config.causal,
                sm_scale=config.scale,
                page_size=page_size,
                rotary_dim=config.rotary if rotates else 0,
                window=window,
                softcap=config.softcap,
            )
            for key in select_plan(context).steps:
                match key:
                    case RopeKey():  # q's heads, then the keys'
                        yield key, static
                        yield key, static._replace(heads=config.kv_heads)
                    case AttentionKey():
                        for lse in options.lse:
                            for sm_count in options.sm_counts if arch is Arch.SM90 else (0,):
                                yield key, static._replace(lse=lse, sm_count=sm_count)
                    case _:
                        yield key, static


def _slot_append_steps(
    config: ModelConfig, options: BuildOptions, arch: Arch, dtype: DType
) -> Iterator[tuple[KernelKey, StaticFacts]]:
    for page_size in options.page_sizes:
        context = _context(
            PagedCacheSlotAppend.__name__,
            kv_layout=KVLayout.PAGED,
            rope=RopeMode.NONE,
            append=True,
            q_dtype=dtype,
            kv_dtype=dtype,
            arch=arch,
            head_dim=config.head_dim,
            group_size=1,
            causal=False,
            page_size=page_size,
            ragged=True,
            slot_mapping=True,
        )
        for key in select_plan(context).steps:
            for index_dtype in options.index_dtypes:
                yield (
                    key,
                    StaticFacts(
                        arch=arch,
                        dtype=dtype,
                        heads=config.kv_heads,
                        kv_heads=config.kv_heads,
                        head_dim=config.head_dim,
                        page_size=page_size,
                        index_dtype=index_dtype,
                    ),
                )


def _context(name: str, **fields: Any) -> PrefillContext:
    context = PrefillContext(**fields)
    try:
        select_plan(context)
    except UnsupportedContextError:
        # The reasons of the nearest kernel of each step without one, for this arch.
        reasons = [gap for gap in gpu_gaps(context) if gap.startswith(f"{context.arch.value}: ")]
        raise ValueError(f"{name}: no kernel serves its calls on {'; '.join(reasons)}") from None
    return context


def describe(key: KernelKey, facts: StaticFacts) -> str:
    """A program's static facts in words, those its arguments hold (what a progress line and the
    index name it by): a RoPE or attention program reads its head counts at launch, and an attention
    program its scale, cap and window length, so only whether it has a window and a cap is named."""
    dtype = facts.dtype.name.lower()
    match key:
        case BatchKey():
            return f"page {facts.page_size}"
        case RopeKey():
            return f"d{facts.head_dim} r{facts.rotary_dim} {dtype}"
        case RopeAppendKey():
            return f"h{facts.heads}/{facts.kv_heads} d{facts.head_dim} r{facts.rotary_dim} {dtype}"
        case AppendKey():
            page = f" page {facts.page_size}" if facts.page_size else ""
            return f"hkv{facts.kv_heads} d{facts.head_dim} {dtype}{page}"
        case SlotAppendKey():
            return f"hkv{facts.kv_heads} d{facts.head_dim} {dtype} {facts.index_dtype.value} slots"
        case AttentionKey():
            words = [f"d{facts.head_dim} {dtype}"]
            words.append("causal" if facts.causal else "non-causal")
            if facts.window:
                words.append("window")
            if facts.softcap:
                words.append("softcap")
            if facts.page_size:
                words.append(f"page {facts.page_size}")
            if facts.lse:
                words.append("lse")
            source, code = attention_traits(key)
            if code is Code.SM90 and sm90_config(source, facts.head_dim, facts.sm_count).persistent_ctas:
                # A persistent program launches one CTA per SM of the device it is built for.
                words.append(f"{sm90_config(source, facts.head_dim, facts.sm_count).persistent_ctas} CTAs")
            return " ".join(words)
        case _:
            assert_never(key)
