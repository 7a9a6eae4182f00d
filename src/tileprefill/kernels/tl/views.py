"""The views every TileLang program takes of the tensors it reads and writes: strides read from the
tensors at launch.

Rows of D elements are what the programs move, and any tensor whose head dim is contiguous is rows:

- a KV cache is 4-D, (blocks, rows, Hkv, D): pages (num_pages, page_size, Hkv, D) or a contiguous
  cache's sequences (B, S_max, Hkv, D). Engines hand over views of their own storage: vLLM's
  kv-first `(2, num_blocks, ...)` (contiguous halves), its FlashInfer layout `(num_blocks, 2, ...)`
  and K|V packed in the last dim (strided halves), FlashInfer's NHD and HND pages (rows before
  heads, or heads before rows). K and V share one set of strides (`kv_cache_strides`).
- the activations, q, k, v, the new keys and values, and the outputs (out, a rotated q), are
  (B, S, H, D) or (T, H, D): often slices of one fused projection, `qkv[:, :Hq * D].view(T, Hq, D)`,
  whose rows are (Hq + 2 Hkv) D elements apart. Each has strides of its own (`row_strides`): a
  contiguous output beside a strided q, a rotated (new, contiguous) k beside the caller's v.

All are one strided tensor whose head dim is contiguous, so the programs declare exactly that and
read the strides at launch: a contiguous tensor is the view whose strides are its shape's, and one
compiled program serves both. The Op checks what the programs need: the data and every stride
aligned to the widest vector of a row (16 bytes, for TMA and the 16-byte loads and stores, wherever
D is a multiple of 8 elements), and that the K and V caches share strides.

A program reads and writes every such tensor through `vector_view(tensor)`: strides TileLang cannot
see to be multiples of 16 bytes turn every 16-byte load (cp.async, vector copy) into 2-byte ones
(seen: the page-size-1 program's `cp_async_gs_conditional<16>` became scalar loads).
"""

from typing import Any, overload

import tilelang.language as T

from tileprefill.validation import widest_vector

#: The bytes of an element of the rows every program moves (fp16 / bf16).
ELEMENT_BYTES = 2

#: The names of the strides of a row tensor of 3 or 4 dims, outermost first (the head dim's is 1).
_STRIDE_NAMES = {3: ("row", "head"), 4: ("batch", "row", "head")}


def kv_cache_strides() -> tuple[Any, Any, Any, int]:
    """The element strides of a cache's K and V (blocks, rows, Hkv, D), as symbolic variables.

    K and V share them, so a launch whose K and V strides differ is refused by the program's
    own argument checks. The block stride is int64: with K|V packed, a block offset past 2**31
    elements is common, and the product page * stride is then computed in 64 bits."""
    block = T.dynamic("kv_block_stride", "int64")
    row, head = T.dynamic("kv_row_stride, kv_head_stride")
    return (block, row, head, 1)


def row_strides(name: str, rank: int) -> tuple[Any, ...]:
    """The element strides of the row tensor `name` of `rank` dims, (T, H, D) or (B, S, H, D), as
    symbolic variables named after it (`q_row_stride`, ...), the head dim's 1.

    The outermost is int64, as a cache's block stride: a token's (or a sequence's) offset passes
    2**31 elements in a long batch of wide fused rows, and its product is then computed in 64 bits.
    """
    names = _STRIDE_NAMES.get(rank)
    if names is None:
        raise ValueError(f"rank: expected 3 (T, H, D) or 4 (B, S, H, D), got {rank}")
    outer = T.dynamic(f"{name}_{names[0]}_stride", "int64")
    inner = [T.dynamic(f"{name}_{dim}_stride") for dim in names[1:]]
    return (outer, *inner, 1)


def vector_view(tensor: Any) -> Any:
    """`tensor` (a parameter declared with `kv_cache_strides` or `row_strides`) with each stride
    written as a multiple of the widest vector of its rows (`validation.row_vector_bytes`, the rule
    the Op checks): the same addresses for every stride the Op accepts, and TileLang can then prove
    that a vector of a row stays aligned. Called in a prim_func's body."""
    n = widest_vector(int(tensor.shape[-1]), ELEMENT_BYTES)
    return T.view(tensor, strides=(*(stride // n * n for stride in tensor.strides[:-1]), 1))


# Typed per count, so that `macro(*vector_views(Q, K, V), ...)` type-checks as three arguments.
@overload
def vector_views(a: Any, b: Any, /) -> tuple[Any, Any]: ...
@overload
def vector_views(a: Any, b: Any, c: Any, /) -> tuple[Any, Any, Any]: ...
@overload
def vector_views(a: Any, b: Any, c: Any, d: Any, /) -> tuple[Any, Any, Any, Any]: ...
def vector_views(*tensors: Any) -> tuple[Any, ...]:
    """`vector_view` of each of `tensors`, in order."""
    return tuple(vector_view(tensor) for tensor in tensors)
