"""TileLang attention kernels: one class per SM80/SM90 attention key.

Each class launches the TileLang program of its key (`kernels/tl/attention_sm80.py`
or `attention_sm90.py`) through a torch custom op, `tileprefill::<key value>`
(e.g. `tileprefill::attn_paged_sm90`), so that `torch.compile(fullgraph=True)`
and CUDA graphs see one opaque op with a known output shape. A call:

1. allocates the output (B, Sq, Hq, D) / (Tq, Hq, D) like q;
2. builds the program for the call's static facts (heads, kv heads, head dim,
   dtype, causal, sm_scale, page size, arch), once per process and cached
   (`kernels.compile.build`); token counts, batch, sequence lengths, pages and
   cache sizes are dynamic in the program and never recompile;
3. launches it on the current stream. No host synchronisation.

SM80 programs are compiled for sm_80 and run on every 8.x device (and on
Hopper); SM90 programs are compiled for sm_90a. Importing this module does not
import tilelang: the program modules are imported on the first call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Final, assert_never, cast

import attrs
import torch

from tileprefill.context import Arch
from tileprefill.kernels.base import (
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    Kernel,
    PagedAttentionKernel,
    RaggedAttentionKernel,
)
from tileprefill.kernels.compile import CompileCase, build, recording_builds
from tileprefill.kernels.compile import prebuild as compile_prebuild
from tileprefill.keys import AttentionKey
from tileprefill.selection import Code, Source, attention_traits

if TYPE_CHECKING:
    from tilelang import JITKernel
    from torch._library.custom_ops import CustomOpDef

_DTYPE_NAMES: Final[dict[torch.dtype, str]] = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def program_arch(key: AttentionKey) -> Arch:
    """The arch the program of a TileLang attention key is compiled for."""
    _, code = attention_traits(key)
    match code:
        case Code.SM80:
            return Arch.SM80
        case Code.SM90:
            return Arch.SM90
        case Code.REF | Code.TL:
            raise ValueError(f"key: expected a per-arch TileLang attention key, got {key.value}")
        case _:
            assert_never(code)


@attrs.frozen(kw_only=True)
class StaticFacts:
    """What a compiled attention program is specialised for (its compile-cache key, with the arch)."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: str  # "float16" | "bfloat16"
    causal: bool
    sm_scale: float
    page_size: int = 0  # paged sources only


def program(key: AttentionKey, facts: StaticFacts) -> tuple[Callable[..., Any], tuple[Hashable, ...]]:
    """The program factory of `key` and its static arguments for `facts` (what `build` compiles)."""
    from tileprefill.kernels.tl import attention_configs

    source, _ = attention_traits(key)
    programs: ModuleType
    if program_arch(key) is Arch.SM90:
        from tileprefill.kernels.tl import attention_sm90

        programs, config = attention_sm90, attention_configs.sm90_config(facts.head_dim)
    else:
        from tileprefill.kernels.tl import attention_sm80

        programs, config = attention_sm80, attention_configs.sm80_config(facts.head_dim)
    from tileprefill.kernels.tl.attention_parts import KVSource

    common = (facts.heads, facts.kv_heads, facts.head_dim, facts.dtype, facts.causal, facts.sm_scale)
    match source:
        case Source.DENSE:
            return programs.program, (KVSource.DENSE, *common, 0, config)
        case Source.RAGGED:
            return programs.program, (KVSource.RAGGED, *common, 0, config)
        case Source.CONTIGUOUS:
            return programs.program, (KVSource.CONTIGUOUS, *common, 0, config)
        case Source.PAGED:
            return programs.program, (KVSource.PAGED, *common, facts.page_size, config)
        case Source.PAGED_TILED:
            return programs.program, (KVSource.PAGED_TILED, *common, facts.page_size, config)
        case _:
            assert_never(source)


def build_program(key: AttentionKey, facts: StaticFacts) -> JITKernel:
    """The compiled program of `key` for `facts` (compiled on first use, then cached)."""
    factory, args = program(key, facts)
    return build(factory, args, None, program_arch(key))


def prebuild(configs: Iterable[tuple[AttentionKey, StaticFacts]], *, jobs: int | None = None) -> None:
    """Compile the programs of `configs` side by side, ahead of the calls that need them: warms up an
    engine, or a benchmark, for known shapes (`kernels.compile.prebuild` of what `build_program`
    asks for)."""
    with recording_builds() as requests:
        for key, facts in configs:
            build_program(key, facts)
    compile_prebuild(requests, jobs=jobs)


def _facts(
    q: torch.Tensor, kv: torch.Tensor, *, causal: bool, sm_scale: float, page_size: int
) -> StaticFacts:
    """The static facts of a call, checked: q (..., Hq, D) and k/v (..., Hkv, D) of one dtype."""
    dtype = _DTYPE_NAMES.get(q.dtype)
    if dtype is None:
        raise TypeError(f"q: expected dtype float16 or bfloat16, got {q.dtype}")
    if kv.dtype != q.dtype:
        raise TypeError(f"k/v: expected the dtype of q ({q.dtype}), got {kv.dtype}")
    heads, head_dim = q.shape[-2], q.shape[-1]
    kv_heads = kv.shape[-2]
    if kv.shape[-1] != head_dim:
        raise ValueError(f"k/v: expected head_dim {head_dim} (that of q), got {kv.shape[-1]}")
    if kv_heads < 1 or heads % kv_heads:
        raise ValueError(f"k/v: expected a number of heads dividing q's {heads}, got {kv_heads}")
    return StaticFacts(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        causal=causal,
        sm_scale=float(sm_scale),
        page_size=page_size,
    )


def _check_index(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype int32, got {tensor.dtype}")


def _program_input(t: torch.Tensor) -> torch.Tensor:
    """`t` as the programs read it: contiguous, starting on a 16-byte boundary (TMA requires it)."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _allocate_output(q: torch.Tensor) -> torch.Tensor:
    """The output buffer of a call, shaped like q (uninitialised: the program writes every element;
    GPU tests replace this function to hand the program a NaN-filled buffer and prove it)."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _launch(
    key: AttentionKey, tensors: tuple[torch.Tensor, ...], causal: bool, sm_scale: float
) -> torch.Tensor:
    """Run the program of `key` on `tensors` (q, k-like, v-like, index tensors...); returns the output."""
    source, _ = attention_traits(key)
    q, k = tensors[0], tensors[1]
    paged = source is Source.PAGED or source is Source.PAGED_TILED
    for name, index in zip(_INDEX_NAMES[source], tensors[3:], strict=True):
        _check_index(name, index)
    facts = _facts(q, k, causal=causal, sm_scale=sm_scale, page_size=k.shape[1] if paged else 0)
    out = _allocate_output(q)
    if out.numel() == 0:
        return out
    # No key can be visible: every row is 0 (and a TMA descriptor of an empty tensor is invalid).
    no_keys = k.shape[0] == 0 or (k.dim() == 4 and k.shape[1] == 0)
    if paged:
        no_keys = no_keys or tensors[3].shape[1] == 0  # a block table with no pages
    if no_keys:
        return out.zero_()
    kernel = build_program(key, facts)
    kernel(*(_program_input(t) for t in tensors), out)
    return out


_INDEX_NAMES: Final[dict[Source, tuple[str, ...]]] = {
    Source.DENSE: (),
    Source.RAGGED: ("cu_seqlens_q", "cu_seqlens_kv"),
    Source.CONTIGUOUS: ("kv_seqlens",),
    Source.PAGED: ("block_table", "kv_seqlens", "cu_seqlens_q"),
    Source.PAGED_TILED: ("block_table", "kv_seqlens", "cu_seqlens_q"),
}

_PAGED_SCHEMA: Final = (
    "(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, Tensor kv_seqlens, "
    "Tensor cu_seqlens_q, bool causal, float sm_scale) -> Tensor"
)
_SCHEMAS: Final[dict[Source, str]] = {
    Source.DENSE: "(Tensor q, Tensor k, Tensor v, bool causal, float sm_scale) -> Tensor",
    Source.RAGGED: (
        "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_kv, bool causal, "
        "float sm_scale) -> Tensor"
    ),
    Source.CONTIGUOUS: (
        "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor kv_seqlens, bool causal, float sm_scale) -> Tensor"
    ),
    Source.PAGED: _PAGED_SCHEMA,
    Source.PAGED_TILED: _PAGED_SCHEMA,
}


def _dense_impl(key: AttentionKey) -> Callable[..., torch.Tensor]:
    def attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, sm_scale: float
    ) -> torch.Tensor:
        return _launch(key, (q, k, v), causal, sm_scale)

    return attention


def _ragged_impl(key: AttentionKey) -> Callable[..., torch.Tensor]:
    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        return _launch(key, (q, k, v, cu_seqlens_q, cu_seqlens_kv), causal, sm_scale)

    return attention


def _contiguous_impl(key: AttentionKey) -> Callable[..., torch.Tensor]:
    def attention(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        return _launch(key, (q, k_cache, v_cache, kv_seqlens), causal, sm_scale)

    return attention


def _paged_impl(key: AttentionKey) -> Callable[..., torch.Tensor]:
    def attention(
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        return _launch(key, (q, k_pages, v_pages, block_table, kv_seqlens, cu_seqlens_q), causal, sm_scale)

    return attention


def _output_like_q(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """The fake (meta) implementation: every attention op returns a tensor shaped like q."""
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


_IMPLS: Final[dict[Source, Callable[[AttentionKey], Callable[..., torch.Tensor]]]] = {
    Source.DENSE: _dense_impl,
    Source.RAGGED: _ragged_impl,
    Source.CONTIGUOUS: _contiguous_impl,
    Source.PAGED: _paged_impl,
    Source.PAGED_TILED: _paged_impl,
}


def _register_op(key: AttentionKey) -> CustomOpDef:
    source, _ = attention_traits(key)
    op = torch.library.custom_op(
        f"tileprefill::{key.value}",
        _IMPLS[source](key),
        mutates_args=(),
        device_types="cuda",
        schema=_SCHEMAS[source],
    )
    op.register_fake(_output_like_q)
    return op


#: The custom op of every TileLang attention key (registered at import; tilelang is not imported).
OPS: Final[dict[AttentionKey, CustomOpDef]] = {
    key: _register_op(key)
    for key in AttentionKey
    if attention_traits(key)[1] is Code.SM80 or attention_traits(key)[1] is Code.SM90
}


def _run(key: AttentionKey, *args: object) -> torch.Tensor:
    return cast(torch.Tensor, OPS[key](*args))


class _DenseTL(DenseAttentionKernel):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, sm_scale: float
    ) -> torch.Tensor:
        return _run(self.key, q, k, v, causal, sm_scale)


class _RaggedTL(RaggedAttentionKernel):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        return _run(self.key, q, k, v, cu_seqlens_q, cu_seqlens_kv, causal, sm_scale)


class _ContiguousTL(ContiguousAttentionKernel):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        return _run(self.key, q, k_cache, v_cache, kv_seqlens, causal, sm_scale)


class _PagedTL(PagedAttentionKernel):
    def __call__(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        return _run(self.key, q, k_pages, v_pages, block_table, kv_seqlens, cu_seqlens_q, causal, sm_scale)


class AttentionDenseSM80Kernel(_DenseTL):
    """Dense (B, S, H, D) attention: SM80 program (cp.async, mma.sync)."""

    key: ClassVar[AttentionKey] = AttentionKey.DENSE_SM80


class AttentionDenseSM90Kernel(_DenseTL):
    """Dense (B, S, H, D) attention: SM90 program (TMA, wgmma, warp-specialized ping-pong)."""

    key: ClassVar[AttentionKey] = AttentionKey.DENSE_SM90


class AttentionRaggedSM80Kernel(_RaggedTL):
    """Ragged (T, H, D) attention by cu_seqlens: SM80 program."""

    key: ClassVar[AttentionKey] = AttentionKey.RAGGED_SM80


class AttentionRaggedSM90Kernel(_RaggedTL):
    """Ragged (T, H, D) attention by cu_seqlens: SM90 program."""

    key: ClassVar[AttentionKey] = AttentionKey.RAGGED_SM90


class AttentionContiguousSM80Kernel(_ContiguousTL):
    """Attention over a contiguous (B, S_max, Hkv, D) cache: SM80 program."""

    key: ClassVar[AttentionKey] = AttentionKey.CONTIGUOUS_SM80


class AttentionContiguousSM90Kernel(_ContiguousTL):
    """Attention over a contiguous (B, S_max, Hkv, D) cache: SM90 program (TMA tiles)."""

    key: ClassVar[AttentionKey] = AttentionKey.CONTIGUOUS_SM90


class AttentionPagedSM80Kernel(_PagedTL):
    """Attention over a paged cache of any page size (rows gathered): SM80 program."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_SM80


class AttentionPagedSM90Kernel(_PagedTL):
    """Attention over a paged cache of any page size (rows gathered with cp.async): SM90 program."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_SM90


class AttentionPagedTiledSM80Kernel(_PagedTL):
    """Attention over a paged cache whose page size is a power of two >= 16 (page copies): SM80."""

    key: ClassVar[AttentionKey] = AttentionKey.PAGED_TILED_SM80


class AttentionPagedTiledSM90Kernel(_PagedTL):
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


def _representative(source: Source) -> tuple[tuple[str, StaticFacts], ...]:
    """Static configurations compiled in CI: every source at D=128 fp16 causal (Hq 32, Hkv 8),
    plus the other head dims, bf16 and non-causal for dense, and page sizes for the paged ones."""

    def facts(
        head_dim: int = 128, dtype: str = "float16", causal: bool = True, page_size: int = 0
    ) -> StaticFacts:
        return StaticFacts(
            heads=32,
            kv_heads=8,
            head_dim=head_dim,
            dtype=dtype,
            causal=causal,
            sm_scale=head_dim**-0.5,
            page_size=page_size,
        )

    match source:
        case Source.DENSE:
            return (
                ("d128 fp16 causal", facts()),
                ("d64 fp16 causal", facts(head_dim=64)),
                ("d256 fp16 causal", facts(head_dim=256)),
                ("d128 bf16 causal", facts(dtype="bfloat16")),
                ("d128 fp16 non-causal", facts(causal=False)),
            )
        case Source.RAGGED | Source.CONTIGUOUS:
            return (("d128 fp16 causal", facts()),)
        case Source.PAGED:
            return (
                ("d128 fp16 causal page 1", facts(page_size=1)),
                ("d128 fp16 causal page 48", facts(page_size=48)),
            )
        case Source.PAGED_TILED:
            return (
                ("d128 fp16 causal page 16", facts(page_size=16)),
                ("d128 fp16 causal page 64", facts(page_size=64)),
            )
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
            factory, args = program(key, facts)
            cases.append(CompileCase(key=key, label=label, factory=factory, args=args, out_idx=None))
    return tuple(cases)
