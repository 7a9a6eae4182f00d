"""TileLang program: write new key/value rows into a paged KV cache at the rows a slot mapping names.

vLLM's `reshape_and_cache_flash`: token t of k_new/v_new (T, Hkv, D) goes to slot
slot_mapping[t] of the pages (num_pages, page_size, Hkv, D), i.e. page
slot // page_size, row slot % page_size. The page size is read from the pages'
shape at launch, so one program serves every page size; the pages are a strided
view (`views`: vLLM's packed and HND layouts). A token's keys (or values) are
Hkv runs of D in k_new/v_new (strided views too: slices of a fused QKV
projection) and in the pages, so the program is a row copy, in 16-byte vectors,
consecutive threads on consecutive vectors of a row.

A CTA takes a block of whole tokens: one thread per token reads its slot and
leaves its page and row in shared memory (page -1 for a token to skip), then
every thread copies vectors of the block's rows, loading k and v before storing
either.

Memory safety: a slot outside [0, num_pages * page_size) (-1 marks a padding
token) writes nothing, so no slot value makes the program write outside the
caches. Slots are compared in int64 and page offsets computed in int64 (a cache
of more than 2**31 elements is common). Slots are not checked for duplicates
here: two tokens with one slot race, and one of them wins (the Op rejects
duplicates with validate=True).
"""

import tilelang.language as T

from tileprefill.kernels.tl.append import THREADS, rows_per_cta
from tileprefill.kernels.tl.views import (
    ELEMENT_BYTES,
    kv_cache_strides,
    row_strides,
    vector_view,
    vector_views,
)
from tileprefill.validation import widest_vector


def slot_append_program(num_kv_heads: int, head_dim: int, dtype: str, index_dtype: str) -> T.PrimFunc:
    """k_new/v_new (T, Hkv, D) -> k_pages/v_pages (num_pages, page_size, Hkv, D) at slots
    slot_mapping[t].

    T, num_pages and page_size are dynamic; `index_dtype` ("int32" or "int64") is slot_mapping's
    dtype.
    """
    if index_dtype not in ("int32", "int64"):
        raise ValueError(f"index_dtype: expected 'int32' or 'int64', got {index_dtype!r}")
    Hkv, D = num_kv_heads, head_dim
    vec = widest_vector(D, ELEMENT_BYTES)
    chunks = Hkv * D // vec  # vectors in one token's row
    block_t = rows_per_cta(Hkv * D)  # tokens per CTA (at most THREADS: one thread reads each slot)
    items = block_t * chunks
    num_tokens, num_pages, page_size = T.dynamic("num_tokens, num_pages, page_size")
    cache_strides = kv_cache_strides()
    k_strides, v_strides = row_strides("k_new", 3), row_strides("v_new", 3)

    @T.prim_func
    def slot_append(
        k_rows: T.StridedTensor((num_tokens, Hkv, D), k_strides, dtype),
        v_rows: T.StridedTensor((num_tokens, Hkv, D), v_strides, dtype),
        k_pages: T.StridedTensor((num_pages, page_size, Hkv, D), cache_strides, dtype),
        v_pages: T.StridedTensor((num_pages, page_size, Hkv, D), cache_strides, dtype),
        slot_mapping: T.Tensor((num_tokens,), index_dtype),
    ) -> None:
        k_new, v_new = vector_views(k_rows, v_rows)
        k_dst, v_dst = vector_view(k_pages), vector_view(v_pages)
        with T.Kernel(T.ceildiv(num_tokens, block_t), threads=THREADS) as bx:
            tx = T.get_thread_binding()
            dst_page = T.alloc_shared((block_t,), "int32")
            dst_row = T.alloc_shared((block_t,), "int32")
            if tx < block_t:
                t = bx * block_t + tx
                page = T.alloc_var("int32", init=-1)
                row = T.alloc_var("int32", init=0)
                if t < num_tokens:
                    slot = T.Cast("int64", slot_mapping[t])
                    rows = T.Cast("int64", page_size)
                    if 0 <= slot and slot < T.Cast("int64", num_pages) * rows:
                        page = T.Cast("int32", slot // rows)
                        row = T.Cast("int32", slot % rows)
                dst_page[tx] = page
                dst_row[tx] = row
            T.sync_threads()
            kv = T.alloc_local((2, vec), dtype)
            for k in T.unroll(T.ceildiv(items, THREADS)):
                item = k * THREADS + tx
                i = item // chunks
                h = item % chunks * vec // D
                d = item % chunks * vec % D
                t = bx * block_t + i
                if item < items and t < num_tokens and dst_page[i] >= 0:
                    for v in T.vectorized(vec):
                        kv[0, v] = k_new[t, h, d + v]
                    for v in T.vectorized(vec):
                        kv[1, v] = v_new[t, h, d + v]
                    for v in T.vectorized(vec):
                        k_dst[dst_page[i], dst_row[i], h, d + v] = kv[0, v]
                    for v in T.vectorized(vec):
                        v_dst[dst_page[i], dst_row[i], h, d + v] = kv[1, v]

    return slot_append
