"""TileLang programs: write new key/value rows into a contiguous or a paged KV cache.

A token's keys (or values) are Hkv runs of D contiguous elements in the new
tensor and in the cache, both strided views (`views`: the new rows may be slices
of a fused QKV projection), so both programs are row copies: find each token's
destination row on the device, then copy the rows of k and of v in 16-byte
vectors. Consecutive threads take consecutive vectors of a row, so warps read
and write contiguous runs of D.

Nothing outside the destination rows is written: a destination outside the
cache (a position past S_max, a block-table entry past the table or naming
no page) is skipped, so a bad length tensor cannot corrupt memory. Callers
validate lengths and capacity before the launch; these guards only keep the
program memory-safe.
"""

import tilelang.language as T

from tileprefill.kernels.tl.views import (
    ELEMENT_BYTES,
    kv_cache_strides,
    row_strides,
    vector_view,
    vector_views,
)
from tileprefill.validation import widest_vector

#: Threads per CTA and elements of one tensor (k or v) each CTA aims to copy:
#: 8 KiB of fp16 for each of k and v, several 16-byte vectors per thread.
THREADS = 128
ELEMENTS_PER_CTA = 4096


def rows_per_cta(row_elements: int) -> int:
    """Tokens one CTA copies: at most THREADS, since the paged program gives each token a thread."""
    return max(1, min(THREADS, ELEMENTS_PER_CTA // row_elements))


def append_contiguous_program(num_kv_heads: int, head_dim: int, dtype: str) -> T.PrimFunc:
    """k_new/v_new (B, S, Hkv, D) -> k_cache/v_cache (B, S_max, Hkv, D) at rows cache_seqlens[b] + i.

    B, S and S_max are dynamic. The grid is (S tiles, B): no search is needed.
    """
    Hkv, D = num_kv_heads, head_dim
    vec = widest_vector(D, ELEMENT_BYTES)
    chunks = Hkv * D // vec  # vectors in one token's row
    block_s = rows_per_cta(Hkv * D)
    items = block_s * chunks
    batch = T.dynamic("batch")
    new_len = T.dynamic("new_len")
    max_len = T.dynamic("max_len")
    cache_strides = kv_cache_strides()
    k_strides, v_strides = row_strides("k_new", 4), row_strides("v_new", 4)

    @T.prim_func
    def append_contiguous(
        k_rows: T.StridedTensor((batch, new_len, Hkv, D), k_strides, dtype),
        v_rows: T.StridedTensor((batch, new_len, Hkv, D), v_strides, dtype),
        k_cache: T.StridedTensor((batch, max_len, Hkv, D), cache_strides, dtype),
        v_cache: T.StridedTensor((batch, max_len, Hkv, D), cache_strides, dtype),
        cache_seqlens: T.Tensor((batch,), "int32"),
    ) -> None:
        k_new, v_new = vector_views(k_rows, v_rows)
        k_dst, v_dst = vector_view(k_cache), vector_view(v_cache)
        with T.Kernel(T.ceildiv(new_len, block_s), batch, threads=THREADS) as (bx, b):
            tx = T.get_thread_binding()
            start = cache_seqlens[b]
            kv = T.alloc_local((2, vec), dtype)
            for k in T.unroll(T.ceildiv(items, THREADS)):
                item = k * THREADS + tx
                i = bx * block_s + item // chunks
                h = item % chunks * vec // D
                d = item % chunks * vec % D
                pos = start + i
                if item < items and i < new_len and 0 <= pos and pos < max_len:
                    for v in T.vectorized(vec):
                        kv[0, v] = k_new[b, i, h, d + v]
                    for v in T.vectorized(vec):
                        kv[1, v] = v_new[b, i, h, d + v]
                    for v in T.vectorized(vec):
                        k_dst[b, pos, h, d + v] = kv[0, v]
                    for v in T.vectorized(vec):
                        v_dst[b, pos, h, d + v] = kv[1, v]

    return append_contiguous


def append_paged_program(num_kv_heads: int, head_dim: int, page_size: int, dtype: str) -> T.PrimFunc:
    """k_new/v_new (T, Hkv, D) packed by cu_seqlens_q (B+1,) -> pages (num_pages, page_size, Hkv, D).

    Token t = cu_seqlens_q[b] + i goes to position p = cache_seqlens[b] + i, i.e.
    page block_table[b, p // page_size], row p % page_size. T, B, num_pages and
    max_pages are dynamic; page_size is static (any >= 1).

    A CTA takes a block of tokens. First one thread per token binary-searches
    cu_seqlens_q for the token's sequence (zero-length sequences share their
    offset with the next sequence; the search takes the last sequence starting
    at or before t, which is the one holding t) and leaves the destination page
    and row in shared memory; then all threads copy the rows.
    """
    if page_size < 1:
        raise ValueError(f"page_size: expected an integer >= 1, got {page_size}")
    Hkv, D = num_kv_heads, head_dim
    vec = widest_vector(D, ELEMENT_BYTES)
    chunks = Hkv * D // vec
    block_t = rows_per_cta(Hkv * D)
    items = block_t * chunks
    num_tokens = T.dynamic("num_tokens")
    batch = T.dynamic("batch")
    num_pages = T.dynamic("num_pages")
    max_pages = T.dynamic("max_pages")
    cache_strides = kv_cache_strides()
    k_strides, v_strides = row_strides("k_new", 3), row_strides("v_new", 3)

    @T.prim_func
    def append_paged(
        k_rows: T.StridedTensor((num_tokens, Hkv, D), k_strides, dtype),
        v_rows: T.StridedTensor((num_tokens, Hkv, D), v_strides, dtype),
        k_pages: T.StridedTensor((num_pages, page_size, Hkv, D), cache_strides, dtype),
        v_pages: T.StridedTensor((num_pages, page_size, Hkv, D), cache_strides, dtype),
        block_table: T.Tensor((batch, max_pages), "int32"),
        cache_seqlens: T.Tensor((batch,), "int32"),
        cu_seqlens_q: T.Tensor((batch + 1,), "int32"),
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
                if t < num_tokens and cu_seqlens_q[0] <= t and t < cu_seqlens_q[batch]:
                    # Invariant: cu_seqlens_q[lo] <= t and the answer lies in [lo, hi).
                    lo = T.alloc_var("int32", init=0)
                    hi = T.alloc_var("int32", init=batch)
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        if cu_seqlens_q[mid] <= t:
                            lo = mid
                        else:
                            hi = mid
                    p = cache_seqlens[lo] + (t - cu_seqlens_q[lo])
                    if 0 <= p and p // page_size < max_pages:
                        entry = block_table[lo, p // page_size]
                        if 0 <= entry and entry < num_pages:
                            page = entry
                            row = p % page_size
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

    return append_paged
