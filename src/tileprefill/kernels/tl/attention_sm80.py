"""SM80 (Ampere; also run by SM86/SM89 and by Hopper) attention programs: cp.async + mma.sync.

One CTA computes `block_M` query rows of one query head with four warps
(FlashAttention-2 layout: each warp owns whole rows, so softmax reductions stay
inside a warp). Per key tile: load K, S = Q K^T, online softmax, load V,
O += P V, in a TileLang software pipeline that issues the next tile's cp.async
loads under the current tile's math.

Two loops: tiles every row of the CTA sees whole run without a mask; the causal
diagonal and the last, partial tile run masked. In the masked loop, cache
sources (contiguous, paged) gather rows through clamped positions: a position
past `kv_seqlens[b]` re-reads the sequence's last key instead of memory the call
does not own, so no NaN can reach P @ V (dense and ragged tiles read zeros past
the tensor end or the next sequence's finite keys, and are masked by selection).
Sequence lengths, token counts, batch, pages and cache sizes are dynamic.
"""

from typing import Any

import tilelang.language as T

from tileprefill.kernels.tl.attention_configs import TileConfig
from tileprefill.kernels.tl.attention_parts import (
    ACCUM,
    LOG2E,
    KVSource,
    Work,
    kv_tile_count,
    locate_ragged_tile,
    online_softmax,
    visibility_mask,
    work,
)


def dense(
    heads: int, kv_heads: int, head_dim: int, dtype: str, causal: bool, sm_scale: float, config: TileConfig
) -> Any:
    """q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D), out (B, Sq, Hq, D)."""
    return _program(KVSource.DENSE, heads, kv_heads, head_dim, dtype, causal, sm_scale, 0, config)


def ragged(
    heads: int, kv_heads: int, head_dim: int, dtype: str, causal: bool, sm_scale: float, config: TileConfig
) -> Any:
    """q (Tq, Hq, D), k/v (Tkv, Hkv, D), cu_seqlens_q/kv int32 (B+1,), out (Tq, Hq, D)."""
    return _program(KVSource.RAGGED, heads, kv_heads, head_dim, dtype, causal, sm_scale, 0, config)


def contiguous(
    heads: int, kv_heads: int, head_dim: int, dtype: str, causal: bool, sm_scale: float, config: TileConfig
) -> Any:
    """q (B, Sq, Hq, D), k/v caches (B, S_max, Hkv, D), kv_seqlens int32 (B,), out (B, Sq, Hq, D)."""
    return _program(KVSource.CONTIGUOUS, heads, kv_heads, head_dim, dtype, causal, sm_scale, 0, config)


def paged(
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    causal: bool,
    sm_scale: float,
    page_size: int,
    config: TileConfig,
) -> Any:
    """q (Tq, Hq, D), pages (P, page_size, Hkv, D), block_table (B, max_pages), kv_seqlens (B,),
    cu_seqlens_q (B+1,), out (Tq, Hq, D); any page size, rows gathered one by one."""
    return _program(KVSource.PAGED, heads, kv_heads, head_dim, dtype, causal, sm_scale, page_size, config)


def paged_tiled(
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    causal: bool,
    sm_scale: float,
    page_size: int,
    config: TileConfig,
) -> Any:
    """As `paged`, for a page size that is a power of two >= 16: each page's part of an unmasked
    key tile is one rectangular copy (one block-table read per page, not per row)."""
    block_N = config.block_N
    if page_size < 16 or page_size & (page_size - 1) or (page_size < block_N and block_N % page_size):
        raise ValueError(
            f"page_size: expected a power of two >= 16 for the tiled paged program, got {page_size}"
        )
    return _program(
        KVSource.PAGED_TILED, heads, kv_heads, head_dim, dtype, causal, sm_scale, page_size, config
    )


def _program(
    source: KVSource,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    causal: bool,
    sm_scale: float,
    page_size: int,
    config: TileConfig,
) -> Any:
    if heads % kv_heads:
        raise ValueError(f"heads: expected a multiple of kv_heads={kv_heads}, got {heads}")
    group = heads // kv_heads
    block_M = config.block_M
    block_N = config.block_N
    stages = config.num_stages
    threads = config.threads
    D = head_dim
    scale = sm_scale * LOG2E
    policy = T.GemmWarpPolicy.FullRow

    softmax = online_softmax(block_M, block_N, scale)
    mask = visibility_mask(block_M, block_N, causal)
    tile_count = kv_tile_count(causal, block_M, block_N)
    locate = locate_ragged_tile(block_M)

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
    def attend(w: Work, Q: Any, K: Any, V: Any, O: Any, block_table: Any) -> None:
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
        # Tiles before `split` are seen whole by every row of the CTA.
        if causal:
            unmasked = T.min(w.kv_len, T.max(0, w.offset + w.q0 + 1)) // block_N
        else:
            unmasked = w.kv_len // block_N
        split = T.min(w.tiles, unmasked)
        for k in T.Pipelined(split, num_stages=stages):
            load_rows(K, Ks, k, w, block_table, False)
            T.gemm(Qs, Ks, s, transpose_B=True, clear_accum=True, policy=policy)
            softmax(s, m, m_prev, alpha, row_sum, l, False)
            T.copy(s, p)
            for i, j in T.Parallel(block_M, D):
                o[i, j] *= alpha[i]
            load_rows(V, Vs, k, w, block_table, False)
            T.gemm(p, Vs, o, policy=policy)
        for k in T.Pipelined(split, w.tiles, num_stages=stages):
            load_rows(K, Ks, k, w, block_table, True)
            T.gemm(Qs, Ks, s, transpose_B=True, clear_accum=True, policy=policy)
            mask(s, w.q0, k * block_N, w.kv_len, w.offset)
            softmax(s, m, m_prev, alpha, row_sum, l, False)
            T.copy(s, p)
            for i, j in T.Parallel(block_M, D):
                o[i, j] *= alpha[i]
            load_rows(V, Vs, k, w, block_table, True)
            T.gemm(p, Vs, o, policy=policy)
        for i, j in T.Parallel(block_M, D):
            o[i, j] = T.if_then_else(l[i] > 0, o[i, j] / l[i], 0)
        if source.ragged_q:
            # Rows past q_len belong to the next sequence.
            for i, d in T.Parallel(block_M, D):
                if w.q0 + i < w.q_len:
                    O[w.q_first + w.q0 + i, w.head, d] = T.cast(o[i, d], dtype)
        else:
            # Rows past Sq fall outside the tensor; the copy skips them.
            T.copy(o, O[w.seq, w.q0 : w.q0 + block_M, w.head, :])

    if source is KVSource.DENSE:
        batch, seq_q, seq_kv = T.dynamic("batch, seq_q, seq_kv")

        @T.prim_func
        def main_dense(
            Q: T.Tensor([batch, seq_q, heads, D], dtype),
            K: T.Tensor([batch, seq_kv, kv_heads, D], dtype),
            V: T.Tensor([batch, seq_kv, kv_heads, D], dtype),
            O: T.Tensor([batch, seq_q, heads, D], dtype),
        ) -> None:
            with T.Kernel(T.ceildiv(seq_q, block_M), heads, batch, threads=threads) as (bx, by, bz):
                # Causal tiles see more keys the later they start: launch the last first.
                tile = T.ceildiv(seq_q, block_M) - 1 - bx if causal else bx
                offset = seq_kv - seq_q
                tiles = tile_count(tile * block_M, seq_kv, offset)
                w = work(
                    seq=bz,
                    head=by,
                    kv_head=by // group,
                    q_first=0,
                    q0=tile * block_M,
                    q_len=seq_q,
                    kv_first=0,
                    kv_len=seq_kv,
                    offset=offset,
                    tiles=tiles,
                )
                attend(w, Q, K, V, O, None)

        return main_dense

    if source is KVSource.RAGGED:
        tokens_q, tokens_kv, seqs_plus_one = T.dynamic("tokens_q, tokens_kv, seqs_plus_one")

        @T.prim_func
        def main_ragged(
            Q: T.Tensor([tokens_q, heads, D], dtype),
            K: T.Tensor([tokens_kv, kv_heads, D], dtype),
            V: T.Tensor([tokens_kv, kv_heads, D], dtype),
            cu_seqlens_q: T.Tensor([seqs_plus_one], "int32"),
            cu_seqlens_kv: T.Tensor([seqs_plus_one], "int32"),
            O: T.Tensor([tokens_q, heads, D], dtype),
        ) -> None:
            with T.Kernel(tokens_q // block_M + seqs_plus_one - 1, heads, threads=threads) as (bx, by):
                seq, tile = locate(cu_seqlens_q, seqs_plus_one - 1, bx)
                q_first = cu_seqlens_q[seq]
                q_len = cu_seqlens_q[seq + 1] - q_first
                kv_first = cu_seqlens_kv[seq]
                kv_len = cu_seqlens_kv[seq + 1] - kv_first
                offset = kv_len - q_len
                # A CTA without a tile runs with no keys and no rows to store.
                has_tile = (tile >= 0) & (tile * block_M < q_len)
                tiles = T.if_then_else(has_tile, tile_count(tile * block_M, kv_len, offset), 0)
                rows = T.if_then_else(has_tile, q_len, 0)
                w = work(
                    seq=seq,
                    head=by,
                    kv_head=by // group,
                    q_first=q_first,
                    q0=tile * block_M,
                    q_len=rows,
                    kv_first=kv_first,
                    kv_len=kv_len,
                    offset=offset,
                    tiles=tiles,
                )
                attend(w, Q, K, V, O, None)

        return main_ragged

    if source is KVSource.CONTIGUOUS:
        batch, seq_q, max_seq = T.dynamic("batch, seq_q, max_seq")

        @T.prim_func
        def main_contiguous(
            Q: T.Tensor([batch, seq_q, heads, D], dtype),
            K: T.Tensor([batch, max_seq, kv_heads, D], dtype),
            V: T.Tensor([batch, max_seq, kv_heads, D], dtype),
            kv_seqlens: T.Tensor([batch], "int32"),
            O: T.Tensor([batch, seq_q, heads, D], dtype),
        ) -> None:
            with T.Kernel(T.ceildiv(seq_q, block_M), heads, batch, threads=threads) as (bx, by, bz):
                tile = T.ceildiv(seq_q, block_M) - 1 - bx if causal else bx
                kv_len = kv_seqlens[bz]
                offset = kv_len - seq_q
                tiles = tile_count(tile * block_M, kv_len, offset)
                w = work(
                    seq=bz,
                    head=by,
                    kv_head=by // group,
                    q_first=0,
                    q0=tile * block_M,
                    q_len=seq_q,
                    kv_first=0,
                    kv_len=kv_len,
                    offset=offset,
                    tiles=tiles,
                )
                attend(w, Q, K, V, O, None)

        return main_contiguous

    batch, tokens_q, num_pages, max_pages = T.dynamic("batch, tokens_q, num_pages, max_pages")

    @T.prim_func
    def main_paged(
        Q: T.Tensor([tokens_q, heads, D], dtype),
        K: T.Tensor([num_pages, page_size, kv_heads, D], dtype),
        V: T.Tensor([num_pages, page_size, kv_heads, D], dtype),
        block_table: T.Tensor([batch, max_pages], "int32"),
        kv_seqlens: T.Tensor([batch], "int32"),
        cu_seqlens_q: T.Tensor([batch + 1], "int32"),
        O: T.Tensor([tokens_q, heads, D], dtype),
    ) -> None:
        with T.Kernel(tokens_q // block_M + batch, heads, threads=threads) as (bx, by):
            seq, tile = locate(cu_seqlens_q, batch, bx)
            q_first = cu_seqlens_q[seq]
            q_len = cu_seqlens_q[seq + 1] - q_first
            kv_len = kv_seqlens[seq]
            offset = kv_len - q_len
            has_tile = (tile >= 0) & (tile * block_M < q_len)
            tiles = T.if_then_else(has_tile, tile_count(tile * block_M, kv_len, offset), 0)
            rows = T.if_then_else(has_tile, q_len, 0)
            w = work(
                seq=seq,
                head=by,
                kv_head=by // group,
                q_first=q_first,
                q0=tile * block_M,
                q_len=rows,
                kv_first=0,
                kv_len=kv_len,
                offset=offset,
                tiles=tiles,
            )
            attend(w, Q, K, V, O, block_table)

    return main_paged
