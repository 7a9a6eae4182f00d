"""Which cases a run times: the default set (every suite's grid, fp16 and bf16, plus the reference
cases whose figures the README and the performance targets quote), its quick subset and the tiny
cases of a CPU dry run. The scoreboard is `scoreboard.py`'s.

`labels` names a reference case's quoted figure; a reference case equal to a grid case is that
case (`merge`).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Final

from tileprefill.bench.cases import DTYPES, Case, Layout, Suite

#: Heads of every case that does not say otherwise (Llama-3-8B-like: group 4).
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128

DENSE_SEQ_LENS: Final = (1024, 2048, 4096, 8192, 16384)
DENSE_TOKENS: Final = 16384  # B * S of every dense grid case
HEAD_DIMS: Final = (64, 128, 256)
GROUP_SIZES: Final = (1, 4, 8, 16)  # Hq = 32, Hkv = 32 // group
RAGGED_LONG_LENS: Final = (1024, 2048, 4096, 8192, 16384)
CONTIGUOUS_CACHED: Final = (1024, 2048, 4096, 8192)
PAGE_SIZES: Final = (1, 16, 32, 64, 128)
#: (batch, cached, new) of the paged workloads: many small requests to a few long ones.
PAGED_WORKLOADS: Final = ((32, 512, 128), (2, 2048, 256), (8, 3000, 700), (8, 4096, 512), (4, 8000, 2000))
ROPE_PAGE_SIZES: Final = (1, 16, 64)
ROPE_PAGED_WORKLOADS: Final = ((32, 512, 128), (8, 4096, 512), (4, 8000, 2000))
ROPE_CONTIGUOUS_WORKLOADS: Final = ((32, 512, 128), (8, 4096, 512))
#: The window suite: Gemma-2-like layers (Hq 16 / Hkv 8, D 256, window 4096, softcap 50), B = 1.
WINDOW_HEADS, WINDOW_KV_HEADS, WINDOW_HEAD_DIM = 16, 8, 256
WINDOW: Final = 4096
WINDOW_SOFTCAP: Final = 50.0
WINDOW_SEQ_LENS: Final = (4096, 8192, 16384, 32768)
#: The head-dim sweep: every head dim the kernels serve (multiples of 16), dense B4 S4096 Hq32/Hkv8.
SWEEP_HEAD_DIMS: Final = tuple(range(64, 257, 16))
SWEEP_BATCH, SWEEP_SEQ = 4, 4096


def _mask(causal: bool) -> str:
    return "causal" if causal else "noncausal"


def dense_case(
    dtype: str,
    batch: int,
    seq: int,
    causal: bool,
    *,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    head_dim: int = HEAD_DIM,
    series: str = "",
    suite: Suite = Suite.DENSE,
    window: int = 0,
    softcap: float = 0.0,
) -> Case:
    extras = (f"_w{window}" if window else "") + (f"_cap{softcap:g}" if softcap else "")
    prefix = "sweep" if suite is Suite.HEAD_DIMS else "dense"  # sweep cases repeat some grid shapes
    return Case(
        name=f"{prefix}_{dtype}_d{head_dim}_h{heads}-{kv_heads}_b{batch}_s{seq}_{_mask(causal)}{extras}",
        suite=suite,
        layout=Layout.DENSE,
        dtype=dtype,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=causal,
        q_lens=(seq,) * batch,
        kv_lens=(seq,) * batch,
        series=series,
        window=window,
        softcap=softcap,
    )


def window_case(dtype: str, seq: int, window: int, softcap: float, *, causal: bool = True) -> Case:
    """One Gemma-like layer call of the window suite (window 0: plain)."""
    case = dense_case(
        dtype,
        1,
        seq,
        causal,
        heads=WINDOW_HEADS,
        kv_heads=WINDOW_KV_HEADS,
        head_dim=WINDOW_HEAD_DIM,
        suite=Suite.WINDOW,
        window=window,
        softcap=softcap,
    )
    return replace(case, series=f"{dtype} D{WINDOW_HEAD_DIM} {_mask(causal)} {case.transforms or 'plain'}")


def ragged_mix(long_len: int, *, seed: int = 0) -> tuple[int, ...]:
    """A batch mixing 32 short sequences (1..127 tokens) with long ones of about `long_len` tokens.

    About 12k tokens sit in the long sequences (at least one), unaligned to any tile;
    the order is shuffled, as a scheduler hands them over.
    """
    rng = random.Random(f"ragged-{long_len}-{seed}")
    count = max(1, 12288 // long_len)
    longs = [long_len - 37 * j for j in range(count)]
    shorts = [rng.randrange(1, 128) for _ in range(32)]
    lens = longs + shorts
    rng.shuffle(lens)
    return tuple(lens)


def ragged_case(
    dtype: str, lens: tuple[int, ...], causal: bool, *, head_dim: int = HEAD_DIM, name: str, series: str = ""
) -> Case:
    return Case(
        name=name,
        suite=Suite.RAGGED,
        layout=Layout.RAGGED,
        dtype=dtype,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=head_dim,
        causal=causal,
        q_lens=lens,
        kv_lens=lens,
        series=series,
    )


def ragged_mix_case(
    dtype: str, long_len: int, causal: bool, *, head_dim: int = HEAD_DIM, series: str = ""
) -> Case:
    """The ragged grid's case: `ragged_mix(long_len)`."""
    lens = ragged_mix(long_len)
    name = f"ragged_{dtype}_d{head_dim}_32short+{len(lens) - 32}x{long_len}_{_mask(causal)}"
    return ragged_case(dtype, lens, causal, head_dim=head_dim, name=name, series=series)


def contiguous_case(
    dtype: str, batch: int, cached: int, new: int, *, suite: Suite = Suite.CONTIGUOUS, series: str = ""
) -> Case:
    kv = cached + new
    prefix = "contiguous" if suite is Suite.CONTIGUOUS else "rope_contiguous"
    return Case(
        name=f"{prefix}_{dtype}_{batch}x{cached}+{new}",
        suite=suite,
        layout=Layout.CONTIGUOUS,
        dtype=dtype,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        causal=True,
        q_lens=(new,) * batch,
        kv_lens=(kv,) * batch,
        capacity=-(-kv // 1024) * 1024,  # the cache is allocated in whole 1k blocks, past the last key
        series=series,
    )


def paged_case(
    dtype: str,
    batch: int,
    cached: int,
    new: int,
    page_size: int,
    *,
    suite: Suite = Suite.PAGED,
    series: str = "",
) -> Case:
    prefix = "paged" if suite is Suite.PAGED else "rope_paged"
    name = f"{prefix}_{dtype}_{batch}x{cached}+{new}_p{page_size}"
    return paged_batch_case(dtype, ((cached, new),) * batch, page_size, name=name, suite=suite, series=series)


def paged_batch_case(
    dtype: str,
    rows: Sequence[tuple[int, int]],
    page_size: int,
    *,
    name: str,
    suite: Suite = Suite.PAGED,
    series: str = "",
) -> Case:
    """A paged causal batch of (cached, new) tokens per sequence, in order."""
    return Case(
        name=name,
        suite=suite,
        layout=Layout.PAGED,
        dtype=dtype,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        causal=True,
        q_lens=tuple(new for _, new in rows),
        kv_lens=tuple(cached + new for cached, new in rows),
        page_size=page_size,
        series=series,
    )


def grid_cases() -> list[Case]:
    """Every suite's grid, fp16 and bf16 (the plots' series)."""
    cases: list[Case] = []
    for dtype, head_dim, group, causal in itertools.product(DTYPES, HEAD_DIMS, GROUP_SIZES, (False, True)):
        kv_heads = HEADS // group
        series = f"{dtype} D{head_dim} Hq{HEADS}/Hkv{kv_heads} {_mask(causal)}"
        for seq in DENSE_SEQ_LENS:
            cases.append(
                dense_case(
                    dtype,
                    DENSE_TOKENS // seq,
                    seq,
                    causal,
                    kv_heads=kv_heads,
                    head_dim=head_dim,
                    series=series,
                )
            )
    for dtype, head_dim, causal in itertools.product(DTYPES, HEAD_DIMS, (False, True)):
        series = f"{dtype} D{head_dim} {_mask(causal)}: 32 short + long"
        for long_len in RAGGED_LONG_LENS:
            cases.append(ragged_mix_case(dtype, long_len, causal, head_dim=head_dim, series=series))
    for dtype in DTYPES:
        for cached in CONTIGUOUS_CACHED:
            cases.append(contiguous_case(dtype, 8, cached, 512, series=f"{dtype} 8 x (cached + 512)"))
    for dtype, page_size in itertools.product(DTYPES, PAGE_SIZES):
        for batch, cached, new in PAGED_WORKLOADS:
            series = f"{dtype} page {page_size}"
            cases.append(paged_case(dtype, batch, cached, new, page_size, series=series))
    for dtype in DTYPES:
        for page_size in ROPE_PAGE_SIZES:
            for batch, cached, new in ROPE_PAGED_WORKLOADS:
                series = f"{dtype} paged, page {page_size}"
                cases.append(
                    paged_case(dtype, batch, cached, new, page_size, suite=Suite.ROPE_APPEND, series=series)
                )
        for batch, cached, new in ROPE_CONTIGUOUS_WORKLOADS:
            series = f"{dtype} contiguous"
            cases.append(contiguous_case(dtype, batch, cached, new, suite=Suite.ROPE_APPEND, series=series))
    for dtype, seq, window, softcap in itertools.product(
        DTYPES, WINDOW_SEQ_LENS, (0, WINDOW), (0.0, WINDOW_SOFTCAP)
    ):
        cases.append(window_case(dtype, seq, window, softcap))
    for dtype in DTYPES:  # every query sees `WINDOW` keys, as in a windowed call past its first window
        cases.append(window_case(dtype, WINDOW, 0, 0.0, causal=False))
    for dtype, causal, head_dim in itertools.product(DTYPES, (False, True), SWEEP_HEAD_DIMS):
        series = f"{dtype} B{SWEEP_BATCH} S{SWEEP_SEQ} Hq{HEADS}/Hkv{KV_HEADS} {_mask(causal)}"
        cases.append(
            dense_case(
                dtype, SWEEP_BATCH, SWEEP_SEQ, causal, head_dim=head_dim, series=series, suite=Suite.HEAD_DIMS
            )
        )
    return cases


#: The lengths of the reference case "ragged, 8 mixed lengths 17..4096" (its quote lists none).
MIXED_RAGGED_LENS: Final = (1024, 17, 4096, 300, 2048, 96, 3000, 517)
README_RAGGED_LENS: Final = (256, 512, 1024, 1536, 2048, 2560, 3072, 4096)


def reference_cases() -> list[Case]:
    """The cases whose figures the README (fp16) and the performance targets (bf16 unless said) quote.

    The four README cases keep the names earlier result files use, so runs compare by name.
    """
    readme, targets = "README", "targets"

    def label(case: Case, source: str, text: str, name: str | None = None) -> Case:
        return replace(case, labels=(f"{source}: {text}",), name=name or case.name)

    return [
        label(
            dense_case("fp16", 4, 4096, False),
            readme,
            "dense S=4096 non-causal (B=4)",
            "dense_s4096_noncausal",
        ),
        label(dense_case("fp16", 2, 8192, True), readme, "dense S=8192 causal (B=2)", "dense_s8192_causal"),
        label(
            paged_case("fp16", 8, 4096, 512, 64),
            readme,
            "paged, 8 x (4096 cached + 512 new), page 64",
            "paged_8x4096+512_p64",
        ),
        label(
            ragged_case("fp16", README_RAGGED_LENS, True, name="ragged_8_256..4096_causal"),
            readme,
            "ragged, 8 seqs of 256..4096, causal",
        ),
        label(dense_case("bf16", 1, 8192, False), targets, "dense B1 S8192 Hq32/Hkv8 D128 non-causal"),
        label(dense_case("bf16", 1, 8192, True), targets, "dense B1 S8192 D128 causal"),
        label(dense_case("fp16", 4, 4096, False), targets, "dense B4 S4096 D128 non-causal fp16"),
        label(
            dense_case("fp16", 2, 4096, True, heads=64, kv_heads=4),
            targets,
            "dense B2 S4096 Hq64/Hkv4 (group 16) causal fp16",
        ),
        label(dense_case("bf16", 4, 2048, True, head_dim=64), targets, "dense B4 S2048 D64 causal"),
        label(dense_case("bf16", 8, 1024, True, heads=40), targets, "dense B8 S1024 Hq40/Hkv8 causal"),
        label(
            ragged_case("bf16", MIXED_RAGGED_LENS, True, name="ragged_bf16_8_17..4096_causal"),
            targets,
            "ragged, 8 mixed lengths 17..4096, causal",
        ),
        label(paged_case("bf16", 8, 3000, 700, 16), targets, "paged 8 x (3000 cached + 700 new), page 16"),
        label(paged_case("bf16", 32, 512, 128, 32), targets, "paged 32 x (512 cached + 128 new), page 32"),
        label(paged_case("bf16", 2, 2048, 256, 1), targets, "paged 2 x (2048 + 256), page 1"),
    ]


#: Grid cases in the quick subset besides every reference case (names as `grid_cases` makes them).
QUICK_GRID: Final = (
    "dense_bf16_d128_h32-8_b16_s1024_causal",
    "dense_bf16_d128_h32-8_b1_s16384_causal",
    "dense_bf16_d256_h32-8_b4_s4096_causal",
    "dense_bf16_d64_h32-4_b2_s8192_noncausal",
    "ragged_bf16_d128_32short+3x4096_causal",
    "contiguous_bf16_8x4096+512",
    "paged_bf16_8x3000+700_p64",
    "paged_bf16_4x8000+2000_p16",
    "rope_paged_bf16_8x4096+512_p16",
    "rope_contiguous_bf16_8x4096+512",
    # the window suite's ratios: windowed S=32k against plain S=4096 per query token; softcap overhead
    "dense_bf16_d256_h16-8_b1_s4096_causal",
    "dense_bf16_d256_h16-8_b1_s32768_causal_w4096",
    "dense_bf16_d256_h16-8_b1_s32768_causal_w4096_cap50",
    "dense_bf16_d256_h16-8_b1_s8192_causal",
    "dense_bf16_d256_h16-8_b1_s8192_causal_cap50",
    "sweep_bf16_d96_h32-8_b4_s4096_causal",
    "sweep_bf16_d192_h32-8_b4_s4096_noncausal",
)


def merge(cases: Iterable[Case]) -> list[Case]:
    """Cases with equal work made one: the first name that came from a reference case, every label,
    the first series, quick if any was. Order of first appearance."""
    merged: dict[tuple[object, ...], Case] = {}
    for case in cases:
        seen = merged.get(case.key())
        if seen is None:
            merged[case.key()] = case
            continue
        labels = seen.labels + tuple(s for s in case.labels if s not in seen.labels)
        name = seen.name if seen.labels or not case.labels else case.name
        merged[case.key()] = replace(
            seen, name=name, labels=labels, series=seen.series or case.series, quick=seen.quick or case.quick
        )
    return list(merged.values())


SUITE_ORDER: Final = tuple(Suite)


def default_cases() -> list[Case]:
    """The whole default set: reference cases first within each suite, then the grids."""
    references = [replace(c, quick=True) for c in reference_cases()]
    grid = [replace(c, quick=c.name in QUICK_GRID) for c in grid_cases()]
    cases = merge([*references, *grid])
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise AssertionError("case names must be unique")
    if missing := sorted(set(QUICK_GRID) - set(names)):
        raise AssertionError(f"QUICK_GRID names no grid case: {missing}")
    return sorted(cases, key=lambda c: (SUITE_ORDER.index(c.suite), not c.labels))


def quick_cases() -> list[Case]:
    return [c for c in default_cases() if c.quick]


def tiny_cases() -> list[Case]:
    """One or two small cases per suite, for a run of the whole pipeline on a CPU (`--dry-run`)."""
    return [
        dense_case("fp16", 2, 48, True, heads=4, kv_heads=2, head_dim=64, series="tiny dense"),
        dense_case("fp16", 1, 96, False, heads=4, kv_heads=2, head_dim=64, series="tiny dense"),
        *(
            dense_case(
                "bf16",
                1,
                96,
                True,
                heads=4,
                kv_heads=2,
                head_dim=64,
                series="tiny window",
                suite=Suite.WINDOW,
                window=window,
                softcap=softcap,
            )
            for window, softcap in ((0, 0.0), (40, 0.0), (40, 20.0))
        ),
        *(
            dense_case(
                "fp16",
                1,
                48,
                True,
                heads=4,
                kv_heads=2,
                head_dim=d,
                series="tiny sweep",
                suite=Suite.HEAD_DIMS,
            )
            for d in (64, 80)
        ),
        replace(
            ragged_case("bf16", (5, 40, 17), True, head_dim=64, name="ragged_tiny", series="tiny ragged"),
            heads=4,
            kv_heads=2,
        ),
        replace(
            contiguous_case("fp16", 2, 40, 9, series="tiny contiguous"), heads=4, kv_heads=2, head_dim=64
        ),
        replace(paged_case("fp16", 2, 30, 7, 16, series="tiny paged"), heads=4, kv_heads=2, head_dim=64),
        replace(paged_case("bf16", 3, 20, 5, 1, series="tiny paged"), heads=4, kv_heads=2, head_dim=64),
        replace(
            paged_case("fp16", 2, 24, 6, 8, suite=Suite.ROPE_APPEND, series="tiny rope"),
            heads=4,
            kv_heads=2,
            head_dim=64,
        ),
        replace(
            contiguous_case("fp16", 2, 20, 6, suite=Suite.ROPE_APPEND, series="tiny rope"),
            heads=4,
            kv_heads=2,
            head_dim=64,
        ),
    ]


#: How much `shrunk` divides sequence lengths by.
SHRINK: Final = 32


def shrunk(case: Case) -> Case:
    """A small copy of `case` for a run of the pipeline on a CPU (`--dry-run` of a set of large cases):
    the same family (suite, layout, dtype, head dim, group size, causality, page size, window and
    softcap), lengths divided by SHRINK (at least 1, a cache case still holding its new keys), at
    most 2 KV heads; named `<name>_tiny`."""

    def small(n: int) -> int:
        return max(1, -(-n // SHRINK)) if n else 0

    q_lens = tuple(small(n) for n in case.q_lens)
    kv_lens = tuple(
        q if case.layout is Layout.RAGGED else max(q, small(kv))
        for q, kv in zip(q_lens, case.kv_lens, strict=True)
    )
    if case.layout is Layout.DENSE:
        kv_lens = q_lens
    kv_heads = min(case.kv_heads, 2)
    return replace(
        case,
        name=f"{case.name}_tiny",
        heads=kv_heads * case.group_size,
        kv_heads=kv_heads,
        q_lens=q_lens,
        kv_lens=kv_lens,
        capacity=max(kv_lens) if case.capacity else 0,
        window=small(case.window),
    )


def select(
    cases: Iterable[Case],
    *,
    suites: Sequence[Suite] = (),
    dtypes: Sequence[str] = (),
    max_cases: int | None = None,
) -> list[Case]:
    """`cases` of the given suites and dtypes (all when empty), at most `max_cases` of each suite."""
    chosen = [c for c in cases if (not suites or c.suite in suites) and (not dtypes or c.dtype in dtypes)]
    if max_cases is None:
        return chosen
    per_suite: dict[Suite, int] = {}
    kept: list[Case] = []
    for case in chosen:
        per_suite[case.suite] = per_suite.get(case.suite, 0) + 1
        if per_suite[case.suite] <= max_cases:
            kept.append(case)
    return kept
