"""Pieces shared by the SM80 and SM90 attention programs.

Every attention program computes, for one tile of query rows of one query head,
an online softmax over tiles of keys (FlashAttention): running row maxima `m`,
running row sums `l`, and an fp32 output accumulator rescaled by
`alpha = exp2((m_old - m_new) * scale)` whenever the maximum grows. Scores are
kept unscaled; `scale = ScoreParams.exp2_scale` (the score's factor times log2(e)) is folded
into the exp2 argument as one fused multiply-add per score.

Masking is by selection, never by addition: a masked score becomes -inf whatever
the key held, so a key row read from memory the call does not own (a cache row
past `kv_seqlens[b]`, even a NaN) cannot reach a visible score. A row that has
seen no visible key keeps `m = -inf`; the exponent offset is then taken as 0 so
that its probabilities are exp2(-inf) = 0 rather than NaN, its `l` stays 0, and
the program writes 0 for it. `m` itself stays -inf until the row sees a key, so a
row whose first tiles are all masked (a sliding window starting inside the CTA's
key range) later rescales from its true maximum, not from a floor of 0 (which
would underflow fp16 probabilities of rows whose scores are all far below 0).

A program is compiled for whether it caps its scores and whether it has a sliding window (each
adds code), and takes the values at launch, as scalar parameters after its tensors
(`ScoreParams`, the TIR variables its macros are built over; `scores.ScoreScalars` computes them):
- the score's factor `score_scale` (sm_scale, or softcap when capped): each thread multiplies it by
  log2(e) once, and every score then costs the one fused multiply-add it would with an immediate
  (the factor stays in a uniform register);
- a sliding window (causal only; presence static, length `window` at launch): query row r sees keys
  `(r + offset - window, r + offset]`; a CTA reads only the key tiles its rows' windows touch
  (`kv_tile_range`), so cost grows with the window, not the context. The window is compared with
  differences of positions, never added to one, so any int32 window (up to "every key") is exact;
- a logit softcap (presence static, `cap_scale = sm_scale / softcap` at launch): scores become
  `softcap * tanh(score * sm_scale / softcap)` (Gemma 2), in fp32 with the hardware tanh
  (`tanh.approx.f32` under fast math, relative error ~5e-4), before the mask. The kernel keeps
  `tanh(score * cap_scale)` and the factor `softcap` is its `score_scale`: one multiply a score
  fewer.

A third static argument, `lse`, makes a program write one more output: the
natural-log log-sum-exp of each row's scaled (and capped) visible scores, float32
(tokens, heads), from the row's statistics at the end (`write_lse`); -inf for a row
that saw no key. Without it the program is the one it always was.

Head counts are not arguments either: a program reads them from its tensors' shapes (the grid and
the schedules already read lengths at launch), and a query head's KV head is `head // group`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import tilelang.language as T

from tileprefill.kernels.tl.scores import LOG2E


@dataclasses.dataclass(frozen=True)
class ScoreParams:
    """A program's scalar parameters, in its parameter order after the tensors (`scores.ScoreScalars`
    holds their values): TIR variables, made before the prim_func so that the macros close over them,
    and declared by the prim_func as its parameters. Every program declares all three; one without a
    cap or a window does not read that one."""

    scale: Any  # float32: the natural factor of a held score (sm_scale; capped, softcap)
    cap_scale: Any  # float32: capped programs' factor inside the tanh
    window_length: Any  # int32: the window of a program with one
    windowed: bool

    @property
    def exp2_scale(self) -> Any:
        """The factor that turns a held score into an exp2 argument (a TIR expression: each thread
        computes it once, and ptxas keeps it in a uniform register across the key loop)."""
        return self.scale * LOG2E

    @property
    def window(self) -> Any | None:
        """The window as the macros take it: its length, or None in a program without one."""
        return self.window_length if self.windowed else None


def score_params(windowed: bool) -> ScoreParams:
    """New scalar parameters for one program (call once per prim_func built)."""
    return ScoreParams(
        scale=T.dynamic("score_scale", "float32"),
        cap_scale=T.dynamic("cap_scale", "float32"),
        window_length=T.dynamic("window", "int32"),
        windowed=windowed,
    )


#: The accumulation type of scores, softmax statistics and outputs.
ACCUM = "float32"


@dataclasses.dataclass(frozen=True)
class Work:
    """What one CTA computes: its sequence, head, query rows and key range (TIR scalars)."""

    seq: Any  # batch index of the sequence
    head: Any
    kv_head: Any
    q_first: Any  # token index of the sequence's first query (ragged q; 0 otherwise)
    q0: Any  # first query row of the CTA's tile, counted within the sequence
    q_len: Any  # query rows of the sequence the CTA may write (0 for a CTA without a tile)
    kv_first: Any  # token index of the sequence's first key (ragged k/v; 0 otherwise)
    kv_len: Any
    offset: Any  # kv_len - q_len: causal row r sees keys <= r + offset
    k_first: Any  # the first key tile to process (0 unless a sliding window starts later)
    tiles: Any  # key tiles to process: k_first, k_first + 1, ...


def work(
    *,
    seq: Any,
    head: Any,
    kv_head: Any,
    q_first: Any,
    q0: Any,
    q_len: Any,
    kv_first: Any,
    kv_len: Any,
    offset: Any,
    k_first: Any,
    tiles: Any,
    hold_ids: bool = False,
) -> Work:
    """A `Work` whose derived scalars are held in registers (`T.alloc_var`), computed once.

    Later index expressions then read one int32 instead of re-deriving, say, a
    ragged tile's rows from cu_seqlens in every loop, which keeps the generated
    code and TileLang's compile time small. The KV head is held too (a division by the group,
    a launch value); `hold_ids` holds the sequence and query head indices as well (a persistent
    CTA derives them from its tile index). Call inside a kernel.
    """

    def held(value: Any) -> Any:
        return T.alloc_var("int32", init=value)[0]

    if hold_ids:
        seq, head = held(seq), held(head)
    return Work(
        seq=seq,
        head=head,
        kv_head=held(kv_head),
        q_first=held(q_first),
        q0=held(q0),
        q_len=held(q_len),
        kv_first=held(kv_first),
        kv_len=held(kv_len),
        offset=held(offset),
        k_first=held(k_first),
        tiles=held(tiles),
    )


def scaled_exponentials(rows: int, cols: int, scale: Any, *, guard_empty: bool = True) -> Any:
    """The macro that turns raw scores `s` (rows, cols) into probabilities: it updates the row
    maxima `m` and leaves the fp32 probabilities in `s` and, after the first key tile, the rescale
    factor of what was accumulated so far in `alpha`. The row sums are the caller's
    (`online_softmax`).

    `first` (a Python bool) is True for the first key tile of a row tile: the statistics start
    there, so the previous maxima are not read (and `alpha` is not written). `m_prev` is scratch:
    it ends as the row's exponent offset (its scaled maximum).

    `guard_empty=False` drops the `m == -inf` select: only for tiles every row sees at least one
    key of (then the new maximum is finite).
    """
    neg_inf = -T.infinity(ACCUM)

    @T.macro
    def step(s: Any, m: Any, m_prev: Any, alpha: Any, first: Any) -> None:
        if first:
            T.reduce_max(s, m, dim=1, clear=True)
        else:
            T.copy(m, m_prev)
            T.reduce_max(s, m, dim=1, clear=False)
        # m_prev becomes the exponent offset: the scaled maximum, or 0 for a row that has seen no
        # key yet (its probabilities are then exp2(-inf) = 0; a previous maximum of -inf gives
        # alpha = 0, never -inf - -inf).
        for i in T.Parallel(rows):
            if guard_empty:
                offset = T.if_then_else(m[i] == neg_inf, 0, m[i] * scale)
            else:
                offset = m[i] * scale
            if not first:
                alpha[i] = T.exp2(m_prev[i] * scale - offset)
            m_prev[i] = offset
        for i, j in T.Parallel(rows, cols):
            s[i, j] = T.exp2(s[i, j] * scale - m_prev[i])

    return step


def online_softmax(rows: int, cols: int, scale: Any, *, guard_empty: bool = True) -> Any:
    """The macro that turns raw scores `s` (rows, cols) into probabilities and updates the statistics:
    `scaled_exponentials`, then the running row sums `l` (already rescaled by `alpha`).

    The caller casts `s` to the P @ V operand: on SM90 only once the previous asynchronous
    P @ V, which reads that operand's registers, has completed. `row_sum` is scratch.
    """
    exponentiate = scaled_exponentials(rows, cols, scale, guard_empty=guard_empty)

    @T.macro
    def step(s: Any, m: Any, m_prev: Any, alpha: Any, row_sum: Any, l: Any, first: Any) -> None:
        exponentiate(s, m, m_prev, alpha, first)
        T.reduce_sum(s, row_sum, dim=1)
        if first:
            T.copy(row_sum, l)
        else:
            for i in T.Parallel(rows):
                l[i] = l[i] * alpha[i] + row_sum[i]

    return step


def write_lse(rows: int, natural: Any, ragged_q: bool) -> Any:
    """The macro that stores the log-sum-exp of the query rows [row0, row0 + rows) of `w` into LSE
    (ragged q: (Tq, Hq), else (B, Sq, Hq)), from the online softmax's final `m` and `l`.

    `m` is the row maximum of the scores the program holds and `l` the sum of exp2((s - m) *
    natural * log2(e)), `natural` the held score's factor (`ScoreParams.scale`: sm_scale, or softcap
    for capped scores); so ln(sum exp(s * natural)) = m * natural + ln(l). A row that saw no key
    (l == 0) gets -inf; a NaN l stays NaN (the NaN policy). Rows past the sequence's q_len are not
    stored.
    """
    neg_inf = -T.infinity(ACCUM)

    @T.macro
    def store(LSE: Any, m: Any, l: Any, w: Work, row0: Any) -> None:
        for i in T.Parallel(rows):
            if row0 + i < w.q_len:
                value = T.if_then_else(l[i] != 0, m[i] * natural + T.log(l[i]), neg_inf)
                if ragged_q:
                    LSE[w.q_first + row0 + i, w.head] = value
                else:
                    LSE[w.seq, row0 + i, w.head] = value

    return store


def soft_cap(rows: int, cols: int, cap_scale: Any) -> Any:
    """The macro that caps raw scores `s` in place: s becomes tanh(s * cap_scale), cap_scale =
    sm_scale / softcap: the capped score over softcap (softcap is in the exp2 factor)."""

    @T.macro
    def apply(s: Any) -> None:
        for i, j in T.Parallel(rows, cols):
            s[i, j] = T.tanh(s[i, j] * cap_scale)

    return apply


def visibility_mask(rows: int, cols: int, causal: bool, window: Any | None = None) -> Any:
    """The macro that sets score (i, j) to -inf unless query row `row0 + i` sees key `key0 + j`.

    Keys at or past `kv_len` are never visible; with `causal`, query row r
    (counted from the start of its sequence) sees keys `<= r + kv_len - q_len`
    (bottom-right alignment; `offset = kv_len - q_len`), and with a `window` (a length, or None)
    only the last `window` of those: keys k with `r + offset - k < window`.
    """
    neg_inf = -T.infinity(ACCUM)

    @T.macro
    def apply(s: Any, row0: Any, key0: Any, kv_len: Any, offset: Any) -> None:
        for i, j in T.Parallel(rows, cols):
            if window is not None:
                s[i, j] = T.if_then_else(
                    (key0 + j < kv_len)
                    & (key0 + j <= offset + row0 + i)
                    & (offset + row0 + i - (key0 + j) < window),
                    s[i, j],
                    neg_inf,
                )
            elif causal:
                s[i, j] = T.if_then_else(
                    (key0 + j < kv_len) & (key0 + j <= offset + row0 + i), s[i, j], neg_inf
                )
            else:
                s[i, j] = T.if_then_else(key0 + j < kv_len, s[i, j], neg_inf)

    return apply


def kv_tile_count(causal: bool, block_M: int, block_N: int) -> Any:
    """The macro returning how many key tiles, from tile 0, the query rows [q0, q0 + block_M) of a
    sequence need: the end of their key range (a sliding window may start it later, see
    `kv_tile_first`)."""

    @T.macro
    def count(q0: Any, kv_len: Any, offset: Any) -> Any:
        if causal:
            # The last row of the tile sees keys [0, offset + q0 + block_M); none if that is <= 0.
            return T.ceildiv(T.max(0, T.min(kv_len, offset + q0 + block_M)), block_N)
        else:
            return T.ceildiv(kv_len, block_N)

    return count


def kv_tile_first(window: Any | None, block_N: int) -> Any:
    """The macro returning the first key tile the query rows from q0 need: the tile of the first
    row's first key in its window (0 without a window)."""

    @T.macro
    def first(q0: Any, offset: Any) -> Any:
        if window is not None:
            # The first row's first key, q0 + offset + 1 - window, or 0 (written so that no int32
            # overflows, whatever the window).
            return T.if_then_else(q0 + offset < window, 0, q0 + offset + 1 - window) // block_N
        else:
            return 0

    return first


def kv_tile_range(causal: bool, window: Any | None, block_M: int, block_N: int) -> Any:
    """The macro returning (first key tile, key tiles) of the query rows [q0, q0 + block_M) of a
    sequence: from the first row's window start (0 without a window) to the end of the last
    row's keys; no tiles when that range is empty."""
    tile_end = kv_tile_count(causal, block_M, block_N)
    tile_first = kv_tile_first(window, block_N)

    @T.macro
    def key_range(q0: Any, kv_len: Any, offset: Any) -> Any:
        end = tile_end(q0, kv_len, offset)
        first = tile_first(q0, offset)
        return first, T.max(0, end - first)

    return key_range


def sequence_length(first: Any, end: Any) -> Any:
    """The tokens of a packed sequence that starts at `first` and ends before `end`: none where `end`
    is below `first` (a decreasing cu_seqlens, which validate=False lets through)."""
    return T.max(0, end - first)


def clamped_kv_len(kv_len: Any, capacity: Any) -> Any:
    """A paged sequence's key count, cut to what its block table row holds: with validate=False a
    kv_seqlens value past max_pages * page_size must not make a program read past the table."""
    return T.max(0, T.min(kv_len, capacity))


def unmasked_tiles(causal: bool, window: Any | None, rows: int, block_N: int) -> Any:
    """The macro returning the absolute key tiles [lo, hi) that every query row in [row0, row0 + rows)
    sees whole (so they need no mask); lo >= hi when there are none."""

    @T.macro
    def bounds(row0: Any, kv_len: Any, offset: Any) -> Any:
        if causal:
            hi = T.min(kv_len, T.max(0, offset + row0 + 1)) // block_N
        else:
            hi = kv_len // block_N
        if window is not None:
            # Tile t starts inside the last row's window: t block_N > row0 + rows - 1 + offset - window.
            last = row0 + rows + offset
            lo = T.if_then_else(last <= window, 0, T.ceildiv(last - window, block_N))
        else:
            lo = 0
        return lo, hi

    return bounds


def locate_ragged_tile(block_M: int) -> Any:
    """The macro returning (sequence, query tile) of CTA `cta` of a ragged batch, found on the device.

    The grid has `T_q // block_M + B` CTAs, an upper bound on the query tiles of
    any split of T_q tokens into B sequences: sequence b owns the CTAs
    [start(b), start(b + 1)) with `start(b) = cu_seqlens_q[b] // block_M + b`,
    at least ceildiv(q_len_b, block_M) of them. A CTA finds its b by binary
    search over the monotone `start` (log2(B) reads of cu_seqlens_q) and takes
    the tiles of its sequence last-first, so the longest causal tiles start
    first. CTAs past a sequence's tiles (and all CTAs of empty sequences) get a
    tile index outside [0, ceildiv(q_len_b, block_M)) and do no work.
    """

    @T.macro
    def locate(cu_seqlens_q: Any, num_seqs: Any, cta: Any) -> Any:
        lo = T.alloc_var("int32", init=0)
        hi = T.alloc_var("int32", init=num_seqs)
        # 31 halvings cover any int32 batch; finished iterations read nothing.
        for _ in T.serial(31):
            if hi - lo > 1:
                mid = (lo + hi) // 2
                if cu_seqlens_q[mid] // block_M + mid <= cta:
                    lo = mid
                else:
                    hi = mid
        first_cta = cu_seqlens_q[lo] // block_M + lo
        ctas = cu_seqlens_q[lo + 1] // block_M + lo + 1 - first_cta
        return lo, ctas - 1 - (cta - first_cta)

    return locate
