"""The view every TileLang program takes of a KV cache: strides read from the tensors at launch.

A cache is 4-D, (blocks, rows, Hkv, D): pages (num_pages, page_size, Hkv, D) or a contiguous
cache's sequences (B, S_max, Hkv, D). Engines hand over views of their own storage: vLLM's
kv-first `(2, num_blocks, ...)` (contiguous halves), its FlashInfer layout
`(num_blocks, 2, ...)` and K|V packed in the last dim (strided halves), FlashInfer's NHD and
HND pages (rows before heads, or heads before rows). All are one strided tensor per K and V
whose head dim is contiguous, so the programs declare exactly that and read the strides at
launch. The Op checks what the programs need: the data and every stride aligned to the widest
vector of a row (16 bytes, for TMA and the 16-byte loads and stores, wherever D is a multiple of
8 elements), and that K and V share strides.

A program reads and writes a cache through `vector_view(cache)`: strides TileLang cannot see to
be multiples of 16 bytes turn every 16-byte load (cp.async, vector copy) into 2-byte ones (seen:
the page-size-1 program's `cp_async_gs_conditional<16>` became scalar loads).
"""

from typing import Any

import tilelang.language as T

from tileprefill.kernels.tl.rope import ELEMENT_BYTES
from tileprefill.validation import widest_vector


def kv_cache_strides() -> tuple[Any, Any, Any, int]:
    """The element strides of a cache's K and V (blocks, rows, Hkv, D), as symbolic variables.

    K and V share them, so a launch whose K and V strides differ is refused by the program's
    own argument checks. The block stride is int64: with K|V packed, a block offset past 2**31
    elements is common, and the product page * stride is then computed in 64 bits."""
    block = T.dynamic("kv_block_stride", "int64")
    row, head = T.dynamic("kv_row_stride, kv_head_stride")
    return (block, row, head, 1)


def vector_view(cache: Any) -> Any:
    """`cache` (a parameter declared with `kv_cache_strides`) with each stride written as a multiple
    of the widest vector of its rows (`validation.cache_vector_bytes`, the rule the Op checks): the
    same addresses for every stride the Op accepts, and TileLang can then prove that a vector of a
    row stays aligned. Called in a prim_func's body."""
    block, row, head, _ = cache.strides
    n = widest_vector(int(cache.shape[-1]), ELEMENT_BYTES)
    return T.view(cache, strides=(block // n * n, row // n * n, head // n * n, 1))
