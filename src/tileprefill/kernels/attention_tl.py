"""TileLang attention kernels: one class per SM80/SM90 attention key.

Each class launches the TileLang program of its key (`kernels/tl/attention_sm80.py`
or `attention_sm90.py`) through the one launch path (`kernels/launch.py`): its
record names the program's tensors (the output last; callers allocate it), which
static facts become the program's arguments (`program`: head dim, dtype, causal, page size,
whether a window, a cap, the LSE; arch and SM count through the tile configuration) and which it
takes at launch (`scalar_params`: the scale, the cap, the window's length).
`bind(facts)` resolves the compiled program once per plan; head counts, token counts, batch,
sequence lengths, pages and cache sizes are dynamic in the program and never recompile. No host
synchronisation.

SM80 programs are compiled for sm_80 and run on every 8.x device (and on
Hopper); SM90 programs are compiled for sm_90a. Importing this module does not
import tilelang: the program modules are imported on the first build.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final, assert_never, cast

import torch
from typing_extensions import Unpack

from tileprefill.context import Arch, DType, sm_count_of
from tileprefill.kernels.base import (
    NO_LSE,
    AttentionOptions,
    AttentionScalars,
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    Kernel,
    PagedAttentionKernel,
    RaggedAttentionKernel,
    StaticFacts,
)
from tileprefill.kernels.compile import CompileCase, recording_builds
from tileprefill.kernels.compile import prebuild as compile_prebuild
from tileprefill.kernels.launch import KernelRecord, Launcher, Program, readable, register
from tileprefill.kernels.tl.scores import ScoreScalars, score_scalars
from tileprefill.keys import AttentionKey, Code, attention_traits
from tileprefill.tiles import KVSource, sm80_config, sm90_config
from tileprefill.validation import check_same_strides, check_view


def program_arch(key: AttentionKey) -> Arch:
    """The arch the program of a TileLang attention key is compiled for: the one its code serves."""
    _, code = attention_traits(key)
    if code is Code.REF or len(code.serves) != 1:
        raise ValueError(f"key: expected a per-arch TileLang attention key, got {key.value}")
    return code.serves[0]


def program(key: AttentionKey, facts: StaticFacts) -> Program:
    """The program factory of `key` and its static arguments for `facts` (what `build` compiles): the
    head dim, dtype, causality, page size, tile configuration, and whether it has a window, a cap and
    the LSE output. The head counts, the scale, the cap and the window's length are not among them:
    the program reads the head counts from its tensors and takes the others at launch
    (`scalar_params`), so calls that differ only in those share one program."""
    source, _ = attention_traits(key)
    arch = program_arch(key)
    if arch is Arch.SM90:
        from tileprefill.kernels.tl.attention_sm90 import program as factory

        config = sm90_config(source, facts.head_dim, facts.sm_count)
    else:
        from tileprefill.kernels.tl.attention_sm80 import program as factory

        config = sm80_config(facts.head_dim)
    args = (
        source,
        facts.head_dim,
        facts.dtype.value,
        facts.causal,
        facts.page_size if source.paged else 0,
        config,
        facts.window > 0,
        facts.softcap > 0,
        facts.lse,
    )
    return Program(factory, args, arch)


def scalar_params(facts: StaticFacts) -> ScoreScalars:
    """The scalars every attention program takes after its tensors, for `facts`."""
    return score_scalars(facts.sm_scale, facts.softcap, facts.window)


#: The program's tensor parameters of each source before its outputs, in order: q, its keys and values,
#: then the index tensors (int32) that locate each sequence's rows.
_INPUTS: Final[dict[KVSource, tuple[str, ...]]] = {
    KVSource.DENSE: ("q", "k", "v"),
    KVSource.RAGGED: ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_kv"),
    KVSource.CONTIGUOUS: ("q", "k_cache", "v_cache", "kv_seqlens"),
    KVSource.PAGED: ("q", "k_pages", "v_pages", "block_table", "kv_seqlens", "cu_seqlens_q"),
    KVSource.PAGED_TILED: ("q", "k_pages", "v_pages", "block_table", "kv_seqlens", "cu_seqlens_q"),
}


def _record(key: AttentionKey, *, lse: bool) -> KernelRecord:
    """The launch record of `key`'s programs with the LSE output or without: the inputs, then out
    (and lse). q, its keys and values (or caches) and out are views (`kernels/tl/views.py`)."""
    source, _ = attention_traits(key)
    inputs = _INPUTS[source]
    outputs = ("out", "lse") if lse else ("out",)
    return register(
        KernelRecord(
            key=key,
            tensors=(*inputs, *outputs),
            mutates=outputs,
            program=lambda facts: program(key, facts),
            scalar_params=scalar_params,
            variant="_lse" if lse else "",
            views=(*inputs[:3], "out"),
        )
    )


_TL_KEYS: Final = tuple(key for key in AttentionKey if attention_traits(key)[1] in (Code.SM80, Code.SM90))

#: The launch record of every TileLang attention key (registered at import; tilelang is not imported).
RECORDS: Final[dict[AttentionKey, KernelRecord]] = {key: _record(key, lse=False) for key in _TL_KEYS}
#: The launch record of the programs with the LSE output (`facts.lse`): the same tensors, then lse.
LSE_RECORDS: Final[dict[AttentionKey, KernelRecord]] = {key: _record(key, lse=True) for key in _TL_KEYS}


def record_of(key: AttentionKey, facts: StaticFacts) -> KernelRecord:
    """The record whose program serves `facts` (with the LSE output or without)."""
    return (LSE_RECORDS if facts.lse else RECORDS)[key]


def prebuild(configs: Iterable[tuple[AttentionKey, StaticFacts]], *, jobs: int | None = None) -> None:
    """Compile the programs of `configs` side by side, ahead of the calls that need them: warms up an
    engine, or a benchmark, for known shapes (`kernels.compile.prebuild` of what `bind` asks for)."""
    with recording_builds() as requests:
        for key, facts in configs:
            Launcher.of(record_of(key, facts), facts)
    compile_prebuild(requests, jobs=jobs)


def facts_of(
    key: AttentionKey,
    q: torch.Tensor,
    kv: torch.Tensor,
    *,
    lse: bool = False,
    **options: Unpack[AttentionOptions],
) -> StaticFacts:
    """The static facts of an allocating call (`__call__`), checked: q (..., Hq, D) and k/v (..., Hkv, D)
    of one dtype; the page size of a paged cache (NP, PS, Hkv, D) is its second dim."""
    dtype = DType.of(q.dtype, argument="q")
    if kv.dtype != q.dtype:
        raise TypeError(f"k/v: expected the dtype of q ({q.dtype}), got {kv.dtype}")
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = kv.shape[-2]
    if kv.shape[-1] != head_dim:
        raise ValueError(f"k/v: expected head_dim {head_dim} (that of q), got {kv.shape[-1]}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k/v: expected a number of heads dividing q's {heads}, got {kv_heads}")
    source, _ = attention_traits(key)
    arch = program_arch(key)
    scalars = AttentionScalars(**options)
    return StaticFacts(
        arch=arch,
        dtype=dtype,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=scalars.causal,
        sm_scale=float(scalars.sm_scale),
        page_size=kv.shape[1] if source.paged else 0,
        window=scalars.window,
        softcap=float(scalars.softcap),
        lse=lse,
        sm_count=sm_count_of(q.device) if arch is Arch.SM90 else 0,
    )


def _allocate_output(q: torch.Tensor) -> torch.Tensor:
    """The output buffer of an allocating call, shaped like q (uninitialised: the program writes every
    element; GPU tests replace this function to hand the program a NaN-filled buffer and prove it)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _allocate_lse(q: torch.Tensor) -> torch.Tensor:
    """The LSE buffer of an allocating call: float32, q's shape less the head dim (uninitialised;
    GPU tests replace it like `_allocate_output`)."""
    return torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)


def _without_keys(inputs: tuple[torch.Tensor, ...], source: KVSource) -> bool:
    """No key can be visible: k has no rows (and a TMA descriptor of an empty tensor is invalid), or a
    paged cache's block table no column."""
    kv = inputs[1]
    no_rows = kv.shape[0] == 0 or (kv.dim() == 4 and kv.shape[1] == 0)
    return no_rows or (source.paged and inputs[3].shape[1] == 0)


class _AttentionTL:
    """The TileLang attention kernel of every source: the tensors of `_INPUTS[source]`, then out and
    lse (each family's signature is that of the attention family the concrete class extends)."""

    key: ClassVar[AttentionKey]

    def bind(self, facts: StaticFacts) -> Callable[..., None]:
        launcher = Launcher.of(record_of(self.key, facts), facts)
        source, _ = attention_traits(self.key)
        with_lse = facts.lse

        def launch(*tensors: torch.Tensor) -> None:
            *inputs, out, lse = tensors
            if out.numel() == 0:
                return
            if _without_keys(tuple(inputs), source):
                # What a program would write when no row sees a key: 0 outputs, -inf LSE.
                out.zero_()
                if with_lse:
                    lse.fill_(float("-inf"))
            elif with_lse:
                launcher(*inputs, out, lse)
            else:
                launcher(*inputs, out)

        return launch

    def _allocating(
        self, tensors: tuple[torch.Tensor, ...], options: AttentionOptions, *, lse: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, kv = tensors[0], tensors[1]
        facts = facts_of(self.key, q, kv, lse=lse, **options)
        source, _ = attention_traits(self.key)
        names = _INPUTS[source]
        for name, index in zip(names[3:], tensors[3:], strict=True):
            if index.dtype != torch.int32:
                raise TypeError(f"{name}: expected dtype int32, got {index.dtype}")
        if source not in (KVSource.DENSE, KVSource.RAGGED):
            # Caches are read in place (a copy would be a whole cache): views the programs take.
            caches = dict(zip(names[1:3], tensors[1:3], strict=True))
            for name, cache in caches.items():
                check_view(name, cache)
            check_same_strides(caches)
            rows = (readable(q), *tensors[1:])
        else:
            rows = (*(readable(t) for t in tensors[:3]), *tensors[3:])
        out, row_lse = _allocate_output(q), _allocate_lse(q) if lse else NO_LSE
        self.bind(facts)(*rows, out, row_lse)
        return out, row_lse

    def __call__(self, *tensors: torch.Tensor, **options: Unpack[AttentionOptions]) -> torch.Tensor:
        return self._allocating(tensors, options, lse=False)[0]

    def with_lse(
        self, *tensors: torch.Tensor, **options: Unpack[AttentionOptions]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._allocating(tensors, options, lse=True)


class AttentionDenseSM80Kernel(_AttentionTL, DenseAttentionKernel):
    """Dense (B, S, H, D) attention: SM80 program (cp.async, mma.sync)."""

    key: ClassVar[AttentionKey] = AttentionKey.DENSE_SM80


class AttentionDenseSM90Kernel(_AttentionTL, DenseAttentionKernel):
    """Dense (B, S, H, D) attention: SM90 program (TMA, wgmma, warp-specialized ping-pong)."""

    key: ClassVar[AttentionKey] = AttentionKey.DENSE_SM90


class AttentionRaggedSM80Kernel(_AttentionTL, RaggedAttentionKernel):
    """Ragged (T, H, D) attention by cu_seqlens: SM80 program."""

    key: ClassVar[AttentionKey] = AttentionKey.RAGGED_SM80


class AttentionRaggedSM90Kernel(_AttentionTL, RaggedAttentionKernel):
    """Ragged (T, H, D) attention by cu_seqlens: SM90 program."""

    key: ClassVar[AttentionKey] = AttentionKey.RAGGED_SM90


class AttentionContiguousSM80Kernel(_AttentionTL, ContiguousAttentionKernel):
    """Attention over a contiguous (B, S_max, Hkv, D) cache: SM80 program."""

    key: ClassVar[AttentionKey] = AttentionKey.CONTIGUOUS_SM80


class AttentionContiguousSM90Kernel(_AttentionTL, ContiguousAttentionKernel):
    """Attention over a contiguous (B, S_max, Hkv, D) cache: SM90 program (TMA tiles)."""

    key: ClassVar[AttentionKey] = AttentionKey.CONTIGUOUS_SM90


class AttentionPagedSM80Kernel(_AttentionTL, PagedAttentionKernel):
    """Attention over a paged cache of any page size (rows gathered): SM80 program."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_SM80


class AttentionPagedSM90Kernel(_AttentionTL, PagedAttentionKernel):
    """Attention over a paged cache of any page size (rows gathered with cp.async): SM90 program."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_SM90


class AttentionPagedTiledSM80Kernel(_AttentionTL, PagedAttentionKernel):
    """Attention over a paged cache whose page size is a power of two >= 16 (page copies): SM80."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_TILED_SM80


class AttentionPagedTiledSM90Kernel(_AttentionTL, PagedAttentionKernel):
    """Attention over a paged cache whose page size is a power of two >= 16 (one TMA copy per
    page): SM90."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_TILED_SM90


KERNELS: tuple[type[Kernel], ...] = (
    AttentionDenseSM80Kernel,
    AttentionDenseSM90Kernel,
    AttentionRaggedSM80Kernel,
    AttentionRaggedSM90Kernel,
    AttentionContiguousSM80Kernel,
    AttentionContiguousSM90Kernel,
    AttentionPagedSM80Kernel,
    AttentionPagedSM90Kernel,
    AttentionPagedTiledSM80Kernel,
    AttentionPagedTiledSM90Kernel,
)


def _compile_weight(source: KVSource, arch: Arch) -> int:
    """nvcc time of one attention program in small-program units (~6 s on a CI core), as measured
    on that machine (README): SM90 persistent ragged and paged programs 101-246 s, other SM90
    ones 53-88 s, SM80 ones about 45 s."""
    if arch is not Arch.SM90:
        return 8
    return 30 if source.ragged_q else 12


def _representative(source: KVSource) -> tuple[tuple[str, StaticFacts], ...]:
    """Static configurations compiled in CI (Hq 32, Hkv 8): every source causal fp16; dense also at
    D 80 (16-column swizzle panels) with bf16, a sliding window and a softcap, at D 256,
    non-causal, and at D 64 (three consumers on SM90); the contiguous cache at D 192 (block_N 64)
    with a window; the paged ones at the page sizes engines use most, the tiled one at D 96
    (32-column panels of each page's copy)."""

    def facts(head_dim: int = 128, **changes: Any) -> StaticFacts:
        # arch: replaced by the key's arch in compile_cases.
        base = StaticFacts(
            Arch.CPU, DType.FP16, heads=32, kv_heads=8, head_dim=head_dim, sm_scale=head_dim**-0.5
        )
        return base._replace(**changes)

    match source:
        case KVSource.DENSE:
            return (
                ("d128 fp16 causal", facts()),
                # bf16, the window and the softcap ride on the D80 case: one program fewer per arch
                # (each persistent SM90 dense program takes about a minute of nvcc on a CI core).
                (
                    "d80 bf16 causal window softcap",
                    facts(head_dim=80, dtype=DType.BF16, window=200, softcap=30.0),
                ),
                ("d256 fp16 causal", facts(head_dim=256)),
                ("d128 fp16 non-causal", facts(causal=False)),
                # SM90: three consumer warpgroups (192-row tiles, 512 threads; tiles.SM90_CONFIGS).
                ("d64 bf16 causal", facts(head_dim=64, dtype=DType.BF16)),
                # The program with the LSE output, once an arch (every source lowers it the same way).
                ("d128 bf16 causal lse", facts(dtype=DType.BF16)._replace(lse=True)),
            )
        case KVSource.RAGGED:
            return (("d128 fp16 causal", facts()),)
        case KVSource.CONTIGUOUS:
            return (("d192 fp16 causal window", facts(head_dim=192, window=300)),)
        # One page size each: the page size is a constant of one program template (the GPU tests
        # run page sizes from 1 up), and each persistent SM90 paged program takes 2-4 minutes of
        # nvcc on a CI core. Page 1 (one key a page) and 16 are the sizes engines use most.
        case KVSource.PAGED:
            return (("d128 fp16 causal page 1", facts(page_size=1)),)
        case KVSource.PAGED_TILED:
            return (("d96 fp16 causal page 16", facts(head_dim=96, page_size=16)),)
        case _:
            assert_never(source)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """The static configurations CI compiles for `arch`, covering every key of this module serving it."""
    cases: list[CompileCase] = []
    for cls in KERNELS:
        key = cast(AttentionKey, cls.key)
        if program_arch(key) is not arch:
            continue
        source, _ = attention_traits(key)
        for label, facts in _representative(source):
            factory, args, _ = program(key, facts._replace(arch=arch))
            weight = _compile_weight(source, arch)
            cases.append(CompileCase(key=key, label=label, factory=factory, args=args, weight=weight))
    return tuple(cases)
