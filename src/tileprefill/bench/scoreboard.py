"""The scoreboard: at most 40 cases that cover every family of work and the worst ratios to the
peers, sized so that one run on one GPU host (compile, ours, SDPA cuDNN, TileOPs, FlashInfer fa3
and fa2) ends within 9 minutes. `python -m tileprefill bench --suite scoreboard`.

What it covers, each a `series` (a plot panel and a group of the tables), bf16 unless said:
dense D128 causal at group 1, 2, 4 and 16 (group 1 is where our causal order spreads the resident
CTAs over the most K/V), short (B16 S1024) and long sequences; dense non-causal at S >= 8k (the
TFLOP/s target); lengths no tile divides (S 1000, 3000); D64 and D256; one fp16 case; ragged mixes
of short and long sequences, causal and not; a contiguous cache; paged caches at page 1, 16 and 64,
chunked (cached + new), long and many small, and a chunked-prefill batch whose other rows are
decode rows (q_len 1); and RoPE + append on paged batches, each beside its attention-alone twin:
the paged case of the same batch (`attention_alone_twins`).

A case that equals one of the default set's keeps that case's name and labels, so runs of either
set compare by name.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Final

from tileprefill.bench.cases import Case, Suite
from tileprefill.bench.catalogue import (
    MIXED_RAGGED_LENS,
    README_RAGGED_LENS,
    contiguous_case,
    default_cases,
    dense_case,
    paged_batch_case,
    paged_case,
    ragged_case,
    ragged_mix_case,
)

#: The most cases the scoreboard may hold: its run has to fit one GPU call.
MAX_CASES: Final = 40
#: The RoPE + append batches, (batch, cached, new, page size): a chunked batch, and many short fresh
#: prompts (where the Op ran at 0.63x attention alone). Each comes with its attention-alone twin.
ROPE_BATCHES: Final = ((8, 4096, 512, 16), (64, 0, 256, 16))
#: The chunked-prefill batch with decode rows: prompt chunks (cached, new), and decode rows over
#: caches of these lengths (few distinct ones: SDPA runs one call per sequence, and cuDNN builds a
#: graph per shape).
DECODE_CHUNKS: Final = ((0, 2048), (2048, 2048), (6144, 2048), (1000, 1000))
DECODE_ROWS: Final = 60
DECODE_CACHED: Final = (517, 1024, 1999, 2048, 3001, 4096, 6000, 8191)


def decode_mix_rows() -> tuple[tuple[int, int], ...]:
    """(cached, new) of the chunked-prefill batch: the chunks and `DECODE_ROWS` decode rows, shuffled
    as a scheduler interleaves them."""
    rng = random.Random("scoreboard-decode-rows")
    rows = [*DECODE_CHUNKS, *((rng.choice(DECODE_CACHED), 1) for _ in range(DECODE_ROWS))]
    rng.shuffle(rows)
    return tuple(rows)


def _groups() -> list[tuple[str, list[Case]]]:
    bf16 = "bf16"
    decode_name = f"paged_bf16_{len(DECODE_CHUNKS)}chunks+{DECODE_ROWS}decode_p16"
    return [
        (
            "D128 group 1 causal",
            [dense_case(bf16, b, s, True, kv_heads=32) for b, s in ((8, 2048), (4, 4096), (1, 16384))],
        ),
        (
            "D128 group 2 causal",
            [dense_case(bf16, b, s, True, kv_heads=16) for b, s in ((8, 2048), (4, 4096))],
        ),
        (
            "D128 group 4 and 16 causal",
            [
                dense_case(bf16, 16, 1024, True),
                dense_case(bf16, 1, 8192, True),
                dense_case(bf16, 2, 4096, True, heads=64, kv_heads=4),
            ],
        ),
        (
            "D128 non-causal",
            [
                dense_case(bf16, 1, 8192, False),
                dense_case(bf16, 1, 16384, False),
                dense_case(bf16, 2, 8192, False, kv_heads=32),
                dense_case("fp16", 4, 4096, False),
            ],
        ),
        ("D128 unaligned causal", [dense_case(bf16, 16, 1000, True), dense_case(bf16, 4, 3000, True)]),
        (
            "D64 and D256",
            [
                dense_case(bf16, 4, 2048, True, head_dim=64),
                dense_case(bf16, 2, 8192, False, kv_heads=4, head_dim=64),
                dense_case(bf16, 4, 4096, True, head_dim=256),
            ],
        ),
        (
            "ragged mixes",
            [
                ragged_case(bf16, MIXED_RAGGED_LENS, True, name="ragged_bf16_8_17..4096_causal"),
                ragged_case(bf16, README_RAGGED_LENS, True, name="ragged_bf16_8_256..4096_causal"),
                ragged_mix_case(bf16, 4096, True),
                ragged_mix_case(bf16, 16384, True),
                ragged_mix_case(bf16, 4096, False),
            ],
        ),
        ("contiguous cache", [contiguous_case(bf16, 8, 4096, 512)]),
        ("paged, page 1", [paged_case(bf16, 2, 2048, 256, 1), paged_case(bf16, 8, 3000, 700, 1)]),
        (
            "paged, page 16",
            [
                paged_case(bf16, 8, 3000, 700, 16),
                paged_case(bf16, 4, 8000, 2000, 16),
                paged_batch_case(bf16, decode_mix_rows(), 16, name=decode_name),
            ],
        ),
        (
            "paged, page 64",
            [
                paged_case(bf16, 8, 4096, 512, 64),
                paged_case(bf16, 4, 8000, 2000, 64),
                paged_case(bf16, 32, 512, 128, 64),
            ],
        ),
        (
            "RoPE + append and attention alone",
            [
                paged_case(bf16, batch, cached, new, page, suite=suite)
                for batch, cached, new, page in ROPE_BATCHES
                for suite in (Suite.ROPE_APPEND, Suite.PAGED)
            ],
        ),
    ]


def scoreboard_cases() -> list[Case]:
    """The scoreboard, in table order; `series` names each case's group."""
    known = {c.key(): c for c in default_cases()}
    cases = []
    for series, members in _groups():
        for case in members:
            same = known.get(case.key())
            named = case if same is None else replace(case, name=same.name, labels=same.labels)
            cases.append(replace(named, series=series, quick=False))
    if len(cases) > MAX_CASES or len({c.name for c in cases}) != len(cases):
        raise AssertionError(f"the scoreboard: expected at most {MAX_CASES} cases of distinct names")
    return cases


def work_key(case: Case) -> tuple[object, ...]:
    """What a case's attention computes, whichever Op computes it: a rope-append case and its
    attention-alone twin share it."""
    return case.key()[1:]  # all but the suite


def attention_alone_twins(cases: list[Case]) -> dict[str, Case]:
    """Each paged rope-append case's twin among `cases` (the paged case of the same batch), by the
    rope-append case's name; a case without one is left out."""
    alone = {work_key(c): c for c in cases if c.suite is Suite.PAGED}
    return {
        c.name: twin
        for c in cases
        if c.suite is Suite.ROPE_APPEND and (twin := alone.get(work_key(c))) is not None
    }
