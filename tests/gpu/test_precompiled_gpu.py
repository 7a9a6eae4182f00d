"""Precompiled programs on a GPU: a directory built beforehand (on any machine with nvcc, no GPU
needed) is loaded, and an Op's first call compiles nothing, takes at most `FIRST_CALL_S`, and
computes what the same Op computes on the CPU.

Build the directory for this GPU first (sm90: an H100 SXM or H200 has the default 132 SMs; an H100
PCIe needs `--sm-count 114`), then point the tests at it:

    tileprefill precompile --preset llama-3-8b --arch sm90 --out /tmp/precompiled
    TILEPREFILL_TEST_PRECOMPILED=/tmp/precompiled pytest -m gpu tests/gpu/test_precompiled_gpu.py

`TILEPREFILL_TEST_PRECOMPILED_PRESET` names another preset the directory was built for. Without
the directory the tests skip, saying so.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import tileprefill as tp
from tileprefill.aot.models import PRESETS, BuildOptions, ModelConfig
from tileprefill.kernels import artifact, precompiled
from tileprefill.kernels import compile as compile_module

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang to load the programs")

DIRECTORY_ENV = "TILEPREFILL_TEST_PRECOMPILED"
PRESET_ENV = "TILEPREFILL_TEST_PRECOMPILED_PRESET"
DIRECTORY = os.environ.get(DIRECTORY_ENV, "")
if not DIRECTORY or not (pathlib.Path(DIRECTORY) / artifact.INDEX_FILE).exists():
    pytest.skip(
        f"needs a precompiled directory for this GPU in ${DIRECTORY_ENV} (got {DIRECTORY!r}): "
        "tileprefill precompile --preset llama-3-8b --arch sm90 --out DIR",
        allow_module_level=True,
    )

#: The longest an Op's first call may take once the model is set up (its programs loaded).
FIRST_CALL_S = 1.0
MODEL: ModelConfig = PRESETS[os.environ.get(PRESET_ENV, "llama-3-8b")]
OPS = ("GQAPrefill", "GQAVarlenPrefill", "GQAPagedCacheRopeAppendPrefill")
DEV = torch.device("cuda")
REL_TOL = 2e-2  # bf16


@pytest.fixture
def strict_from_directory(monkeypatch: pytest.MonkeyPatch) -> Iterator[precompiled.Directory]:
    """The directory in use in strict mode, nothing loaded or compiled yet, and TileLang's compile
    function replaced by one that fails the test."""

    def refuse(*args: object) -> Any:
        raise AssertionError(f"compiled a program: {args[:2]}")

    precompiled.forget()
    compile_module._load_or_build.cache_clear()
    monkeypatch.setattr(compile_module, "_build", refuse)
    yield tp.use_precompiled(DIRECTORY, strict=True)
    precompiled.forget()
    compile_module._load_or_build.cache_clear()


def _calls(window: int) -> dict[str, Callable[[torch.device], Any]]:
    """One call of each Op family on a device, from the same inputs (made on the CPU)."""
    gen = torch.Generator().manual_seed(window)
    heads, kv_heads, dim = MODEL.heads, MODEL.kv_heads, MODEL.head_dim
    dtype = torch.bfloat16
    options: dict[str, Any] = dict(
        sm_scale=MODEL.sm_scale, sliding_window=window or None, softcap=MODEL.softcap or None
    )
    q, k, v = (torch.randn(2, 96, h, dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, 96, 192], dtype=torch.int32)
    page_size, pages = 16, 40
    k_pages, v_pages = (torch.randn(pages, page_size, kv_heads, dim, generator=gen).to(dtype) for _ in "kv")
    table = torch.randperm(pages, generator=gen)[: 2 * 16].reshape(2, 16).to(torch.int32)
    cache_lens = torch.tensor([37, 100], dtype=torch.int32)
    cos_sin = torch.randn(512, dim // 2, generator=gen).float()
    dense, varlen = tp.GQAPrefill(**options), tp.GQAVarlenPrefill(**options)
    paged = tp.GQAPagedCacheRopeAppendPrefill(rope=MODEL.rope, **options)

    def on(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
        return [t.to(device) for t in tensors]

    return {
        "GQAPrefill": lambda d: dense(*on(d, q, k, v)),
        "GQAVarlenPrefill": lambda d: varlen(
            *on(d, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu)
        ),
        "GQAPagedCacheRopeAppendPrefill": lambda d: paged(
            *on(
                d, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), k_pages, v_pages, table, cache_lens, cu
            ),
            *on(d, cos_sin.cos(), cos_sin.sin()),
        ),
    }


def test_warm_up_loads_every_program_and_compiles_none(strict_from_directory: precompiled.Directory) -> None:
    assert strict_from_directory.refused == ()
    ready = tp.warm_up(MODEL, DEV, BuildOptions(ops=OPS))
    assert ready.programs > 0
    assert (ready.loaded, ready.compiled) == (ready.programs, 0)


@pytest.mark.parametrize("window", MODEL.windows)
def test_first_calls_after_set_up_compile_nothing_and_are_fast(
    strict_from_directory: precompiled.Directory, window: int
) -> None:
    tp.warm_up(MODEL, DEV, BuildOptions(ops=OPS))  # the engine's set-up
    for name, call in _calls(window).items():
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = call(DEV)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        print(f"{name} window {window}: first call {elapsed * 1e3:.1f} ms")
        assert elapsed <= FIRST_CALL_S, f"{name}: first call took {elapsed:.2f}s > {FIRST_CALL_S}s"
        expected = call(torch.device("cpu"))  # the reference kernels
        error = float((out.double().cpu() - expected.double()).norm() / expected.double().norm())
        assert error <= REL_TOL, f"{name}: relative error {error:.3g} against the CPU reference"


def test_a_fresh_process_loads_from_the_environment_and_compiles_nothing() -> None:
    """What an engine process sees: only the environment names the directory; strict mode turns any
    compile into an error, so a zero exit means its first call loaded every program."""
    script = (
        "import time, torch, tileprefill as tp\n"
        f"q = torch.randn(1, 64, {MODEL.heads}, {MODEL.head_dim}, dtype=torch.bfloat16, device='cuda')\n"
        f"k = torch.randn(1, 64, {MODEL.kv_heads}, {MODEL.head_dim}, dtype=torch.bfloat16, device='cuda')\n"
        f"op = tp.GQAPrefill(sm_scale={MODEL.sm_scale!r}, softcap={MODEL.softcap or None!r}, "
        f"sliding_window={MODEL.windows[0] or None!r})\n"
        "torch.cuda.synchronize(); t = time.perf_counter(); op(q, k, k); torch.cuda.synchronize()\n"
        "print(f'first call in a fresh process: {time.perf_counter() - t:.2f}s (tilelang imported in it)')\n"
    )
    env = {**os.environ, precompiled.ENV_DIRECTORIES: DIRECTORY, precompiled.ENV_STRICT: "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-3000:]
