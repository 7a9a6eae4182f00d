"""The entry programs of the attention kernels, shared by SM80 and SM90.

An entry program is the `T.prim_func` of one KV source: it declares the
source's tensors, launches the grid and works out what each CTA computes (its
sequence, head, query tile and key range: a `Work`). The per-arch body, a macro
`attend(w, Q, K, V, O, LSE, block_table)`, then computes that tile. With `lse` the
prim_func has one more output after O, the float32 log-sum-exp `LSE` (tokens, heads):
(B, Sq, Hq) for dense q, (Tq, Hq) for packed q; without it the prim_func is the one it
always was and the body gets LSE None. (A prim_func's parameters are read from its
source, so each source has one prim_func of each kind.) Only the body
differs between architectures, so the grids, the tile order and the ragged tile
search are written once, here. Every tensor of rows is a strided view (`views`): a cache source's
K and V (contiguous, paged) with one set of strides (`views.kv_cache_strides`), and Q, dense and
ragged K and V, and O each with strides of its own (`views.row_strides`), so that slices of a fused
QKV projection and an output inside a larger buffer are read and written in place.

Every prim_func reads its head counts from its tensors (`heads` from Q and O, `kv_heads` from K and
V), and takes the score scalars after its tensors (`ScoreParams`: score_scale, cap_scale, window):
no program is compiled for a head count, a scale, a cap or a window length.

Each arch module supplies `program(source, head_dim, dtype, causal, page_size, config, windowed,
capped, lse)`, which builds its body and returns `entry_program(...)`; that module-level function
is the factory `attention_tl` compiles (module-level, so compile workers in other processes can
unpickle it).
"""

import dataclasses
from typing import Any

import tilelang.language as T
from tilelang import tvm

from tileprefill.kernels.tl.attention_parts import (
    ScoreParams,
    Work,
    clamped_kv_len,
    kv_tile_range,
    locate_ragged_tile,
    sequence_length,
    work,
)
from tileprefill.kernels.tl.dense_order import (
    Arith,
    BandLayout,
    DenseOrder,
    band_layout,
    tile_at,
    tile_count,
)
from tileprefill.kernels.tl.views import kv_cache_strides, row_strides, vector_view, vector_views
from tileprefill.tiles import KVSource, TileConfig, pages_tile_whole

#: The dtype of the log-sum-exp output.
LSE_DTYPE = "float32"


def _held(value: Any) -> Any:
    """`value` in an int32 register (call inside a kernel); a Python int stays a constant."""
    return value if isinstance(value, int) else T.alloc_var("int32", init=value)[0]


def _select(condition: Any, if_true: Any, if_false: Any) -> Any:
    """T.if_then_else (its branches evaluated lazily), or the branch itself where the condition is
    already a Python bool (a static fact)."""
    if isinstance(condition, bool):
        return if_true if condition else if_false
    return T.if_then_else(condition, if_true, if_false)


#: The operations of `dense_order`'s rule on TIR expressions (its Python model runs on ints).
TIR_ARITH = Arith(T.min, T.max, _select, _held, T.truncdiv, T.truncmod)


def entry_program(
    source: KVSource,
    head_dim: int,
    dtype: str,
    causal: bool,
    page_size: int,
    config: TileConfig,
    attend: Any,
    params: ScoreParams,
    lse: bool = False,
) -> Any:
    """The prim_func of `source` whose CTAs each run the macro
    `attend(w, Q, K, V, O, LSE, block_table)` (LSE None without `lse`).

    Every CTA calls `attend`, also one without a query tile (ragged grids have
    spare CTAs): its `Work` then has no key tiles and no rows to store. There is
    no early exit, since SM90's warp-specialized body must be entered by every
    thread of the CTA.
    """
    if source is KVSource.PAGED_TILED and not pages_tile_whole(page_size, config.block_N):
        raise ValueError(
            f"page_size: expected a power of two >= 16 for the tiled paged program, got {page_size}"
        )
    heads, kv_heads = T.dynamic("heads, kv_heads")
    # The scalar parameters every prim_func declares after its tensors (`ScoreParams`).
    scale_param, cap_param, window_param = params.scale, params.cap_scale, params.window_length
    group = heads // kv_heads
    block_M = config.block_M
    threads = config.threads
    D = head_dim
    key_range = kv_tile_range(causal, params.window, block_M, config.block_N)
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
        k_first, tiles = key_range(tile * block_M, kv_len, offset)
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
            k_first=k_first,
            tiles=tiles,
        )

    @T.macro
    def packed_work(bx: Any, by: Any, cu_seqlens_q: Any, num_seqs: Any, keys: Any, capacity: Any) -> Work:
        """The work of CTA (bx, by) over q packed by cu_seqlens_q: the query tile found by
        `locate`, head by. `keys` is cu_seqlens_kv (ragged) or kv_seqlens (paged, whose block
        table holds `capacity` keys)."""
        seq, tile = locate(cu_seqlens_q, num_seqs, bx)
        q_first = cu_seqlens_q[seq]
        q_len = cu_seqlens_q[seq + 1] - q_first
        if source is KVSource.RAGGED:
            kv_first = keys[seq]
            kv_len = keys[seq + 1] - kv_first
        else:
            kv_first = 0
            kv_len = clamped_kv_len(keys[seq], capacity)
        offset = kv_len - q_len
        # A CTA without a tile runs with no keys and no rows to store.
        has_tile = (tile >= 0) & (tile * block_M < q_len)
        k_first, tile_keys = key_range(tile * block_M, kv_len, offset)
        tiles = T.if_then_else(has_tile, tile_keys, 0)
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
            k_first=k_first,
            tiles=tiles,
        )

    if source is KVSource.DENSE:
        batch, seq_q, seq_kv = T.dynamic("batch, seq_q, seq_kv")
        q_strides, k_strides, v_strides, o_strides = (row_strides(name, 4) for name in "qkvo")

        @T.macro
        def dense_grid(Q: Any, K: Any, V: Any, O: Any, LSE: Any) -> None:
            with T.Kernel(T.ceildiv(seq_q, block_M), heads, batch, threads=threads) as (bx, by, bz):
                w = batched_work(bx, by, bz, seq_q, seq_kv)
                attend(w, Q, K, V, O, LSE, None)

        if lse:

            @T.prim_func
            def main_dense_lse(
                Q: T.StridedTensor([batch, seq_q, heads, D], q_strides, dtype),
                K: T.StridedTensor([batch, seq_kv, kv_heads, D], k_strides, dtype),
                V: T.StridedTensor([batch, seq_kv, kv_heads, D], v_strides, dtype),
                O: T.StridedTensor([batch, seq_q, heads, D], o_strides, dtype),
                LSE: T.Tensor([batch, seq_q, heads], LSE_DTYPE),
                score_scale: scale_param,
                cap_scale: cap_param,
                window: window_param,
            ) -> None:
                dense_grid(*vector_views(Q, K, V, O), LSE)

            return main_dense_lse

        @T.prim_func
        def main_dense(
            Q: T.StridedTensor([batch, seq_q, heads, D], q_strides, dtype),
            K: T.StridedTensor([batch, seq_kv, kv_heads, D], k_strides, dtype),
            V: T.StridedTensor([batch, seq_kv, kv_heads, D], v_strides, dtype),
            O: T.StridedTensor([batch, seq_q, heads, D], o_strides, dtype),
            score_scale: scale_param,
            cap_scale: cap_param,
            window: window_param,
        ) -> None:
            dense_grid(*vector_views(Q, K, V, O), None)

        return main_dense

    if source is KVSource.RAGGED:
        tokens_q, tokens_kv, seqs_plus_one = T.dynamic("tokens_q, tokens_kv, seqs_plus_one")
        q_strides, k_strides, v_strides, o_strides = (row_strides(name, 3) for name in "qkvo")

        @T.macro
        def ragged_grid(
            Q: Any, K: Any, V: Any, cu_seqlens_q: Any, cu_seqlens_kv: Any, O: Any, LSE: Any
        ) -> None:
            with T.Kernel(tokens_q // block_M + seqs_plus_one - 1, heads, threads=threads) as (bx, by):
                w = packed_work(bx, by, cu_seqlens_q, seqs_plus_one - 1, cu_seqlens_kv, None)
                attend(w, Q, K, V, O, LSE, None)

        if lse:

            @T.prim_func
            def main_ragged_lse(
                Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
                K: T.StridedTensor([tokens_kv, kv_heads, D], k_strides, dtype),
                V: T.StridedTensor([tokens_kv, kv_heads, D], v_strides, dtype),
                cu_seqlens_q: T.Tensor([seqs_plus_one], "int32"),
                cu_seqlens_kv: T.Tensor([seqs_plus_one], "int32"),
                O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
                LSE: T.Tensor([tokens_q, heads], LSE_DTYPE),
                score_scale: scale_param,
                cap_scale: cap_param,
                window: window_param,
            ) -> None:
                ragged_grid(*vector_views(Q, K, V), cu_seqlens_q, cu_seqlens_kv, vector_view(O), LSE)

            return main_ragged_lse

        @T.prim_func
        def main_ragged(
            Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
            K: T.StridedTensor([tokens_kv, kv_heads, D], k_strides, dtype),
            V: T.StridedTensor([tokens_kv, kv_heads, D], v_strides, dtype),
            cu_seqlens_q: T.Tensor([seqs_plus_one], "int32"),
            cu_seqlens_kv: T.Tensor([seqs_plus_one], "int32"),
            O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
            score_scale: scale_param,
            cap_scale: cap_param,
            window: window_param,
        ) -> None:
            ragged_grid(*vector_views(Q, K, V), cu_seqlens_q, cu_seqlens_kv, vector_view(O), None)

        return main_ragged

    if source is KVSource.CONTIGUOUS:
        batch, seq_q, max_seq = T.dynamic("batch, seq_q, max_seq")
        cache_strides = kv_cache_strides()
        q_strides, o_strides = row_strides("q", 4), row_strides("o", 4)

        @T.macro
        def contiguous_grid(Q: Any, K: Any, V: Any, kv_seqlens: Any, O: Any, LSE: Any) -> None:
            with T.Kernel(T.ceildiv(seq_q, block_M), heads, batch, threads=threads) as (bx, by, bz):
                w = batched_work(bx, by, bz, seq_q, kv_seqlens)
                attend(w, Q, K, V, O, LSE, None)

        if lse:

            @T.prim_func
            def main_contiguous_lse(
                Q: T.StridedTensor([batch, seq_q, heads, D], q_strides, dtype),
                K: T.StridedTensor([batch, max_seq, kv_heads, D], cache_strides, dtype),
                V: T.StridedTensor([batch, max_seq, kv_heads, D], cache_strides, dtype),
                kv_seqlens: T.Tensor([batch], "int32"),
                O: T.StridedTensor([batch, seq_q, heads, D], o_strides, dtype),
                LSE: T.Tensor([batch, seq_q, heads], LSE_DTYPE),
                score_scale: scale_param,
                cap_scale: cap_param,
                window: window_param,
            ) -> None:
                contiguous_grid(*vector_views(Q, K, V), kv_seqlens, vector_view(O), LSE)

            return main_contiguous_lse

        @T.prim_func
        def main_contiguous(
            Q: T.StridedTensor([batch, seq_q, heads, D], q_strides, dtype),
            K: T.StridedTensor([batch, max_seq, kv_heads, D], cache_strides, dtype),
            V: T.StridedTensor([batch, max_seq, kv_heads, D], cache_strides, dtype),
            kv_seqlens: T.Tensor([batch], "int32"),
            O: T.StridedTensor([batch, seq_q, heads, D], o_strides, dtype),
            score_scale: scale_param,
            cap_scale: cap_param,
            window: window_param,
        ) -> None:
            contiguous_grid(*vector_views(Q, K, V), kv_seqlens, vector_view(O), None)

        return main_contiguous

    batch, tokens_q, num_pages, max_pages = T.dynamic("batch, tokens_q, num_pages, max_pages")
    cache_strides = kv_cache_strides()
    q_strides, o_strides = row_strides("q", 3), row_strides("o", 3)

    @T.macro
    def paged_grid(
        Q: Any, K: Any, V: Any, block_table: Any, kv_seqlens: Any, cu_seqlens_q: Any, O: Any, LSE: Any
    ) -> None:
        with T.Kernel(tokens_q // block_M + batch, heads, threads=threads) as (bx, by):
            w = packed_work(bx, by, cu_seqlens_q, batch, kv_seqlens, max_pages * page_size)
            attend(w, Q, K, V, O, LSE, block_table)

    if lse:

        @T.prim_func
        def main_paged_lse(
            Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
            K: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
            V: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
            block_table: T.Tensor([batch, max_pages], "int32"),
            kv_seqlens: T.Tensor([batch], "int32"),
            cu_seqlens_q: T.Tensor([batch + 1], "int32"),
            O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
            LSE: T.Tensor([tokens_q, heads], LSE_DTYPE),
            score_scale: scale_param,
            cap_scale: cap_param,
            window: window_param,
        ) -> None:
            paged_grid(*vector_views(Q, K, V), block_table, kv_seqlens, cu_seqlens_q, vector_view(O), LSE)

        return main_paged_lse

    @T.prim_func
    def main_paged(
        Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
        K: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
        V: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
        block_table: T.Tensor([batch, max_pages], "int32"),
        kv_seqlens: T.Tensor([batch], "int32"),
        cu_seqlens_q: T.Tensor([batch + 1], "int32"),
        O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
        score_scale: scale_param,
        cap_scale: cap_param,
        window: window_param,
    ) -> None:
        paged_grid(*vector_views(Q, K, V), block_table, kv_seqlens, cu_seqlens_q, vector_view(O), None)

    return main_paged


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The query tiles of one persistent CTA: `count` of them (a TIR scalar). Each warpgroup calls
    `begin()` (a macro) once, for the state of its own walk over the schedule, then `work(i, state)`
    (a macro) for the `Work` of the CTA's i-th tile, i ascending."""

    count: Any
    begin: Any
    work: Any


def persistent_program(
    source: KVSource,
    head_dim: int,
    dtype: str,
    causal: bool,
    config: TileConfig,
    attend_tiles: Any,
    params: ScoreParams,
    lse: bool = False,
) -> Any:
    """The dense prim_func with a persistent grid: `config.persistent_ctas` CTAs, each running the
    macro `attend_tiles(schedule, Q, K, V, O, LSE, block_table)` over its `Schedule`: a static
    schedule (no device-side counter, CUDA-graph safe) in the order of `dense_order`, whose Python
    model the CPU tests check. Causal: bands of query-tile lengths, longest first; inside a band
    the (sequence, KV head) sections one after another, so that the CTAs resident together read
    the K/V of a few sections (under `dense_order.RESIDENT_KV_BYTES`), not of every query head at
    once; units of two tiles whose costs add up to the same, dealt snake-wise, keep the CTAs
    evenly loaded. Non-causal: sections of one (sequence, KV head), its query heads fastest.
    """
    if source is not KVSource.DENSE or config.persistent_ctas <= 0:
        raise ValueError(f"persistent grid: expected the dense source and persistent_ctas > 0, got {source}")
    heads, kv_heads = T.dynamic("heads, kv_heads")
    # The scalar parameters every prim_func declares after its tensors (`ScoreParams`).
    scale_param, cap_param, window_param = params.scale, params.cap_scale, params.window_length
    block_M = config.block_M
    ctas = config.persistent_ctas
    D = head_dim
    key_range = kv_tile_range(causal, params.window, block_M, config.block_N)
    order = DenseOrder(
        ctas=ctas,
        heads=heads,
        kv_heads=kv_heads,
        causal=causal,
        kv_key_bytes=2 * head_dim * tvm.DataType(dtype).bits // 8,
    )
    batch, seq_q, seq_kv = T.dynamic("batch, seq_q, seq_kv")
    q_strides, k_strides, v_strides, o_strides = (row_strides(name, 4) for name in "qkvo")

    @T.macro
    def tile_work(
        cta: Any, i: Any, m_tiles: Any, batch: Any, seq_q: Any, seq_kv: Any, layout: BandLayout
    ) -> Work:
        """The `Work` of CTA `cta`'s i-th tile."""
        seq, head, tile = tile_at(order, cta, i, batch, m_tiles, layout, TIR_ARITH)
        offset = seq_kv - seq_q
        k_first, tiles = key_range(tile * block_M, seq_kv, offset)
        return work(
            seq=seq,
            head=head,
            kv_head=head // order.group,
            q_first=0,
            q0=tile * block_M,
            q_len=seq_q,
            kv_first=0,
            kv_len=seq_kv,
            offset=offset,
            k_first=k_first,
            tiles=tiles,
            hold_ids=True,
        )

    @T.macro
    def grid(Q: Any, K: Any, V: Any, O: Any, LSE: Any) -> None:
        with T.Kernel(ctas, threads=config.threads) as bx:
            m_tiles = T.ceildiv(seq_q, block_M)
            layout = band_layout(order, batch, seq_kv, m_tiles, TIR_ARITH)
            count = tile_count(order, bx, batch, m_tiles, layout, TIR_ARITH)
            schedule = Schedule(
                count, lambda: None, lambda i, _state: tile_work(bx, i, m_tiles, batch, seq_q, seq_kv, layout)
            )
            attend_tiles(schedule, Q, K, V, O, LSE, None)

    if lse:

        @T.prim_func
        def main_dense_lse(
            Q: T.StridedTensor([batch, seq_q, heads, D], q_strides, dtype),
            K: T.StridedTensor([batch, seq_kv, kv_heads, D], k_strides, dtype),
            V: T.StridedTensor([batch, seq_kv, kv_heads, D], v_strides, dtype),
            O: T.StridedTensor([batch, seq_q, heads, D], o_strides, dtype),
            LSE: T.Tensor([batch, seq_q, heads], LSE_DTYPE),
            score_scale: scale_param,
            cap_scale: cap_param,
            window: window_param,
        ) -> None:
            grid(*vector_views(Q, K, V, O), LSE)

        return main_dense_lse

    @T.prim_func
    def main_dense(
        Q: T.StridedTensor([batch, seq_q, heads, D], q_strides, dtype),
        K: T.StridedTensor([batch, seq_kv, kv_heads, D], k_strides, dtype),
        V: T.StridedTensor([batch, seq_kv, kv_heads, D], v_strides, dtype),
        O: T.StridedTensor([batch, seq_q, heads, D], o_strides, dtype),
        score_scale: scale_param,
        cap_scale: cap_param,
        window: window_param,
    ) -> None:
        grid(*vector_views(Q, K, V, O), None)

    return main_dense


def _scalar(value: Any) -> Any:
    """A one-element int32 register buffer holding `value`: read and written as buf[0], also by the
    macros it is passed to (a `T.alloc_var` passed to a macro arrives as its value)."""
    buf = T.alloc_local([1], "int32")
    T.buffer_store(buf, value, [0])
    return buf


#: Steps (one (band, sequence) pair each) a persistent CTA's walk over a packed batch may take:
#: the cost bands widen until (bands x sequences) fits, so the walk stays a few microseconds.
WALK_STEPS = 160


@dataclasses.dataclass(frozen=True)
class _Walk:
    """One warpgroup's position in the cost-ordered list of query units (sequence, query tile) of a
    packed batch (one-element int32 buffers): band `hi` (costs (hi - width, hi]), sequence `seq`,
    the units before the pair (`base`), its units (`units`) and the tiles of cost <= hi (`top`:
    the pair's units are tiles top - units .. top - 1), and the lengths of `seq`."""

    hi: Any
    seq: Any
    base: Any
    units: Any
    top: Any
    q_first: Any
    q_len: Any
    kv_first: Any
    kv_len: Any


def persistent_packed_program(
    source: KVSource,
    head_dim: int,
    dtype: str,
    causal: bool,
    page_size: int,
    config: TileConfig,
    attend_tiles: Any,
    params: ScoreParams,
    lse: bool = False,
) -> Any:
    """The prim_func of a packed batch of sequences of their own lengths (ragged, paged) with a
    persistent grid: `config.persistent_ctas` CTAs, each running the macro
    `attend_tiles(schedule, Q, K, V, O, LSE, block_table)` over its `Schedule`.

    The schedule is static and computed on the device from the length tensors (CUDA-graph safe,
    no atomics): a query *unit* is one query tile of one sequence (all query heads of it follow
    one another, so the group's K/V stays in L2); its cost is the key tiles it reads. Units are
    ordered longest first over the whole batch: by cost band (bands of `width` costs, top band
    first), then sequence, then tile (costliest first). A CTA takes the tiles
    `i ctas + cta` (even rounds) or `i ctas + ctas - 1 - cta` (odd rounds): snake dealing, so
    no CTA takes the dearest tile of every round. Every CTA first reads each sequence's lengths
    once (the unit total and the top cost); then each warpgroup walks the (band, sequence) pairs
    forward as its tiles advance, reading a sequence's lengths once per pair. No CTA is empty
    when there are at least `ctas` tiles, and none searches. The band width grows with the batch
    so that the walk takes at most about WALK_STEPS steps (width 1: exact longest-first order).
    With a sliding window the ranking still uses the cost without the window (keys from 0 to a
    tile's last one: non-decreasing along a sequence, which the band count `at_most` needs); a
    tile then reads only its window's key tiles.
    """
    if not source.ragged_q:
        raise ValueError(f"persistent packed grid: expected a ragged or paged source, got {source}")
    if source is KVSource.PAGED_TILED and not pages_tile_whole(page_size, config.block_N):
        raise ValueError(
            f"page_size: expected a power of two >= 16 for the tiled paged program, got {page_size}"
        )
    heads, kv_heads = T.dynamic("heads, kv_heads")
    # The scalar parameters every prim_func declares after its tensors (`ScoreParams`).
    scale_param, cap_param, window_param = params.scale, params.cap_scale, params.window_length
    group = heads // kv_heads
    block_M = config.block_M
    block_N = config.block_N
    ctas = config.persistent_ctas
    D = head_dim
    key_range = kv_tile_range(causal, params.window, block_M, block_N)

    @T.macro
    def at_most(cost: Any, units: Any, kv_len: Any, offset: Any) -> Any:
        """How many of a sequence's `units` query tiles read at most `cost` >= 0 key tiles (tile
        j reads tile_count(j block_M, ...), non-decreasing in j)."""
        if causal:
            # Tile j reads min(kv_len, offset + (j + 1) block_M) keys, rounded up to tiles.
            below = T.min(units, T.max(0, T.floordiv(cost * block_N - offset, block_M)))
        else:
            below = 0
        return T.if_then_else(cost >= T.ceildiv(kv_len, block_N), units, below)

    @T.macro
    def batch_totals(lengths: Any, batch: Any) -> Any:
        """Every sequence once: the batch's query units and the top cost of any unit."""
        total = _scalar(0)
        top_cost = _scalar(0)
        for b in T.serial(batch):
            _, q_len, _, kv_len = lengths(b)
            units = T.ceildiv(q_len, block_M)
            total[0] = total[0] + units
            # A sequence's last query tile reads all its keys.
            top_cost[0] = T.max(top_cost[0], T.if_then_else(units > 0, T.ceildiv(kv_len, block_N), 0))
        return total, top_cost

    @T.macro
    def enter(walk: _Walk, lengths: Any, width: Any) -> None:
        """Read the lengths of walk.seq and count its units in band walk.hi."""
        q_first, q_len, kv_first, kv_len = lengths(walk.seq[0])
        walk.q_first[0] = q_first
        walk.q_len[0] = q_len
        walk.kv_first[0] = kv_first
        walk.kv_len[0] = kv_len
        units = T.ceildiv(q_len, block_M)
        offset = kv_len - q_len
        walk.top[0] = at_most(walk.hi[0], units, kv_len, offset)
        lo = walk.hi[0] - width
        walk.units[0] = walk.top[0] - T.if_then_else(lo >= 0, at_most(lo, units, kv_len, offset), 0)

    @T.macro
    def begin(lengths: Any, top_cost: Any, width: Any) -> _Walk:
        walk = _Walk(*(_scalar(value) for value in (top_cost, 0, 0, 0, 0, 0, 0, 0, 0)))
        enter(walk, lengths, width)
        return walk

    @T.macro
    def unit_work(i: Any, walk: _Walk, lengths: Any, batch: Any, bx: Any, width: Any) -> Work:
        """The `Work` of CTA bx's i-th tile (i ascending: the walk only moves forward)."""
        t = i * ctas + T.if_then_else(i % 2 == 0, bx, ctas - 1 - bx)
        unit = t // heads
        head = t % heads
        # Forward to the (band, sequence) pair holding the unit.
        while unit >= walk.base[0] + walk.units[0]:
            walk.base[0] = walk.base[0] + walk.units[0]
            if walk.seq[0] + 1 == batch:
                walk.seq[0] = 0
                walk.hi[0] = walk.hi[0] - width
            else:
                walk.seq[0] = walk.seq[0] + 1
            enter(walk, lengths, width)
        tile = walk.top[0] - 1 - (unit - walk.base[0])
        kv_len = walk.kv_len[0]
        offset = kv_len - walk.q_len[0]
        k_first, tiles = key_range(tile * block_M, kv_len, offset)
        return work(
            seq=walk.seq[0],
            head=head,
            kv_head=head // group,
            q_first=walk.q_first[0],
            q0=tile * block_M,
            q_len=walk.q_len[0],
            kv_first=walk.kv_first[0],
            kv_len=kv_len,
            offset=offset,
            k_first=k_first,
            tiles=tiles,
            hold_ids=True,
        )

    def packed(lengths: Any, batch: Any, bx: Any) -> Schedule:
        """The schedule of CTA bx (called inside the kernel); `lengths(b)` (a macro) gives sequence
        b's (q_first, q_len, kv_first, kv_len)."""
        total, top_cost = batch_totals(lengths, batch)
        # Bands of `width` costs: about WALK_STEPS (band, sequence) pairs in all.
        width = _scalar(T.max(1, T.ceildiv((top_cost[0] + 1) * batch, WALK_STEPS)))
        tiles = total[0] * heads
        rounds = tiles // ctas
        last = T.if_then_else(rounds % 2 == 0, bx, ctas - 1 - bx)
        count = rounds + T.if_then_else(last < tiles % ctas, 1, 0)
        return Schedule(
            count,
            lambda: begin(lengths, top_cost[0], width[0]),
            lambda i, walk: unit_work(i, walk, lengths, batch, bx, width[0]),
        )

    # Every length the schedule reads is clamped at 0: with validate=False a decreasing
    # cu_seqlens would give a sequence a negative count of query tiles, and the walk, which
    # moves forward by each sequence's count, could then never reach a CTA's tile.
    @T.macro
    def ragged_lengths(b: Any, cu_seqlens_q: Any, cu_seqlens_kv: Any) -> Any:
        q_first = cu_seqlens_q[b]
        kv_first = cu_seqlens_kv[b]
        q_len = sequence_length(q_first, cu_seqlens_q[b + 1])
        return q_first, q_len, kv_first, sequence_length(kv_first, cu_seqlens_kv[b + 1])

    @T.macro
    def paged_lengths(b: Any, cu_seqlens_q: Any, kv_seqlens: Any, capacity: Any) -> Any:
        q_first = cu_seqlens_q[b]
        q_len = sequence_length(q_first, cu_seqlens_q[b + 1])
        return q_first, q_len, 0, clamped_kv_len(kv_seqlens[b], capacity)

    if source is KVSource.RAGGED:
        tokens_q, tokens_kv, seqs_plus_one = T.dynamic("tokens_q, tokens_kv, seqs_plus_one")
        q_strides, k_strides, v_strides, o_strides = (row_strides(name, 3) for name in "qkvo")

        @T.macro
        def ragged_grid(
            Q: Any, K: Any, V: Any, cu_seqlens_q: Any, cu_seqlens_kv: Any, O: Any, LSE: Any
        ) -> None:
            with T.Kernel(ctas, threads=config.threads) as bx:
                schedule = packed(
                    lambda b: ragged_lengths(b, cu_seqlens_q, cu_seqlens_kv), seqs_plus_one - 1, bx
                )
                attend_tiles(schedule, Q, K, V, O, LSE, None)

        if lse:

            @T.prim_func
            def main_ragged_lse(
                Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
                K: T.StridedTensor([tokens_kv, kv_heads, D], k_strides, dtype),
                V: T.StridedTensor([tokens_kv, kv_heads, D], v_strides, dtype),
                cu_seqlens_q: T.Tensor([seqs_plus_one], "int32"),
                cu_seqlens_kv: T.Tensor([seqs_plus_one], "int32"),
                O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
                LSE: T.Tensor([tokens_q, heads], LSE_DTYPE),
                score_scale: scale_param,
                cap_scale: cap_param,
                window: window_param,
            ) -> None:
                ragged_grid(*vector_views(Q, K, V), cu_seqlens_q, cu_seqlens_kv, vector_view(O), LSE)

            return main_ragged_lse

        @T.prim_func
        def main_ragged(
            Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
            K: T.StridedTensor([tokens_kv, kv_heads, D], k_strides, dtype),
            V: T.StridedTensor([tokens_kv, kv_heads, D], v_strides, dtype),
            cu_seqlens_q: T.Tensor([seqs_plus_one], "int32"),
            cu_seqlens_kv: T.Tensor([seqs_plus_one], "int32"),
            O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
            score_scale: scale_param,
            cap_scale: cap_param,
            window: window_param,
        ) -> None:
            ragged_grid(*vector_views(Q, K, V), cu_seqlens_q, cu_seqlens_kv, vector_view(O), None)

        return main_ragged

    batch, tokens_q, num_pages, max_pages = T.dynamic("batch, tokens_q, num_pages, max_pages")
    cache_strides = kv_cache_strides()
    q_strides, o_strides = row_strides("q", 3), row_strides("o", 3)

    @T.macro
    def paged_grid(
        Q: Any, K: Any, V: Any, block_table: Any, kv_seqlens: Any, cu_seqlens_q: Any, O: Any, LSE: Any
    ) -> None:
        with T.Kernel(ctas, threads=config.threads) as bx:
            capacity = max_pages * page_size
            schedule = packed(lambda b: paged_lengths(b, cu_seqlens_q, kv_seqlens, capacity), batch, bx)
            attend_tiles(schedule, Q, K, V, O, LSE, block_table)

    if lse:

        @T.prim_func
        def main_paged_lse(
            Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
            K: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
            V: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
            block_table: T.Tensor([batch, max_pages], "int32"),
            kv_seqlens: T.Tensor([batch], "int32"),
            cu_seqlens_q: T.Tensor([batch + 1], "int32"),
            O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
            LSE: T.Tensor([tokens_q, heads], LSE_DTYPE),
            score_scale: scale_param,
            cap_scale: cap_param,
            window: window_param,
        ) -> None:
            paged_grid(*vector_views(Q, K, V), block_table, kv_seqlens, cu_seqlens_q, vector_view(O), LSE)

        return main_paged_lse

    @T.prim_func
    def main_paged(
        Q: T.StridedTensor([tokens_q, heads, D], q_strides, dtype),
        K: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
        V: T.StridedTensor([num_pages, page_size, kv_heads, D], cache_strides, dtype),
        block_table: T.Tensor([batch, max_pages], "int32"),
        kv_seqlens: T.Tensor([batch], "int32"),
        cu_seqlens_q: T.Tensor([batch + 1], "int32"),
        O: T.StridedTensor([tokens_q, heads, D], o_strides, dtype),
        score_scale: scale_param,
        cap_scale: cap_param,
        window: window_param,
    ) -> None:
        paged_grid(*vector_views(Q, K, V), block_table, kv_seqlens, cu_seqlens_q, vector_view(O), None)

    return main_paged
