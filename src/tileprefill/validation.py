"""Input checks of the public Ops, run before any kernel (and so before any cache write).

Two kinds of check, kept apart because they cost differently:

- metadata checks (`check_metadata` and the `check_*_shape` helpers) read only
  ranks, shapes, dtypes, devices and strides. They always run: they are free,
  they never synchronise with the device, and they trace under `torch.compile`.
- value checks (`check_cu_seqlens`, `check_lengths`, ...) read the index tensors'
  values, copying them to the host. Ops run them only when constructed with
  `validate=True`.

Every error names the argument, what was expected and what was found.
Input specs (`TensorSpec`) are the single statement of each Op's inputs: the
metadata checks read them and the manifest test compares them to the YAML.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple, assert_never

import attrs
import torch

from tileprefill.context import KVOrder


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
    # A KV cache (blocks, rows, Hkv, D): any view of the engine's storage (`check_cache_view`); the
    # widest vector is 16 bytes wherever D is a multiple of 8 (`cache_vector_bytes`).
    CACHE_VIEW = "D contiguous, strides a multiple of a row's widest vector"


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
                raise ValueError(
                    f"{s.name}: expected shape {s.shape} with {dim.symbol}={known.value} "
                    f"(from {known.source}), got {tuple(t.shape)}"
                )
        match s.strides:
            case StrideRule.CONTIGUOUS:
                if not t.is_contiguous():
                    raise ValueError(
                        f"{s.name}: expected a contiguous tensor (kernels index it densely), "
                        f"got shape {tuple(t.shape)} with strides {t.stride()}"
                    )
            case StrideRule.CACHE_VIEW:
                check_cache_view(s.name, t)
            case _:
                assert_never(s.strides)
    return dims


# --- KV-cache views ---------------------------------------------------------------------------------

#: The widest access of the programs, in bytes: a 16-byte vector of a row (cp.async, vector loads
#: and stores), which is also TMA's stride and base alignment.
VECTOR_BYTES = 16


def widest_vector(extent: int, element_bytes: int) -> int:
    """The most elements (a power of two, at most VECTOR_BYTES) of one access that divide `extent`."""
    width = VECTOR_BYTES // element_bytes
    while width > 1 and extent % width:
        width //= 2
    return width


def cache_vector_bytes(head_dim: int, element_bytes: int) -> int:
    """The bytes every cache stride and the cache's address are multiples of: the widest vector of a
    row of `head_dim` (16 bytes, the programs' vector, for a head dim that is a multiple of 8 fp16
    elements; less for one that is not, whose rows the programs move in narrower vectors)."""
    return widest_vector(head_dim, element_bytes) * element_bytes


def cache_view_problem(t: torch.Tensor) -> str | None:
    """What keeps the 4-D cache `t` (blocks, rows, Hkv, D) from being read and written in place by
    the kernels, in words, or None. Metadata only: under torch.compile the address is not read.

    A cache may be any view of the engine's storage whose head dim is contiguous, whose address and
    strides are multiples of the row's vector (`cache_vector_bytes`: 16 bytes for every head dim the
    attention kernels take), and whose elements are distinct (no two indices of the view share an
    address: an append would race). Size-1 dims take any stride."""
    problem = _cache_layout_problem(tuple(t.shape), t.stride(), t.element_size())
    alignment = cache_vector_bytes(t.shape[-1], t.element_size())
    if problem is None and not torch.compiler.is_compiling() and t.data_ptr() % alignment:
        return f"expected data {alignment}-byte aligned, got address {t.data_ptr():#x}"
    return problem


@functools.lru_cache(maxsize=256)
def _cache_layout_problem(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> str | None:
    """`cache_view_problem` of the shape and strides (cached: a run checks each cache every layer,
    and an engine's caches keep one layout)."""
    if shape[-1] > 1 and strides[-1] != 1:
        return f"expected the last dim (D) contiguous (stride 1), got strides {strides}"
    outer = [(stride, size) for stride, size in zip(strides[:-1], shape[:-1], strict=True) if size > 1]
    alignment = cache_vector_bytes(shape[-1], itemsize)
    if any(stride * itemsize % alignment for stride, _ in outer):
        return (
            f"expected every stride a multiple of {alignment} bytes ({alignment // itemsize} elements, "
            f"the widest vector of a row of D {shape[-1]}), got strides {strides}"
        )
    if not distinct_elements(shape, strides):
        return (
            f"expected a view whose elements do not overlap (each stride past the extent of the "
            f"dims inside it), got shape {shape} with strides {strides}"
        )
    return None


def distinct_elements(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the dims of a view nest, so that no two of its indices share an address: each stride
    (of a dim of size > 1) passes the farthest offset the dims of smaller stride, and on equal
    strides the later dims, reach. Written without sorting: under torch.compile the sizes and
    strides may be symbolic, and a sort by them does not trace."""
    dims = [(stride, size) for stride, size in zip(strides, shape, strict=True) if size > 1]
    for i, (stride, _) in enumerate(dims):
        inside = sum(
            (size - 1) * other
            for j, (other, size) in enumerate(dims)
            if other < stride or (other == stride and j > i)
        )
        if stride <= inside:
            return False
    return True


def follows(t: torch.Tensor, rule: StrideRule) -> bool:
    """Whether `t`'s layout meets `rule` (the fast path of a plan's run checks; metadata only)."""
    match rule:
        case StrideRule.CONTIGUOUS:
            return t.is_contiguous()
        case StrideRule.CACHE_VIEW:
            return cache_view_problem(t) is None
        case _:
            assert_never(rule)


def check_cache_view(name: str, t: torch.Tensor) -> None:
    """`cache_view_problem` as an error naming the argument."""
    problem = cache_view_problem(t)
    if problem is not None:
        raise ValueError(f"{name}: {problem}")


def kv_order_of(t: torch.Tensor) -> KVOrder | None:
    """The row/head order of a cache view (blocks, rows, Hkv, D): HND when one head's rows lie side
    by side (the head stride is the larger), NHD otherwise; None when a block has one row or the
    cache one head (then both orders are the same memory)."""
    if t.shape[1] == 1 or t.shape[2] == 1:
        return None
    return KVOrder.HND if t.stride(2) > t.stride(1) else KVOrder.NHD


def check_same_strides(caches: Mapping[str, torch.Tensor]) -> None:
    """The K and V caches of one call have the strides of the first (the programs index them with
    one set of strides). Metadata only."""
    (first, reference), *rest = caches.items()
    for name, cache in rest:
        if cache.stride() != reference.stride():
            raise ValueError(
                f"{name}: expected the strides of {first} {reference.stride()} (the kernels index the "
                f"caches alike), got {cache.stride()}"
            )


def check_kv_order(name: str, cache: torch.Tensor, order: KVOrder, order_source: str) -> None:
    """A cache has the row/head order a plan was made for (metadata only)."""
    found = kv_order_of(cache)
    if found is not None and found is not order:
        raise ValueError(
            f"{name}: expected a {order.value} cache ({order_source}), got a {found.value} one "
            f"(shape {tuple(cache.shape)}, strides {cache.stride()})"
        )


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


# --- value checks (validate=True only: they copy index tensors to the host) -------------------------


def host_values(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """The values of small int32 index tensors, each flattened, on the host: one device-to-host copy
    for all of them (it synchronises with the device)."""
    if not tensors:
        return []
    flat = torch.cat([t if t.dim() == 1 else t.reshape(-1) for t in tensors]).tolist()
    values: list[list[int]] = []
    start = 0
    for t in tensors:
        values.append(flat[start : start + t.numel()])
        start += t.numel()
    return values


def rows(values: Sequence[int], count: int, width: int) -> list[list[int]]:
    """A flattened (count, width) table as its rows."""
    return [list(values[i * width : (i + 1) * width]) for i in range(count)]


def check_cu_seqlens(name: str, cu: Sequence[int], total: int, total_source: str) -> list[int]:
    """cu_seqlens start at 0, never decrease and end at the packed token count; returns lengths."""
    if cu[0] != 0:
        raise ValueError(f"{name}: expected {name}[0] = 0, got {cu[0]}")
    for b in range(len(cu) - 1):
        if cu[b + 1] < cu[b]:
            raise ValueError(
                f"{name}: expected nondecreasing values, got {name}[{b + 1}] = {cu[b + 1]} < "
                f"{name}[{b}] = {cu[b]}"
            )
    if cu[-1] != total:
        raise ValueError(
            f"{name}: expected {name}[-1] = {total} (the tokens of {total_source}), got {cu[-1]}"
        )
    return [cu[b + 1] - cu[b] for b in range(len(cu) - 1)]


def check_lengths(name: str, lengths: Sequence[int], capacity: int, capacity_is: str) -> None:
    """Per-sequence lengths within [0, capacity]."""
    for b, n in enumerate(lengths):
        if not 0 <= n <= capacity:
            raise ValueError(f"{name}: expected {name}[{b}] in [0, {capacity}] ({capacity_is}), got {n}")


def check_append_capacity(
    name: str, cache_lens: Sequence[int], q_lens: Sequence[int], capacity: int, capacity_is: str
) -> None:
    """The keys already cached plus the new ones fit the cache of each sequence."""
    for b, (cached, new) in enumerate(zip(cache_lens, q_lens, strict=True)):
        if cached < 0:
            raise ValueError(f"{name}: expected {name}[{b}] >= 0, got {cached}")
        if cached + new > capacity:
            raise ValueError(
                f"{name}: expected {name}[{b}] + q_len {new} <= {capacity} ({capacity_is}), "
                f"got {cached} + {new} = {cached + new}"
            )


def check_block_table(
    block_table: Sequence[Sequence[int]], kv_lens: Sequence[int], page_size: int, num_pages: int
) -> None:
    """Entries of the pages each sequence uses (positions < its kv length) name real pages."""
    for b, (row, n) in enumerate(zip(block_table, kv_lens, strict=True)):
        used = math.ceil(n / page_size)
        for i in range(used):
            if not 0 <= row[i] < num_pages:
                raise ValueError(
                    f"block_table: expected entries in [0, {num_pages}) (num_pages) for the {used} pages "
                    f"sequence {b} uses (positions < {n}), got block_table[{b}, {i}] = {row[i]}"
                )


def check_slot_mapping(values: Sequence[int]) -> None:
    """Slots are -1 (skip the token) or a row, and no two tokens name one row (the rows a write
    would then leave depend on the order of the writes). The upper bound depends on num_pages:
    `check_slots_fit`."""
    first: dict[int, int] = {}
    for t, slot in enumerate(values):
        if slot < -1:
            raise ValueError(
                f"slot_mapping: expected values >= -1 (-1 skips a token), got slot_mapping[{t}] = {slot}"
            )
        if slot == -1:
            continue
        seen = first.setdefault(slot, t)
        if seen != t:
            raise ValueError(
                f"slot_mapping: expected distinct slots (two tokens writing one row leave an "
                f"order-dependent result), got slot_mapping[{seen}] = slot_mapping[{t}] = {slot}"
            )


def check_slots_fit(values: Sequence[int], num_pages: int, page_size: int) -> None:
    """Every slot names a row of the cache: slot < num_pages * page_size."""
    rows_ = num_pages * page_size
    for t, slot in enumerate(values):
        if slot >= rows_:
            raise ValueError(
                f"slot_mapping: expected values in [-1, {rows_}) (num_pages {num_pages} * page_size "
                f"{page_size}), got slot_mapping[{t}] = {slot}"
            )


def check_rope_positions(name: str, last_positions: Sequence[int], table_rows: int, why: str) -> None:
    """Every rotated token's position has a row in cos/sin; `last_positions[b]` is -1 for no token."""
    for b, last in enumerate(last_positions):
        if last >= table_rows:
            raise ValueError(
                f"{name}: expected more than {last} rows (sequence {b} rotates position {last}, {why}), "
                f"got {table_rows}"
            )
