"""What a model needs built ahead of time: its attention shapes (`ModelConfig`, and `PRESETS` of
well-known models), and how an engine serves it (`BuildOptions`: Op families, page sizes, arches).

The presets are the attention facts of each model's public configuration (its Hugging Face
`config.json`): query and KV heads, head dim, dtype, the sliding windows of its layer kinds, the
logit softcap and the scale. Nothing else of a model changes which programs it needs (the RoPE
tables are inputs, so rope_theta and scaling laws are not).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import attrs

from tileprefill.context import Arch, DType, IndexDType, RopeMode
from tileprefill.ops import CACHE_OPS, PUBLIC_OPS, PagedCacheSlotAppend, PrefillOp

#: Every public Op class by name: the Op families a build can be asked for.
OP_CLASSES: Final[Mapping[str, type[PrefillOp[Any]] | type[PagedCacheSlotAppend]]] = MappingProxyType(
    {cls.__name__: cls for cls in (*PUBLIC_OPS, *CACHE_OPS)}
)

#: The arches programs are built for.
BUILT_ARCHS: Final = (Arch.SM80, Arch.SM90)
#: The SMs of an H100 SXM or an H200: one CTA each for a persistent SM90 attention program
#: (`tiles.SM90_PERSISTENT_CTAS`).
DEFAULT_SM_COUNT: Final = 132


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{attribute.name}: expected an int >= 1, got {value!r}")


def _non_empty_unique(instance: object, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    if not isinstance(value, tuple) or not value:
        raise ValueError(f"{attribute.name}: expected a non-empty tuple, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{attribute.name}: expected distinct values, got {value!r}")


def _members(kind: type[Any]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[tuple[Any, ...]], value: tuple[Any, ...]) -> None:
        wrong = [v for v in value if not isinstance(v, kind)]
        if wrong:
            raise TypeError(f"{attribute.name}: expected {kind.__name__} members, got {wrong!r}")

    return check


@attrs.frozen(kw_only=True)
class ModelConfig:
    """The attention facts of a model that decide which programs it needs.

    `windows` lists its kinds of attention layer: 0 for full (causal) attention, n for a causal
    sliding window of n keys (Gemma 2 alternates (0, 4096)). `softcap` is the logit softcap (0:
    none); `sm_scale` the score scale (None: head_dim ** -0.5); `rope` and `rotary_dim` (None: the
    whole head) what the RoPE Ops rotate; `dtypes` the dtypes it is served in.
    """

    heads: int = attrs.field(validator=_positive)
    kv_heads: int = attrs.field(validator=_positive)
    head_dim: int = attrs.field(validator=_positive)
    dtypes: tuple[DType, ...] = attrs.field(
        default=(DType.BF16,), validator=[_non_empty_unique, _members(DType)]
    )
    windows: tuple[int, ...] = attrs.field(default=(0,), validator=_non_empty_unique)
    softcap: float = 0.0
    sm_scale: float | None = None
    rope: RopeMode = RopeMode.NEOX
    rotary_dim: int | None = None
    causal: bool = True
    #: Where the numbers come from (a public configuration), for the listing.
    source: str = ""

    def __attrs_post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: expected a divisor of heads ({self.heads}), got {self.kv_heads}")
        bad = [w for w in self.windows if isinstance(w, bool) or not isinstance(w, int) or w < 0]
        if bad:
            raise ValueError(f"windows: expected ints >= 0 (0: full attention), got {self.windows!r}")
        if not self.causal and any(self.windows):
            raise ValueError(
                f"windows: expected (0,) without causal (a window is causal), got {self.windows!r}"
            )
        if not (math.isfinite(self.softcap) and self.softcap >= 0):
            raise ValueError(f"softcap: expected a finite float >= 0 (0: none), got {self.softcap!r}")
        if self.sm_scale is not None and not (math.isfinite(self.sm_scale) and self.sm_scale > 0):
            raise ValueError(f"sm_scale: expected None or a finite float > 0, got {self.sm_scale!r}")
        if self.rotary_dim is not None and not (
            isinstance(self.rotary_dim, int)
            and 2 <= self.rotary_dim <= self.head_dim
            and self.rotary_dim % 2 == 0
        ):
            raise ValueError(
                f"rotary_dim: expected None or an even int in [2, head_dim {self.head_dim}], "
                f"got {self.rotary_dim!r}"
            )

    @property
    def scale(self) -> float:
        """The score scale the Ops are built with (`sm_scale`, else head_dim ** -0.5 as an Op takes it)."""
        return self.sm_scale if self.sm_scale is not None else float(self.head_dim) ** -0.5

    @property
    def rotary(self) -> int:
        """The dims RoPE rotates."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def sharded(self, tensor_parallel: int) -> ModelConfig:
        """The attention one GPU of `tensor_parallel` runs: the query heads split among them, the KV
        heads too, or each replicated where there are fewer than GPUs (as vLLM and SGLang shard).
        Programs are built for a GPU's heads, so a sharded model needs these."""
        if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
            raise ValueError(f"tensor_parallel: expected an int >= 1, got {tensor_parallel!r}")
        if self.heads % tensor_parallel:
            raise ValueError(
                f"tensor_parallel: expected a divisor of heads ({self.heads}), got {tensor_parallel}"
            )
        if self.kv_heads % tensor_parallel and tensor_parallel % self.kv_heads:
            raise ValueError(
                f"tensor_parallel: expected a divisor or a multiple of kv_heads ({self.kv_heads}), "
                f"got {tensor_parallel}"
            )
        kv_heads = max(1, self.kv_heads // tensor_parallel)
        return attrs.evolve(self, heads=self.heads // tensor_parallel, kv_heads=kv_heads)


#: Well-known models, by name: the attention facts of their public `config.json` (source).
#: Qwen2.5-7B's config names a sliding window but leaves it off (use_sliding_window false).
#: gpt-oss also adds learned attention sinks, which tileprefill does not compute: its programs are
#: built for its shapes, and a call with sinks is not served.
PRESETS: Final[Mapping[str, ModelConfig]] = MappingProxyType(
    {
        "llama-3-8b": ModelConfig(heads=32, kv_heads=8, head_dim=128, source="meta-llama/Meta-Llama-3-8B"),
        "qwen2.5-7b": ModelConfig(heads=28, kv_heads=4, head_dim=128, source="Qwen/Qwen2.5-7B"),
        "mistral-7b": ModelConfig(
            heads=32, kv_heads=8, head_dim=128, windows=(4096,), source="mistralai/Mistral-7B-v0.1"
        ),
        "gemma-2-9b": ModelConfig(
            heads=16,
            kv_heads=8,
            head_dim=256,
            windows=(0, 4096),
            softcap=50.0,
            sm_scale=256**-0.5,  # query_pre_attn_scalar 256
            source="google/gemma-2-9b",
        ),
        "gpt-oss-20b": ModelConfig(
            heads=64, kv_heads=8, head_dim=64, windows=(0, 128), source="openai/gpt-oss-20b"
        ),
    }
)


def model_config(model: str | ModelConfig) -> ModelConfig:
    """`model` itself, or the preset it names."""
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model]
    raise ValueError(f"model: expected a ModelConfig or one of the presets {sorted(PRESETS)}, got {model!r}")


def _op_names(instance: object, attribute: attrs.Attribute[Any], value: tuple[str, ...] | None) -> None:
    if value is None:
        return
    _non_empty_unique(instance, attribute, value)
    unknown = [name for name in value if name not in OP_CLASSES]
    if unknown:
        raise ValueError(f"ops: expected names of {sorted(OP_CLASSES)}, got {unknown!r}")


def _archs(instance: object, attribute: attrs.Attribute[tuple[Arch, ...]], value: tuple[Arch, ...]) -> None:
    _non_empty_unique(instance, attribute, value)
    wrong = [a for a in value if a not in BUILT_ARCHS]
    if wrong:
        raise ValueError(f"archs: expected some of {[a.value for a in BUILT_ARCHS]}, got {wrong!r}")


def _positive_ints(
    instance: object, attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]
) -> None:
    _non_empty_unique(instance, attribute, value)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
        raise ValueError(f"{attribute.name}: expected ints >= 1, got {value!r}")


@attrs.frozen(kw_only=True)
class BuildOptions:
    """How a model is served, as far as it decides its programs.

    `ops`: the Op families (public Op class names; None: every Op the model can use, the RoPE ones
    only with RoPE). `page_sizes`: of the paged caches. `lse`: whether attention also returns the
    log-sum-exp (False, True or both). `sm_counts`: the SM counts of the SM90 devices (a persistent
    SM90 attention program launches one CTA per SM: 132 on an H100 SXM or H200, 114 on an H100
    PCIe). `index_dtypes`: of the slot mappings `PagedCacheSlotAppend` takes (vLLM's is int64).
    """

    ops: tuple[str, ...] | None = attrs.field(default=None, validator=_op_names)
    archs: tuple[Arch, ...] = attrs.field(default=BUILT_ARCHS, validator=_archs)
    page_sizes: tuple[int, ...] = attrs.field(default=(16,), validator=_positive_ints)
    lse: tuple[bool, ...] = attrs.field(default=(False,), validator=[_non_empty_unique, _members(bool)])
    sm_counts: tuple[int, ...] = attrs.field(default=(DEFAULT_SM_COUNT,), validator=_positive_ints)
    index_dtypes: tuple[IndexDType, ...] = attrs.field(
        default=(IndexDType.INT32, IndexDType.INT64), validator=[_non_empty_unique, _members(IndexDType)]
    )

    def op_names(self, model: ModelConfig) -> tuple[str, ...]:
        """The Op families built for `model`: `ops`, else every one it can use."""
        if self.ops is not None:
            return self.ops
        return tuple(
            name for name, cls in OP_CLASSES.items() if model.rope is not RopeMode.NONE or not _rotates(cls)
        )


def _rotates(cls: type[PrefillOp[Any]] | type[PagedCacheSlotAppend]) -> bool:
    return bool(getattr(cls, "rotates", False))
