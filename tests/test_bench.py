"""The benchmark harness on a CPU: cases and FLOPs, the scoreboard, outputs and summary from fake
timings, dry runs, the peer processes."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import attrs
import pytest
import torch

from tileprefill import cli
from tileprefill.bench import cases as bench_cases
from tileprefill.bench import catalogue, merging, peer, report, runner, scoreboard, summary
from tileprefill.bench.calls import our_calls
from tileprefill.bench.cases import Case, Layout, Suite
from tileprefill.bench.catalogue import default_cases, quick_cases, select, tiny_cases
from tileprefill.bench.results import (
    FLASHINFER_BEST,
    FLASHINFER_FA2,
    FLASHINFER_FA3,
    OURS,
    OURS_ATTENTION,
    SDPA_CUDNN,
    SDPA_FLASH,
    TILEOPS,
    CaseResult,
    Measurement,
    PeerInfo,
    RunResult,
)
from tileprefill.bench.settings import SCOREBOARD_DEFAULTS, BenchSettings
from tileprefill.bench.timing import Deadline, estimate

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def brute_force_pairs(q_len: int, kv_len: int, causal: bool, window: int = 0) -> int:
    """Visible (query, key) pairs by the definition: query i at p = kv_len - q_len + i sees keys
    j <= p, and with a window only those with j > p - window."""
    return sum(
        1
        for i in range(q_len)
        for j in range(kv_len)
        if not causal or (j <= (p := kv_len - q_len + i) and (not window or j > p - window))
    )


@pytest.mark.parametrize("causal", [True, False])
def test_visible_pairs_match_a_brute_force_count(causal: bool) -> None:
    for q_len, kv_len in itertools.product(range(0, 12), range(0, 12)):
        assert bench_cases.visible_pairs(q_len, kv_len, causal) == brute_force_pairs(q_len, kv_len, causal)


def test_windowed_visible_pairs_match_a_brute_force_count() -> None:
    for q_len, kv_len, window in itertools.product(range(0, 12), range(0, 12), range(1, 14)):
        want = brute_force_pairs(q_len, kv_len, True, window)
        assert bench_cases.visible_pairs(q_len, kv_len, True, window) == want, (q_len, kv_len, window)


def test_the_window_suite_pairs_every_windowed_call_with_its_baselines() -> None:
    """Each windowed or softcapped Gemma-like case has the plain case its ratio is taken against:
    the same S without softcap, and S = window without a window (the window suite's ratios)."""
    window = {c.name: c for c in default_cases() if c.suite is Suite.WINDOW}
    keys = {(c.dtype, c.seq_len, c.causal, c.window, c.softcap) for c in window.values()}
    assert max(c.seq_len for c in window.values()) == 32768
    for c in window.values():
        assert c.head_dim == 256 and c.layout is Layout.DENSE
        assert c.causal or (c.seq_len, c.window, c.softcap) == (4096, 0, 0.0)
        if c.softcap:
            assert (c.dtype, c.seq_len, True, c.window, 0.0) in keys
        if c.window:
            assert (c.dtype, c.window, True, 0, c.softcap) in keys
            assert (c.dtype, c.window, False, 0, 0.0) in keys
    sweep = {c.head_dim for c in default_cases() if c.suite is Suite.HEAD_DIMS}
    assert sweep == set(range(64, 257, 16))
    with pytest.raises(ValueError, match="window: expected 0, or > 0 with causal"):
        catalogue.dense_case("fp16", 1, 64, False, window=8)
    with pytest.raises(ValueError, match="dense calls only"):
        dataclasses.replace(catalogue.paged_case("bf16", 1, 20, 5, 16), softcap=5.0)


def test_flops_count_visible_keys_per_query_head() -> None:
    case = catalogue.paged_case("bf16", 3, 20, 5, 16)
    assert case.flops == 4 * 128 * 32 * 3 * brute_force_pairs(5, 25, True)
    ragged = catalogue.ragged_case("fp16", (3, 0, 7), True, name="r")
    assert ragged.pairs == brute_force_pairs(3, 3, True) + brute_force_pairs(7, 7, True)
    dense = catalogue.dense_case("fp16", 2, 64, False, heads=8, kv_heads=2, head_dim=64)
    assert dense.flops == 4 * 64 * 8 * 2 * 64 * 64


def test_the_default_set_covers_every_grid() -> None:
    cases = default_cases()
    assert len({c.name for c in cases}) == len(cases)
    assert len({c.key() for c in cases}) == len(cases)
    for suite in Suite:
        assert {c.dtype for c in cases if c.suite is suite} == {"fp16", "bf16"}, suite
    dense = {
        (c.dtype, c.batch, c.q_lens[0], c.causal, c.head_dim, c.group_size)
        for c in cases
        if c.suite is Suite.DENSE
    }
    for dtype, seq, causal, head_dim, group in itertools.product(
        ("fp16", "bf16"), (1024, 2048, 4096, 8192, 16384), (True, False), (64, 128, 256), (1, 4, 8, 16)
    ):
        assert (dtype, 16384 // seq, seq, causal, head_dim, group) in dense
    ragged = [c for c in cases if c.suite is Suite.RAGGED]
    assert any(min(c.q_lens) < 128 and max(c.q_lens) >= 4096 for c in ragged)
    contiguous = {(c.cached_lens[0], c.q_lens[0]) for c in cases if c.suite is Suite.CONTIGUOUS}
    assert (4096, 512) in contiguous
    paged = {(c.page_size, c.batch, c.cached_lens[0], c.q_lens[0]) for c in cases if c.suite is Suite.PAGED}
    for page_size in (1, 16, 32, 64, 128):
        assert (page_size, 32, 512, 128) in paged  # many small requests
        assert (page_size, 4, 8000, 2000) in paged  # a few long ones
    rope = [c for c in cases if c.suite is Suite.ROPE_APPEND]
    assert {c.layout for c in rope} == {Layout.PAGED, Layout.CONTIGUOUS}


def test_the_quoted_cases_are_in_the_default_set() -> None:
    cases = {c.name: c for c in default_cases()}
    # the README's four cases keep the names of the earlier result files
    for name in (
        "dense_s4096_noncausal",
        "dense_s8192_causal",
        "paged_8x4096+512_p64",
        "ragged_8_256..4096_causal",
    ):
        assert cases[name].dtype == "fp16" and cases[name].labels
    labels = [label for c in cases.values() for label in c.labels]
    assert sum(label.startswith("targets:") for label in labels) == 10
    assert sum(label.startswith("README:") for label in labels) == 4
    b8 = cases["dense_bf16_d128_h40-8_b8_s1024_causal"]
    assert (b8.heads, b8.kv_heads, b8.batch, b8.causal) == (40, 8, 8, True)
    page1 = cases["paged_bf16_2x2048+256_p1"]
    assert page1.labels and page1.series  # a quoted case that is also a grid case is one case


def test_quick_is_a_small_subset_of_every_suite_with_every_quoted_case() -> None:
    full, quick = default_cases(), quick_cases()
    assert {c.name for c in quick} < {c.name for c in full}
    assert {c.suite for c in quick} == set(Suite)
    assert all(c.quick for c in full if c.labels) and all(c.quick for c in quick)
    assert len(quick) <= 30 < len(full)


def test_select_filters_and_caps_each_suite() -> None:
    chosen = select(default_cases(), suites=(Suite.PAGED, Suite.DENSE), dtypes=("bf16",), max_cases=3)
    assert Counter(c.suite for c in chosen) == {Suite.DENSE: 3, Suite.PAGED: 3}
    assert {c.dtype for c in chosen} == {"bf16"}
    assert chosen[0].labels  # quoted cases come first within their suite


def test_cases_round_trip_through_json() -> None:
    for case in [*quick_cases(), *tiny_cases()]:
        assert Case.from_json(json.loads(json.dumps(case.to_json()))) == case


def test_inputs_have_the_ops_shapes_and_disjoint_pages() -> None:
    for case in tiny_cases():
        x = bench_cases.make_inputs(case, "cpu")
        assert x["q"].dtype == case.torch_dtype
        assert x["q"].shape[-2:] == (case.heads, case.head_dim)
        if case.layout is Layout.PAGED:
            used = [
                p
                for b, n in enumerate(case.kv_lens)
                for p in x["block_table"][b, : -(-n // case.page_size)].tolist()
            ]
            assert len(used) == len(set(used)) == x["k_pages"].shape[0]
        if case.suite is Suite.ROPE_APPEND:
            assert x["cache_seqlens"].tolist() == list(case.cached_lens)
            assert x["cos"].shape == (case.seq_len, case.head_dim // 2)


def load_script(name: str) -> ModuleType:
    """A benchmarks/ script loaded by path, as a module (its `main` not run)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cases_module_needs_only_the_standard_library_and_torch() -> None:
    """The peer processes load it by path, next to other packages: it must not import tileprefill,
    and the cases they rebuild from the harness's JSON are ours."""
    source = Path(bench_cases.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "torch"}, imported
    loaded = load_script("bench_peer").load_cases_module(load_script("bench_peer").DEFAULT_CASES_MODULE)
    for case in scoreboard.scoreboard_cases():
        theirs = loaded.Case.from_json(json.loads(json.dumps(case.to_json())))
        assert theirs.to_json() == case.to_json() and theirs.flops == case.flops


def test_reference_rows_match_our_cpu_kernels_on_every_layout() -> None:
    """The rows a peer's output is checked against are the attention our Ops compute (CPU reference
    kernels): masks, windows, softcaps, GQA heads and pages read the same way."""
    for case in tiny_cases():
        x = bench_cases.make_inputs(case, "cpu")
        reference = bench_cases.reference_rows(case, x, rows=5)
        if case.suite is Suite.ROPE_APPEND:
            assert reference is None
            continue
        assert reference is not None
        first, want = reference
        ours = our_calls(case, x)[OURS]().flatten(0, -3)
        got = ours[first : first + want.shape[0]].float()
        assert 1 <= want.shape[0] <= 5 and want.shape[1:] == (case.heads, case.head_dim), case.name
        assert torch.allclose(got, want, atol=2e-2, rtol=2e-2), case.name


# --- the scoreboard ----------------------------------------------------------------------------------

#: What the scoreboard must cover, each a test of a case: a scoreboard without one fails.
SCOREBOARD_FAMILIES: dict[str, Callable[[Case], bool]] = {
    "dense D128 group 1 causal": lambda c: (
        c.layout is Layout.DENSE and c.head_dim == 128 and c.group_size == 1 and c.causal
    ),
    "dense D128 group 2 causal": lambda c: (
        c.layout is Layout.DENSE and c.head_dim == 128 and c.group_size == 2 and c.causal
    ),
    "dense D128 Hq32/Hkv32 B8 S2048 causal": lambda c: (
        c.layout is Layout.DENSE
        and (c.heads, c.kv_heads, c.batch, c.seq_len, c.causal) == (32, 32, 8, 2048, True)
    ),
    "dense D128 Hq32/Hkv32 B4 S4096 causal": lambda c: (
        c.layout is Layout.DENSE
        and (c.heads, c.kv_heads, c.batch, c.seq_len, c.causal) == (32, 32, 4, 4096, True)
    ),
    "dense D64": lambda c: c.layout is Layout.DENSE and c.head_dim == 64,
    "dense D256": lambda c: c.layout is Layout.DENSE and c.head_dim == 256,
    "short dense B16 S1024": lambda c: c.layout is Layout.DENSE and (c.batch, c.seq_len) == (16, 1024),
    "dense D128 non-causal S8192": lambda c: (
        c.layout is Layout.DENSE and c.head_dim == 128 and not c.causal and c.seq_len == 8192
    ),
    "dense D128 non-causal S16384": lambda c: (
        c.layout is Layout.DENSE and c.head_dim == 128 and not c.causal and c.seq_len == 16384
    ),
    "unaligned dense lengths": lambda c: c.layout is Layout.DENSE and c.seq_len % 64 != 0,
    "ragged mix of short and long": lambda c: (
        c.layout is Layout.RAGGED and min(c.q_lens) < 128 and max(c.q_lens) >= 4096
    ),
    "ragged non-causal": lambda c: c.layout is Layout.RAGGED and not c.causal,
    "paged page 1 chunked": lambda c: c.suite is Suite.PAGED and c.page_size == 1 and min(c.cached_lens) > 0,
    "paged page 16 chunked": lambda c: (
        c.suite is Suite.PAGED and c.page_size == 16 and min(c.cached_lens) > 0
    ),
    "paged page 64 chunked": lambda c: (
        c.suite is Suite.PAGED and c.page_size == 64 and min(c.cached_lens) > 0
    ),
    "paged long (>= 8k keys)": lambda c: c.suite is Suite.PAGED and min(c.kv_lens) >= 8192,
    "paged chunks with decode rows": lambda c: (
        c.layout is Layout.PAGED and min(c.q_lens) == 1 and max(c.q_lens) >= 512
    ),
    "rope-append paged": lambda c: c.suite is Suite.ROPE_APPEND and c.layout is Layout.PAGED,
    "fp16": lambda c: c.dtype == "fp16",
}


def test_the_scoreboard_fits_one_run_and_covers_every_family() -> None:
    cases = scoreboard.scoreboard_cases()
    assert len(cases) <= scoreboard.MAX_CASES == 40
    assert len({c.name for c in cases}) == len({c.key() for c in cases}) == len(cases)
    missing = [name for name, covers in SCOREBOARD_FAMILIES.items() if not any(map(covers, cases))]
    assert not missing, missing
    assert sum(c.dtype == "bf16" for c in cases) >= 0.9 * len(cases)
    assert all(c.series for c in cases)
    # a case the default set has keeps its name there (runs of either set compare by name)
    known = {c.key(): c.name for c in default_cases()}
    assert all(known.get(c.key(), c.name) == c.name for c in cases)
    assert "dense_bf16_d128_h32-8_b1_s8192_noncausal" in {c.name for c in cases}


def test_every_rope_append_batch_of_the_scoreboard_has_its_attention_alone_twin() -> None:
    cases = scoreboard.scoreboard_cases()
    twins = scoreboard.attention_alone_twins(cases)
    rope = [c for c in cases if c.suite is Suite.ROPE_APPEND]
    assert rope and set(twins) == {c.name for c in rope}
    for case in rope:
        twin = twins[case.name]
        assert twin.suite is Suite.PAGED and twin in cases
        assert dataclasses.replace(twin, suite=Suite.ROPE_APPEND, name=case.name, series=case.series) == case
        assert twin.flops == case.flops
    assert scoreboard.attention_alone_twins([c for c in cases if c not in twins.values()]) == {}


def test_the_scoreboard_fits_its_time_budget_by_estimate() -> None:
    """Its estimate with every peer (compile, ours, TileOPs, FlashInfer's two backends) stays within
    the deadline of its defaults, and that deadline within 9 minutes less the archives' unpacking."""
    cases = scoreboard.scoreboard_cases()
    defaults = SCOREBOARD_DEFAULTS
    expected = estimate(
        ours=cases,
        sdpa_backends=len(defaults.sdpa),
        peers={"TileOPs": (len(cases), 1, defaults.peer_compile_jobs), "FlashInfer": (len(cases), 2, 0)},
        warmup_ms=defaults.warmup_ms,
        rep_ms=defaults.rep_ms,
        jobs=16,
    )
    assert defaults.deadline_s is not None and expected.total_s < defaults.deadline_s <= 9 * 60 - 60
    assert "compile ~" in expected.describe() and "FlashInfer ~" in expected.describe()


def test_shrunk_cases_keep_their_family() -> None:
    for case in scoreboard.scoreboard_cases():
        small = catalogue.shrunk(case)
        same = ("suite", "layout", "dtype", "head_dim", "causal", "page_size", "softcap")
        assert all(getattr(small, f) == getattr(case, f) for f in same), case.name
        assert small.group_size == case.group_size and small.batch == case.batch
        assert max(small.kv_lens) <= -(-max(case.kv_lens) // catalogue.SHRINK)
        assert small.name == case.name + "_tiny"


def test_a_deadline_gives_each_stage_what_the_later_ones_do_not_need() -> None:
    assert Deadline(None).share(10, 10) == float("inf") and not Deadline(None).passed()
    now = time.perf_counter()
    deadline = Deadline(100.0, start=now)
    assert 79 < deadline.share(10, 20) <= 80  # the slack goes to this stage
    assert 49 < deadline.share(200, 200) <= 50  # too little left: in proportion
    assert Deadline(1.0, start=now - 5).passed() and Deadline(1.0, start=now - 5).share(1, 1) == 0
    assert "--deadline-s" in deadline.reason() and deadline.reason().startswith("not reached")


# --- outputs from fake timings -----------------------------------------------------------------------


@attrs.frozen
class FakeTimer:
    """Every callable takes `ms`: no GPU, no clock."""

    ms: float = 2.0

    @property
    def name(self) -> str:
        return f"fake timer ({self.ms} ms)"

    def __call__(self, fn: object) -> float:
        return self.ms


def fake_run() -> RunResult:
    case = next(c for c in default_cases() if c.name == "dense_s8192_causal")
    paged = next(c for c in default_cases() if c.name == "paged_bf16_2x2048+256_p1")
    return RunResult(
        device={"name": "Fake GPU", "arch": "sm90", "sms": 132},
        versions={"torch": "0", "tilelang": "0"},
        command="python -m tileprefill bench --fake",
        timer="fake",
        started="2026-12-01T00:00:00+00:00",
        finished="2026-12-01T00:01:00+00:00",
        peers=[PeerInfo(ran=True, available=True, seconds=5.0, versions={"tileops": "0.1.0"})],
        cases=[
            CaseResult(
                case,
                {
                    OURS: Measurement(ms=1.0),
                    SDPA_FLASH: Measurement(ms=2.0),
                    SDPA_CUDNN: Measurement.unavailable("RuntimeError: no kernel"),
                    TILEOPS: Measurement(ms=0.5),
                },
                kernel="attn_dense_sm90",
                relative_error={SDPA_FLASH: 1e-3},
            ),
            CaseResult(
                paged, {OURS: Measurement(ms=4.0), TILEOPS: Measurement(ms=5.0)}, kernel="attn_paged_sm90"
            ),
        ],
    )


def test_markdown_json_and_plots_from_fake_results(tmp_path: Path) -> None:
    result = fake_run()
    written = report.write_all(result, report.OutputPaths(tmp_path, "fake"))
    assert {p.name for p in written} == {"fake.json", "fake.md", "fake-dense.png", "fake-paged.png"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written if p.suffix == ".png")
    text = (tmp_path / "fake.md").read_text()
    tflops = result.cases[0].case.flops / 1.0 / 1e9
    row = next(line for line in text.splitlines() if line.startswith("| `dense_s8192_causal`"))
    assert f"| {tflops:.0f} |" in row and "| 2.00× |" in row and "| 0.50× |" in row
    assert "SDPA cuDNN: unavailable: RuntimeError: no kernel" in text
    assert "## Reference cases (figures quoted in the README and the performance targets)" in text
    assert "| 1.25× |" in text and "| 4.000 |" in text  # ours ÷ TileOPs on the paged case; its ms
    data = json.loads((tmp_path / "fake.json").read_text())
    assert data["device"]["name"] == "Fake GPU" and data["command"].endswith("--fake")
    entry = data["cases"]["dense_s8192_causal"]
    assert entry["speedup"] == {"sdpa_flash": 2.0, "tileops": 0.5}
    assert entry["results"]["ours"]["tflops"] == pytest.approx(tflops)
    again = RunResult.from_json(data)
    assert report.markdown(again) == text


def fake_scoreboard() -> RunResult:
    """A few scoreboard cases with chosen times (ms) per implementation."""
    cases = {c.name: c for c in scoreboard.scoreboard_cases()}
    times = {
        "dense_bf16_d128_h32-32_b8_s2048_causal": {
            OURS: 1.0,
            TILEOPS: 0.5,
            FLASHINFER_FA3: 0.8,
            SDPA_CUDNN: 1.1,
        },
        "dense_bf16_d128_h32-8_b1_s8192_noncausal": {
            OURS: 2.0,
            TILEOPS: 2.2,
            FLASHINFER_FA3: 3.0,
            FLASHINFER_FA2: 4.0,
            SDPA_CUDNN: 2.0,
        },
        "dense_bf16_d128_h32-8_b1_s16384_noncausal": {
            OURS: 4.0,
            TILEOPS: 4.0,
            FLASHINFER_FA2: 6.0,
            SDPA_CUDNN: 5.0,
        },
        "dense_bf16_d64_h32-8_b4_s2048_causal": {OURS: 1.0, TILEOPS: 1.25},
        "rope_paged_bf16_8x4096+512_p16": {OURS: 1.25, OURS_ATTENTION: 1.0, SDPA_CUDNN: 2.5},
        "paged_bf16_8x4096+512_p16": {OURS: 1.0, TILEOPS: 0.9, FLASHINFER_FA3: 1.1, FLASHINFER_FA2: 1.3},
    }
    run = fake_run()
    run.cases = [
        CaseResult(cases[name], {impl: Measurement(ms=ms) for impl, ms in measured.items()})
        for name, measured in times.items()
    ]
    run.cases[0].results[FLASHINFER_FA2] = Measurement.unavailable("no prebuilt module")
    return run


def test_the_summary_takes_per_family_medians_and_minimums_of_each_comparison(tmp_path: Path) -> None:
    result = fake_scoreboard()
    rows = {f.name: f for f in summary.families(result.cases)}
    assert list(rows) == ["dense", "dense D64", "dense D128", "paged", "rope-append"]
    dense = rows["dense"].vs
    tileops, best, cudnn = dense[TILEOPS], dense[FLASHINFER_BEST], dense[SDPA_CUDNN]
    assert tileops is not None and best is not None and cudnn is not None
    assert (tileops.count, tileops.median, tileops.low, tileops.below_one) == (4, 1.05, 0.5, 1)
    assert tileops.low_case == "dense_bf16_d128_h32-32_b8_s2048_causal"
    assert (best.count, best.median, best.low) == (3, 1.5, 0.8)  # fa3 0.8 ms vs ours 1.0: fa2 failed
    assert (cudnn.count, cudnn.median, cudnn.low, cudnn.below_one) == (3, 1.1, 1.0, 0)
    assert rows["dense D64"].vs[FLASHINFER_BEST] is None and rows["dense D128"].cases == 3
    paged = rows["paged"].vs[FLASHINFER_BEST]
    assert paged is not None and paged.median == pytest.approx(1.1)  # the faster backend: fa3
    assert [r.case.name for r in summary.long_dense(result.cases)] == [
        "dense_bf16_d128_h32-8_b1_s8192_noncausal",
        "dense_bf16_d128_h32-8_b1_s16384_noncausal",
    ]
    (rope,) = summary.rope_rows(result.cases)
    assert rope.twin is not None and rope.twin.case.name == "paged_bf16_8x4096+512_p16"
    assert rope.vs_alone == pytest.approx(0.8) and rope.vs_twin == pytest.approx(0.8)
    text = report.markdown(result)
    assert (
        "| dense D128 | 3 | 1.00× (min 0.50× `dense_bf16_d128_h32-32_b8_s2048_causal`; 1 of 3 below 1.00×)"
        in text
    )
    assert (
        "| `rope_paged_bf16_8x4096+512_p16` | " in text
        and "| 0.80× | `paged_bf16_8x4096+512_p16` | 0.80× |" in text
    )
    s8192 = result.cases[1]
    assert f"| `{s8192.case.name}` | {s8192.case.describe()} | {s8192.case.flops / 2e9:.0f} |" in text
    assert "issue" not in text.lower() and "session" not in text.lower()
    data = json.loads(json.dumps(result.to_json()))
    assert data["cases"]["dense_bf16_d128_h32-32_b8_s2048_causal"]["speedup"][FLASHINFER_BEST] == 0.8


def test_split_runs_merge_into_one_set_of_outputs(tmp_path: Path) -> None:
    first, second = fake_run(), fake_run()
    first.cases, second.cases = first.cases[:1], second.cases[1:]
    report.write_json(first, tmp_path / "a.json")
    report.write_json(second, tmp_path / "b.json")
    argv = ["bench", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    assert cli.main([*argv, "--out-dir", str(tmp_path), "--name", "ab"]) == 0
    merged = json.loads((tmp_path / "ab.json").read_text())
    assert list(merged["cases"]) == ["dense_s8192_causal", "paged_bf16_2x2048+256_p1"]
    assert (tmp_path / "ab.md").exists() and (tmp_path / "ab-paged.png").exists()


def test_merge_combines_split_runs_per_implementation(tmp_path: Path) -> None:
    """Ours in one run, the peer in another (--peer-only), a third run whose peer stopped at its
    deadline, and a raw peer JSON folded in: every figure survives, none is replaced by a missing
    one, and a merge of an unfinished run is marked partial."""
    ours_run, peer_run, cut_off = fake_run(), fake_run(), fake_run()
    for case_result in ours_run.cases:
        del case_result.results[TILEOPS]
    peer_run.cases = [CaseResult(c.case, {TILEOPS: c.results[TILEOPS]}) for c in peer_run.cases]
    cut_off.cases = [CaseResult(c.case, {TILEOPS: Measurement.unavailable("stopped")}) for c in cut_off.cases]
    cut_off.finished = ""
    for name, run in (("ours", ours_run), ("peer", peer_run), ("cut", cut_off)):
        report.write_json(run, tmp_path / f"{name}.json")
    folded = {"peer": "TileOPs 0.1.0", "available": True, "cases": {"paged_bf16_2x2048+256_p1": {"ms": 8.0}}}
    (tmp_path / "raw-peer.json").write_text(json.dumps(folded))
    files = [str(tmp_path / f"{name}.json") for name in ("ours", "peer", "cut")]
    assert cli.main(["bench", "--merge", *files, "--out-dir", str(tmp_path), "--name", "m"]) == 0
    merged = json.loads((tmp_path / "m.json").read_text())["cases"]
    dense = merged["dense_s8192_causal"]
    assert dense["results"]["ours"]["ms"] == 1.0 and dense["results"]["tileops"]["ms"] == 0.5
    assert dense["kernel"] == "attn_dense_sm90" and dense["speedup"]["tileops"] == 0.5
    assert "**partial**" in (tmp_path / "m.md").read_text()
    argv = ["bench", "--merge", *files[:2], "--peer-results", str(tmp_path / "raw-peer.json")]
    assert cli.main([*argv, "--out-dir", str(tmp_path), "--name", "f"]) == 0
    merged = json.loads((tmp_path / "f.json").read_text())["cases"]
    assert merged["paged_bf16_2x2048+256_p1"]["results"]["tileops"]["ms"] == 8.0
    assert merged["dense_s8192_causal"]["results"]["tileops"]["ms"] == 0.5
    text = (tmp_path / "f.md").read_text()
    assert "folded in from" in text and "- status: complete" in text


def test_a_run_of_every_suite_on_cpu_writes_every_output(tmp_path: Path) -> None:
    """The whole pipeline on tiny cases: our Ops (reference kernels) and SDPA on the CPU, timed by
    the fake timer; outputs checked against SDPA's for real."""
    settings = BenchSettings(dry_run=True, out_dir=str(tmp_path), name="t")
    assert runner.run(settings, timer=FakeTimer(2.0)) == 0
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["timer"] == "fake timer (2.0 ms)" and data["finished"]
    assert {e["case"]["suite"] for e in data["cases"].values()} == {s.value for s in Suite}
    for name, entry in data["cases"].items():
        assert entry["results"]["ours"]["ms"] == 2.0, name
        assert entry["kernel"].endswith("_ref"), name  # torch reference kernels on a CPU
        if entry["case"]["window"] or entry["case"]["softcap"]:  # SDPA has neither: nothing to time
            assert entry["results"]["sdpa_flash"]["error"].startswith("unavailable: SDPA's flash"), name
            continue
        assert entry["results"]["sdpa_flash"]["ms"] == 2.0, name
        assert entry["relative_error_vs"]["sdpa_flash"] < 1e-2, name
        assert "ms" in entry["results"]["sdpa_cudnn"] or "error" in entry["results"]["sdpa_cudnn"]
        assert entry["results"]["tileops"]["error"].startswith("unavailable: not run"), name
        assert entry["speedup"]["sdpa_flash"] == 1.0, name
    rope = [e for e in data["cases"].values() if e["case"]["suite"] == "rope-append"]
    assert all(e["kernel"].count("->") >= 2 and "ms" in e["results"]["ours_attention"] for e in rope)
    markdown = (tmp_path / "t.md").read_text()
    assert "TileOPs 0.1.0: no figures: not run: --dry-run" in markdown
    assert "- bf16 S96 window 40 softcap 20: 1.000x the time without softcap" in markdown
    assert {p.name for p in tmp_path.glob("*.png")} == {f"t-{s.value}.png" for s in Suite}


def test_a_run_past_its_deadline_starts_nothing_more_and_still_writes_its_outputs(tmp_path: Path) -> None:
    """Past the deadline no case of ours and no peer starts; each says so, the outputs are written,
    and --resume would time them all again."""
    settings = BenchSettings(
        dry_run=True,
        suites=(Suite.PAGED,),
        deadline_s=0.0,
        flashinfer_path="",
        out_dir=str(tmp_path),
        name="late",
    )
    assert runner.run(settings, timer=FakeTimer()) == 0
    data = json.loads((tmp_path / "late.json").read_text())
    assert data["finished"] and data["cases"]
    for entry in data["cases"].values():
        for implementation in (OURS, SDPA_FLASH, FLASHINFER_FA3, FLASHINFER_FA2):
            error = entry["results"][implementation]["error"]
            assert error.startswith("unavailable: not reached: the run stopped timing at its deadline"), error
    assert "- FlashInfer: no figures: not reached" in (tmp_path / "late.md").read_text()
    settled = merging.settled_in([str(tmp_path / "late.json")])
    assert not settled[OURS] and not settled[FLASHINFER_FA3]


def test_a_resumed_run_times_only_what_the_earlier_runs_left(tmp_path: Path) -> None:
    """--resume after a cut-off run: a case with a figure or a failure (which a new attempt would
    repeat) is left out; one never reached, or missing from the earlier runs, is timed; the two runs
    then merge into one whole set."""
    settings = BenchSettings(
        dry_run=True, suites=(Suite.DENSE, Suite.PAGED), out_dir=str(tmp_path), name="rest"
    )
    cases = runner.selected_cases(settings)
    measured, failed, unreached, missing = cases
    earlier = fake_run()
    earlier.device = runner.environment(torch.device("cpu"))[0]  # what --merge checks: one machine
    earlier.cases = [
        CaseResult(measured, {OURS: Measurement(ms=3.0), TILEOPS: Measurement.unavailable("not run: x")}),
        CaseResult(
            failed, {OURS: Measurement.failed(RuntimeError("no kernel")), TILEOPS: Measurement(ms=1.0)}
        ),
        CaseResult(unreached, {OURS: Measurement.unavailable("not reached: stopped at its budget")}),
    ]
    report.write_json(earlier, tmp_path / "cut.json")
    raw_peer = {
        "peer": "TileOPs 0.1.0",
        "available": True,
        "cases": {missing.name: {"error": "unavailable: X"}},
    }
    (tmp_path / "cut-peer.json").write_text(json.dumps(raw_peer))
    settled = merging.settled_in([str(tmp_path / "cut.json"), str(tmp_path / "cut-peer.json")])
    assert settled[OURS] == {measured.name, failed.name}
    assert settled[TILEOPS] == {failed.name, missing.name}
    settings = attrs.evolve(settings, resume=(str(tmp_path / "cut.json"),))
    assert runner.run(settings, timer=FakeTimer(2.0)) == 0
    rest = json.loads((tmp_path / "rest.json").read_text())
    assert list(rest["cases"]) == [unreached.name, missing.name]
    argv = ["bench", "--merge", str(tmp_path / "cut.json"), str(tmp_path / "rest.json")]
    assert cli.main([*argv, "--out-dir", str(tmp_path), "--name", "whole"]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())["cases"]
    assert [whole[c.name]["results"]["ours"].get("ms") for c in cases] == [3.0, None, 2.0, 2.0]
    everything = (*settings.resume, str(tmp_path / "rest.json"))
    assert runner.run(attrs.evolve(settings, name="none", resume=everything), timer=FakeTimer()) == 0
    assert not (tmp_path / "none.json").exists()


def test_resume_refuses_merge_and_files_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report.write_json(fake_run(), tmp_path / "a.json")
    run = str(tmp_path / "a.json")
    assert cli.main(["bench", "--merge", run, "--resume", run, "--out-dir", str(tmp_path)]) == 2
    assert "--resume: expected no --merge" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{not json")
    for path in (tmp_path / "missing.json", tmp_path / "bad.json"):
        argv = ["bench", "--dry-run", "--resume", str(path), "--out-dir", str(tmp_path), "--name", "x"]
        assert cli.main(argv) == 2
        assert "--resume: expected JSON written by bench, got" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


# --- the CLI -----------------------------------------------------------------------------------------


def test_cli_parses_bench_flags() -> None:
    flags = "--suite paged --suite rope-append --dtype bf16 --quick --max-cases 2 --peer-timeout 90"
    args = cli.parse_args(["bench", *flags.split(), "--peer-path", "/tmp/peer:/tmp/tl", "--out-dir", "out"])
    assert isinstance(args, BenchSettings)
    assert args.suites == (Suite.PAGED, Suite.ROPE_APPEND) and args.dtypes == ("bf16",)
    assert (args.quick, args.max_cases, args.peer_path, args.peer_timeout_s) == (
        True,
        2,
        "/tmp/peer:/tmp/tl",
        90.0,
    )
    no_peer = cli.parse_args(["bench", "--peer-path", "/x", "--no-peer"])
    assert isinstance(no_peer, BenchSettings) and no_peer.peer_path is None
    full = cli.parse_args(["bench"])
    assert isinstance(full, BenchSettings) and not full.quick and not full.suites and full.max_cases is None
    resumed = cli.parse_args(["bench", "--peer-only", "--resume", "a.json", "b.json"])
    assert isinstance(resumed, BenchSettings) and resumed.resume == ("a.json", "b.json") and resumed.peer_only


def test_the_scoreboard_flag_selects_its_set_and_its_timing_defaults() -> None:
    args = cli.parse_args(["bench", "--suite", "scoreboard", "--flashinfer-path", "/tmp/fi"])
    assert isinstance(args, BenchSettings) and args.scoreboard and args.suites == ()
    assert (args.warmup_ms, args.rep_ms, args.deadline_s, args.peer_compile_jobs, args.sdpa) == (
        50,
        200,
        450.0,
        16,
        (SDPA_CUDNN,),
    )
    assert args.flashinfer_path == "/tmp/fi" and not args.flashinfer_jit
    given = cli.parse_args(
        [
            "bench",
            "--suite",
            "scoreboard",
            "--suite",
            "paged",
            "--rep-ms",
            "7",
            "--deadline-s",
            "60",
            "--no-peer",
        ]
    )
    assert isinstance(given, BenchSettings) and given.suites == (Suite.PAGED,)
    assert (given.rep_ms, given.warmup_ms, given.deadline_s) == (7, 50, 60.0)
    assert given.flashinfer_path is None and given.peer_path is None
    dry = cli.parse_args(["bench", "--suite", "scoreboard", "--dry-run"])
    assert isinstance(dry, BenchSettings) and dry.scoreboard and dry.deadline_s is None
    assert dry.sdpa == (SDPA_FLASH, SDPA_CUDNN) and dry.peer_compile_jobs == 0
    plain = cli.parse_args(["bench"])
    assert (
        isinstance(plain, BenchSettings)
        and not plain.scoreboard
        and (plain.warmup_ms, plain.rep_ms) == (25, 100)
    )
    assert runner.selected_cases(dry)[0].name.endswith("_tiny")
    assert runner.run(attrs.evolve(args, quick=True)) == 2  # --quick and the scoreboard: refused


def test_cli_lists_the_cases(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith(f"{len(default_cases())} cases: dense ") and lines[-1].startswith(
        "estimate: "
    )
    assert (
        cli.main(["bench", "--list", "--suite", "scoreboard", "--peer-path", "/p", "--flashinfer-path", "/f"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith(f"{len(scoreboard.scoreboard_cases())} cases: dense 17, ragged 5")
    assert "TileOPs 0.1.0 ~" in lines[-1] and "FlashInfer ~" in lines[-1] and "stops at 450 s" in lines[-1]
    assert cli.main(["bench", "--list", "--quick", "--suite", "paged"]) == 0
    out = capsys.readouterr().out
    assert "paged_bf16_2x2048+256_p1" in out and "dense" not in out.splitlines()[0]


def test_dry_run_from_the_cli_times_with_the_wall_clock(tmp_path: Path) -> None:
    argv = [
        "bench",
        "--dry-run",
        "--suite",
        "paged",
        "--max-cases",
        "1",
        "--out-dir",
        str(tmp_path),
        "--name",
        "d",
    ]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "d.json").read_text())
    assert data["timer"].startswith("wall clock") and data["command"].endswith("--name d")
    (entry,) = data["cases"].values()
    assert entry["results"]["ours"]["ms"] > 0 and entry["first_call_s"] > 0
    assert {p.name for p in tmp_path.iterdir()} == {"d.json", "d.md", "d-paged.png"}


def test_recording_on_a_cpu_lists_no_program() -> None:
    assert runner.record_programs(tiny_cases()[:1], torch.device("cpu")) == []


# --- the peer processes ------------------------------------------------------------------------------


def started(
    spec: peer.PeerSpec, cases: list[Case], tmp_path: Path, **options: float
) -> tuple[PeerInfo, peer.PeerResults]:
    """`spec` run on `cases` with its files under `tmp_path`, the harness's way."""
    files = report.OutputPaths(tmp_path, "t").peer_files(spec.slug)
    peer.write_cases(cases, files.cases)
    timeout = float(options.get("timeout_s", 120.0))
    return peer.run_peer(spec, cases, files, timeout_s=timeout, warmup_ms=1, rep_ms=1, device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("tileops") is not None, reason="TileOPs is importable here")
def test_the_peer_says_when_tileops_is_not_importable(tmp_path: Path) -> None:
    info, results = started(peer.tileops(""), tiny_cases()[:2], tmp_path)
    assert info.ran and not info.available and results == {}
    assert info.reason.startswith("not importable in its process: ModuleNotFoundError"), info.reason
    assert info.name == "TileOPs 0.1.0" and info.implementations == (TILEOPS,)


@pytest.mark.skipif(
    importlib.util.find_spec("flashinfer") is not None, reason="FlashInfer is importable here"
)
def test_a_run_without_flashinfer_reports_it_skipped_with_its_reason(tmp_path: Path) -> None:
    """FlashInfer's process on a PYTHONPATH without it: no crash, no figure; every case of the run
    says why, and so does the report (the whole pipeline of a scoreboard dry run on a CPU)."""
    info, results = started(peer.flashinfer(""), tiny_cases()[:1], tmp_path)
    assert info.ran and not info.available and results == {}
    assert info.reason.startswith(
        "not importable in its process: ModuleNotFoundError: No module named 'flashinfer'"
    )
    settings = BenchSettings(
        dry_run=True,
        scoreboard=True,
        suites=(Suite.PAGED, Suite.ROPE_APPEND),
        max_cases=1,
        flashinfer_path="",
        out_dir=str(tmp_path),
        name="sb",
    )
    assert runner.run(settings, timer=FakeTimer(2.0)) == 0
    data = json.loads((tmp_path / "sb.json").read_text())
    assert list(data["cases"]) == ["paged_bf16_2x2048+256_p1_tiny", "rope_paged_bf16_8x4096+512_p16_tiny"]
    for entry in data["cases"].values():
        for backend in (FLASHINFER_FA3, FLASHINFER_FA2):
            assert entry["results"][backend]["error"].startswith("unavailable: not importable in its process")
        assert entry["results"][TILEOPS]["error"] == "unavailable: not run: --dry-run"
        assert entry["results"][OURS]["ms"] == 2.0
    text = (tmp_path / "sb.md").read_text()
    assert "- FlashInfer: no figures: not importable in its process: ModuleNotFoundError" in text
    assert "## Summary" in text and "RoPE + append Op against attention alone" in text


class FakeFlashInferSite:
    """A `flashinfer` package whose wrappers have no module for any configuration (as FlashInfer
    with JIT compiling off and no prebuilt module): each `plan` raises MissingJITCacheError."""

    PREFILL = (
        "from flashinfer.jit import MissingJITCacheError\n"
        "planned = []\n"
        "class Wrapper:\n"
        "    def __init__(self, workspace, layout, backend):\n"
        "        self.backend = backend\n"
        "    def plan(self, *args, **kwargs):\n"
        "        planned.append(self.backend)\n"
        "        raise MissingJITCacheError('JIT compilation is disabled')\n"
        "BatchPrefillWithRaggedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper = Wrapper\n"
    )

    @classmethod
    def install(cls, root: Path) -> None:
        site = root / "flashinfer"
        site.mkdir()
        (site / "__init__.py").write_text("__version__ = '0.0'\n")
        (site / "jit.py").write_text("class MissingJITCacheError(RuntimeError):\n    pass\n")
        (site / "prefill.py").write_text(cls.PREFILL)


def test_flashinfer_declines_a_case_without_a_prebuilt_module_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A (backend, dtype, head dim) with no prebuilt module and JIT compiling off: the case is declined
    with a note naming the module and the flag, the module is not asked for again, and a RoPE +
    append case is declined as FlashInfer has no such Op."""
    FakeFlashInferSite.install(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("flashinfer", "flashinfer.jit", "flashinfer.prefill"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    script = load_script("bench_flashinfer_peer")
    from flashinfer import prefill  # type: ignore[import-not-found]
    from flashinfer.jit import MissingJITCacheError  # type: ignore[import-not-found]

    adapter = script.FlashInfer(MissingJITCacheError, device="cpu")
    args = argparse.Namespace(compile_only=False, warmup_ms=1, rep_ms=1)
    cases_module = script.bench_peer.load_cases_module(script.bench_peer.DEFAULT_CASES_MODULE)
    paged, second, rope = (
        cases_module.Case.from_json(c.to_json()) for c in tiny_cases() if c.layout is Layout.PAGED
    )
    for case in (paged, second):
        x = cases_module.make_inputs(case, "cpu")
        entry = script.bench_peer.measure(adapter, cases_module, case, x, FLASHINFER_FA3, args, do_bench=None)
        assert entry["error"].startswith(
            f"unavailable: no prebuilt FlashInfer fa3 module for {case.dtype} D64"
        )
        assert "--flashinfer-jit" in entry["error"] and "ms" not in entry
    assert prefill.planned == ["fa3", "fa3"]  # fp16 and bf16: two modules, each asked for once
    again = script.bench_peer.measure(adapter, cases_module, second, x, FLASHINFER_FA3, args, do_bench=None)
    assert again == {"error": entry["error"]} and prefill.planned == ["fa3", "fa3"]
    x = cases_module.make_inputs(rope, "cpu")
    entry = script.bench_peer.measure(adapter, cases_module, rope, x, FLASHINFER_FA2, args, do_bench=None)
    assert entry["error"].startswith("unavailable: FlashInfer's prefill API has no RoPE + append Op")


def test_the_flashinfer_process_declines_what_it_has_no_module_for_and_carries_on(tmp_path: Path) -> None:
    """The FlashInfer script end to end in its own process (on the CPU, with a FlashInfer that has no
    module for anything): every case comes back declined with its note, none crashes the run."""
    site = tmp_path / "site"
    site.mkdir()
    FakeFlashInferSite.install(site)
    cases = [c for c in tiny_cases() if c.layout in (Layout.PAGED, Layout.RAGGED)]
    info, results = started(peer.flashinfer(str(site)), cases, tmp_path)
    assert info.available and info.ran and info.name == "FlashInfer 0.0", info
    assert info.versions["jit"] == "off" and info.implementations == (FLASHINFER_FA3, FLASHINFER_FA2)
    for backend in (FLASHINFER_FA3, FLASHINFER_FA2):
        assert set(results[backend]) == {c.name for c in cases}
        for case in cases:
            error = results[backend][case.name].error or ""
            if case.suite is Suite.ROPE_APPEND:
                assert error.startswith("unavailable: FlashInfer's prefill API has no RoPE + append Op")
            else:
                assert error.startswith(f"unavailable: no prebuilt FlashInfer {backend[-3:]} module for")


def test_a_peer_output_off_the_reference_is_no_figure() -> None:
    """The driver checks each output against `reference_rows`: a peer whose outputs are off gets no
    figure where it says so (FlashInfer), and only the error recorded where not (TileOPs)."""
    bench_peer = load_script("bench_peer")
    cases_module = bench_peer.load_cases_module(bench_peer.DEFAULT_CASES_MODULE)
    case = cases_module.Case.from_json(next(c for c in tiny_cases() if c.layout is Layout.RAGGED).to_json())
    x = cases_module.make_inputs(case, "cpu")
    first, rows = cases_module.reference_rows(case, x)
    right = torch.zeros(sum(case.q_lens), case.heads, case.head_dim)
    right[first : first + rows.shape[0]] = rows

    class Adapter:
        implementations = ("peer",)

        def __init__(self, output: torch.Tensor, void: bool) -> None:
            self.output, self.void_on_mismatch = output, void

        def call(self, case: object, x: object, implementation: str) -> tuple[Callable[[], object], str]:
            return (lambda: self.output), ""

    args = argparse.Namespace(compile_only=False, warmup_ms=1, rep_ms=1)
    timed = lambda fn, **kw: 2.0  # noqa: E731  (do_bench's median, without a GPU)
    good = bench_peer.measure(Adapter(right, True), cases_module, case, x, "peer", args, timed)
    assert good["ms"] == 2.0 and good["reference_error"] < 1e-6
    wrong = bench_peer.measure(Adapter(right * 1.5, True), cases_module, case, x, "peer", args, timed)
    assert "ms" not in wrong and wrong["error"].startswith(
        "unavailable: its output is off the float32 reference"
    )
    recorded = bench_peer.measure(Adapter(right * 1.5, False), cases_module, case, x, "peer", args, timed)
    assert recorded["ms"] == 2.0 and recorded["reference_error"] == pytest.approx(0.5)


def test_a_peer_past_its_budget_is_stopped_and_its_partial_results_kept(tmp_path: Path) -> None:
    script = tmp_path / "slow_peer.py"
    script.write_text(
        "import json, sys, time\n"
        "out = sys.argv[sys.argv.index('--out') + 1]\n"
        "cases = json.load(open(sys.argv[sys.argv.index('--cases') + 1]))\n"
        "data = {'peer': 'TileOPs 0.1.0', 'available': True, 'cases': {cases[0]['name']: {'ms': 1.5}}}\n"
        "json.dump(data, open(out, 'w'))\n"
        "time.sleep(60)\n"
    )
    cases = tiny_cases()[:3]
    info, results = started(peer.tileops("", script=script), cases, tmp_path, timeout_s=1.5)
    assert info.available and "time budget" in info.reason
    ordered = sorted(cases, key=lambda c: (not c.labels, not c.quick))
    assert results[TILEOPS][ordered[0].name] == Measurement(ms=1.5)
    assert all(results[TILEOPS][c.name].error for c in ordered[1:])


def test_peer_compile_jobs_compile_every_case_once_side_by_side_before_the_timing_run(tmp_path: Path) -> None:
    """--peer-compile-jobs N: N compile-only processes, each a disjoint shard of the cases, all done
    before the one timing process starts (what they leave for it is TileLang's disk cache)."""
    script = tmp_path / "recording_peer.py"
    script.write_text(
        "import json, sys, time\n"
        "arg = lambda name: sys.argv[sys.argv.index(name) + 1]\n"
        "cases = json.load(open(arg('--cases')))\n"
        "if '--compile-only' in sys.argv:\n"
        "    i, n = map(int, arg('--shard').split('/'))\n"
        "    mine = [c['name'] for c in cases[i::n]]\n"
        "    time.sleep(0.3)\n"
        "    json.dump({'shard': [i, n], 'cases': mine, 'done': time.time()}, open(arg('--out'), 'w'))\n"
        "else:\n"
        "    data = {'peer': 'TileOPs 0.1.0', 'available': True, 'started': time.time(),\n"
        "            'implementations': ['tileops'],\n"
        "            'results': {'tileops': {c['name']: {'ms': 1.0} for c in cases}}}\n"
        "    json.dump(data, open(arg('--out'), 'w'))\n"
    )
    cases = tiny_cases()[:5]
    spec = peer.tileops("", compile_jobs=3, script=script)
    files = report.OutputPaths(tmp_path, "t").peer_files(spec.slug)
    peer.write_cases(cases, files.cases)
    compiling = peer.start_compile(spec, len(cases), files, budget_s=60)
    assert compiling is not None
    compiled_s = compiling.wait()
    info, results = peer.run_peer(
        spec, cases, files, timeout_s=60, warmup_ms=1, rep_ms=1, compiled_s=compiled_s
    )
    shards = [json.loads(files.compile_log(i, ".json").read_text()) for i in range(3)]
    assert [s["shard"] for s in shards] == [[0, 3], [1, 3], [2, 3]]
    compiled = [name for s in shards for name in s["cases"]]
    assert sorted(compiled) == sorted(c.name for c in cases)  # every case once
    started_at = json.loads(files.results.read_text())["started"]
    assert all(s["done"] <= started_at for s in shards)
    assert info.available and set(results[TILEOPS]) == {c.name for c in cases}
    assert "after 3 --compile-only processes" in info.command
