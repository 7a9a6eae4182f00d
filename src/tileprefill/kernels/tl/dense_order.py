"""The order in which the CTAs of a persistent dense attention program take their query tiles.

The rule is written once, over integer arithmetic (+, -, * and the operations of an `Arith`:
division of values >= 0 among them), and evaluated twice: by the program on TIR expressions (`TIR_ARITH`, in
`attention_entries.persistent_program`) and by its Python model on ints (`PYTHON_ARITH`, in
`tiles_of`, `first_wave_kv_bytes` and `balance`). The model is what the CPU tests check: that the
order is a permutation of the tiles, how much K/V the first wave of resident CTAs reads, and how
evenly the CTAs are loaded. Pure Python: no TileLang import.

A *tile* is one query tile (block_M rows) of one (sequence, query head); a *section* is one
(sequence, KV head) with its `group` query heads, which share that K/V. A causal tile j (of
`m_tiles`, counted from the sequence's start) reads about j + 1 key tiles, so tiles differ in cost
by up to m_tiles times.

The order, causal:

- *Bands*: the query tiles are cut into bands of `width` tile indices, the longest first (band 0
  holds tiles m_tiles - 1 down to m_tiles - width; the last band may be narrower). Inside a band
  the sections follow one another, each section's tiles of the band longest first with its query
  heads fastest: `group * width` consecutive tiles read one section's K/V.
- *Units*: with `width` >= 2 a unit is two tiles of one band, its q-th and its (n - 1 - q)-th (n
  tiles in the band): each section's run of tiles inside the band goes from long to short, so
  the two tiles' key tiles add up to the same count for every unit of the band. With `width` 1
  a unit is one tile. A CTA runs a unit's tiles one after the other.
- *Rounds*: round r deals units [r ctas, (r + 1) ctas), snake-wise (odd rounds reversed), so a
  CTA that took a band's last, dearer unit in a round takes one of the next band's cheaper
  units first in the next.

So the tiles that the resident CTAs run together (two rounds: 2 ctas units) come from about
`2 ctas per_unit / (group width)` sections: `width` is the smallest even count that keeps their
K/V under RESIDENT_KV_BYTES (from the sequence length, a runtime value), or 1 (global
longest-first, every round on tiles of one length) where that already does: when the group alone
makes the sections few enough, or when the whole batch's K/V is under the bound anyway.

Balance: every unit of a band costs the same, bands get cheaper down the order, and the tail is
the cheapest band. Dealing single tiles of mixed lengths in rounds instead (the band's tiles
longest first, no units) loads CTAs unevenly: a round holds only some CTAs' long tiles, and the
next round does not even that out unless the band's layout lines up with the CTA count (measured
22% slower at S 8192 with sections of one KV head's whole sequence).

Non-causal: one band of the whole sequence (`width` = m_tiles), units of one tile: sections of
one (sequence, KV head) one after another, its query heads fastest; every tile costs the same.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

#: K/V bytes that the tiles of two rounds of resident CTAs may read together: about half of the
#: 50 MB L2 of an H100 or H200 (a D 128 tile does ~128 FLOP a byte of K/V it reads, under those
#: GPUs' ~200 FLOP a byte of HBM, so most of its K/V reads must hit L2). The first wave (one round)
#: reads about half of it.
RESIDENT_KV_BYTES = 32 << 20


@dataclasses.dataclass(frozen=True)
class Arith:
    """The operations the order needs beyond +, - and *."""

    minimum: Callable[[Any, Any], Any]
    maximum: Callable[[Any, Any], Any]
    select: Callable[[Any, Any, Any], Any]  # (condition, if true, if false)
    # A value computed once and read by what follows (a register in a program: without it, every
    # use would repeat the expression, and TileLang's simplifier works through the nested whole).
    hold: Callable[[Any], Any]
    # Quotient and remainder of operands the order knows are >= 0 (its indices and counts): in a
    # program, C's truncating division, which floor division would wrap in sign corrections.
    div: Callable[[Any, Any], Any]
    mod: Callable[[Any, Any], Any]


def _select(condition: Any, if_true: Any, if_false: Any) -> Any:
    return if_true if condition else if_false


def _same(value: Any) -> Any:
    return value


#: The order on Python ints (the model).
PYTHON_ARITH = Arith(min, max, _select, _same, operator.floordiv, operator.mod)


@dataclasses.dataclass(frozen=True)
class DenseOrder:
    """What the order of one program depends on: its static facts (`ctas`, `causal`,
    `kv_key_bytes`) and its launch's head counts, ints in the model and TIR expressions in a
    program (which reads them from its tensors' shapes)."""

    ctas: int
    heads: Any
    kv_heads: Any
    causal: bool
    kv_key_bytes: int  # bytes of one key's K and V rows (2 x head_dim x element size)

    def __post_init__(self) -> None:
        counts = (self.heads, self.kv_heads)
        # A program's counts are checked where its launch is: the Op's inputs.
        bad_heads = all(isinstance(n, int) for n in counts) and (
            self.kv_heads <= 0 or self.heads % self.kv_heads
        )
        if self.ctas <= 0 or bad_heads:
            raise ValueError(
                "DenseOrder: expected ctas > 0 and heads a multiple of kv_heads > 0, "
                f"got ctas={self.ctas}, heads={self.heads}, kv_heads={self.kv_heads}"
            )

    @property
    def group(self) -> Any:
        """Query heads a KV head (an int, or a TIR expression)."""
        return self.heads // self.kv_heads


@dataclasses.dataclass(frozen=True)
class BandLayout:
    """The per-launch layout (ints, or TIR expressions): `width` tile indices a band, `per_unit`
    tiles a unit (1 or 2)."""

    width: Any
    per_unit: Any
    units_per_band: Any  # units of a band `width` tiles wide
    last_band: Any  # the index of the last band


def band_layout(order: DenseOrder, batch: Any, seq_kv: Any, m_tiles: Any, ar: Arith) -> BandLayout:
    """The band layout of a launch (see the module docstring), each value held (a register of the
    program) across its tiles: a tile's own arithmetic then divides by launch values only for its
    band (causal), its section and its head."""
    if not order.causal:
        width = ar.maximum(m_tiles, 1)
        return BandLayout(width, 1, batch * order.heads * width, 0)
    resident_keys = RESIDENT_KV_BYTES // order.kv_key_bytes
    # Keys of each section the tiles of two rounds may read, were they spread over 2 ctas sections.
    keys_per_slot = max(1, resident_keys // (2 * order.ctas))
    # Tiles of one section in two rounds that keep the resident K/V under the bound.
    tiles_needed = ar.div(seq_kv + keys_per_slot - 1, keys_per_slot)
    batch_fits = batch * order.kv_heads <= ar.div(resident_keys, ar.maximum(seq_kv, 1))
    group = ar.div(order.heads, order.kv_heads)
    wide = 2 * ar.div(tiles_needed + 2 * group - 1, 2 * group)
    width = ar.hold(ar.select(tiles_needed <= group, 1, ar.select(batch_fits, 1, wide)))
    single = width == 1
    units_per_band = ar.select(single, batch * order.heads, ar.div(batch * order.heads * width, 2))
    last_band = ar.select(single, m_tiles - 1, ar.div(m_tiles + width - 1, width) - 1)
    return BandLayout(width, ar.minimum(width, 2), ar.hold(units_per_band), ar.hold(last_band))


def tile_count(order: DenseOrder, cta: Any, batch: Any, m_tiles: Any, layout: BandLayout, ar: Arith) -> Any:
    """How many tiles CTA `cta` runs."""
    total = batch * order.heads * m_tiles
    units = ar.select(layout.per_unit == 1, total, ar.div(total + 1, 2))  # per_unit is 1 or 2
    rounds = ar.div(units, order.ctas)
    mine = rounds + ar.select(_dealt(order, cta, rounds, ar) < ar.mod(units, order.ctas), 1, 0)
    # The last unit holds one tile when the tile count is odd (per_unit 2): the middle of the last band.
    last = units - 1
    holds_last = _dealt(order, ar.mod(last, order.ctas), ar.div(last, order.ctas), ar) == cta
    return layout.per_unit * mine - ar.select(holds_last, layout.per_unit * units - total, 0)


def tile_at(
    order: DenseOrder, cta: Any, i: Any, batch: Any, m_tiles: Any, layout: BandLayout, ar: Arith
) -> tuple[Any, Any, Any]:
    """(sequence, query head, query tile) of CTA `cta`'s i-th tile, 0 <= i < tile_count."""
    width = layout.width
    # A unit's arithmetic runs before its tiles, on every warpgroup: units of one tile (every
    # non-causal launch, and causal ones whose bands are one tile wide) take i as their index, and a
    # non-causal launch's one band takes no division.
    single = layout.per_unit == 1
    k = ar.hold(ar.select(single, i, ar.div(i, 2)))
    unit = ar.hold(k * order.ctas + _dealt(order, cta, k, ar))
    if order.causal:
        band = ar.hold(ar.minimum(ar.div(unit, layout.units_per_band), layout.last_band))
        u = unit - band * layout.units_per_band
        band_width = ar.hold(ar.minimum(width, m_tiles - band * width))
    else:  # one band of the whole sequence
        band, u, band_width = 0, unit, width
    # The unit's first tile is the band's u-th, its second (per_unit 2) the band's (n - 1 - u)-th.
    q = ar.hold(
        ar.select(single, u, ar.select(ar.mod(i, 2) == 0, u, batch * order.heads * band_width - 1 - u))
    )
    # The query heads of a KV head: a launch value in a program (it reads both counts from its
    # tensors), so one division by `run` serves bands of every width.
    group = ar.hold(ar.div(order.heads, order.kv_heads))
    run = group * band_width  # tiles of one section in the band
    section = ar.hold(ar.div(q, run))
    r = ar.hold(q - section * run)
    seq = ar.div(section, order.kv_heads)
    head = ar.mod(section, order.kv_heads) * group + ar.mod(r, group)
    return seq, head, m_tiles - 1 - band * width - ar.div(r, group)


def _dealt(order: DenseOrder, cta: Any, k: Any, ar: Arith) -> Any:
    """The place in round k of CTA `cta`'s unit: snake dealing, odd rounds reversed."""
    return ar.select(ar.mod(k, 2) == 0, cta, order.ctas - 1 - cta)


# ---------------------------------------------------------------- the model


def tiles_of(order: DenseOrder, batch: int, seq_kv: int, m_tiles: int) -> list[list[tuple[int, int, int]]]:
    """Each CTA's (sequence, query head, query tile) list, in the order it runs them."""
    layout = band_layout(order, batch, seq_kv, m_tiles, PYTHON_ARITH)
    return [
        [
            tile_at(order, cta, i, batch, m_tiles, layout, PYTHON_ARITH)
            for i in range(tile_count(order, cta, batch, m_tiles, layout, PYTHON_ARITH))
        ]
        for cta in range(order.ctas)
    ]


@dataclasses.dataclass(frozen=True)
class Shape:
    """A dense launch and the tile sizes of its program, for the model's key ranges."""

    batch: int
    seq_q: int
    seq_kv: int
    block_M: int
    block_N: int
    window: int = 0

    @property
    def m_tiles(self) -> int:
        return -(-self.seq_q // self.block_M)

    def key_tiles(self, causal: bool, tile: int) -> tuple[int, int]:
        """The key tiles [first, end) query tile `tile` reads: the rule of
        `attention_parts.kv_tile_range`, on ints."""
        q0 = tile * self.block_M
        offset = self.seq_kv - self.seq_q
        if causal:
            end = -(-max(0, min(self.seq_kv, offset + q0 + self.block_M)) // self.block_N)
        else:
            end = -(-self.seq_kv // self.block_N)
        first = max(0, q0 + offset - self.window + 1) // self.block_N if self.window else 0
        return first, max(first, end)


def first_wave_kv_bytes(order: DenseOrder, shape: Shape) -> int:
    """K/V bytes the first tile of every CTA reads (the resident CTAs at the launch): per section,
    the span of key tiles those tiles read."""
    spans: dict[tuple[int, int], tuple[int, int]] = {}
    for tiles in tiles_of(order, shape.batch, shape.seq_kv, shape.m_tiles):
        if not tiles:
            continue
        seq, head, tile = tiles[0]
        first, end = shape.key_tiles(order.causal, tile)
        if end > first:
            low, high = spans.get((seq, head // order.group), (first, end))
            spans[(seq, head // order.group)] = (min(low, first), max(high, end))
    keys = sum(
        min(shape.seq_kv, end * shape.block_N) - first * shape.block_N for first, end in spans.values()
    )
    return keys * order.kv_key_bytes


def balance(order: DenseOrder, shape: Shape, tile_overhead: float = 1.0) -> float:
    """The busiest CTA's work over the mean: a tile costs its key tiles plus `tile_overhead` (its
    Q load, first product and epilogue, in key tiles)."""
    loads = [
        sum(_width(shape.key_tiles(order.causal, tile)) + tile_overhead for _, _, tile in tiles)
        for tiles in tiles_of(order, shape.batch, shape.seq_kv, shape.m_tiles)
    ]
    return max(loads) * len(loads) / sum(loads)


def _width(key_range: tuple[int, int]) -> int:
    return key_range[1] - key_range[0]
