"""SM90 (Hopper) attention programs: warp-specialized, TMA-fed, wgmma, ping-pong consumers.

One CTA computes 128 query rows of one query head with two consumer warpgroups (384
threads), or 192 rows with three (512 threads; D 64, see tiles.py):

- the last warpgroup, the producer, loads the Q tile once and then K and V tiles into a
  ring of `num_stages` shared-memory slots: rectangular tiles with TMA
  (dense, ragged, contiguous cache, and whole pages of the tiled paged cache),
  rows gathered through the block table with cp.async for any page size. Each
  slot has a `full` mbarrier (producer -> consumers) and a `free` one
  (consumers -> producer).
- warpgroups 0 .. consumers - 1, the consumers, own 64 query rows each. Per key tile k
  a consumer issues S = Q K_k^T and O += P_{k-1} V_{k-1} as asynchronous wgmma,
  waits for S and masks it while the P V product runs, then waits for that product,
  releases V_{k-1}'s slot and runs the softmax (ptxas may start the row maxima before
  that wait). ptxas put the wait ahead of the exponentials even when the source ran them
  under the product, and then released the slot only after the whole softmax; now the
  exponentials depend on the release (`release_before`). One named barrier per consumer
  passes the turn to issue GEMMs round the consumers (ping-pong with two), so one
  warpgroup's softmax runs under the others' tensor-core work.

Per key tile the output is rescaled (`o *= alpha`) after the P V product has been
waited for, outside the window in which the consumers take turns (as FlashAttention-3
does). Tiles that need no mask (every row of the warpgroup sees every key) run a loop
without the mask and without the empty-row guard of the softmax; the causal diagonal
and the last, partial tile run the masked loop.

Dense, ragged and paged programs with `config.persistent_ctas > 0` launch that many CTAs
(one per SM); each computes a static list of query tiles one after another (see
`attention_entries.persistent_program` and `persistent_packed_program` for the
orders). The K/V ring and the Q tile's barriers run on across tiles (phases counted by
`kbase`, `qround`; the producer's own v_landed barrier by `landed`), the consumers
release the Q tile after their last Q K^T, and outputs are staged in tiles of
their own, so the next tile's Q and first K/V tiles load under the current tile's last
P V product and epilogue. Sequence lengths, token counts, batch, pages and cache sizes are dynamic:
one compiled program serves every call with the same static arguments.

A cache tile that ends past `kv_seqlens[b]` holds rows the call does not own
(possibly NaN). Their scores are masked by selection; the producer additionally
zeroes such V rows in shared memory before releasing the tile, since 0 * NaN
would otherwise reach the output through P @ V.
"""

import dataclasses
from typing import Any

import tilelang.language as T
from tilelang.layout import make_swizzled_layout

from tileprefill.kernels.tl.attention_entries import (
    Schedule,
    entry_program,
    persistent_packed_program,
    persistent_program,
)
from tileprefill.kernels.tl.attention_parts import (
    ACCUM,
    Work,
    online_softmax,
    scaled_exponentials,
    score_params,
    soft_cap,
    unmasked_tiles,
    visibility_mask,
    write_lse,
)
from tileprefill.tiles import KVSource, TileConfig

#: Query rows of one consumer warpgroup (the M of one wgmma).
ROWS_PER_CONSUMER = 64
#: Threads of one warpgroup: each consumer, and the producer.
WARPGROUP_THREADS = 128
PRODUCER_THREADS = WARPGROUP_THREADS
#: Threads that meet at a turn barrier: the consumer whose turn it is and the one before it.
TURN_THREADS = 2 * WARPGROUP_THREADS
#: Consumer warpgroups a program may have (block_M = 64 x consumers).
MAX_CONSUMERS = 3
#: Named barrier ids (16 per CTA): TileLang reserves 0-2 (__syncthreads, cross-warp reductions)
#: and numbers the partial barriers it inserts itself from 3 up, one per thread range
#: (at most 4 here); ours stay clear of both.
#: Consumer w waits on TURN_BARRIER + w for its turn to issue GEMMs.
TURN_BARRIER = 8
#: Consumer w syncs its own 128 threads on EPILOGUE_BARRIER + w before the output TMA store.
EPILOGUE_BARRIER = TURN_BARRIER + MAX_CONSUMERS
#: All 65,536 registers of an SM go to the one CTA; setmaxnreg moves them between warpgroups.
REGISTER_FILE = 65536
#: L2 priorities of the producer's TMA loads. A K/V tile is read again, by the CTAs running the
#: other query heads of its KV head and the other query tiles of its sequence (the persistent
#: orders keep them resident together: `attention_entries`); a Q tile is read once.
KV_EVICTION = "evict_last"
Q_EVICTION = "evict_first"

#: CUDA every SM90 program carries (`T.import_source`) for `release_before`: an mbarrier arrive that
#: returns the barrier's state (TileLang's discards it), and a value passed through a byte permute
#: of that state which takes every byte from the value (the value is unchanged; what reads it now
#: depends on the arrive). ptxas schedules an arrive whose result nothing reads after everything
#: else of its block.
TIED_RELEASE_SOURCE = r"""
#ifndef TILEPREFILL_TIED_RELEASE
#define TILEPREFILL_TIED_RELEASE
template <typename Barrier>
__device__ __forceinline__ unsigned long long tileprefill_arrive(Barrier &barrier) {
  unsigned long long state;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];"
               : "=l"(state)
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(&barrier)))
               : "memory");
  return state;
}
__device__ __forceinline__ float tileprefill_tie(float value, unsigned long long state) {
  unsigned bits;
  asm("prmt.b32 %0, %1, %2, 0x7654;"
      : "=r"(bits)
      : "r"(static_cast<unsigned>(state)), "r"(__float_as_uint(value)));
  return __uint_as_float(bits);
}
#endif
"""


#: Columns of one swizzle panel of a 16-bit tile of each head dim: 128-byte panels where 64 columns
#: divide the row, else 64- or 32-byte ones (TMA copies a sub-tile panel by panel).
def panel_columns(head_dim: int) -> int:
    return next(cols for cols in (64, 32, 16) if head_dim % cols == 0)


def quad_partial_sums(rows: int, cols: int) -> Any:
    """The macro that adds the probabilities `s` (rows, cols) of a key tile to each thread's partial
    row sums `lp`, rescaled by `alpha` like the output.

    In the wgmma accumulator layout a thread holds, of each of its rows, the columns
    8 c + 2 (t % 4) + {0, 1}: the four threads of a quad share a row. A thread keeps the running
    sum of its own columns in the first 8 columns of `lp`, a fragment shaped like the scores (so
    that TileLang gives it their layout; its other columns stay 0). The quad's partial sums are
    added up once a query tile (`T.reduce_sum(lp, l, dim=1)` after the last key tile), instead of
    two shuffle rounds a row every key tile (as TileOPs' D 128 kernel keeps its row sums).
    """

    @T.macro
    def accumulate(s: Any, lp: Any, alpha: Any, first: Any) -> None:
        for i, j in T.Parallel(rows, 8):
            if first:
                lp[i, j] = s[i, j]
            else:
                lp[i, j] = lp[i, j] * alpha[i] + s[i, j]
        for c in T.unroll(1, cols // 8):
            for i, j in T.Parallel(rows, 8):
                lp[i, j] += s[i, 8 * c + j]

    return accumulate


@dataclasses.dataclass
class _Buffers:
    """Global tensors, shared tiles and mbarriers of one CTA."""

    Q: Any
    K: Any
    V: Any
    O: Any
    LSE: Any  # the log-sum-exp output (programs with `lse`; None otherwise)
    block_table: Any
    # (64, D) per consumer; separate buffers, so TileLang's sync planning sees no sharing
    # between the consumers.
    Qs: tuple[Any, ...]
    # (64, D) per consumer, staging its output for the TMA store: Qs itself,
    # or, persistent, separate tiles, so that the next tile's Q may land meanwhile.
    Os: tuple[Any, ...]
    Ks: Any  # (stages, block_N, D)
    Vs: Any
    q_full: Any
    q_free: Any  # persistent: every consumer is done with the Q tile
    k_full: Any
    v_full: Any
    k_free: Any
    v_free: Any
    v_landed: Any  # a partial cache V tile has landed and may be cleaned


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
    consumers = config.block_M // ROWS_PER_CONSUMER
    if (
        config.block_M % ROWS_PER_CONSUMER
        or not 2 <= consumers <= MAX_CONSUMERS
        or config.threads != (consumers + 1) * WARPGROUP_THREADS
    ):
        raise ValueError(
            "config: expected block_M 128 or 192 (two or three consumer warpgroups of 64 rows) and "
            f"128 threads per consumer plus the producer's 128 for sm90, got {config}"
        )
    consumer_threads = consumers * WARPGROUP_THREADS  # what the free barriers count
    # A tuple, not range(): TileLang turns a `for` over range() inside a macro into a device loop,
    # and each consumer's code must be unrolled with its index a Python int.
    consumer_ids = tuple(range(consumers))
    half = ROWS_PER_CONSUMER
    block_N = config.block_N
    stages = config.num_stages
    D = head_dim
    if D % 16:
        raise ValueError(f"head_dim: expected a multiple of 16 for sm90, got {D}")
    if windowed and not causal:
        raise ValueError(f"windowed: expected False without causal, got {windowed}")
    panel = panel_columns(D)
    params = score_params(windowed)
    scale = params.exp2_scale
    window = params.window
    gathers = source is KVSource.PAGED
    # Caches may hold garbage past kv_len inside a tile that TMA loads whole.
    cleans_tail = source in (KVSource.CONTIGUOUS, KVSource.PAGED_TILED)
    # setmaxnreg moves registers between warpgroups inside the CTA's launch allocation,
    # 65536 / threads a thread rounded down to 8 (168 with two consumers, 128 with three):
    # producer + consumers x consumer <= that times the warpgroups, or the consumers' increase
    # waits forever. A TMA producer needs few (24, as FlashAttention-3); a gathering one
    # computes a block-table address per row and spills below ~88 (ptxas), which leaves two
    # consumers 208 (enough for D <= 128; D 256 spills ~100 bytes there). Three consumers
    # (D 64, TMA producers only) get 160, as TileOPs' D 64 kernel.
    launch_regs = REGISTER_FILE // config.threads // 8 * 8
    if gathers and consumers > 2:
        raise ValueError(f"config: expected two consumers for the gathering paged program, got {config}")
    producer_regs = 88 if gathers else 24
    consumer_regs = (launch_regs * (consumers + 1) - producer_regs) // consumers // 8 * 8
    consumer_regs = min(consumer_regs, 240)
    policy = T.GemmWarpPolicy.FullRow

    # Row sums as per-thread partial sums, added up once a query tile (`quad_partial_sums`), where
    # the consumers have the registers: with three consumers (160 registers) they doubled the D 64
    # program's spills (outside the loop), so there the row sums are shuffled every key tile.
    partial_sums = consumers == 2
    sums_shape = [half, block_N] if partial_sums else [half]
    softmax = online_softmax(half, block_N, scale)
    exponentiate = scaled_exponentials(half, block_N, scale)
    # Tiles every row of the consumer sees whole: the row maxima are finite.
    softmax_seen = online_softmax(half, block_N, scale, guard_empty=False)
    exponentiate_seen = scaled_exponentials(half, block_N, scale, guard_empty=False)
    add_row_sums = quad_partial_sums(half, block_N)
    mask = visibility_mask(half, block_N, causal, window)
    cap = soft_cap(half, block_N, params.cap_scale) if capped else None
    whole_tiles = unmasked_tiles(causal, window, half, block_N)
    persistent = config.persistent_ctas > 0
    if persistent and source is KVSource.CONTIGUOUS:
        raise ValueError(
            "config: expected persistent_ctas 0 for the contiguous cache (tiles.sm90_config "
            f"says why), got {config.persistent_ctas}"
        )
    store_lse = write_lse(half, params.scale, source.ragged_q) if lse else None
    # Outputs are staged in shared memory for a TMA store, persistent ones in tiles of their own.
    # A ragged or paged tile that ends past its sequence's q_len is stored from registers, row by
    # row, instead (a TMA store would write the next sequence's rows).
    stages_output = persistent

    @T.macro
    def softmax_step(
        s: Any, m: Any, m_prev: Any, alpha: Any, sums: Any, l: Any, first: Any, masked: Any
    ) -> None:
        """The softmax of key tile `s` (`masked`: some row may see none of its keys): probabilities in
        `s`, the statistics, and the row sums: added to the partial sums `sums` (`partial_sums`;
        `l` is their total once the query tile is done), or (`sums` scratch) into `l`."""
        if partial_sums:
            if masked:
                exponentiate(s, m, m_prev, alpha, first)
            else:
                exponentiate_seen(s, m, m_prev, alpha, first)
            add_row_sums(s, sums, alpha, first)
        elif masked:
            softmax(s, m, m_prev, alpha, sums, l, first)
        else:
            softmax_seen(s, m, m_prev, alpha, sums, l, first)

    @T.macro
    def release_before(barriers: Any, index: Any, maxima: Any) -> None:
        """Arrive on barriers[index] ahead of everything that reads the row maxima fragment `maxima`
        (its values unchanged, tied to the arrive; see TIED_RELEASE_SOURCE): once per thread, since
        the free barriers count every consumer thread. (The barrier goes in as its array and index:
        a macro argument that is an element is copied into a local.)"""
        state = T.alloc_var("uint64", init=T.call_extern("uint64", "tileprefill_arrive", barriers[index]))
        for i in T.Parallel(half):
            maxima[i] = T.call_extern(ACCUM, "tileprefill_tie", maxima[i], state)

    @T.macro
    def copy_rows(
        src: Any, dst: Any, slot: Any, barriers: Any, barrier_index: Any, k: Any, w: Work, bt: Any
    ) -> None:
        """Start loading key tile k of `src` (K or V) into dst[slot]; barriers[barrier_index] counts
        its bytes."""
        if source is KVSource.DENSE or source is KVSource.CONTIGUOUS:
            T.tma_copy(
                src[w.seq, k * block_N : (k + 1) * block_N, w.kv_head, :],
                dst[slot, :, :],
                barrier=barriers[barrier_index],
                eviction_policy=KV_EVICTION,
            )
        elif source is KVSource.RAGGED:
            start = w.kv_first + k * block_N
            T.tma_copy(
                src[start : start + block_N, w.kv_head, :],
                dst[slot, :, :],
                barrier=barriers[barrier_index],
                eviction_policy=KV_EVICTION,
            )
        elif source is KVSource.PAGED_TILED:
            if page_size >= block_N:
                # The tile lies inside one page (block_N divides page_size).
                page = bt[w.seq, (k * block_N) // page_size]
                row = (k * block_N) % page_size
                T.tma_copy(
                    src[page, row : row + block_N, w.kv_head, :],
                    dst[slot, :, :],
                    barrier=barriers[barrier_index],
                    eviction_policy=KV_EVICTION,
                )
            else:
                # The tile is whole pages; pages past the sequence re-read its last page
                # (their rows are masked and, for V, zeroed) so that no block-table entry
                # the call does not own is read.
                # One copy per page and 64-column panel of the swizzled tile.
                per_tile = block_N // page_size
                last_page = (w.kv_len - 1) // page_size
                for i in T.unroll(per_tile):
                    page = bt[w.seq, T.min(k * per_tile + i, last_page)]
                    for c in T.unroll(D // panel):
                        T.tma_copy(
                            src[page, 0:page_size, w.kv_head, c * panel : (c + 1) * panel],
                            dst[slot, i * page_size : (i + 1) * page_size, c * panel : (c + 1) * panel],
                            barrier=barriers[barrier_index],
                            eviction_policy=KV_EVICTION,
                        )
        else:
            # Any page size: gather row by row with cp.async. Positions past the
            # sequence re-read its last key (finite data; masked in the scores).
            for j, d in T.Parallel(block_N, D, prefer_async=True):
                pos = T.min(k * block_N + j, w.kv_len - 1)
                dst[slot, j, d] = src[bt[w.seq, pos // page_size], pos % page_size, w.kv_head, d]
            T.fence_proxy_async()

    @T.macro
    def produce_tile(w: Work, b: _Buffers, kbase: Any, qround: Any, landed: Any) -> None:
        """Load the Q tile of `w`, then its key tiles in the order the consumers use them:
        K(0), then K(k) before V(k - 1), so a K tile never waits behind the previous V's slot.
        `kbase` key tiles and `qround` Q tiles went through the rings before this one, and
        `landed` partial V tiles through the v_landed barrier (at most one a query tile)."""
        if w.tiles > 0:
            if persistent:
                T.mbarrier_wait_parity(b.q_free, (qround % 2) ^ 1)
            for c in consumer_ids:
                rows = w.q0 + c * half
                if source.ragged_q:
                    T.tma_copy(
                        b.Q[w.q_first + rows : w.q_first + rows + half, w.head, :],
                        b.Qs[c],
                        barrier=b.q_full,
                        eviction_policy=Q_EVICTION,
                    )
                else:
                    T.tma_copy(
                        b.Q[w.seq, rows : rows + half, w.head, :],
                        b.Qs[c],
                        barrier=b.q_full,
                        eviction_policy=Q_EVICTION,
                    )
            T.mbarrier_arrive(b.q_full)
        for k in T.serial(w.tiles + 1):
            if k < w.tiles:
                slot = (kbase + k) % stages
                T.mbarrier_wait_parity(b.k_free[slot], ((kbase + k) // stages) % 2 ^ 1)
                copy_rows(b.K, b.Ks, slot, b.k_full, slot, w.k_first + k, w, b.block_table)
                T.mbarrier_arrive(b.k_full[slot])
            if k > 0:
                v = k - 1
                slot = (kbase + v) % stages
                T.mbarrier_wait_parity(b.v_free[slot], ((kbase + v) // stages) % 2 ^ 1)
                if cleans_tail:
                    if (w.k_first + v + 1) * block_N > w.kv_len:
                        # The only partial tile of the sequence: let it land, zero the rows
                        # past kv_len, then publish it.
                        copy_rows(b.V, b.Vs, slot, b.v_landed, 0, w.k_first + v, w, b.block_table)
                        T.mbarrier_arrive(b.v_landed)
                        T.mbarrier_wait_parity(b.v_landed, landed % 2)
                        for j, d in T.Parallel(block_N, D):
                            if (w.k_first + v) * block_N + j >= w.kv_len:
                                b.Vs[slot, j, d] = T.cast(0, dtype)
                        T.fence_proxy_async()
                    else:
                        copy_rows(b.V, b.Vs, slot, b.v_full, slot, w.k_first + v, w, b.block_table)
                else:
                    copy_rows(b.V, b.Vs, slot, b.v_full, slot, w.k_first + v, w, b.block_table)
                T.mbarrier_arrive(b.v_full[slot])

    @T.macro
    def attend_tile(
        c: Any,
        k: Any,
        kbase: Any,
        w: Work,
        b: _Buffers,
        s: Any,
        p: Any,
        o: Any,
        m: Any,
        m_prev: Any,
        alpha: Any,
        sums: Any,
        l: Any,
        masked: Any,
    ) -> None:
        """Key tile k >= 1 for consumer c: S_k = Q K_k^T and O += P_{k-1} V_{k-1} (in the turn window
        in which the consumers take turns issuing GEMMs, each handing the turn to the next), then,
        once S_k is done, its mask under the P V product; once that is done, the V slot's release,
        the softmax of S_k (its row maxima may start earlier) and O *= alpha_k."""
        n = kbase + k
        slot = n % stages
        prev = (n - 1) % stages
        T.sync_threads(TURN_BARRIER + c, TURN_THREADS)
        T.mbarrier_wait_parity(b.k_full[slot], (n // stages) % 2)
        T.wgmma_gemm(b.Qs[c], b.Ks[slot, :, :], s, transpose_B=True, policy=policy, clear_accum=True)
        T.mbarrier_wait_parity(b.v_full[prev], ((n - 1) // stages) % 2)
        T.wgmma_gemm(p, b.Vs[prev, :, :], o, policy=policy)
        T.named_barrier_arrive(TURN_BARRIER + (c + 1) % consumers, TURN_THREADS)
        T.wait_wgmma(1)
        # Pin the accumulators after the waits, so nvcc reads none of them earlier (the count is
        # a thread's registers: the fragment's elements over the warpgroup's 128 threads).
        T.warpgroup_fence_operand(s, num_regs=half * block_N // 128)
        T.mbarrier_arrive(b.k_free[slot])
        if capped:
            cap(s)
        if masked:
            mask(s, w.q0 + c * half, (w.k_first + k) * block_N, w.kv_len, w.offset)
        T.wait_wgmma(0)
        T.warpgroup_fence_operand(o, num_regs=half * D // 128)
        # V_{k-1} is free as soon as its product is: the exponentials read the row maxima through
        # the release, so ptxas keeps it ahead of them.
        release_before(b.v_free, prev, m)
        softmax_step(s, m, m_prev, alpha, sums, l, False, masked)
        for i, j in T.Parallel(half, D):
            o[i, j] *= alpha[i]
        T.copy(s, p)

    @T.macro
    def store_staged(c: Any, o: Any, b: _Buffers, rows: Any) -> None:
        """Consumer c's output tile `o`, staged in shared memory, then one TMA store to `rows`."""
        if persistent:
            # The previous tile's store has read the staging tile (its issuing thread
            # waited for that).
            T.sync_threads(EPILOGUE_BARRIER + c, 128)
        T.copy(o, b.Os[c])
        T.fence_proxy_async()
        T.sync_threads(EPILOGUE_BARRIER + c, 128)
        T.copy(b.Os[c], rows)

    @T.macro
    def store_rows(o: Any, b: _Buffers, w: Work, row0: Any) -> None:
        """Consumer rows row0.. of a ragged tile `o`, element by element from registers, each row
        only if it is below q_len: the rows past it belong to the next sequence. (Seen on paged
        32 x (512 + 128), where every tile went this way: 13% of the warp samples were in these
        4-byte stores; whole tiles now go through `store_staged`.)"""
        for i, d in T.Parallel(half, D):
            if row0 + i < w.q_len:
                b.O[w.q_first + row0 + i, w.head, d] = T.cast(o[i, d], dtype)

    @T.macro
    def consume_tile(c: Any, w: Work, b: _Buffers, kbase: Any, qround: Any, f: Any) -> None:
        """Consumer c's 64 rows of the query tile of `w` (see produce_tile for kbase, qround)."""
        s, p, o, m, m_prev, alpha, sums, l = f
        row0 = w.q0 + c * half
        T.fill(o, 0)
        if partial_sums:
            T.fill(sums, 0)
        else:
            T.fill(l, 0)
        if w.tiles > 0:
            T.mbarrier_wait_parity(b.q_full, qround % 2)
            if c == consumers - 1 and not persistent:
                # Consumer 0 issues first: the last one hands it the first turn.
                T.named_barrier_arrive(TURN_BARRIER, TURN_THREADS)
            first = kbase % stages
            T.sync_threads(TURN_BARRIER + c, TURN_THREADS)
            T.mbarrier_wait_parity(b.k_full[first], (kbase // stages) % 2)
            T.wgmma_gemm(b.Qs[c], b.Ks[first, :, :], s, transpose_B=True, policy=policy, clear_accum=True)
            T.named_barrier_arrive(TURN_BARRIER + (c + 1) % consumers, TURN_THREADS)
            T.wait_wgmma(0)
            T.mbarrier_arrive(b.k_free[first])
            if capped:
                cap(s)
            mask(s, row0, w.k_first * block_N, w.kv_len, w.offset)
            softmax_step(s, m, m_prev, alpha, sums, l, True, True)
            T.copy(s, p)
            # Tiles [lo, hi) (counted from k_first) are seen whole by every row of this consumer;
            # the others after the first run masked: before lo (a window's lower edge) and from hi
            # (the causal diagonal, the partial last tile).
            lo, hi = whole_tiles(row0, w.kv_len, w.offset)
            start = T.min(w.tiles, T.max(1, lo - w.k_first))
            split = T.max(start, T.min(w.tiles, hi - w.k_first))
            if windowed:
                for k in T.serial(1, start):
                    attend_tile(c, k, kbase, w, b, s, p, o, m, m_prev, alpha, sums, l, True)
            for k in T.serial(start, split):
                attend_tile(c, k, kbase, w, b, s, p, o, m, m_prev, alpha, sums, l, False)
            for k in T.serial(split, w.tiles):
                attend_tile(c, k, kbase, w, b, s, p, o, m, m_prev, alpha, sums, l, True)
            if persistent:
                # Every Q K^T of the tile is done: the next tile's Q may land.
                T.mbarrier_arrive(b.q_free)
            last = (kbase + w.tiles - 1) % stages
            T.mbarrier_wait_parity(b.v_full[last], ((kbase + w.tiles - 1) // stages) % 2)
            T.wgmma_gemm(p, b.Vs[last, :, :], o, policy=policy)
            T.wait_wgmma(0)
            T.mbarrier_arrive(b.v_free[last])
        if partial_sums:
            # The quads' partial sums, added up: the row sums (0 for a tile without keys).
            T.reduce_sum(sums, l, dim=1)
        if lse:
            store_lse(b.LSE, m, l, w, row0)
        # One reciprocal a row, not a division an element (alpha is free now). A row that saw
        # no key (l == 0) is 0 exactly, even where P V met a NaN value (0 * NaN); a NaN l (a NaN in
        # this row's inputs) stays NaN: the README's NaN policy.
        for i in T.Parallel(half):
            alpha[i] = T.if_then_else(l[i] != 0, 1.0 / l[i], 0)
        for i, j in T.Parallel(half, D):
            o[i, j] = T.if_then_else(l[i] != 0, o[i, j] * alpha[i], 0)
        if source.ragged_q and persistent:
            if row0 + half <= w.q_len:
                store_staged(c, o, b, b.O[w.q_first + row0 : w.q_first + row0 + half, w.head, :])
            else:
                store_rows(o, b, w, row0)
        elif source.ragged_q:
            # One CTA a tile stages in Qs, which the producer's TMA wrote: TileLang then syncs the
            # consumer before the staging write, and cannot inside a branch on q_len (a compile
            # error: the barrier's threads are not warp-uniform to it).
            store_rows(o, b, w, row0)
        else:
            # Rows past Sq fall outside the tensor and are dropped by the TMA store.
            store_staged(c, o, b, b.O[w.seq, row0 : row0 + half, w.head, :])

    @T.macro
    def fragments() -> Any:
        s = T.alloc_fragment([half, block_N], ACCUM)
        p = T.alloc_fragment([half, block_N], dtype)
        o = T.alloc_fragment([half, D], ACCUM)
        m = T.alloc_fragment([half], ACCUM)
        m_prev = T.alloc_fragment([half], ACCUM)
        alpha = T.alloc_fragment([half], ACCUM)
        # The running partial sums (see quad_partial_sums), or the row sums' scratch.
        sums = T.alloc_fragment(sums_shape, ACCUM)
        l = T.alloc_fragment([half], ACCUM)
        return s, p, o, m, m_prev, alpha, sums, l

    @T.macro
    def buffers(Q: Any, K: Any, V: Any, O: Any, LSE: Any, block_table: Any) -> _Buffers:
        T.import_source(TIED_RELEASE_SOURCE)
        Qs = tuple(T.alloc_shared([half, D], dtype) for _ in consumer_ids)
        Ks = T.alloc_shared([stages, block_N, D], dtype)
        Vs = T.alloc_shared([stages, block_N, D], dtype)
        layouts = {tile: make_swizzled_layout(tile) for tile in (*Qs, Ks, Vs)}
        Os: tuple[Any, ...] = Qs
        if stages_output:
            # One buffer for all consumers: TileLang's shared-memory planner orders the
            # warp-specialized regions one after another and would otherwise overlay a
            # consumer-1-only tile on Qs[0], which the producer refills meanwhile.
            Ost = T.alloc_shared([consumers, half, D], dtype)
            layouts[Ost] = make_swizzled_layout(Ost)
            Os = tuple(Ost[c, :, :] for c in consumer_ids)
        T.annotate_layout(layouts)
        # Every arrival is by a whole warpgroup; TMA bytes are counted on top.
        q_full = T.alloc_barrier([PRODUCER_THREADS])
        q_free = T.alloc_barrier([consumer_threads])
        k_full = T.alloc_barrier([PRODUCER_THREADS] * stages)
        v_full = T.alloc_barrier([PRODUCER_THREADS] * stages)
        k_free = T.alloc_barrier([consumer_threads] * stages)
        v_free = T.alloc_barrier([consumer_threads] * stages)
        v_landed = T.alloc_barrier([PRODUCER_THREADS])
        return _Buffers(
            Q,
            K,
            V,
            O,
            LSE,
            block_table,
            Qs,
            Os,
            Ks,
            Vs,
            q_full,
            q_free,
            k_full,
            v_full,
            k_free,
            v_free,
            v_landed,
        )

    @T.macro
    def attend(w: Work, Q: Any, K: Any, V: Any, O: Any, LSE: Any, block_table: Any) -> None:
        """One query tile per CTA."""
        b = buffers(Q, K, V, O, LSE, block_table)
        with T.ws(consumers):
            T.set_max_nreg(producer_regs, 0)
            produce_tile(w, b, 0, 0, 0)
        for c in consumer_ids:
            with T.ws(c):
                T.set_max_nreg(consumer_regs, 1)
                consume_tile(c, w, b, 0, 0, fragments())

    @T.macro
    def consume_all(c: Any, schedule: Schedule, b: _Buffers) -> None:
        T.set_max_nreg(consumer_regs, 1)
        f = fragments()
        kbase = T.alloc_var("int32", init=0)
        qround = T.alloc_var("int32", init=0)
        if c == consumers - 1:
            # Consumer 0 issues first; afterwards the turns go round across tiles.
            T.named_barrier_arrive(TURN_BARRIER, TURN_THREADS)
        walk = schedule.begin()
        for i in T.serial(schedule.count):
            w = schedule.work(i, walk)
            consume_tile(c, w, b, kbase, qround, f)
            kbase = kbase + w.tiles
            qround = qround + T.if_then_else(w.tiles > 0, 1, 0)

    @T.macro
    def attend_tiles(schedule: Schedule, Q: Any, K: Any, V: Any, O: Any, LSE: Any, block_table: Any) -> None:
        """Persistent: the CTA's query tiles one after another; the K/V rings and the Q tile's
        barriers run on across tiles (phases counted by kbase and qround)."""
        b = buffers(Q, K, V, O, LSE, block_table)
        with T.ws(consumers):
            T.set_max_nreg(producer_regs, 0)
            kbase = T.alloc_var("int32", init=0)
            qround = T.alloc_var("int32", init=0)
            landed = T.alloc_var("int32", init=0)
            walk = schedule.begin()
            for i in T.serial(schedule.count):
                w = schedule.work(i, walk)
                produce_tile(w, b, kbase, qround, landed)
                kbase = kbase + w.tiles
                qround = qround + T.if_then_else(w.tiles > 0, 1, 0)
                if cleans_tail:
                    landed = landed + T.if_then_else(
                        (w.tiles > 0) & ((w.k_first + w.tiles) * block_N > w.kv_len), 1, 0
                    )
        for c in consumer_ids:
            with T.ws(c):
                consume_all(c, schedule, b)

    if persistent and source is KVSource.DENSE:
        return persistent_program(source, head_dim, dtype, causal, config, attend_tiles, params, lse)
    if persistent:
        return persistent_packed_program(
            source, head_dim, dtype, causal, page_size, config, attend_tiles, params, lse
        )
    return entry_program(source, head_dim, dtype, causal, page_size, config, attend, params, lse)
