"""The entry programs of the attention kernels, shared by SM80 and SM90.

An entry program is the `T.prim_func` of one KV source: it declares the
source's tensors, launches the grid and works out what each CTA computes (its
sequence, head, query tile and key range: a `Work`). The per-arch body, a macro
`attend(w, Q, K, V, O, block_table)`, then computes that tile. Only the body
differs between architectures, so the grids, the tile order and the ragged tile
search are written once, here.

Each arch module supplies `program(source, heads, kv_heads, head_dim, dtype,
causal, sm_scale, page_size, config)`, which builds its body and returns
`entry_program(...)`; that module-level function is the factory `attention_tl`
compiles (module-level, so compile workers in other processes can unpickle it).
"""

import dataclasses
from typing import Any

import tilelang.language as T

from tileprefill.kernels.tl.attention_configs import TileConfig
from tileprefill.kernels.tl.attention_parts import KVSource, Work, kv_tile_count, locate_ragged_tile, work
from tileprefill.selection import pages_tile_evenly


def entry_program(
    source: KVSource,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    causal: bool,
    page_size: int,
    config: TileConfig,
    attend: Any,
) -> Any:
    """The prim_func of `source` whose CTAs each run the macro `attend(w, Q, K, V, O, block_table)`.

    Every CTA calls `attend`, also one without a query tile (ragged grids have
    spare CTAs): its `Work` then has no key tiles and no rows to store. There is
    no early exit, since SM90's warp-specialized body must be entered by every
    thread of the CTA.
    """
    if source is KVSource.PAGED_TILED and not _pages_tile(page_size, config.block_N):
        raise ValueError(
            f"page_size: expected a power of two >= 16 for the tiled paged program, got {page_size}"
        )
    group = heads // kv_heads
    block_M = config.block_M
    threads = config.threads
    D = head_dim
    tile_count = kv_tile_count(causal, block_M, config.block_N)
    locate = locate_ragged_tile(block_M)

    @T.macro
    def batched_work(bx: Any, by: Any, bz: Any, seq_q: Any, keys: Any) -> Work:
        """The work of CTA (bx, by, bz) over q (B, Sq, ...): query tile bx of sequence bz, head by.
        `keys` is seq_kv (dense) or the kv_seqlens tensor (contiguous cache)."""
        # Causal tiles see more keys the later they start: launch the last first.
        tile = T.ceildiv(seq_q, block_M) - 1 - bx if causal else bx
        if source is KVSource.CONTIGUOUS:
            kv_len = keys[bz]
        else:
            kv_len = keys
        offset = kv_len - seq_q
        tiles = tile_count(tile * block_M, kv_len, offset)
        return work(
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

    @T.macro
    def packed_work(bx: Any, by: Any, cu_seqlens_q: Any, num_seqs: Any, keys: Any) -> Work:
        """The work of CTA (bx, by) over q packed by cu_seqlens_q: the query tile found by
        `locate`, head by. `keys` is cu_seqlens_kv (ragged) or kv_seqlens (paged)."""
        seq, tile = locate(cu_seqlens_q, num_seqs, bx)
        q_first = cu_seqlens_q[seq]
        q_len = cu_seqlens_q[seq + 1] - q_first
        if source is KVSource.RAGGED:
            kv_first = keys[seq]
            kv_len = keys[seq + 1] - kv_first
        else:
            kv_first = 0
            kv_len = keys[seq]
        offset = kv_len - q_len
        # A CTA without a tile runs with no keys and no rows to store.
        has_tile = (tile >= 0) & (tile * block_M < q_len)
        tiles = T.if_then_else(has_tile, tile_count(tile * block_M, kv_len, offset), 0)
        rows = T.if_then_else(has_tile, q_len, 0)
        return work(
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
                w = batched_work(bx, by, bz, seq_q, seq_kv)
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
                w = packed_work(bx, by, cu_seqlens_q, seqs_plus_one - 1, cu_seqlens_kv)
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
                w = batched_work(bx, by, bz, seq_q, kv_seqlens)
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
            w = packed_work(bx, by, cu_seqlens_q, batch, kv_seqlens)
            attend(w, Q, K, V, O, block_table)

    return main_paged


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The query tiles of one persistent CTA: `count` of them (a TIR scalar); `work(i)`, a macro,
    is the `Work` of its i-th."""

    count: Any
    work: Any


def persistent_program(
    source: KVSource,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    causal: bool,
    config: TileConfig,
    attend_tiles: Any,
) -> Any:
    """The dense prim_func with a persistent grid: `config.persistent_ctas` CTAs, each running the
    macro `attend_tiles(schedule, Q, K, V, O, block_table)` over its `Schedule`: a static
    schedule (no device-side counter, CUDA-graph safe). The order is the one measured
    fastest of two on an H200 (benchmarks/kernel-notes.md), per mask:

    - non-causal: sections of one (sequence, KV head); inside one, the query heads of
      the KV group fastest, then the query tiles. The CTAs resident at one time then
      share one or two KV heads' K/V, which stays in L2 (a D 128 tile does ~128 FLOP a
      byte of K/V, under the H200's ~206, so it needs that reuse); heads fastest
      streamed every KV head at once and ran 3-5% slower at S 4096-16384. Round r
      takes tiles [r ctas, (r + 1) ctas), dealt snake-wise (equal tiles: no effect on
      balance).
    - causal: query heads fastest, then sequences, then query tiles longest first
      (tile index descending) over the whole launch, dealt round-robin: CTA c takes
      tiles c, c + ctas, ... The section order (longest first inside each section
      only) left CTAs unbalanced: 22% slower at S 8192.
    """
    if source is not KVSource.DENSE or config.persistent_ctas <= 0:
        raise ValueError(f"persistent grid: expected the dense source and persistent_ctas > 0, got {source}")
    group = heads // kv_heads
    block_M = config.block_M
    ctas = config.persistent_ctas
    D = head_dim
    tile_count = kv_tile_count(causal, block_M, config.block_N)
    batch, seq_q, seq_kv = T.dynamic("batch, seq_q, seq_kv")

    @T.macro
    def tile_work(cta: Any, i: Any, m_tiles: Any, batch: Any, seq_q: Any, seq_kv: Any) -> Work:
        """The `Work` of CTA `cta`'s i-th tile."""
        if causal:
            t = cta + i * ctas
            head = t % heads
            rest = t // heads
            seq = rest % batch
            tile = m_tiles - 1 - rest // batch
        else:
            t = i * ctas + T.if_then_else(i % 2 == 0, cta, ctas - 1 - cta)
            g = t % group
            rest = t // group
            tile = rest % m_tiles
            section = rest // m_tiles  # sequence * kv_heads + KV head
            head = (section % kv_heads) * group + g
            seq = section // kv_heads
        offset = seq_kv - seq_q
        return work(
            seq=seq,
            head=head,
            kv_head=head // group,
            q_first=0,
            q0=tile * block_M,
            q_len=seq_q,
            kv_first=0,
            kv_len=seq_kv,
            offset=offset,
            tiles=tile_count(tile * block_M, seq_kv, offset),
            hold_ids=True,
        )

    @T.prim_func
    def main_dense(
        Q: T.Tensor([batch, seq_q, heads, D], dtype),
        K: T.Tensor([batch, seq_kv, kv_heads, D], dtype),
        V: T.Tensor([batch, seq_kv, kv_heads, D], dtype),
        O: T.Tensor([batch, seq_q, heads, D], dtype),
    ) -> None:
        with T.Kernel(ctas, threads=config.threads) as bx:
            m_tiles = T.ceildiv(seq_q, block_M)
            total = m_tiles * heads * batch
            if causal:
                count = T.ceildiv(T.max(total - bx, 0), ctas)
            else:
                rounds = total // ctas
                last = T.if_then_else(rounds % 2 == 0, bx, ctas - 1 - bx)
                count = rounds + T.if_then_else(last < total % ctas, 1, 0)
            schedule = Schedule(count, lambda i: tile_work(bx, i, m_tiles, batch, seq_q, seq_kv))
            attend_tiles(schedule, Q, K, V, O, None)

    return main_dense


def _pages_tile(page_size: int, block_N: int) -> bool:
    """A key tile is whole pages or lies inside one page: each page's part is one rectangular copy.
    The rule the selection states (`pages_tile_evenly`), for this program's power-of-two block_N."""
    return pages_tile_evenly(page_size) and (page_size >= block_N or not block_N % page_size)
