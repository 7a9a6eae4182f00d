"""SM80 (Ampere; also run by SM86/SM89 and by Hopper) attention programs: cp.async + mma.sync.

One CTA computes `block_M` query rows of one query head with four warps
(FlashAttention-2 layout: each warp owns whole rows, so softmax reductions stay
inside a warp). Per key tile: load K, S = Q K^T, online softmax, load V,
O += P V, in a TileLang software pipeline that issues the next tile's cp.async
loads under the current tile's math.

Tiles every row of the CTA sees whole run in a loop without a mask; the causal
diagonal and the last, partial tile (and, with a sliding window, the tiles of its
lower edge) run masked. In the masked loop, cache
sources (contiguous, paged) gather rows through clamped positions: a position
past `kv_seqlens[b]` re-reads the sequence's last key instead of memory the call
does not own, so no NaN can reach P @ V (dense and ragged tiles read zeros past
the tensor end or the next sequence's finite keys, and are masked by selection).
Sequence lengths, token counts, batch, pages and cache sizes are dynamic.
"""

from typing import Any

import tilelang.language as T

from tileprefill.kernels.tl.attention_entries import entry_program
from tileprefill.kernels.tl.attention_parts import (
    ACCUM,
    Work,
    online_softmax,
    score_params,
    soft_cap,
    unmasked_tiles,
    visibility_mask,
    write_lse,
)
from tileprefill.tiles import KVSource, TileConfig


def program(
    source: KVSource,
    head_dim: int,
    dtype: str,
    causal: bool,
    page_size: int,
    config: TileConfig,
    windowed: bool = False,
    capped: bool = False,
    lse: bool = False,
) -> Any:
    """The program of `source`: `windowed` for a causal sliding window, `capped` for a logit cap,
    `lse` for the log-sum-exp output (see `attention_parts`; the window's length, the scale and the
    cap are scalar parameters, `ScoreParams`)."""
    block_M = config.block_M
    block_N = config.block_N
    stages = config.num_stages
    D = head_dim
    if D % 16:
        raise ValueError(f"head_dim: expected a multiple of 16 for sm80, got {D}")
    if windowed and not causal:
        raise ValueError(f"windowed: expected False without causal, got {windowed}")
    params = score_params(windowed)
    scale = params.exp2_scale
    window = params.window
    policy = T.GemmWarpPolicy.FullRow

    softmax = online_softmax(block_M, block_N, scale)
    mask = visibility_mask(block_M, block_N, causal, window)
    cap = soft_cap(block_M, block_N, params.cap_scale) if capped else None
    whole_tiles = unmasked_tiles(causal, window, block_M, block_N)
    store_lse = write_lse(block_M, params.scale, source.ragged_q) if lse else None

    @T.macro
    def load_rows(src: Any, dst: Any, k: Any, w: Work, bt: Any, masked: Any) -> None:
        """Load key tile k of `src` (K or V) into `dst`."""
        if source is KVSource.DENSE:
            T.copy(src[w.seq, k * block_N : (k + 1) * block_N, w.kv_head, :], dst)
        elif source is KVSource.RAGGED:
            start = w.kv_first + k * block_N
            T.copy(src[start : start + block_N, w.kv_head, :], dst)
        elif source is KVSource.CONTIGUOUS and not masked:
            T.copy(src[w.seq, k * block_N : (k + 1) * block_N, w.kv_head, :], dst)
        elif source is KVSource.CONTIGUOUS:
            for j, d in T.Parallel(block_N, D):
                dst[j, d] = src[w.seq, T.min(k * block_N + j, w.kv_len - 1), w.kv_head, d]
        elif source is KVSource.PAGED_TILED and not masked:
            if page_size >= block_N:
                page = bt[w.seq, (k * block_N) // page_size]
                row = (k * block_N) % page_size
                T.copy(src[page, row : row + block_N, w.kv_head, :], dst)
            else:
                per_tile = block_N // page_size
                for i in T.unroll(per_tile):
                    T.copy(
                        src[bt[w.seq, k * per_tile + i], 0:page_size, w.kv_head, :],
                        dst[i * page_size : (i + 1) * page_size, :],
                    )
        else:
            for j, d in T.Parallel(block_N, D):
                pos = T.min(k * block_N + j, w.kv_len - 1)
                dst[j, d] = src[bt[w.seq, pos // page_size], pos % page_size, w.kv_head, d]

    @T.macro
    def kv_step(t: Any, w: Work, K: Any, V: Any, block_table: Any, f: Any, masked: Any) -> None:
        """Key tile t (absolute): S = Q K_t^T, (cap,) (mask,) online softmax, O = alpha O + P V_t."""
        Qs, Ks, Vs, s, p, o, m, m_prev, alpha, row_sum, l = f
        load_rows(K, Ks, t, w, block_table, masked)
        T.gemm(Qs, Ks, s, transpose_B=True, clear_accum=True, policy=policy)
        if capped:
            cap(s)
        if masked:
            mask(s, w.q0, t * block_N, w.kv_len, w.offset)
        softmax(s, m, m_prev, alpha, row_sum, l, False)
        T.copy(s, p)
        for i, j in T.Parallel(block_M, D):
            o[i, j] *= alpha[i]
        load_rows(V, Vs, t, w, block_table, masked)
        T.gemm(p, Vs, o, policy=policy)

    @T.macro
    def attend(w: Work, Q: Any, K: Any, V: Any, O: Any, LSE: Any, block_table: Any) -> None:
        Qs = T.alloc_shared([block_M, D], dtype)
        Ks = T.alloc_shared([block_N, D], dtype)
        Vs = T.alloc_shared([block_N, D], dtype)
        s = T.alloc_fragment([block_M, block_N], ACCUM)
        p = T.alloc_fragment([block_M, block_N], dtype)
        o = T.alloc_fragment([block_M, D], ACCUM)
        m = T.alloc_fragment([block_M], ACCUM)
        m_prev = T.alloc_fragment([block_M], ACCUM)
        alpha = T.alloc_fragment([block_M], ACCUM)
        row_sum = T.alloc_fragment([block_M], ACCUM)
        l = T.alloc_fragment([block_M], ACCUM)
        if source.ragged_q:
            T.copy(Q[w.q_first + w.q0 : w.q_first + w.q0 + block_M, w.head, :], Qs)
        else:
            T.copy(Q[w.seq, w.q0 : w.q0 + block_M, w.head, :], Qs)
        T.fill(o, 0)
        T.fill(l, 0)
        T.fill(m, -T.infinity(ACCUM))
        # Tiles [lo, hi) are seen whole by every row of the CTA and run without a mask; the ones
        # before lo (a window's lower edge) and from hi (the causal diagonal, the partial last
        # tile) run masked. Loop indices count from the CTA's first key tile.
        lo, hi = whole_tiles(w.q0, w.kv_len, w.offset)
        start = T.min(w.tiles, T.max(0, lo - w.k_first))
        split = T.max(start, T.min(w.tiles, hi - w.k_first))

        f = (Qs, Ks, Vs, s, p, o, m, m_prev, alpha, row_sum, l)
        if windowed:
            for k in T.Pipelined(start, num_stages=stages):
                kv_step(w.k_first + k, w, K, V, block_table, f, True)
        for k in T.Pipelined(start, split, num_stages=stages):
            kv_step(w.k_first + k, w, K, V, block_table, f, False)
        for k in T.Pipelined(split, w.tiles, num_stages=stages):
            kv_step(w.k_first + k, w, K, V, block_table, f, True)
        if lse:
            store_lse(LSE, m, l, w, w.q0)
        # A row that saw no key (l == 0) is 0; a NaN l (a NaN in the row's inputs) stays NaN.
        for i, j in T.Parallel(block_M, D):
            o[i, j] = T.if_then_else(l[i] != 0, o[i, j] / l[i], 0)
        if source.ragged_q:
            # Rows past q_len belong to the next sequence.
            for i, d in T.Parallel(block_M, D):
                if w.q0 + i < w.q_len:
                    O[w.q_first + w.q0 + i, w.head, d] = T.cast(o[i, d], dtype)
        else:
            # Rows past Sq fall outside the tensor; the copy skips them.
            T.copy(o, O[w.seq, w.q0 : w.q0 + block_M, w.head, :])

    return entry_program(source, head_dim, dtype, causal, page_size, config, attend, params, lse)
