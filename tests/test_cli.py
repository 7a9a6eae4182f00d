"""`python -m tileprefill`: explain, demo and compile."""

from __future__ import annotations

import subprocess
import sys
from types import ModuleType

import pytest

import tileprefill as tp
from tileprefill import cli
from tileprefill.cli import main

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
    assert main(PAGED_ROPE_APPEND) == 0
    out = capsys.readouterr().out
    assert "plan: batch_paged_tl -> rope_append_neox_tl -> attn_paged_tiled_sm90" in out
    # every other candidate is listed with its reasons
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
    argv = [*PAGED_ROPE_APPEND[:-1], "7"]
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
            ["--layout", "paged", "--rope", "none", "--arch", "sm80", "--head-dim", "64"],
            "--page-size: expected",
        ),
        (
            ["--layout", "none", "--rope", "none", "--arch", "sm80", "--head-dim", "64", "--page-size", "16"],
            "--page-size: expected none",
        ),
        (
            ["--layout", "none", "--rope", "neox", "--arch", "cpu", "--head-dim", "63"],
            "head_dim: expected an even head_dim",
        ),
        (
            ["--layout", "none", "--rope", "none", "--arch", "cpu", "--head-dim", "0"],
            "head_dim: expected an integer",
        ),
    ],
)
def test_explain_impossible_context(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--dtype", "bf16", "--group-size", "4", *argv]) == 2
    assert message in capsys.readouterr().err


def test_explain_no_plan(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["explain", "--layout", "paged", "--rope", "none", "--dtype", "bf16", "--arch", "sm90"]
    assert main([*argv, "--head-dim", "72", "--group-size", "4", "--page-size", "16"]) == 2
    captured = capsys.readouterr()
    assert "plan: none (no kernel serves step attention)" in captured.out
    assert (
        "head_dim 72 is not compiled for TileLang sm90 "
        "(compiled: 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240, 256)" in captured.out
    )
    assert "no kernel serves step attention" in captured.err


def test_explain_bad_choice_exits_2() -> None:
    with pytest.raises(SystemExit) as raised:
        main(["explain", "--layout", "ring", "--rope", "none", "--dtype", "bf16", "--arch", "cpu"])
    assert raised.value.code == 2


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_demo_on_cpu(dtype: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--device", "cpu", "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    assert out.count("rope_neox_ref -> append_paged_ref -> attn_paged_ref") == 3  # three chunk steps
    assert "ran torch reference kernels" in out
    assert "values in pages exact: True" in out and "max abs error chunked vs dense" in out
    assert out.rstrip().endswith("ok")


def test_demo_fails_when_chunked_and_dense_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cli.DEMO_TOLERANCE, tp.DType.BF16, (-1.0, 0.0))  # nothing can be within
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
    compile_check: ModuleType = pytest.importorskip("tileprefill.compile_check")
    seen: list[tuple[str, str | None]] = []

    def fake_main(*, arch: str, out_dir: str | None) -> int:
        seen.append((arch, out_dir))
        return 3

    monkeypatch.setattr(compile_check, "main", fake_main)
    assert main(["compile", "--arch", "sm_90a", "--out", "/tmp/x"]) == 3
    assert main(["compile", "--arch", "sm_80"]) == 3
    assert seen == [("sm_90a", "/tmp/x"), ("sm_80", None)]
