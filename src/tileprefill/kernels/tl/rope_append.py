"""TileLang program: RoPE of q and the new keys, and their write with the new values into a KV cache by
slot, in one launch.

The caller hands any cache as blocks of rows, (blocks, rows, Hkv, D): a paged
cache (num_pages, page_size, Hkv, D) or a contiguous one (B, S_max, Hkv, D), a
strided view (`views`), and one int32 slot per new token, computed once
per batch: slot s is row s % rows of block s // rows. The program therefore
knows nothing of pages or sequences: no block-table walk or search per token,
and page size 1 costs what any page size costs. One launch of
`rope_append_program` does the work of three (RoPE of q, RoPE of k, append).

A CTA takes a block of whole tokens (a token's heads share one position, one
cos/sin row and one slot) and walks flat spaces of chunks in steps of
THREADS, so that consecutive threads take consecutive 16-byte chunks and a
warp touches contiguous memory: the rotated chunks of its q rows, then of its
k rows (the same code on two pairs of tensors); the pass-through dims >= R of
q and k; and the values (a token's Hkv * D values are Hkv runs of D in v_new
and in the cache). q, k_new, v_new and q_out are strided views too: slices of a
fused QKV projection are read in place.

Several loads in flight: each thread takes its chunks in batches, issuing
every load of a batch (x first, then cos/sin, which wait for the position)
before rotating and storing any; batches hold about LOADS_IN_FLIGHT 16-byte
loads of data. The rotation is rope.py's fp32 arithmetic, operation for
operation, rounded once to dtype, so q and k come out bit-for-bit as that
program's.

Memory safety: a token whose slot is outside [0, blocks * rows) (e.g. -1 for a
padding token) writes nothing to the caches; its q_out row is still written.
No slot value makes a program write outside the caches. Slots are not checked
for duplicates: two tokens with one slot race, and one of them wins.

Seen in the SASS (nvcc 13, sm_90a): most shapes store in 16-byte vectors;
for a few (e.g. D = 96 interleaved) nvcc splits some q_out stores into four
4-byte stores (index arithmetic it cannot see through); they stay coalesced.
"""

from collections.abc import Callable
from typing import Any

import attrs
import tilelang.language as T

from tileprefill.kernels.tl.views import (
    ELEMENT_BYTES,
    kv_cache_strides,
    row_strides,
    vector_view,
    vector_views,
)
from tileprefill.validation import VECTOR_BYTES, widest_vector

#: Threads per CTA, and elements of q, k and v together a CTA aims to cover (16 KiB
#: of fp16 read, as much written): about 8 16-byte loads per thread.
THREADS = 128
ELEMENTS_PER_CTA = 8192

#: 16-byte loads of tensor data each thread issues before its first store of a batch.
LOADS_IN_FLIGHT = 4


@attrs.frozen
class RopeChunks:
    """How a row of D elements splits into the (at most) 16-byte chunks of the rotation.

    A rotated chunk holds `pairs` rotation pairs: NEOX reads `pairs` elements from
    each half, INTERLEAVED 2 * `pairs` adjacent elements. Every width divides the
    extents and offsets it is used at (D, R/2, R), so with rows that start 16-byte
    aligned every access is aligned to its width.
    """

    pairs: int
    trig_vec: int  # cos/sin floats read at a time
    rot_chunks: int  # rotated chunks of a row
    pass_vec: int  # elements of one pass-through access
    pass_chunks: int  # pass-through chunks of a row (0 when R == D)


def rope_chunks(head_dim: int, rotary_dim: int, interleaved: bool) -> RopeChunks:
    """The chunking of a row of `head_dim` elements with `rotary_dim` rotated dims (validated here)."""
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even value for RoPE, got {head_dim}")
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim: expected an even value in [2, head_dim={head_dim}], got {rotary_dim}")
    D, R = head_dim, rotary_dim
    half = R // 2
    if interleaved:
        # 2 * pairs elements at offset 2 * j: `pairs` divides half, 2 * pairs divides D.
        pairs = widest_vector(half, 2 * ELEMENT_BYTES)
        while D % (2 * pairs):
            pairs //= 2
    else:
        # Runs of `pairs` elements at j and half + j: `pairs` divides half and D.
        pairs = widest_vector(half, ELEMENT_BYTES)
        while D % pairs:
            pairs //= 2
    pass_vec = widest_vector(D - R, ELEMENT_BYTES) if D > R else 1
    while R % pass_vec or D % pass_vec:
        pass_vec //= 2
    return RopeChunks(
        pairs=pairs,
        trig_vec=widest_vector(pairs, 4),
        rot_chunks=half // pairs,
        pass_vec=pass_vec,
        pass_chunks=(D - R) // pass_vec,
    )


def _ceildiv(a: int, b: int) -> int:
    return -(-a // b)


def batch_size(elements_per_item: int, iterations: int) -> int:
    """Items of a thread loaded together: about LOADS_IN_FLIGHT 16-byte loads' worth, with the
    `iterations` split into batches as even as possible (the last batch's unused slots are code)."""
    most = max(1, LOADS_IN_FLIGHT * (VECTOR_BYTES // ELEMENT_BYTES) // elements_per_item)
    batches = _ceildiv(iterations, most)
    return _ceildiv(iterations, batches) if batches else 1


def _chunk_space(block_t: int, num_tokens: Any) -> Callable[..., tuple[Any, Any, Any, Any]]:
    """Item k * THREADS + tx of a CTA's flat space of chunks over its block of `block_t` tokens,
    `heads` rows a token, `per_row` chunks a row -> (in range, token, head, chunk of the row).

    Consecutive threads take consecutive chunks of a row, then the next rows: contiguous memory
    within a head's row of tensors (T, heads, D), and across a token's heads where they are side
    by side. Pure index arithmetic, called in every phase of a batch."""

    def chunk(tx: Any, bx: Any, k: Any, heads: int, per_row: int) -> tuple[Any, Any, Any, Any]:
        item = k * THREADS + tx
        t = bx * block_t + item // (heads * per_row)
        valid = T.And(item < block_t * heads * per_row, t < num_tokens)
        return valid, t, item // per_row % heads, item % per_row

    return chunk


def rope_append_program(
    num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int, dtype: str, interleaved: bool
) -> T.PrimFunc:
    """RoPE of q into q_out, and RoPE of k_new plus v_new into the caches at slots, in one launch.

    q (T, Hq, D), k_new/v_new (T, Hkv, D), positions/slots int32 (T,), cos/sin
    float32 (P, R/2), k_cache/v_cache (blocks, rows, Hkv, D) strided, q_out (T, Hq, D); T, P,
    blocks, rows dynamic, T >= 1. q_out[t] = RoPE(q[t]) at positions[t]; when
    0 <= slots[t] < S = blocks * rows, with s = slots[t], k_cache[s // rows, s % rows] =
    RoPE(k_new[t]) and v_cache[s // rows, s % rows] = v_new[t]. RoPE is
    rope.py's: dims < R rotate (NEOX halves, INTERLEAVED pairs), dims >= R pass
    through, fp32 math, one rounding to dtype. A position outside [0, P) reads
    cos = sin = 0 (TileLang's bounds guard on the dynamic table), as rope.py does.
    q, k_new, v_new, q_out and the caches are views (`views`) whose address and strides are
    multiples of a row's widest vector (`validation.row_vector_bytes`); positions, slots, cos and
    sin are contiguous, 16-byte aligned.
    """
    if num_kv_heads < 1 or num_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads: expected a positive multiple of num_kv_heads={num_kv_heads}, got {num_heads}"
        )
    geo = rope_chunks(head_dim, rotary_dim, interleaved)
    Hq, Hkv, D, R = num_heads, num_kv_heads, head_dim, rotary_dim
    half = R // 2
    pairs, trig_vec, rot_chunks = geo.pairs, geo.trig_vec, geo.rot_chunks
    vec = widest_vector(D, ELEMENT_BYTES)
    block_t = max(1, ELEMENTS_PER_CTA // ((Hq + 2 * Hkv) * D))
    num_tokens = T.dynamic("num_tokens")
    max_position = T.dynamic("max_position")
    num_blocks, block_rows = T.dynamic("num_blocks, block_rows")
    cache_strides = kv_cache_strides()
    q_strides, k_strides, v_strides = (row_strides(name, 3) for name in ("q", "k_new", "v_new"))
    q_out_strides = row_strides("q_out", 3)
    chunk = _chunk_space(block_t, num_tokens)

    # Slot s of the cache is row s % rows of block s // rows, here in C's truncating division (no
    # floor corrections): a negative slot gets a negative row, which the store check skips like a
    # block past the cache.
    def block_of(slot: Any) -> Any:
        return T.truncdiv(slot, block_rows)

    def row_of_block(slot: Any) -> Any:
        return T.truncmod(slot, block_rows)

    @T.macro
    def rotate_rows(
        tx: Any,
        bx: Any,
        src: Any,
        dst: Any,
        positions: Any,
        slots: Any,
        cos: Any,
        sin: Any,
        heads: int,
        to_cache: bool,
    ) -> None:
        """Rotated chunks of the block's rows of src (T, heads, D) into dst: q_out rows by token,
        or cache rows by slot (`to_cache`)."""
        iters = _ceildiv(block_t * heads * rot_chunks, THREADS)
        batch = batch_size(2 * pairs, iters)
        xa = T.alloc_local((batch, 2 * pairs), dtype)
        c = T.alloc_local((batch, pairs), "float32")
        s = T.alloc_local((batch, pairs), "float32")
        pos = T.alloc_local((batch,), "int32")
        page_of = T.alloc_local((batch,), "int32")
        row_of = T.alloc_local((batch,), "int32")
        yf = T.alloc_local((2 * pairs,), "float32")
        for g in T.unroll(_ceildiv(iters, batch)):
            # Loads that wait for nothing, for the whole batch, come first; then cos/sin,
            # which wait for the position. A key is read even when its slot is skipped:
            # checking first would make every key load wait for the slot.
            for b in T.unroll(batch):
                valid, t, h, i = chunk(tx, bx, g * batch + b, heads, rot_chunks)
                if valid:
                    j = i * pairs  # first rotation pair of the chunk
                    pos[b] = positions[t]
                    if to_cache:
                        page_of[b] = block_of(slots[t])
                        row_of[b] = row_of_block(slots[t])
                    if interleaved:
                        for v in T.vectorized(2 * pairs):
                            xa[b, v] = src[t, h, 2 * j + v]
                    else:
                        for v in T.vectorized(pairs):
                            xa[b, v] = src[t, h, j + v]
                        for v in T.vectorized(pairs):
                            xa[b, pairs + v] = src[t, h, half + j + v]
            for b in T.unroll(batch):
                valid, t, h, i = chunk(tx, bx, g * batch + b, heads, rot_chunks)
                if valid:
                    j = i * pairs
                    p = pos[b]
                    for u in T.unroll(pairs // trig_vec):
                        for v in T.vectorized(trig_vec):
                            c[b, u * trig_vec + v] = cos[p, j + u * trig_vec + v]
                        for v in T.vectorized(trig_vec):
                            s[b, u * trig_vec + v] = sin[p, j + u * trig_vec + v]
            for b in T.unroll(batch):
                valid, t, h, i = chunk(tx, bx, g * batch + b, heads, rot_chunks)
                if valid:
                    j = i * pairs
                    # rope.py's fp32 operations in its order; the one rounding of each value
                    # moves into the vector store (packed conversions, same rounding): the
                    # same bits for q and k.
                    if interleaved:
                        for v in T.unroll(pairs):
                            x1 = T.cast(xa[b, 2 * v], "float32")
                            x2 = T.cast(xa[b, 2 * v + 1], "float32")
                            yf[2 * v] = x1 * c[b, v] - x2 * s[b, v]
                            yf[2 * v + 1] = x2 * c[b, v] + x1 * s[b, v]
                    else:
                        for v in T.unroll(pairs):
                            x1 = T.cast(xa[b, v], "float32")
                            x2 = T.cast(xa[b, pairs + v], "float32")
                            yf[v] = x1 * c[b, v] - x2 * s[b, v]
                            yf[pairs + v] = x2 * c[b, v] + x1 * s[b, v]
                    # A block and row bound to variables and checked once also show TileLang that
                    # the cache stores are in bounds (it adds no per-store guards of its own).
                    page = page_of[b] if to_cache else t
                    row = row_of[b] if to_cache else 0
                    if not to_cache or (0 <= page and page < num_blocks and 0 <= row and row < block_rows):
                        at = (page, row) if to_cache else (page,)
                        if interleaved:
                            for v in T.vectorized(2 * pairs):
                                dst[(*at, h, 2 * j + v)] = T.cast(yf[v], dtype)
                        else:
                            for v in T.vectorized(pairs):
                                dst[(*at, h, j + v)] = T.cast(yf[v], dtype)
                            for v in T.vectorized(pairs):
                                dst[(*at, h, half + j + v)] = T.cast(yf[pairs + v], dtype)

    @T.macro
    def copy_rows(
        tx: Any, bx: Any, src: Any, dst: Any, slots: Any, heads: int, to_cache: bool, width: int, first: int
    ) -> None:
        """Dims [first, D) of the block's rows of src (T, heads, D) into dst, `width` at a time."""
        per_row = (D - first) // width
        iters = _ceildiv(block_t * heads * per_row, THREADS)
        batch = batch_size(width, iters)
        xa = T.alloc_local((batch, width), dtype)
        page_of = T.alloc_local((batch,), "int32")
        row_of = T.alloc_local((batch,), "int32")
        for g in T.unroll(_ceildiv(iters, batch)):
            for b in T.unroll(batch):
                valid, t, h, i = chunk(tx, bx, g * batch + b, heads, per_row)
                if valid:
                    if to_cache:
                        page_of[b] = block_of(slots[t])
                        row_of[b] = row_of_block(slots[t])
                    for v in T.vectorized(width):
                        xa[b, v] = src[t, h, first + i * width + v]
            for b in T.unroll(batch):
                valid, t, h, i = chunk(tx, bx, g * batch + b, heads, per_row)
                if valid:
                    page = page_of[b] if to_cache else t
                    row = row_of[b] if to_cache else 0
                    if not to_cache or (0 <= page and page < num_blocks and 0 <= row and row < block_rows):
                        at = (page, row) if to_cache else (page,)
                        for v in T.vectorized(width):
                            dst[(*at, h, first + i * width + v)] = xa[b, v]

    @T.prim_func
    def rope_append(
        q_rows: T.StridedTensor((num_tokens, Hq, D), q_strides, dtype),
        k_rows: T.StridedTensor((num_tokens, Hkv, D), k_strides, dtype),
        v_rows: T.StridedTensor((num_tokens, Hkv, D), v_strides, dtype),
        positions: T.Tensor((num_tokens,), "int32"),
        slots: T.Tensor((num_tokens,), "int32"),
        cos: T.Tensor((max_position, half), "float32"),
        sin: T.Tensor((max_position, half), "float32"),
        k_cache: T.StridedTensor((num_blocks, block_rows, Hkv, D), cache_strides, dtype),
        v_cache: T.StridedTensor((num_blocks, block_rows, Hkv, D), cache_strides, dtype),
        q_out_rows: T.StridedTensor((num_tokens, Hq, D), q_out_strides, dtype),
    ) -> None:
        q, k_new, v_new, q_out = vector_views(q_rows, k_rows, v_rows, q_out_rows)
        k_dst, v_dst = vector_view(k_cache), vector_view(v_cache)
        with T.Kernel(T.ceildiv(num_tokens, block_t), threads=THREADS) as bx:
            tx = T.get_thread_binding()
            # q rows, then k rows: one code on two pairs of tensors, in separate loops (one
            # loop with a per-item branch between the q_out and the cache store made nvcc
            # split more 16-byte stores into 4-byte ones).
            rotate_rows(tx, bx, q, q_out, positions, slots, cos, sin, Hq, False)
            rotate_rows(tx, bx, k_new, k_dst, positions, slots, cos, sin, Hkv, True)
            if D > R:
                copy_rows(tx, bx, q, q_out, slots, Hq, False, geo.pass_vec, R)
                copy_rows(tx, bx, k_new, k_dst, slots, Hkv, True, geo.pass_vec, R)
            # A token's Hkv * D values, Hkv runs of D in v_new and in the cache.
            copy_rows(tx, bx, v_new, v_dst, slots, Hkv, True, vec, 0)

    return rope_append
