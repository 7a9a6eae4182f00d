"""The memory geometry of the tensors the kernels read and write in place: which views of a
caller's storage the programs take as they are (`view_problem`: KV caches, and the activations and
outputs, e.g. slices of a fused QKV projection), and whether two tensors share memory (`overlaps`,
`check_apart`). Metadata only: shapes, strides and addresses, never values.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from tileprefill.context import KVOrder

#: The widest access of the programs, in bytes: a 16-byte vector of a row (cp.async, vector loads
#: and stores), which is also TMA's stride and base alignment.
VECTOR_BYTES = 16


def widest_vector(extent: int, element_bytes: int) -> int:
    """The most elements (a power of two, at most VECTOR_BYTES) of one access that divide `extent`."""
    width = VECTOR_BYTES // element_bytes
    while width > 1 and extent % width:
        width //= 2
    return width


def row_vector_bytes(head_dim: int, element_bytes: int) -> int:
    """The bytes every stride of a view and its address are multiples of: the widest vector of a row
    of `head_dim` (16 bytes, the programs' vector, for a head dim that is a multiple of 8 fp16
    elements; less for one that is not, whose rows the programs move in narrower vectors)."""
    return widest_vector(head_dim, element_bytes) * element_bytes


def view_problem(t: torch.Tensor) -> str | None:
    """What keeps `t` (a KV cache (blocks, rows, Hkv, D), or rows (..., H, D) of an activation or an
    output) from being read and written in place by the kernels, in words, or None. Metadata only:
    under torch.compile the address is not read.

    Any view of the caller's storage is taken whose head dim is contiguous, whose address and strides
    are multiples of the row's vector (`row_vector_bytes`: 16 bytes for every head dim the attention
    kernels take; a contiguous tensor's are, at an aligned address), and whose elements are distinct
    (no two indices of the view share an address: a write would race). Size-1 dims take any stride."""
    # A contiguous tensor's strides are multiples of D, and so of the row's vector (the common case,
    # checked every run: no shape and stride tuples to build).
    problem = None if t.is_contiguous() else _layout_problem(tuple(t.shape), t.stride(), t.element_size())
    alignment = row_vector_bytes(t.shape[-1], t.element_size())
    if problem is None and not torch.compiler.is_compiling() and t.data_ptr() % alignment:
        return f"expected data {alignment}-byte aligned, got address {t.data_ptr():#x}"
    return problem


@functools.lru_cache(maxsize=256)
def _layout_problem(shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int) -> str | None:
    """`view_problem` of the shape and strides (cached: a run checks each view every layer, and an
    engine's tensors keep one layout)."""
    if shape[-1] > 1 and strides[-1] != 1:
        return f"expected the last dim (D) contiguous (stride 1), got strides {strides}"
    outer = [(stride, size) for stride, size in zip(strides[:-1], shape[:-1], strict=True) if size > 1]
    alignment = row_vector_bytes(shape[-1], itemsize)
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


def check_view(name: str, t: torch.Tensor) -> None:
    """`view_problem` as an error naming the argument."""
    problem = view_problem(t)
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


# --- memory shared between tensors ----------------------------------------------------------------


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) a tensor's elements lie in."""
    start = t.data_ptr()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + (extent * t.element_size() if t.numel() else 0)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory (metadata only). Byte ranges that do not meet never do.
    Two views with one shape and one set of strides are told apart exactly: the K and V halves of
    one cache storage interleave (vLLM's K|V-packed and `(blocks, 2, ...)` layouts) without sharing
    an element. Any other pair whose ranges meet counts as sharing."""
    if a.device != b.device or not a.numel() or not b.numel():
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if not (a0 < b1 and b0 < a1):
        return False
    itemsize = a.element_size()
    if a.shape != b.shape or a.stride() != b.stride() or b.element_size() != itemsize:
        return True
    return _view_meets_shifted(tuple(a.shape), a.stride(), itemsize, b.data_ptr() - a0)


@functools.lru_cache(maxsize=256)
def _view_meets_shifted(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, shift_bytes: int
) -> bool:
    """Whether a view meets itself moved by `shift_bytes` (`overlaps` of two views of one shape and
    strides). Cached: an engine's K and V views keep one layout and one offset, checked every run."""
    if not distinct_elements(shape, strides):
        return True  # elements of one view overlap each other: no exact answer here
    shift, misaligned = divmod(shift_bytes, itemsize)
    dims = sorted(
        ((stride, size) for stride, size in zip(strides, shape, strict=True) if size > 1), reverse=True
    )
    return bool(misaligned) or _shift_meets(shift, dims)


def check_apart(written: Mapping[str, torch.Tensor], read: Mapping[str, torch.Tensor]) -> None:
    """The tensors a call writes in place share no memory with each other or with what it reads
    (metadata only): a shared element would race, or change an input in the middle of the call.
    Each written tensor is checked against the written ones before it, then against the read.
    Under torch.compile nothing is checked: addresses are not traced (as `view_problem`)."""
    if torch.compiler.is_compiling():
        return
    # Tensors of separate allocations never meet: `overlaps` (byte ranges, exact for interleaved
    # views) runs only on two views of one storage. A run checks this every layer.
    tensors = {**written, **read}
    storage = {name: t.untyped_storage().data_ptr() for name, t in tensors.items()}
    earlier: list[str] = []
    for name, t in written.items():
        for other_name in (*earlier, *read):
            if storage[name] == storage[other_name] and overlaps(t, tensors[other_name]):
                raise ValueError(
                    f"{name}: expected memory apart from {other_name}, got memory shared with "
                    f"{other_name} (the write of {name} would change {other_name})"
                )
        earlier.append(name)


def _shift_meets(shift: int, dims: Sequence[tuple[int, int]]) -> bool:
    """Whether a view whose (stride, size) dims, outermost first, nest (each stride at least the
    extent of the dims inside it) meets itself moved by `shift` elements: whether shift is a sum
    of d * stride over its dims with |d| < size. The dims inside one span less than its stride, so
    only the two multiples of the outermost stride nearest to shift can start such a sum."""
    if not dims:
        return shift == 0
    (stride, size), inner = dims[0], dims[1:]
    return any(
        abs(d) < size and _shift_meets(shift - d * stride, inner)
        for d in {shift // stride, -(-shift // stride)}
    )
