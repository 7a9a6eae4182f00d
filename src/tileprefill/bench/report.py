"""A run's outputs: the JSON (everything), a markdown table per suite, one PNG plot per suite.

TFLOP/s count only visible keys; ratios are ours over theirs in speed (their time /
our time: above 1 we are faster). A measurement that is not there is "n/a" with
its reason listed under the table. matplotlib is imported only to draw (Agg).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from tileprefill.bench import summary
from tileprefill.bench.cases import Case, Suite
from tileprefill.bench.peer import PeerFiles
from tileprefill.bench.results import (
    FLASHINFER,
    FLASHINFER_BEST,
    LABELS,
    OURS,
    OURS_ATTENTION,
    PEERS,
    CaseResult,
    Measurement,
    PeerInfo,
    RunResult,
)

if TYPE_CHECKING:
    from matplotlib.artist import Artist  # type: ignore[import-not-found, unused-ignore]


@attrs.frozen
class OutputPaths:
    """Where a run with file stem `stem` writes under `out_dir`."""

    out_dir: Path
    stem: str

    @property
    def json(self) -> Path:
        return self.out_dir / f"{self.stem}.json"

    @property
    def markdown(self) -> Path:
        return self.out_dir / f"{self.stem}.md"

    def peer_files(self, slug: str) -> PeerFiles:
        """A peer's cases, JSON and log: `<stem>-<slug>-cases.json`, `.json`, `.log`."""
        base = self.out_dir / f"{self.stem}-{slug}"
        return PeerFiles(
            cases=base.with_name(base.name + "-cases.json"),
            results=base.with_name(base.name + ".json"),
            log=base.with_name(base.name + ".log"),
        )

    def plot(self, suite: Suite) -> Path:
        return self.out_dir / f"{self.stem}-{suite.value}.png"


def write_all(result: RunResult, paths: OutputPaths) -> list[Path]:
    """JSON, markdown and the plots; returns the paths written."""
    write_json(result, paths.json)
    write_markdown(result, paths.markdown)
    return [paths.json, paths.markdown, *write_plots(result, paths)]


def _atomic_write(path: Path, text: str) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


def write_json(result: RunResult, path: Path) -> None:
    _atomic_write(path, json.dumps(result.to_json(), indent=2) + "\n")


# --- markdown ----------------------------------------------------------------------------------------


def _tflops(m: Measurement | None, case: Case, notes: _Notes, label: str) -> str:
    if m is None:
        return "–"
    value = m.tflops(case.flops)
    if value is None:
        return f"n/a{notes.mark(label, m.error or 'no figure')}"
    return number(value) + (notes.mark(label, m.note) if m.note else "")


def number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


class _Notes:
    """Numbered footnotes of one table, each distinct text once."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def mark(self, label: str, text: str) -> str:
        entry = f"{label}: {text}"
        if entry not in self.texts:
            self.texts.append(entry)
        return f" [{self.texts.index(entry) + 1}]"

    def lines(self) -> list[str]:
        return [f"[{i}] {text}" for i, text in enumerate(self.texts, 1)] + ([""] if self.texts else [])


def _shown(results: Sequence[CaseResult]) -> list[str]:
    """The peers with a measurement (a figure or a reason) in any of `results`, in table order."""
    return [p for p in PEERS if any(p in r.results for r in results)]


def _table(results: Sequence[CaseResult], peers: Sequence[str], *, rope: bool, references: bool) -> list[str]:
    notes = _Notes()
    best = [p for p in FLASHINFER if p in peers]
    head = ["case", "work"] if not references else ["reference", "case"]
    head += ["ours, TFLOP/s", "ours, ms", "kernel"]
    if rope:
        head += [f"{LABELS[OURS_ATTENTION]}, TFLOP/s", "full ÷ alone, time"]
    head += [f"{LABELS[p]}, TFLOP/s" for p in peers] + [f"vs {LABELS[p]}" for p in peers]
    head += ["vs FlashInfer, better backend"] if best else []
    head += ["rel. err vs SDPA"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        case = r.case
        row = (
            [", ".join(case.labels), f"`{case.name}`"] if references else [f"`{case.name}`", case.describe()]
        )
        ours = r.results.get(OURS)
        row += [
            _tflops(ours, case, notes, LABELS[OURS]),
            "–" if ours is None or ours.ms is None else f"{ours.ms:.3f}",
            f"`{r.kernel}`" if r.kernel else "–",
        ]
        if rope:
            alone = r.speedup(OURS_ATTENTION)
            row += [
                _tflops(r.results.get(OURS_ATTENTION), case, notes, LABELS[OURS_ATTENTION]),
                "–" if alone is None else f"{1 / alone:.2f}",
            ]
        row += [_tflops(r.results.get(p), case, notes, LABELS[p]) for p in peers]
        row += [_ratio(r.speedup(p)) for p in peers]
        row += [_ratio(r.best_speedup(best))] if best else []
        errors = r.relative_error.values()
        row.append(f"{max(errors):.1e}" if errors else "–")
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, "", *notes.lines()]


def markdown(result: RunResult) -> str:
    device = result.device
    name = str(device.get("name", "?"))
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    peers = _shown(result.cases)
    lines = [
        f"# tileprefill benchmark: {name}, {result.started[:10]}",
        "",
        f"- device: {name} ({device.get('arch', '?')}"
        + (f", {device['sms']} SMs" if "sms" in device else "")
        + f"); {versions}",
        f"- command: `{result.command}`",
        f"- timing: {result.timer}; TFLOP/s count only visible keys (causal is bottom-right aligned); "
        "ratios are ours ÷ theirs in speed (their time / our time), one run on one machine",
        f"- compile: {result.compile.programs} programs of ours prebuilt side by side in "
        f"{result.compile.seconds:.0f} s before any timing"
        + (f" (prebuild failed: {result.compile.error})" if result.compile.error else ""),
        *(f"- {_peer_line(peer, result)}" for peer in result.peers),
        "- SDPA: `enable_gqa`, `causal_lower_right` where q and kv lengths differ; ragged: one call per "
        "sequence; contiguous and paged: on the cache gathered to dense (gather not timed); "
        "rope-append: attention FLOPs over the time of the whole RoPE + append + attention Op",
        "- status: "
        + (
            "complete, " + result.finished
            if result.finished
            else "**partial**: the run had not finished when this was written (under way, or stopped)"
        ),
        "",
        *_summary(result.cases),
    ]
    references = [r for r in result.cases if r.case.labels]
    if references:
        lines += ["## Reference cases (figures quoted in the README and the performance targets)", ""]
        lines += _table(references, peers, rope=False, references=True)
    for suite in Suite:
        rows = [r for r in result.cases if r.case.suite is suite]
        if rows:
            lines += [f"## {suite.value} ({len(rows)} cases)", ""]
            lines += _table(rows, peers, rope=suite is Suite.ROPE_APPEND, references=False)
            if suite is Suite.WINDOW:
                lines += _window_ratios(rows)
    return "\n".join(lines).rstrip() + "\n"


def _ratios(stats: summary.Ratios | None) -> str:
    if stats is None:
        return "–"
    below = f"{stats.below_one or 'none'} of {stats.count} below 1.00×"
    return f"{stats.median:.2f}× (min {stats.low:.2f}× `{stats.low_case}`; {below})"


def _figure(result: CaseResult, implementation: str) -> str:
    """An implementation's TFLOP/s on a case, "–" without one (tables whose notes are elsewhere)."""
    m = result.results.get(implementation)
    tflops = None if m is None else m.tflops(result.case.flops)
    return "–" if tflops is None else number(tflops)


def _summary(results: Sequence[CaseResult]) -> list[str]:
    """The figures a run is judged by (`summary.py`): per family, dense long non-causal TFLOP/s,
    RoPE + append against attention alone."""
    rows = summary.families(results)
    if not rows:
        return []
    compared = {
        p: "vs " + ("FlashInfer, better of fa3 and fa2" if p == FLASHINFER_BEST else LABELS[p])
        for p in summary.COMPARED
    }
    head = ["family", "cases", *compared.values()]
    lines = [
        "## Summary",
        "",
        "Ours ÷ each peer in speed, over the cases both ran: the median, the lowest (and its case), and "
        "how many are below 1.00×.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *(f"| {f.name} | {f.cases} | " + " | ".join(_ratios(f.vs[p]) for p in compared) + " |" for f in rows),
        "",
    ]
    return lines + _long_dense(summary.long_dense(results)) + _rope(summary.rope_rows(results))


def _long_dense(results: Sequence[CaseResult]) -> list[str]:
    if not results:
        return []
    shown = [OURS, *_shown(results)]
    return [
        f"Dense D128 non-causal at S ≥ {summary.LONG_SEQ}, TFLOP/s:",
        "",
        "| case | work | " + " | ".join(LABELS[p] for p in shown) + " |",
        "|" + "---|" * (len(shown) + 2),
        *(
            f"| `{r.case.name}` | {r.case.describe()} | " + " | ".join(_figure(r, p) for p in shown) + " |"
            for r in results
        ),
        "",
    ]


def _rope(rows: Sequence[summary.RopeRow]) -> list[str]:
    if not rows:
        return []
    return [
        "RoPE + append Op against attention alone on the same batch, in speed (alone's time ÷ the "
        "full Op's): on the same inputs in the same process, and against the batch's own paged case "
        "(its twin):",
        "",
        "| case | full Op, TFLOP/s | full ÷ alone | twin | full ÷ twin |",
        "|---|---|---|---|---|",
        *(
            f"| `{row.result.case.name}` | {_figure(row.result, OURS)} | {_ratio(row.vs_alone)} | "
            + (f"`{row.twin.case.name}`" if row.twin is not None else "–")
            + f" | {_ratio(row.vs_twin)} |"
            for row in rows
        ),
        "",
    ]


def _window_ratios(rows: Sequence[CaseResult]) -> list[str]:
    """The window suite's two ratios from its own timings of our Op: a windowed call's time
    per query token over that of the call at S = window without one (causal: its queries see half
    as many keys on average; non-causal: each sees `window` keys, as past the first window), and a
    softcapped call's time over the same causal call without softcap."""
    ms = {
        (r.case.dtype, r.case.seq_len, r.case.causal, r.case.window, r.case.softcap): m.ms
        for r in rows
        if (m := r.results.get(OURS)) is not None and m.ms is not None
    }
    lines = []
    for (dtype, seq, causal, window, softcap), took in sorted(ms.items()):
        cap = f" softcap {softcap:g}" if softcap else ""
        for base_causal, mask in ((True, "causal"), (False, "non-causal")):
            base = ms.get((dtype, window, base_causal, 0, softcap)) if window and seq > window else None
            if base:
                per_token = (took / seq) / (base / window)
                lines.append(
                    f"- {dtype} S{seq} window {window}{cap}: {per_token:.2f}x the time per query token "
                    f"of S{window} {mask} without a window"
                )
        if softcap and (plain := ms.get((dtype, seq, causal, window, 0.0))):
            lines.append(
                f"- {dtype} S{seq}{f' window {window}' if window else ''} softcap {softcap:g}: "
                f"{took / plain:.3f}x the time without softcap"
            )
    return [*lines, ""] if lines else []


def _peer_line(peer: PeerInfo, result: RunResult) -> str:
    if peer.available:
        ran = f"in its own process, {peer.seconds:.0f} s" if peer.ran else peer.command
        versions = ", ".join(f"{k} {v}" for k, v in peer.versions.items())
        timed = ", ".join(
            f"{LABELS.get(i, i)} {sum(r.results.get(i, Measurement()).ok for r in result.cases)}"
            for i in peer.implementations
        )
        extra = f"; {peer.reason}" if peer.reason else ""
        return f"{peer.name}: {ran} ({versions}); cases timed of {len(result.cases)}: {timed}{extra}"
    return f"{peer.name}: no figures: {peer.reason or 'not run'}"


def write_markdown(result: RunResult, path: Path) -> None:
    _atomic_write(path, markdown(result))


def _natural(text: str) -> tuple[tuple[int, int | str], ...]:
    """A sort key that orders the numbers inside `text` by value ("page 16" after "page 2")."""
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", text))


# --- plots -------------------------------------------------------------------------------------------


def write_plots(result: RunResult, paths: OutputPaths) -> list[Path]:
    """One PNG per suite with results: TFLOP/s against sequence length (head-dims: head dim), a panel
    per series of the grid (cases outside the grids are in the tables only), a line per
    implementation."""
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]
        from matplotlib import ticker  # type: ignore[import-not-found, unused-ignore]
    except ImportError as error:
        print(f"no plots: {error}", file=sys.stderr)
        return []
    written = []
    for suite in Suite:
        rows = [r for r in result.cases if r.case.suite is suite]
        series = sorted({r.case.series or "other cases" for r in rows}, key=_natural)
        if not rows:
            continue
        columns = min(6, len(series))
        lines_of = -(-len(series) // columns)
        height = 3.2 * lines_of + 1.0
        figure, axes = plt.subplots(
            lines_of,
            columns,
            figsize=(4.2 * columns, height),
            squeeze=False,
            sharey=True,
            gridspec_kw={"hspace": 0.6, "wspace": 0.15, "left": 0.06, "right": 0.99, "bottom": 0.6 / height},
        )
        handles: dict[str, Artist] = {}
        for index, title in enumerate(series):
            axis = axes[index // columns][index % columns]
            members = sorted(
                (r for r in rows if (r.case.series or "other cases") == title), key=lambda r: r.case.plot_x[1]
            )
            for impl in (OURS, OURS_ATTENTION, *PEERS):
                points = [
                    (r.case.plot_x[1], t)
                    for r in members
                    if impl in r.results and (t := r.results[impl].tflops(r.case.flops)) is not None
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    style = "none" if title == "other cases" else "-"  # unrelated cases: no line
                    axis.plot(xs, ys, marker="o", linestyle=style, label=LABELS[impl])
            x_label = members[0].case.plot_x[0]
            if suite is not Suite.HEAD_DIMS:  # sequence lengths double from point to point
                axis.set_xscale("log", base=2)
                axis.xaxis.set_major_formatter(ticker.ScalarFormatter())
            axis.set_title(title, fontsize=9)
            axis.set_xlabel(x_label, fontsize=8)
            axis.set_ylabel("TFLOP/s", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(True, alpha=0.3)
            for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        figure.subplots_adjust(top=1 - 0.9 / height)
        figure.legend(list(handles.values()), list(handles), loc="upper left", ncols=len(handles), fontsize=8)
        for index in range(len(series), lines_of * columns):
            axes[index // columns][index % columns].set_visible(False)
        device = result.device.get("name", "?")
        figure.suptitle(f"{suite.value}: {device}, {result.started[:10]}", fontsize=11, y=1 - 0.2 / height)
        path = paths.plot(suite)
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(path)
    return written
