"""The figures a run is judged by, computed from its results: per family of cases, ours over each
peer that the targets name (TileOPs, the better of FlashInfer's fa3 and fa2, SDPA cuDNN) as a
median and a minimum; the dense D128 non-causal TFLOP/s at S >= 8k; and the RoPE + append Op
against attention alone on the same batch. `report.py` renders them.

Ratios are in speed (their time / our time: above 1 we are faster), over the cases where both
sides have a figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Final

import attrs

from tileprefill.bench.cases import Layout, Suite
from tileprefill.bench.results import (
    FLASHINFER,
    FLASHINFER_BEST,
    OURS,
    OURS_ATTENTION,
    SDPA_CUDNN,
    TILEOPS,
    CaseResult,
)
from tileprefill.bench.scoreboard import attention_alone_twins

#: The comparisons of the summary, by the key `CaseResult.to_json` gives their ratio under.
COMPARED: Final = (TILEOPS, FLASHINFER_BEST, SDPA_CUDNN)
#: The shortest sequence at which dense non-causal TFLOP/s are listed.
LONG_SEQ: Final = 8192


def ratio(result: CaseResult, against: str) -> float | None:
    """Ours over `against` in speed: a peer, or FLASHINFER_BEST (the faster of its backends)."""
    return result.best_speedup(FLASHINFER if against == FLASHINFER_BEST else (against,))


@attrs.frozen
class Ratios:
    """Ours over one peer on a family's cases where both ran."""

    count: int
    median: float
    low: float
    low_case: str  # the case of the minimum
    below_one: int  # cases where we are slower


def ratios(results: Sequence[CaseResult], against: str) -> Ratios | None:
    pairs = [(r, result.case.name) for result in results if (r := ratio(result, against)) is not None]
    if not pairs:
        return None
    low, low_case = min(pairs)
    values = [value for value, _ in pairs]
    return Ratios(len(values), statistics.median(values), low, low_case, sum(v < 1.0 for v in values))


@attrs.frozen
class Family:
    name: str
    cases: int
    vs: dict[str, Ratios | None]  # by COMPARED key


def families(results: Sequence[CaseResult]) -> list[Family]:
    """One row per suite with results, in suite order; the dense suite also per head dim when it
    has several."""
    rows = []
    for suite in Suite:
        members = [r for r in results if r.case.suite is suite]
        if not members:
            continue
        groups = [(suite.value, members)]
        head_dims = sorted({r.case.head_dim for r in members})
        if suite is Suite.DENSE and len(head_dims) > 1:
            groups += [(f"dense D{d}", [r for r in members if r.case.head_dim == d]) for d in head_dims]
        rows += [Family(name, len(group), {p: ratios(group, p) for p in COMPARED}) for name, group in groups]
    return rows


def long_dense(results: Sequence[CaseResult]) -> list[CaseResult]:
    """The dense D128 non-causal cases at S >= LONG_SEQ without a window or softcap."""
    return [
        r
        for r in results
        if r.case.layout is Layout.DENSE
        and r.case.head_dim == 128
        and not r.case.causal
        and r.case.seq_len >= LONG_SEQ
        and not (r.case.window or r.case.softcap)
    ]


@attrs.frozen
class RopeRow:
    """A rope-append case: its full Op over attention alone on the same inputs (same process), and
    over the paged case of the same batch timed as a case of its own (its twin), where the run
    has one. Both in speed: alone time / full time."""

    result: CaseResult
    vs_alone: float | None
    twin: CaseResult | None
    vs_twin: float | None


def rope_rows(results: Sequence[CaseResult]) -> list[RopeRow]:
    twins = attention_alone_twins([r.case for r in results])
    by_name = {r.case.name: r for r in results}
    rows = []
    for result in results:
        if result.case.suite is not Suite.ROPE_APPEND:
            continue
        full = result.results.get(OURS)
        twin = by_name[twins[result.case.name].name] if result.case.name in twins else None
        twin_ours = twin.results.get(OURS) if twin is not None else None
        rows.append(
            RopeRow(
                result,
                result.speedup(OURS_ATTENTION),
                twin,
                None
                if full is None or full.ms is None or twin_ours is None or twin_ours.ms is None
                else twin_ours.ms / full.ms,
            )
        )
    return rows
