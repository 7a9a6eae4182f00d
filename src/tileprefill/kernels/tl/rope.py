"""TileLang program: rotary position embedding of (T, H, D) rows, one pass, into another tensor.

x is read as T * H rows of D elements (row r is token r // H, head r % H). A
CTA takes a block of rows; each thread walks "chunks". A rotated chunk is one
16-byte run of the rotated dims of a row (NEOX: a run of the first half and
the matching run of the second half; INTERLEAVED: a run of adjacent pairs)
with the matching cos/sin values; a pass-through chunk is a run of the dims
>= R, copied. Consecutive threads take consecutive chunks of a row, so a warp
reads and writes contiguous memory, and all heads of a token read the same
cos/sin row (L1 hits). Arithmetic is fp32; the store is in the input dtype.
x and out are strided views (`views.row_strides`): a slice of a fused QKV
projection is read in place.
"""

from typing import Any

import tilelang.language as T

from tileprefill.kernels.tl.fast_divide import Divisor, quotient
from tileprefill.kernels.tl.views import ELEMENT_BYTES, row_strides, vector_views
from tileprefill.validation import widest_vector

#: Threads per CTA, and elements of x a CTA aims to cover (16 KiB of fp16):
#: several independent 16-byte loads in flight per thread.
THREADS = 128
ELEMENTS_PER_CTA = 8192


def rope_program(head_dim: int, rotary_dim: int, dtype: str, interleaved: bool) -> T.PrimFunc:
    """x (T, H, D) dtype, positions int32 (T,), cos/sin float32 (P, R/2) -> out (T, H, D) dtype.

    out[t, h, :R] is x[t, h, :R] rotated by the angles of position positions[t]
    (NEOX: halves, INTERLEAVED: adjacent pairs); out[t, h, R:] = x[t, h, R:].
    T, H and P are dynamic: a CTA's block of rows is sized by D alone, and a row's token r // H is
    one wide multiply and a shift by the scalar parameters (heads_multiplier, heads_shift) =
    `fast_divide.divisor(H)`, which follow the tensors; so q's and the keys' rotations (any head
    counts) are one program. x and out are views whose head dim is contiguous, whose data and strides
    are multiples of a row's widest vector (`validation.row_vector_bytes`); cos and sin are
    contiguous, 16-byte aligned. Every access below is then aligned to its width, since each
    width divides the row lengths (D, R/2) and the offsets it is used at.
    A position outside [0, P) reads cos = sin = 0 (TileLang's bounds guard).
    """
    if head_dim % 2:
        raise ValueError(f"head_dim: expected an even value for RoPE, got {head_dim}")
    if rotary_dim % 2 or not 2 <= rotary_dim <= head_dim:
        raise ValueError(f"rotary_dim: expected an even value in [2, head_dim={head_dim}], got {rotary_dim}")
    D, R = head_dim, rotary_dim
    half = R // 2
    # A rotated chunk holds `pairs` rotation pairs: NEOX reads `pairs` elements
    # from each half, INTERLEAVED 2 * `pairs` adjacent elements.
    if interleaved:
        pairs = widest_vector(half, 2 * ELEMENT_BYTES)
        while D % (2 * pairs):
            pairs //= 2
    else:
        pairs = widest_vector(half, ELEMENT_BYTES)
        while D % pairs:
            pairs //= 2
    trig_vec = widest_vector(pairs, 4)  # cos/sin are read `trig_vec` floats at a time
    rot_chunks = half // pairs
    pass_vec = widest_vector(D - R, ELEMENT_BYTES) if D > R else 1
    while R % pass_vec or D % pass_vec:
        pass_vec //= 2
    pass_chunks = (D - R) // pass_vec

    block_rows = max(1, ELEMENTS_PER_CTA // D)
    rot_items = block_rows * rot_chunks
    pass_items = block_rows * pass_chunks
    num_tokens, H = T.dynamic("num_tokens, num_heads")
    max_position = T.dynamic("max_position")
    x_strides, out_strides = row_strides("x", 3), row_strides("out", 3)
    multiplier = T.dynamic("heads_multiplier", "uint32")
    shift = T.dynamic("heads_shift", "int32")

    by_heads = Divisor(T.Cast("uint64", multiplier), T.Cast("uint64", shift))

    def token_of(row: Any) -> Any:
        """row // H, in 64-bit arithmetic (rows < T H < 2**31)."""
        return T.Cast("int32", quotient(T.Cast("uint64", row), by_heads))

    @T.prim_func
    def rope(
        x_rows: T.StridedTensor((num_tokens, H, D), x_strides, dtype),
        positions: T.Tensor((num_tokens,), "int32"),
        cos: T.Tensor((max_position, half), "float32"),
        sin: T.Tensor((max_position, half), "float32"),
        out_rows: T.StridedTensor((num_tokens, H, D), out_strides, dtype),
        heads_multiplier: multiplier,
        heads_shift: shift,
    ) -> None:
        x, out = vector_views(x_rows, out_rows)
        with T.Kernel(T.ceildiv(num_tokens * H, block_rows), threads=THREADS) as bx:
            tx = T.get_thread_binding()
            xa = T.alloc_local((2 * pairs,), dtype)
            ya = T.alloc_local((2 * pairs,), dtype)
            c = T.alloc_local((pairs,), "float32")
            s = T.alloc_local((pairs,), "float32")
            for k in T.unroll(T.ceildiv(rot_items, THREADS)):
                item = k * THREADS + tx
                r = bx * block_rows + item // rot_chunks
                t = token_of(r)
                h = T.max(T.min(r - t * H, H - 1), 0)
                j = item % rot_chunks * pairs  # first rotation pair of the chunk
                if item < rot_items and t < num_tokens:
                    p = positions[t]
                    for g in T.unroll(pairs // trig_vec):
                        for v in T.vectorized(trig_vec):
                            c[g * trig_vec + v] = cos[p, j + g * trig_vec + v]
                        for v in T.vectorized(trig_vec):
                            s[g * trig_vec + v] = sin[p, j + g * trig_vec + v]
                    if interleaved:
                        for v in T.vectorized(2 * pairs):
                            xa[v] = x[t, h, 2 * j + v]
                        for v in T.unroll(pairs):
                            x1 = T.cast(xa[2 * v], "float32")
                            x2 = T.cast(xa[2 * v + 1], "float32")
                            ya[2 * v] = T.cast(x1 * c[v] - x2 * s[v], dtype)
                            ya[2 * v + 1] = T.cast(x2 * c[v] + x1 * s[v], dtype)
                        for v in T.vectorized(2 * pairs):
                            out[t, h, 2 * j + v] = ya[v]
                    else:
                        for v in T.vectorized(pairs):
                            xa[v] = x[t, h, j + v]
                        for v in T.vectorized(pairs):
                            xa[pairs + v] = x[t, h, half + j + v]
                        for v in T.unroll(pairs):
                            x1 = T.cast(xa[v], "float32")
                            x2 = T.cast(xa[pairs + v], "float32")
                            ya[v] = T.cast(x1 * c[v] - x2 * s[v], dtype)
                            ya[pairs + v] = T.cast(x2 * c[v] + x1 * s[v], dtype)
                        for v in T.vectorized(pairs):
                            out[t, h, j + v] = ya[v]
                        for v in T.vectorized(pairs):
                            out[t, h, half + j + v] = ya[pairs + v]
            if pass_items:
                for k in T.unroll(T.ceildiv(pass_items, THREADS)):
                    item = k * THREADS + tx
                    r = bx * block_rows + item // pass_chunks
                    t = token_of(r)
                    h = T.max(T.min(r - t * H, H - 1), 0)
                    d = R + item % pass_chunks * pass_vec
                    if item < pass_items and t < num_tokens:
                        for v in T.vectorized(pass_vec):
                            out[t, h, d + v] = x[t, h, d + v]

    return rope
