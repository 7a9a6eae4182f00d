"""Compile checks of the TileLang kernels (no GPU), and fast checks of what CI compiles.

`@pytest.mark.compile` tests lower every compile case and build cubins with nvcc
for sm_80 and sm_90a (a few minutes); the rest only inspect the case lists and
the custom ops' registration.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tileprefill import compile_check
from tileprefill.context import Arch
from tileprefill.kernels import attention_tl
from tileprefill.kernels import compile as compile_module
from tileprefill.kernels.compile import CompileCase
from tileprefill.keys import AttentionKey
from tileprefill.selection import Code, Source, attention_traits

TL_ARCHS = [Arch.SM80, Arch.SM90]


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_compile_case_compiles(arch: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every case of every TileLang kernel module lowers and compiles, and every TileLang key is covered.

    The output directory is fresh; TileLang's caches are bypassed for it (so a
    cubin is really built) and left as they are otherwise."""
    out_dir = tmp_path_factory.mktemp(f"cubins-{arch}")
    assert compile_check.main(arch=arch, out_dir=str(out_dir)) == 0


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_compile_cases_cover_every_tilelang_key(arch: Arch) -> None:
    """No compilation: every key whose TileLang kernel serves `arch` has a case (RoPE and append too)."""
    cases = compile_check.collect_cases(arch)
    assert compile_check.uncovered_keys(arch, cases) == ()
    assert all(compile_check.serves(compile_check.key_code(case.key), arch) for case in cases), (
        "a case compiles a key for an arch it does not serve"
    )


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_attention_cases_are_exactly_the_keys_of_the_arch(arch: Arch) -> None:
    expected = {key for key in AttentionKey if compile_check.serves(attention_traits(key)[1], arch)}
    assert len(expected) == 5
    assert {case.key for case in attention_tl.compile_cases(arch)} == expected


def _facts_of(case: CompileCase) -> tuple[int, str, bool, int]:
    """(head_dim, dtype, causal, page_size) of an attention case, read from its program arguments."""
    _source, heads, kv_heads, head_dim, dtype, causal, sm_scale, page_size, _config = case.args
    assert isinstance(head_dim, int) and isinstance(dtype, str) and isinstance(causal, bool)
    assert (heads, kv_heads) == (32, 8) and sm_scale == pytest.approx(head_dim**-0.5)
    assert isinstance(page_size, int)
    return head_dim, dtype, causal, page_size


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_attention_cases_span_the_static_variants(arch: Arch) -> None:
    """Per key: D=128 fp16 causal; dense adds D 64/256, bf16 and non-causal; page sizes 16/64 (tiled)
    and 1 plus a non-power-of-two (generic)."""
    by_source: dict[Source, set[tuple[int, str, bool, int]]] = {}
    for case in attention_tl.compile_cases(arch):
        assert isinstance(case.key, AttentionKey)
        by_source.setdefault(attention_traits(case.key)[0], set()).add(_facts_of(case))
    for facts in by_source.values():
        assert any(f[:3] == (128, "float16", True) for f in facts)
    dense = by_source[Source.DENSE]
    assert {f[0] for f in dense} == {64, 128, 256}
    assert {f[1] for f in dense} == {"float16", "bfloat16"}
    assert {f[2] for f in dense} == {True, False}
    assert {f[3] for f in by_source[Source.PAGED_TILED]} == {16, 64}
    generic = {f[3] for f in by_source[Source.PAGED]}
    assert 1 in generic and any(p & (p - 1) for p in generic), generic


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_cases_compile_what_the_kernels_run(arch: Arch) -> None:
    """A case's factory and arguments are those the kernel class builds for the same static facts."""
    for case in attention_tl.compile_cases(arch):
        assert isinstance(case.key, AttentionKey)
        head_dim, dtype, causal, page_size = _facts_of(case)
        facts = attention_tl.StaticFacts(
            heads=32,
            kv_heads=8,
            head_dim=head_dim,
            dtype=dtype,
            causal=causal,
            sm_scale=head_dim**-0.5,
            page_size=page_size,
        )
        assert attention_tl.program(case.key, facts) == (case.factory, case.args)
        assert attention_tl.program_arch(case.key) is arch


def test_compile_check_rejects_an_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch: expected one of"):
        compile_check.main(arch="sm_70", out_dir=None)


def test_importing_the_kernels_does_not_import_tilelang() -> None:
    code = (
        "import sys, tileprefill.kernels.attention_tl, tileprefill.kernels.registry;"
        "sys.exit(1 if 'tilelang' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_tilelang_attention_key_has_a_custom_op_with_the_output_shape_of_q() -> None:
    """The fake (meta) implementation gives torch.compile the output shape without running anything."""
    tl_keys = [key for key in AttentionKey if attention_traits(key)[1] in (Code.SM80, Code.SM90)]
    assert set(attention_tl.OPS) == set(tl_keys)
    meta = torch.device("meta")
    dense_q = torch.empty(2, 33, 8, 64, dtype=torch.float16, device=meta)
    ragged_q = torch.empty(41, 8, 64, dtype=torch.bfloat16, device=meta)
    index = torch.empty(3, dtype=torch.int32, device=meta)
    for key in tl_keys:
        op = getattr(torch.ops.tileprefill, key.value).default
        match attention_traits(key)[0]:
            case Source.DENSE:
                kv = torch.empty(2, 17, 2, 64, dtype=torch.float16, device=meta)
                out = op(dense_q, kv, kv, True, 0.125)
                q = dense_q
            case Source.RAGGED:
                kv = torch.empty(50, 2, 64, dtype=torch.bfloat16, device=meta)
                out = op(ragged_q, kv, kv, index, index, False, 0.125)
                q = ragged_q
            case Source.CONTIGUOUS:
                cache = torch.empty(2, 99, 2, 64, dtype=torch.float16, device=meta)
                out = op(dense_q, cache, cache, index[:2], True, 0.125)
                q = dense_q
            case Source.PAGED | Source.PAGED_TILED:
                pages = torch.empty(9, 16, 2, 64, dtype=torch.bfloat16, device=meta)
                table = torch.empty(2, 4, dtype=torch.int32, device=meta)
                out = op(ragged_q, pages, pages, table, index[:2], index, True, 0.125)
                q = ragged_q
        assert (out.shape, out.dtype, out.device) == (q.shape, q.dtype, meta), key.value


class _CompiledForReal(Exception):
    """Raised by a factory that `build` reached: it tried to compile."""


def _refusing_factory(*args: object) -> object:
    raise _CompiledForReal(args)


def test_recording_builds_records_and_compiles_nothing() -> None:
    """Inside: no factory runs and the launch does nothing. Outside again: `build` compiles."""
    with compile_module.recording_builds() as requests:
        kernel = compile_module.build(_refusing_factory, (1, "float16"), None, Arch.SM90)
        compile_module.build(_refusing_factory, (2, "bfloat16"), (3,), Arch.SM80)
        assert kernel(torch.zeros(1)) is None
    assert requests == [
        compile_module.BuildRequest(_refusing_factory, (1, "float16"), None, Arch.SM90),
        compile_module.BuildRequest(_refusing_factory, (2, "bfloat16"), (3,), Arch.SM80),
    ]
    pytest.importorskip("tilelang")
    with pytest.raises(_CompiledForReal):
        compile_module.build(_refusing_factory, (9, "float16"), None, Arch.SM90)


def test_nested_recordings_each_see_their_own_builds() -> None:
    with compile_module.recording_builds() as outer:
        compile_module.build(_refusing_factory, (1,), None, Arch.SM90)
        with compile_module.recording_builds() as inner:
            compile_module.build(_refusing_factory, (2,), None, Arch.SM90)
        compile_module.build(_refusing_factory, (3,), None, Arch.SM90)
    assert [r.args for r in outer] == [(1,), (3,)]
    assert [r.args for r in inner] == [(2,)]


def test_a_recorded_build_is_not_cached_by_the_kernel_modules() -> None:
    """A warm-up must leave no do-nothing kernel behind: the RoPE and append modules ask `build`
    again on their next call (a cache in front of `build` would hand back the recorded stub)."""
    from tileprefill.context import DType
    from tileprefill.kernels import append_tl, rope_tl

    for _ in range(2):
        with compile_module.recording_builds() as requests:
            rope_tl._kernel(8, 128, 64, DType.FP16, False, Arch.SM90)
            append_tl._contiguous_kernel(2, 128, DType.BF16, Arch.SM90)
            append_tl._paged_kernel(2, 128, 16, DType.BF16, Arch.SM90)
        assert len(requests) == 3


def test_attention_prebuild_compiles_what_the_kernels_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """`attention_tl.prebuild` hands `kernels.compile.prebuild` the program of each config, for its arch."""
    handed: list[compile_module.BuildRequest] = []

    def capture(requests: list[compile_module.BuildRequest], *, jobs: int | None) -> None:
        handed.extend(requests)

    monkeypatch.setattr(attention_tl, "compile_prebuild", capture)
    facts = attention_tl.StaticFacts(
        heads=16, kv_heads=2, head_dim=64, dtype="bfloat16", causal=False, sm_scale=0.125, page_size=5
    )
    keys = [AttentionKey.PAGED_SM90, AttentionKey.PAGED_SM80]
    attention_tl.prebuild([(key, facts) for key in keys])
    assert handed == [
        compile_module.BuildRequest(*attention_tl.program(key, facts), None, attention_tl.program_arch(key))
        for key in keys
    ]
