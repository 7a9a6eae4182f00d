"""The benchmark harness on a CPU: cases and FLOPs, outputs from fake timings, a dry run, the peer."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import attrs
import pytest
import torch

from tileprefill import cli
from tileprefill.bench import cases as bench_cases
from tileprefill.bench import peer, report, runner
from tileprefill.bench.cases import Case, Layout, Suite, default_cases, quick_cases, select, tiny_cases
from tileprefill.bench.results import (
    OURS,
    SDPA_CUDNN,
    SDPA_FLASH,
    TILEOPS,
    CaseResult,
    Measurement,
    PeerInfo,
    RunResult,
)
from tileprefill.bench.settings import BenchSettings


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
    the same S without softcap, and S = window without a window (issue 10's targets)."""
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
        bench_cases.dense_case("fp16", 1, 64, False, window=8)
    with pytest.raises(ValueError, match="dense calls only"):
        dataclasses.replace(bench_cases.paged_case("bf16", 1, 20, 5, 16), softcap=5.0)


def test_flops_count_visible_keys_per_query_head() -> None:
    case = bench_cases.paged_case("bf16", 3, 20, 5, 16)
    assert case.flops == 4 * 128 * 32 * 3 * brute_force_pairs(5, 25, True)
    ragged = bench_cases.ragged_case("fp16", (3, 0, 7), True, name="r")
    assert ragged.pairs == brute_force_pairs(3, 3, True) + brute_force_pairs(7, 7, True)
    dense = bench_cases.dense_case("fp16", 2, 64, False, heads=8, kv_heads=2, head_dim=64)
    assert dense.flops == 4 * 64 * 8 * 2 * 64 * 64


def test_the_default_set_covers_what_issue_7_lists() -> None:
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
    assert sum(label.startswith("issue 7:") for label in labels) == 10
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


def test_the_cases_module_needs_only_the_standard_library_and_torch() -> None:
    """The peer process loads it by path, next to an older TileLang: it must not import tileprefill."""
    source = Path(bench_cases.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "torch"}, imported
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py"
    spec = importlib.util.spec_from_file_location("bench_peer_under_test", script)
    assert spec is not None and spec.loader is not None
    bench_peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_peer)
    loaded = bench_peer.load_cases_module(bench_peer.DEFAULT_CASES_MODULE)
    readme = {c.name: c for c in loaded.default_cases()}
    ours = {c.name: c for c in default_cases()}
    for name in bench_peer.README_CASES:
        assert readme[name].to_json() == ours[name].to_json() and readme[name].flops == ours[name].flops


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
        peer=PeerInfo(ran=True, available=True, seconds=5.0, versions={"tileops": "0.1.0"}),
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
    assert "## Cases quoted in the README and issue 7" in text and "| 1.25× |" in text
    data = json.loads((tmp_path / "fake.json").read_text())
    assert data["device"]["name"] == "Fake GPU" and data["command"].endswith("--fake")
    entry = data["cases"]["dense_s8192_causal"]
    assert entry["speedup"] == {"sdpa_flash": 2.0, "tileops": 0.5}
    assert entry["results"]["ours"]["tflops"] == pytest.approx(tflops)
    again = RunResult.from_json(data)
    assert report.markdown(again) == text


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
    settled = runner.settled_in([str(tmp_path / "cut.json"), str(tmp_path / "cut-peer.json")])
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


def test_cli_lists_the_cases(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{len(default_cases())} cases: dense ")
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


# --- the peer process --------------------------------------------------------------------------------


@pytest.mark.skipif(importlib.util.find_spec("tileops") is not None, reason="TileOPs is importable here")
def test_the_peer_says_when_tileops_is_not_importable(tmp_path: Path) -> None:
    info, results = peer.run_peer(
        tiny_cases()[:2],
        python_path="",
        timeout_s=120,
        out_json=tmp_path / "peer.json",
        log=tmp_path / "peer.log",
        warmup_ms=1,
        rep_ms=1,
    )
    assert info.ran and not info.available and results == {}
    assert info.reason.startswith("not importable in its process: ModuleNotFoundError"), info.reason


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
    info, results = peer.run_peer(
        cases,
        python_path="",
        timeout_s=1.5,
        out_json=tmp_path / "peer.json",
        log=tmp_path / "peer.log",
        warmup_ms=1,
        rep_ms=1,
        script=script,
        python=sys.executable,
    )
    assert info.available and "time budget" in info.reason
    ordered = sorted(cases, key=lambda c: (not c.labels, not c.quick))
    assert results[ordered[0].name] == Measurement(ms=1.5)
    assert all(results[c.name].error for c in ordered[1:])


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
        "            'cases': {c['name']: {'ms': 1.0} for c in cases}}\n"
        "    json.dump(data, open(arg('--out'), 'w'))\n"
    )
    cases = tiny_cases()[:5]
    info, results = peer.run_peer(
        cases,
        python_path="",
        timeout_s=60,
        out_json=tmp_path / "peer.json",
        log=tmp_path / "peer.log",
        warmup_ms=1,
        rep_ms=1,
        script=script,
        python=sys.executable,
        compile_jobs=3,
    )
    shards = [json.loads((tmp_path / f"peer-compile-{i}.json").read_text()) for i in range(3)]
    assert [s["shard"] for s in shards] == [[0, 3], [1, 3], [2, 3]]
    compiled = [name for s in shards for name in s["cases"]]
    assert sorted(compiled) == sorted(c.name for c in cases)  # every case once
    started = json.loads((tmp_path / "peer.json").read_text())["started"]
    assert all(s["done"] <= started for s in shards)
    assert info.available and set(results) == {c.name for c in cases}
    assert "after 3 --compile-only processes" in info.command
