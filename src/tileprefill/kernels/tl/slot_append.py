"""TileLang program: write new key/value rows into a paged KV cache at the rows a slot mapping names.

vLLM's `reshape_and_cache_flash`: token t of k_new/v_new (T, Hkv, D) goes to row
slot_mapping[t] of the pages viewed as rows (num_slots = num_pages * page_size,
Hkv, D), i.e. page slot // page_size, row slot % page_size. The caller passes the
row views, so the program knows nothing of pages: one program serves every page
size. A token's keys (or values) are one row of Hkv * D contiguous elements in
both tensors, so the program is a row copy, in 16-byte vectors, consecutive
threads on consecutive vectors of a row (warps read and write contiguous memory).

A CTA takes a block of whole tokens: one thread per token reads its slot and
leaves it in shared memory (-1 for a token to skip), then every thread copies
vectors of the block's rows, loading k and v before storing either.

Memory safety: a slot outside [0, num_slots) (-1 marks a padding token) writes
nothing, so no slot value makes the program write outside the caches. Row
offsets are computed in int64 (a cache of more than 2**31 elements is common).
Slots are not checked for duplicates here: two tokens with one slot race, and
one of them wins (the Op rejects duplicates with validate=True).
"""

import tilelang.language as T

from tileprefill.kernels.tl.append import ELEMENT_BYTES, THREADS, rows_per_cta
from tileprefill.kernels.tl.rope import widest_vector


def slot_append_program(num_kv_heads: int, head_dim: int, dtype: str, index_dtype: str) -> T.PrimFunc:
    """k_new/v_new (T, Hkv, D) -> k_rows/v_rows (num_slots, Hkv, D) at rows slot_mapping[t].

    T and num_slots are dynamic; `index_dtype` ("int32" or "int64") is slot_mapping's dtype.
    """
    if index_dtype not in ("int32", "int64"):
        raise ValueError(f"index_dtype: expected 'int32' or 'int64', got {index_dtype!r}")
    Hkv, D = num_kv_heads, head_dim
    vec = widest_vector(D, ELEMENT_BYTES)
    chunks = Hkv * D // vec  # vectors in one token's row
    block_t = rows_per_cta(Hkv * D)  # tokens per CTA (at most THREADS: one thread reads each slot)
    items = block_t * chunks
    num_tokens = T.dynamic("num_tokens")
    num_slots = T.dynamic("num_slots")

    @T.prim_func
    def slot_append(
        k_new: T.Tensor((num_tokens, Hkv, D), dtype),
        v_new: T.Tensor((num_tokens, Hkv, D), dtype),
        k_rows: T.Tensor((num_slots, Hkv, D), dtype),
        v_rows: T.Tensor((num_slots, Hkv, D), dtype),
        slot_mapping: T.Tensor((num_tokens,), index_dtype),
    ) -> None:
        with T.Kernel(T.ceildiv(num_tokens, block_t), threads=THREADS) as bx:
            tx = T.get_thread_binding()
            dst = T.alloc_shared((block_t,), "int64")
            if tx < block_t:
                t = bx * block_t + tx
                row = T.alloc_var("int64", init=-1)
                if t < num_tokens:
                    slot = T.Cast("int64", slot_mapping[t])
                    if 0 <= slot and slot < T.Cast("int64", num_slots):
                        row = slot
                dst[tx] = row
            T.sync_threads()
            kv = T.alloc_local((2, vec), dtype)
            for k in T.unroll(T.ceildiv(items, THREADS)):
                item = k * THREADS + tx
                i = item // chunks
                h = item % chunks * vec // D
                d = item % chunks * vec % D
                t = bx * block_t + i
                if item < items and t < num_tokens and dst[i] >= 0:
                    for v in T.vectorized(vec):
                        kv[0, v] = k_new[t, h, d + v]
                    for v in T.vectorized(vec):
                        kv[1, v] = v_new[t, h, d + v]
                    for v in T.vectorized(vec):
                        k_rows[dst[i], h, d + v] = kv[0, v]
                    for v in T.vectorized(vec):
                        v_rows[dst[i], h, d + v] = kv[1, v]

    return slot_append
