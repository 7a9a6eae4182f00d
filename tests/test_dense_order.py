"""The order of the persistent dense attention program's tiles, checked on its Python model.

`kernels/tl/dense_order.py` states the rule once; the program evaluates it on TIR expressions and
the model on ints. Here: every tile runs exactly once, for many shapes and CTA counts; the K/V that
the first wave of resident CTAs reads stays under the L2 bound for the group-1 causal shapes
(where the previous order, query heads fastest over the whole launch, read 66-256 MB against a
50 MB L2); the CTAs stay as evenly loaded as under that order; and the TIR expressions compute
the model's numbers.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tileprefill.bench.first_wave import first_waves
from tileprefill.bench.first_wave import main as first_wave_main
from tileprefill.bench.scoreboard import scoreboard_cases
from tileprefill.kernels.tl.dense_order import (
    PYTHON_ARITH,
    RESIDENT_KV_BYTES,
    DenseOrder,
    Shape,
    balance,
    band_layout,
    first_wave_kv_bytes,
    tile_at,
    tile_count,
    tiles_of,
)

MB = 1 << 20
H100_CTAS = 132


def _order(heads: int, kv_heads: int, causal: bool, head_dim: int = 128, ctas: int = H100_CTAS) -> DenseOrder:
    return DenseOrder(ctas=ctas, heads=heads, kv_heads=kv_heads, causal=causal, kv_key_bytes=4 * head_dim)


def _shape(batch: int, seq: int, head_dim: int = 128) -> Shape:
    """A dense launch at the SM90 tile sizes (192 x 128 at D 64, 128 x 128 at D 128)."""
    return Shape(batch, seq, seq, 192 if head_dim == 64 else 128, 128)


def _heads_fastest(order: DenseOrder, batch: int, m_tiles: int) -> list[list[tuple[int, int, int]]]:
    """The previous causal order: query heads fastest, then sequences, then query tiles longest
    first over the whole launch, dealt round-robin."""
    tiles: list[list[tuple[int, int, int]]] = [[] for _ in range(order.ctas)]
    for t in range(batch * order.heads * m_tiles):
        rest = t // order.heads
        tiles[t % order.ctas].append((rest % batch, t % order.heads, m_tiles - 1 - rest // batch))
    return tiles


def _first_wave_bytes(order: DenseOrder, shape: Shape, tiles: list[list[tuple[int, int, int]]]) -> int:
    keys: dict[tuple[int, int], int] = {}
    for cta_tiles in tiles:
        if cta_tiles:
            seq, head, tile = cta_tiles[0]
            end = shape.key_tiles(order.causal, tile)[1]
            keys[(seq, head // order.group)] = max(keys.get((seq, head // order.group), 0), end)
    return sum(min(shape.seq_kv, end * shape.block_N) for end in keys.values()) * order.kv_key_bytes


def _balance(order: DenseOrder, shape: Shape, tiles: list[list[tuple[int, int, int]]]) -> float:
    loads = [sum(1.0 + shape.key_tiles(order.causal, t)[1] for _, _, t in cta) for cta in tiles]
    return max(loads) * len(loads) / sum(loads)


def _assert_every_tile_once(order: DenseOrder, batch: int, seq_kv: int, m_tiles: int) -> None:
    got = [tile for cta in tiles_of(order, batch, seq_kv, m_tiles) for tile in cta]
    want = itertools.product(range(batch), range(order.heads), range(m_tiles))
    assert sorted(got) == sorted(want)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("batch", "seq", "heads", "kv_heads", "ctas"),
    [
        (8, 2048, 32, 32, 132),  # bands of 10 tiles, two-tile units
        (2, 8192, 32, 32, 132),
        (1, 8192, 32, 8, 132),  # the batch's K/V fits: one tile length a band
        (3, 3000, 5, 5, 132),  # an odd tile count: the last unit holds one tile
        (3, 777, 5, 1, 114),
        (1, 100, 1, 1, 132),  # one tile for 132 CTAs
        (2, 300, 32, 8, 78),
        (4, 4096, 64, 4, 3),
        (5, 1000, 7, 7, 1),
    ],
)
def test_the_order_runs_every_tile_once(
    batch: int, seq: int, heads: int, kv_heads: int, ctas: int, causal: bool
) -> None:
    order = _order(heads, kv_heads, causal, ctas=ctas)
    _assert_every_tile_once(order, batch, seq, _shape(batch, seq).m_tiles)


@settings(max_examples=150, deadline=None)
@given(
    batch=st.integers(1, 6),
    kv_heads=st.integers(1, 4),
    group=st.integers(1, 6),
    m_tiles=st.integers(1, 40),
    seq_kv=st.integers(1, 1 << 20),
    ctas=st.integers(1, 140),
    causal=st.booleans(),
)
def test_the_order_runs_every_tile_once_for_any_launch(
    batch: int, kv_heads: int, group: int, m_tiles: int, seq_kv: int, ctas: int, causal: bool
) -> None:
    """Any band width the sequence length chooses (1, or even and up to past m_tiles), odd tile
    counts, fewer tiles than CTAs."""
    _assert_every_tile_once(_order(kv_heads * group, kv_heads, causal, ctas=ctas), batch, seq_kv, m_tiles)


#: (batch, seq): the group-1 causal D 128 shapes of the scoreboard (Hq 32 / Hkv 32), and the first
#: wave's K/V under the previous order, in MB (132-256 MB against a 50 MB L2; TileOPs' 9-72).
GROUP_ONE = [(8, 2048, 132), (4, 4096, 256), (2, 8192, 256), (1, 16384, 256), (16, 1024, 66)]


@pytest.mark.parametrize(("batch", "seq", "before_mb"), GROUP_ONE)
def test_the_first_wave_of_group_one_causal_launches_reads_at_most_half_the_l2(
    batch: int, seq: int, before_mb: int
) -> None:
    order, shape = _order(32, 32, True), _shape(batch, seq)
    assert first_wave_kv_bytes(order, shape) <= RESIDENT_KV_BYTES <= 32 * MB
    before = _first_wave_bytes(order, shape, _heads_fastest(order, batch, shape.m_tiles))
    assert before == before_mb * MB  # what the bound tells apart


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "kv_heads", "head_dim", "causal"),
    [
        (4, 4096, 32, 8, 128, True),
        (2, 4096, 64, 4, 128, True),
        (4, 4096, 32, 8, 64, True),
        (2, 8192, 32, 32, 64, True),
        (1, 16384, 32, 32, 128, False),
        (4, 4096, 32, 32, 128, False),
    ],
)
def test_the_first_wave_of_other_launches_reads_at_most_the_resident_bound(
    batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, causal: bool
) -> None:
    order = _order(heads, kv_heads, causal, head_dim)
    assert first_wave_kv_bytes(order, _shape(batch, seq, head_dim)) <= RESIDENT_KV_BYTES


def test_first_wave_kv_bytes_is_the_span_of_keys_the_first_tiles_read() -> None:
    """Matches the direct count on the previous order's tiles (the same model of a tile's keys)."""
    order, shape = _order(32, 32, True), _shape(2, 1000)
    tiles = tiles_of(order, shape.batch, shape.seq_kv, shape.m_tiles)
    assert first_wave_kv_bytes(order, shape) == _first_wave_bytes(order, shape, tiles)


#: Causal launches with at least 10 tiles a CTA: (batch, seq, heads, kv_heads, head_dim).
BALANCED = [
    (8, 2048, 32, 32, 128),
    (4, 4096, 32, 32, 128),
    (2, 8192, 32, 32, 128),
    (1, 16384, 32, 32, 128),
    (16, 1024, 32, 32, 128),
    (4, 4096, 32, 8, 128),
    (1, 8192, 32, 8, 128),
    (2, 4096, 64, 4, 128),
    (8, 1024, 40, 8, 128),
    (4, 2048, 32, 8, 64),
    (16, 1024, 32, 8, 64),
    (4, 4096, 32, 8, 64),
    (3, 3000, 32, 32, 128),
    (2, 5000, 16, 16, 128),
]


@pytest.mark.parametrize(("batch", "seq", "heads", "kv_heads", "head_dim"), BALANCED)
def test_the_ctas_are_as_evenly_loaded_as_under_the_previous_order(
    batch: int, seq: int, heads: int, kv_heads: int, head_dim: int
) -> None:
    """The busiest CTA's key tiles (plus one a tile for its fixed costs) over the mean, within 1%
    of the previous order's (1.03-1.09 on these shapes: its last round is partial, so some CTAs
    run one more tile). A band's units all cost the same; what is left is each band's last
    round, which some CTAs take and others not."""
    order, shape = _order(heads, kv_heads, True, head_dim), _shape(batch, seq, head_dim)
    before = _balance(order, shape, _heads_fastest(order, batch, shape.m_tiles))
    assert balance(order, shape) <= before + 0.01


@pytest.mark.parametrize(("batch", "seq", "before_mb"), GROUP_ONE)
def test_group_one_causal_launches_are_evenly_loaded(batch: int, seq: int, before_mb: int) -> None:
    """31 tiles a CTA: the busiest CTA does at most 3.5% more than the mean (the previous order:
    3.1%, four CTAs running a 32nd tile)."""
    assert balance(_order(32, 32, True), _shape(batch, seq)) <= 1.035


def test_a_launch_with_few_tiles_a_cta_is_loaded_no_worse_than_under_the_previous_order() -> None:
    """B1 S1024 Hq32 group 1: 256 tiles for 132 CTAs. The whole batch's K/V (16 MB) fits, so the
    order keeps one tile length a band (longest first over the launch) and deals it snake-wise: the
    CTA with the longest tile takes the shortest second tile (round-robin gave it a middle one)."""
    order, shape = _order(32, 32, True), _shape(1, 1024)
    assert band_layout(order, 1, 1024, shape.m_tiles, PYTHON_ARITH).width == 1
    before = _balance(order, shape, _heads_fastest(order, 1, shape.m_tiles))
    assert balance(order, shape) < before


@pytest.mark.parametrize(
    ("batch", "seq", "heads", "kv_heads", "causal", "width"),
    [
        (8, 2048, 32, 32, True, 10),  # group 1: sections of 10 tile lengths
        (4, 4096, 32, 32, True, 18),
        (16, 1024, 32, 4, True, 1),  # group 8: its heads alone keep 2 x 132 tiles on 33 sections (16 MB)
        (1, 8192, 32, 8, True, 1),  # the batch's K/V (32 MB) is under the bound
        (2, 1024, 32, 32, False, 8),  # non-causal: one band of the whole sequence
    ],
)
def test_the_band_width_follows_the_k_v_a_band_keeps_resident(
    batch: int, seq: int, heads: int, kv_heads: int, causal: bool, width: int
) -> None:
    order = _order(heads, kv_heads, causal)
    layout = band_layout(order, batch, seq, _shape(batch, seq).m_tiles, PYTHON_ARITH)
    assert layout.width == width
    assert layout.per_unit == (2 if width > 1 and causal else 1)


def test_the_order_refuses_impossible_static_facts() -> None:
    with pytest.raises(ValueError, match="heads a multiple of kv_heads"):
        DenseOrder(ctas=132, heads=6, kv_heads=4, causal=True, kv_key_bytes=512)
    with pytest.raises(ValueError, match="ctas > 0"):
        DenseOrder(ctas=0, heads=8, kv_heads=4, causal=True, kv_key_bytes=512)


def test_the_tir_expressions_compute_the_model() -> None:
    """The program evaluates the same functions on TIR variables, the head counts among them (it
    reads them from its tensors): substituted with the model's ints and simplified, every expression
    is the model's number, for every head count of one program. (The program holds intermediate
    values in registers; here they stay expressions.)"""
    pytest.importorskip("tilelang")
    from tilelang import tvm

    from tileprefill.kernels.tl.attention_entries import TIR_ARITH

    tir = tvm.tirx
    # The program's operations, but for `hold`: here intermediate values stay expressions.
    tir_arith = dataclasses.replace(TIR_ARITH, hold=lambda value: value)
    names = ("cta", "i", "batch", "m_tiles", "seq_kv", "heads", "kv_heads")
    var = {name: tir.Var(name, "int32") for name in names}
    rng = random.Random(3)
    analyzer = tvm.arith.Analyzer()
    for causal in (True, False):
        program_order = DenseOrder(
            ctas=H100_CTAS, heads=var["heads"], kv_heads=var["kv_heads"], causal=causal, kv_key_bytes=512
        )
        layout = band_layout(program_order, var["batch"], var["seq_kv"], var["m_tiles"], tir_arith)
        exprs = (
            layout.width,
            layout.per_unit,
            tile_count(program_order, var["cta"], var["batch"], var["m_tiles"], layout, tir_arith),
            *tile_at(program_order, var["cta"], var["i"], var["batch"], var["m_tiles"], layout, tir_arith),
        )
        for heads, kv_heads in ((32, 32), (40, 8), (5, 1), (28, 4)):
            order = _order(heads, kv_heads, causal)
            assert order.kv_key_bytes == program_order.kv_key_bytes
            for _ in range(20):
                batch, m_tiles, seq_kv = rng.randint(1, 9), rng.randint(1, 70), rng.randint(1, 20000)
                model_layout = band_layout(order, batch, seq_kv, m_tiles, PYTHON_ARITH)
                cta = rng.randrange(order.ctas)
                count = tile_count(order, cta, batch, m_tiles, model_layout, PYTHON_ARITH)
                i = rng.randrange(count) if count else 0
                want = (
                    model_layout.width,
                    model_layout.per_unit,
                    count,
                    *tile_at(order, cta, i, batch, m_tiles, model_layout, PYTHON_ARITH),
                )
                values = dict(zip(names, (cta, i, batch, m_tiles, seq_kv, heads, kv_heads), strict=True))
                binding = {var[name]: tir.IntImm("int32", value) for name, value in values.items()}
                got = tuple(
                    e
                    if isinstance(e, int)
                    else int(analyzer.simplify(tir.stmt_functor.substitute(e, binding)))
                    for e in exprs
                )
                assert got == want, values


def test_every_persistent_dense_scoreboard_case_keeps_its_first_wave_under_the_resident_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rows = first_waves()
    assert {row.case for row in rows} >= {c.name for c in scoreboard_cases() if "h32-32" in c.name}
    for row in rows:
        assert row.first_wave_bytes <= RESIDENT_KV_BYTES, row
        assert row.busiest_over_mean <= 1.04, row
    assert first_wave_main([]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 + len(rows) and all(row.case in "".join(printed) for row in rows)
