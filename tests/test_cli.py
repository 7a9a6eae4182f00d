"""The command line, `tileprefill` (or `python -m tileprefill`): explain, demo and compile."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from types import ModuleType

import pytest
import torch

import tileprefill as tp
from tileprefill import cli, demo
from tileprefill.cli import main
from tileprefill.context import Arch

PAGED_ROPE_APPEND = [
    "explain",
    "--layout",
    "paged",
    "--rope",
    "neox",
    "--append",
    "--dtype",
    "bf16",
    "--arch",
    "sm90",
    "--head-dim",
    "128",
    "--group-size",
    "4",
    "--page-size",
    "16",
]


def test_explain_paged_rope_append(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*PAGED_ROPE_APPEND, "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "plan: batch_paged_tl -> rope_append_neox_tl -> attn_paged_tiled_sm90" in out
    # with --verbose, every other candidate is listed with its reasons
    assert "attn_paged_sm90: supported, but a kernel earlier in preference order serves" in out
    assert "rope_neox_ref: torch reference code serves arch cpu; the call's arch is sm90" in out
    assert "append_contiguous_tl: kv_layout is paged, this kernel appends to contiguous" in out


def test_explain_names_the_attention_tile_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PAGED_ROPE_APPEND) == 0
    assert "attention config: sm90 128x128 tiles, 2 stage(s), 384 threads, persistent 132 CTAs" in (
        capsys.readouterr().out
    )
    argv = ["explain", "--layout", "contiguous", "--rope", "none", "--dtype", "bf16", "--group-size", "4"]
    assert main([*argv, "--arch", "sm90", "--head-dim", "192"]) == 0
    out = capsys.readouterr().out  # the contiguous cache keeps one CTA per query tile
    assert "attention config: sm90 128x64 tiles, 2 stage(s), 384 threads\n" in out
    assert main([*argv, "--arch", "sm80", "--head-dim", "96"]) == 0
    assert "attention config: sm80 128x64 tiles, 1 stage(s), 256 threads\n" in capsys.readouterr().out
    assert main([*argv, "--arch", "cpu", "--head-dim", "96"]) == 0
    assert "attention config" not in capsys.readouterr().out


def test_explain_runs_as_a_module() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tileprefill", *PAGED_ROPE_APPEND], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "plan: batch_paged_tl -> rope_append_neox_tl -> attn_paged_tiled_sm90" in done.stdout


def test_explain_odd_page_size_uses_the_gather_kernel(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*PAGED_ROPE_APPEND[:-1], "7", "--verbose"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "plan: batch_paged_tl -> rope_append_neox_tl -> attn_paged_sm90" in out
    assert "attn_paged_tiled_sm90: page_size 7 is not a power of two >= 16" in out


def test_explain_cpu_plan(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--layout", "none", "--rope", "interleaved", "--ragged", "--dtype", "fp16"]
    assert main([*argv, "--arch", "cpu", "--head-dim", "96", "--group-size", "8", "--non-causal"]) == 0
    out = capsys.readouterr().out
    assert "plan: rope_interleaved_ref -> attn_ragged_ref" in out and "causal=False" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        # RoPE on a read-only cache: no Op can make this call
        (
            ["--layout", "contiguous", "--rope", "neox", "--arch", "sm90", "--head-dim", "128"],
            "rope: expected none for a read-only cache",
        ),
        (
            ["--layout", "none", "--rope", "none", "--arch", "sm80", "--head-dim", "64", "--page-size", "16"],
            "--page-size: expected none with --layout none, got 16",
        ),
        (
            ["--layout", "none", "--rope", "neox", "--arch", "cpu", "--head-dim", "63"],
            "head_dim: expected an even head_dim",
        ),
        (
            ["--layout", "none", "--rope", "none", "--arch", "cpu", "--head-dim", "0"],
            "--head-dim: expected an integer >= 1, got '0'",
        ),
    ],
)
def test_explain_impossible_context(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(["explain", "--dtype", "bf16", "--group-size", "4", *argv])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: tileprefill explain") and "\ntileprefill explain: error: " in err
    assert message in err


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The error lines of a command line that must be refused with exit status 2."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return [line for line in captured.err.splitlines() if ": error: " in line]


def test_every_bad_flag_is_reported_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--layout", "ring", "--rope", "yarn", "--dtype", "fp8", "--arch", "sm70"]
    argv += ["--head-dim", "x", "--group-size", "0", "--page-size", "-1", "--sliding-window", "-2"]
    argv += ["--softcap", "nan", "--frobnicate"]
    assert _refused(argv, capsys) == [
        "tileprefill explain: error: --layout: expected one of none, contiguous, paged, got 'ring'",
        "tileprefill explain: error: --rope: expected one of none, neox, interleaved, got 'yarn'",
        "tileprefill explain: error: --dtype: expected one of fp16, bf16, got 'fp8'",
        "tileprefill explain: error: --arch: expected cpu, sm80 (or sm_80) or sm90 (or sm_90, sm_90a), "
        "got 'sm70'",
        "tileprefill explain: error: --head-dim: expected an integer >= 1, got 'x'",
        "tileprefill explain: error: --group-size: expected an integer >= 1, got '0'",
        "tileprefill explain: error: --page-size: expected an integer >= 1, got '-1'",
        "tileprefill explain: error: --sliding-window: expected an integer >= 0, got '-2'",
        "tileprefill explain: error: --softcap: expected a number >= 0, got 'nan'",
        "tileprefill explain: error: unrecognized arguments: --frobnicate",
    ]


def test_impossible_combinations_are_reported_together(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--layout", "contiguous", "--page-size", "16", "--rope", "neox", "--head-dim", "63"]
    errors = _refused(argv, capsys)
    assert len(errors) == 2
    assert errors[0].endswith("--page-size: expected none with --layout contiguous, got 16")
    assert "rope: expected none for a read-only cache" in errors[1]
    assert "head_dim: expected an even head_dim with RoPE, got 63" in errors[1]


def test_demo_and_compile_report_every_bad_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert _refused(["demo", "--device", "tpu", "--dtype", "fp8", "--engine", "vllm"], capsys) == [
        "tileprefill demo: error: --device: expected one of cpu, cuda, got 'tpu'",
        "tileprefill demo: error: --dtype: expected one of fp16, bf16, got 'fp8'",
        "tileprefill demo: error: --engine: expected one of paged, transformers, got 'vllm'",
    ]
    assert _refused(["compile", "--arch", "cpu", "--jobs", "0"], capsys) == [
        "tileprefill compile: error: --arch: expected sm80 (or sm_80) or sm90 (or sm_90, sm_90a), got 'cpu'",
        "tileprefill compile: error: --jobs: expected an integer >= 1, got '0'",
    ]
    assert _refused(["compile"], capsys) == [
        "tileprefill compile: error: --arch: expected sm80 (or sm_80) or sm90 (or sm_90, sm_90a), got none"
    ]


def test_explain_no_plan_ends_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--layout", "paged", "--rope", "none", "--dtype", "bf16", "--arch", "sm90"]
    assert main([*argv, "--head-dim", "72", "--group-size", "4", "--page-size", "16"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "plan: none (no kernel serves step attention)" in lines
    assert "not chosen:" not in lines
    # the nearest kernel: of those built for sm90, the one with the fewest reasons, earliest preferred
    assert lines[-1] == (
        "no plan: no kernel serves step attention; the nearest, attn_paged_tiled_sm90, refuses: "
        "head_dim 72 is not compiled for TileLang sm90 "
        "(compiled: 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256)"
    )
    assert main([*argv[:-1], "sm_80", "--layout", "none", "--head-dim", "72", "--verbose"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert "not chosen:" in lines and "  attn_dense_ref: torch reference code serves arch cpu; " in "\n".join(
        lines
    )
    assert lines[-1].startswith("no plan: no kernel serves step attention; the nearest, attn_dense_sm80, ")


def test_explain_lists_the_kernels_not_chosen_only_when_verbose(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(PAGED_ROPE_APPEND) == 0
    quiet = capsys.readouterr().out
    assert "not chosen" not in quiet.replace("kernels not chosen: --verbose", "")
    assert quiet.splitlines()[-1] == "(25 kernels not chosen: --verbose says why)"
    assert main([*PAGED_ROPE_APPEND, "-v"]) == 0
    verbose = capsys.readouterr().out.splitlines()
    not_chosen = verbose[verbose.index("not chosen:") + 1 :]
    assert len(not_chosen) == 25 and all(line.startswith("  ") for line in not_chosen)
    assert quiet.splitlines()[:-1] == verbose[: verbose.index("not chosen:")]


def test_explain_alone_explains_a_common_call(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "context: kv_layout=none, rope=none, append=False, q_dtype=bfloat16, kv_dtype=bfloat16, "
        "arch=sm90, head_dim=128, group_size=4, causal=True, page_size=0, ragged=False,"
    )
    assert "plan: attn_dense_sm90\n" in out
    assert main(["explain", "--layout", "paged", "--arch", "cpu"]) == 0  # a page size of 16
    assert "page_size=16, ragged=True" in capsys.readouterr().out


@pytest.mark.parametrize(
    "capability,arch",
    [(None, Arch.SM90), ((9, 0), Arch.SM90), ((8, 0), Arch.SM80), ((8, 9), Arch.SM80), ((10, 0), Arch.SM90)],
)
def test_explain_defaults_to_the_local_gpus_arch(
    capability: tuple[int, int] | None, arch: Arch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU torch sees, else (none, or one we have no code for) sm90."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    parsed = cli.parse_args(["explain"])
    assert isinstance(parsed, cli.ExplainArgs) and parsed.arch is arch


@pytest.mark.parametrize(
    "spelling,arch",
    [
        ("cpu", Arch.CPU),
        ("sm80", Arch.SM80),
        ("sm_80", Arch.SM80),
        ("sm90", Arch.SM90),
        ("sm_90", Arch.SM90),
        ("sm_90a", Arch.SM90),
    ],
)
def test_every_arch_spelling_is_accepted_and_printed_one_way(
    spelling: str, arch: Arch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--arch", spelling]) == 0
    assert f"arch={arch.value}, " in capsys.readouterr().out
    if arch is not Arch.CPU:
        assert cli.parse_args(["compile", "--arch", spelling]) == cli.CompileArgs(arch, None)


def test_version(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The installed package's version; else the package's `__version__`; else "unknown"."""
    with pytest.raises(SystemExit) as raised:
        main(["--version"])
    assert raised.value.code == 0
    assert capsys.readouterr().out == f"tileprefill {importlib.metadata.version('tileprefill')}\n"

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli.package_version() == "unknown"
    monkeypatch.setattr(tp, "__version__", "9.8.7", raising=False)
    assert cli.package_version() == "9.8.7"


def test_help_names_the_tool_as_it_was_run(capsys: pytest.CaptureFixture[str]) -> None:
    """`tileprefill` as the console script (its entry point is `main` with the default prog), and
    `python -m tileprefill` as a module."""
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="tileprefill")
    assert script.value == "tileprefill.cli:main"
    with pytest.raises(SystemExit):
        main(["explain", "--help"])
    assert capsys.readouterr().out.startswith("usage: tileprefill explain [-h]")
    done = subprocess.run(
        [sys.executable, "-m", "tileprefill", "--help"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: python -m tileprefill [-h] [--version]")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_demo_on_cpu(dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cpu", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert out.count("rope_neox_ref -> append_paged_ref -> attn_paged_ref") == 3  # three chunk steps
    assert "ran torch reference kernels" in out
    assert "values in pages exact: True" in out and "max abs error chunked vs dense" in out
    assert out.rstrip().endswith("ok")


def test_demo_fails_when_chunked_and_dense_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(demo.DEMO_TOLERANCE, tp.DType.BF16, (-1.0, 0.0))  # nothing can be within
    assert main(["demo", "--device", "cpu"]) == 1


def test_demo_with_transformers_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    assert main(["demo", "--engine", "transformers", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "16 of 16 are SDPA's greedy choice" in out and "kernels: attn_dense_ref" in out
    assert out.rstrip().endswith("matched SDPA")


def test_demo_with_transformers_fails_when_it_does_not_match(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    from tileprefill.integrations import transformers_demo

    monkeypatch.setattr(transformers_demo, "TOLERANCE", -1.0)  # nothing can be within
    assert main(["demo", "--engine", "transformers", "--device", "cpu"]) == 1


def test_compile_calls_compile_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nvcc's target of the arch, whichever way the arch is spelled."""
    compile_check: ModuleType = pytest.importorskip("tileprefill.compile_check")
    seen: list[tuple[str, str | None, int | None]] = []

    def fake_main(*, arch: str, out_dir: str | None, jobs: int | None) -> int:
        seen.append((arch, out_dir, jobs))
        return 3

    monkeypatch.setattr(compile_check, "main", fake_main)
    assert main(["compile", "--arch", "sm90", "--out", "/tmp/x"]) == 3
    assert main(["compile", "--arch", "sm_80", "--jobs", "2"]) == 3
    assert seen == [("sm_90a", "/tmp/x", None), ("sm_80", None, 2)]
