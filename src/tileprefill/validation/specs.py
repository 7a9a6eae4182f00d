"""Metadata checks of an Op's inputs against its specs: ranks, shapes, dtypes, devices and strides.

They read no device memory, so they always run, never synchronise with the device and trace under
`torch.compile`. `TensorSpec`s are the single statement of each Op's inputs: these checks read them
and the manifest test compares them to the YAML.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import NamedTuple, assert_never

import attrs
import torch

from tileprefill.validation.memory import check_view, view_problem


class DtypeRule(enum.Enum):
    """The dtype an input must have; the value is how the manifest writes it."""

    ACTIVATION = "float16 | bfloat16"  # q: the dtype of the call
    SAME_AS_Q = "q.dtype"  # keys, values and caches
    # Values and caches of a cache write, whose first input (the activation) is k_new.
    SAME_AS_K_NEW = "k_new.dtype"
    INT32 = "int32"  # lengths, cu_seqlens, block tables
    INDEX = "int32 | int64"  # slot mappings (vLLM's are int64)
    FLOAT32 = "float32"  # RoPE cos/sin tables


_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)


class StrideRule(enum.Enum):
    """The memory layout an input must have; the value is how the manifest writes it."""

    CONTIGUOUS = "contiguous"
    # Rows of D read and written in place: a KV cache (blocks, rows, Hkv, D) as the engine stores it,
    # or an activation or output (..., H, D), e.g. a slice of a fused QKV projection (`check_view`);
    # the widest vector is 16 bytes wherever D is a multiple of 8 (`row_vector_bytes`).
    VIEW = "D contiguous, strides a multiple of a row's widest vector"


class Dim(NamedTuple):
    """One dimension of a symbolic shape: `symbol + offset` (e.g. "B + 1" for cu_seqlens)."""

    symbol: str
    offset: int = 0

    def __str__(self) -> str:
        return f"{self.symbol} + {self.offset}" if self.offset else self.symbol


@attrs.frozen
class TensorSpec:
    """One tensor input of an Op: its name, dtype rule, symbolic shape and stride rule."""

    name: str
    dtype: DtypeRule
    dims: tuple[Dim, ...]
    strides: StrideRule = StrideRule.CONTIGUOUS

    @property
    def shape(self) -> str:
        """The symbolic shape as written in the manifest, e.g. "(B, Sq, Hq, D)"."""
        inner = ", ".join(str(d) for d in self.dims)
        return f"({inner},)" if len(self.dims) == 1 else f"({inner})"


def spec(name: str, dtype: DtypeRule, shape: str, strides: StrideRule = StrideRule.CONTIGUOUS) -> TensorSpec:
    """A TensorSpec from a shape written like "B, Sq, Hq, D" or "B + 1"."""
    dims: list[Dim] = []
    for part in shape.split(","):
        symbol, _, offset = part.partition("+")
        dims.append(Dim(symbol.strip(), int(offset) if offset.strip() else 0))
    return TensorSpec(name, dtype, tuple(dims), strides)


class Binding(NamedTuple):
    value: int
    source: str  # the input whose shape bound the symbol first


#: The sizes of an Op's shape symbols, as bound from its inputs.
Dims = Mapping[str, Binding]


def check_metadata(
    specs: Sequence[TensorSpec],
    tensors: Sequence[torch.Tensor],
    *,
    bound: Mapping[str, Binding] | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Binding]:
    """Check every input against its spec; return the size of each shape symbol.

    The first input (q) fixes the device and the activation dtype unless `device` and
    `dtype` are given (a plan's). A symbol is bound by `bound` or else by the first input
    that has it; later inputs must agree.
    """
    dims: dict[str, Binding] = dict(bound or {})
    if not specs:
        return dims
    first = specs[0].name
    if device is None:
        device = tensors[0].device if isinstance(tensors[0], torch.Tensor) else None
        device_source = first
    else:
        device_source = "the plan"
    for s, t in zip(specs, tensors, strict=True):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{s.name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(
                f"{s.name}: expected a tensor on {device} (the device of {device_source}), got {t.device}"
            )
        _check_dtype(
            s, t, tensors[0].dtype if dtype is None else dtype, first if dtype is None else "the plan"
        )
        if t.dim() != len(s.dims):
            raise ValueError(
                f"{s.name}: expected shape {s.shape} (rank {len(s.dims)}), "
                f"got {tuple(t.shape)} (rank {t.dim()})"
            )
        for dim, size in zip(s.dims, t.shape, strict=True):
            value = size - dim.offset
            known = dims.get(dim.symbol)
            if known is None:
                if value < 0:
                    raise ValueError(
                        f"{s.name}: expected shape {s.shape} with {dim} >= {dim.offset}, got {size}"
                    )
                dims[dim.symbol] = Binding(value, s.name)
            elif known.value != value:
                raise _disagreement(specs, tensors, dim.symbol, known, s, value)
        match s.strides:
            case StrideRule.CONTIGUOUS:
                if not t.is_contiguous():
                    raise ValueError(
                        f"{s.name}: expected a contiguous tensor (kernels index it densely), "
                        f"got shape {tuple(t.shape)} with strides {t.stride()}"
                    )
            case StrideRule.VIEW:
                check_view(s.name, t)
            case _:
                assert_never(s.strides)
    return dims


def _disagreement(
    specs: Sequence[TensorSpec],
    tensors: Sequence[torch.Tensor],
    symbol: str,
    known: Binding,
    later: TensorSpec,
    value: int,
) -> ValueError:
    """The error of an input whose shape gives `symbol` another size than the one `known` bound. It
    names the input that is wrong: `later`, unless `known` came from an input that more of the
    inputs disagree with than agree (k_new with the wrong Hkv is named, not the v_new read after
    it). A size bound by a plan is never the one named."""
    sizes = Counter(_sizes_of(specs, tensors, symbol).values())
    named = {s.name: (s, t) for s, t in zip(specs, tensors, strict=True)}
    if known.source in named and sizes[value] > sizes[known.value]:
        first, first_tensor = named[known.source]
        return ValueError(
            f"{first.name}: expected shape {first.shape} with {symbol}={value} (from {later.name}), "
            f"got {tuple(first_tensor.shape)}"
        )
    later_tensor = named[later.name][1]
    return ValueError(
        f"{later.name}: expected shape {later.shape} with {symbol}={known.value} "
        f"(from {known.source}), got {tuple(later_tensor.shape)}"
    )


def _sizes_of(specs: Sequence[TensorSpec], tensors: Sequence[torch.Tensor], symbol: str) -> dict[str, int]:
    """The size of `symbol` in each input of the spec's rank that has it, by input name."""
    sizes: dict[str, int] = {}
    for s, t in zip(specs, tensors, strict=True):
        if isinstance(t, torch.Tensor) and t.dim() == len(s.dims):
            for dim, size in zip(s.dims, t.shape, strict=True):
                if dim.symbol == symbol:
                    sizes[s.name] = size - dim.offset
    return sizes


def follows(t: torch.Tensor, rule: StrideRule) -> bool:
    """Whether `t`'s layout meets `rule` (the fast path of a plan's run checks; metadata only)."""
    match rule:
        case StrideRule.CONTIGUOUS:
            return t.is_contiguous()
        case StrideRule.VIEW:
            return view_problem(t) is None
        case _:
            assert_never(rule)


def _check_dtype(s: TensorSpec, t: torch.Tensor, q_dtype: torch.dtype, first: str) -> None:
    match s.dtype:
        case DtypeRule.ACTIVATION:
            ok, expected = t.dtype in _ACTIVATION_DTYPES, "float16 or bfloat16"
            if ok and first == "the plan" and t.dtype != q_dtype:
                ok, expected = False, f"{q_dtype} (the dtype of the plan)"
        case DtypeRule.SAME_AS_Q | DtypeRule.SAME_AS_K_NEW:
            ok, expected = t.dtype == q_dtype, f"{q_dtype} (the dtype of {first})"
        case DtypeRule.INT32:
            ok, expected = t.dtype == torch.int32, "torch.int32"
        case DtypeRule.INDEX:
            ok, expected = t.dtype in (torch.int32, torch.int64), "torch.int32 or torch.int64"
        case DtypeRule.FLOAT32:
            ok, expected = t.dtype == torch.float32, "torch.float32"
        case _:
            assert_never(s.dtype)
    if not ok:
        raise TypeError(f"{s.name}: expected dtype {expected}, got {t.dtype}")


# --- metadata checks on the bound shape symbols (always run) ---------------------------------------


def check_positive(dims: Dims, symbols: Sequence[str]) -> None:
    """Sizes that must be at least 1 (heads, head dim, batch, page size...)."""
    for symbol in symbols:
        bound = dims[symbol]
        if bound.value < 1:
            raise ValueError(f"{bound.source}: expected {symbol} >= 1, got {symbol}={bound.value}")


def check_heads(dims: Dims) -> None:
    """GQA: every KV head serves the same number of query heads."""
    hq, hkv = dims["Hq"], dims["Hkv"]
    if hq.value % hkv.value:
        raise ValueError(
            f"{hq.source}: expected Hq divisible by Hkv={hkv.value} (from {hkv.source}), got Hq={hq.value}"
        )


def rotary_dim_of(dims: Dims, rotary_dim: int | None) -> int:
    """The rotary dim of a RoPE call, checked against cos/sin and the head dim."""
    half, head_dim = dims["R2"], dims["D"]
    table = 2 * half.value
    if rotary_dim is not None and rotary_dim != table:
        raise ValueError(
            f"rotary_dim: expected 2 * {half.source}.shape[1] = {table} (cos/sin hold rotary_dim // 2 "
            f"frequencies), got {rotary_dim}"
        )
    if head_dim.value % 2:
        raise ValueError(f"{head_dim.source}: expected an even head dim D with RoPE, got D={head_dim.value}")
    if table > head_dim.value:
        raise ValueError(
            f"{half.source}: expected shape[1] <= D / 2 = {head_dim.value // 2} (rotary_dim <= head dim), "
            f"got {half.value} (rotary_dim {table})"
        )
    return table


def check_rope_table_length(dims: Dims, needed: int, why: str) -> None:
    """cos/sin must have a row for every position a call rotates."""
    positions = dims["P"]
    if needed > positions.value:
        raise ValueError(
            f"{positions.source}: expected at least {needed} rows ({why}), got {positions.value}"
        )
