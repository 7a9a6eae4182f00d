"""TileLang program: what a paged append batch's layers share, derived once per plan in one launch.

For a batch that appends packed new tokens (cu_seqlens_q) behind cache_seqlens
keys of each sequence in a paged cache, every layer needs the same three
things; torch ops derive them in about twenty small launches, this program in
one:

- positions[t]: new token t = cu_seqlens_q[b] + i sits at position
  cache_seqlens[b] + i of its sequence (its RoPE angle and cache position);
- slots[t]: the row of the cache viewed as (num_pages * page_size, Hkv, D)
  that token t goes to, block_table[b, p // page_size] * page_size +
  p % page_size, or -1 where the page is outside the block table or its entry
  is negative or too large for an int32 slot (an entry past the pool gives a
  row past the cache, which the writing programs skip);
- kv_seqlens[b] = cache_seqlens[b] + q_len_b: the keys each sequence attends.

A thread takes one token and binary-searches cu_seqlens_q for its sequence (as
the paged append program does); the first CTA also writes kv_seqlens. Reads
stay inside the tensors whatever they hold.
"""

import tilelang.language as T

#: Threads per CTA: one token each.
THREADS = 128

INT32_MAX = 2**31 - 1


def paged_batch_program(page_size: int) -> T.PrimFunc:
    """block_table (B, MP), cache_seqlens (B,), cu_seqlens_q (B + 1,) -> positions, slots (T,),
    kv_seqlens (B,); all int32, T, B and MP dynamic, page_size static (any >= 1)."""
    if page_size < 1:
        raise ValueError(f"page_size: expected an integer >= 1, got {page_size}")
    num_tokens = T.dynamic("num_tokens")
    batch = T.dynamic("batch")
    max_pages = T.dynamic("max_pages")

    @T.prim_func
    def paged_batch(
        block_table: T.Tensor((batch, max_pages), "int32"),
        cache_seqlens: T.Tensor((batch,), "int32"),
        cu_seqlens_q: T.Tensor((batch + 1,), "int32"),
        positions: T.Tensor((num_tokens,), "int32"),
        slots: T.Tensor((num_tokens,), "int32"),
        kv_seqlens: T.Tensor((batch,), "int32"),
    ) -> None:
        # One CTA more than the tokens need, so that kv_seqlens is written when there are none.
        with T.Kernel(T.ceildiv(num_tokens + 1, THREADS), threads=THREADS) as bx:
            tx = T.get_thread_binding()
            if bx == 0:
                for k in T.serial(T.ceildiv(batch, THREADS)):
                    b = k * THREADS + tx
                    if b < batch:
                        kv_seqlens[b] = cache_seqlens[b] + cu_seqlens_q[b + 1] - cu_seqlens_q[b]
            t = bx * THREADS + tx
            if t < num_tokens and batch > 0:
                # Invariant: the sequence of t lies in [lo, hi); the last one starting at or before t.
                lo = T.alloc_var("int32", init=0)
                hi = T.alloc_var("int32", init=batch)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if cu_seqlens_q[mid] <= t:
                        lo = mid
                    else:
                        hi = mid
                position = cache_seqlens[lo] + (t - cu_seqlens_q[lo])
                positions[t] = position
                slot = T.alloc_var("int32", init=-1)
                if 0 <= position and position // page_size < max_pages:
                    entry = block_table[lo, position // page_size]
                    # An entry past INT32_MAX // page_size would wrap the int32 slot into the cache:
                    # it is past any pool, so it names no row (validate=False passes such tables).
                    if entry >= 0 and entry < INT32_MAX // page_size:
                        slot = entry * page_size + position % page_size
                slots[t] = slot

    return paged_batch
