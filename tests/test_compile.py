"""Compile checks of the TileLang kernels (no GPU), and fast checks of what CI compiles.

`@pytest.mark.compile` tests lower every compile case and build cubins with nvcc
for sm_80 and sm_90a (a few minutes); the rest only inspect the case lists and
the custom ops' registration.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

import tileprefill as tp
from tileprefill import compile_check, tiles
from tileprefill.context import Arch, DType
from tileprefill.kernels import attention_tl, launch, slot_append_tl
from tileprefill.kernels import compile as compile_module
from tileprefill.kernels.base import StaticFacts
from tileprefill.kernels.compile import CompileCase
from tileprefill.keys import ALL_KEYS, AttentionKey, Code, SlotAppendKey, attention_traits, code_of
from tileprefill.tiles import KVSource, TileConfig, sm90_config

TL_ARCHS = [Arch.SM80, Arch.SM90]


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_compile_case_compiles(
    arch: str, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every case of every TileLang kernel module lowers and compiles, and every TileLang key is covered.

    The output directory is fresh; TileLang's caches are bypassed for it (so a
    cubin is really built) and left as they are otherwise. The whole set takes minutes: its progress,
    a line per case as it completes, goes to the terminal whether or not pytest captures output."""
    out_dir = tmp_path_factory.mktemp(f"cubins-{arch}")
    with capsys.disabled():
        print()  # off the line pytest writes the test's name on
        assert compile_check.main(arch=arch, out_dir=str(out_dir)) == 0


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_slot_append_cases_compile(arch: str, tmp_path: pathlib.Path) -> None:
    """The slot-append program's cases alone (`-k slot`): each lowers and compiles to a non-empty cubin."""
    target = compile_check.parse_arch(arch)
    cases = slot_append_tl.compile_cases(target)
    assert {case.key for case in cases} == {SlotAppendKey.TL}
    outcomes = compile_check.compile_all(cases, target, str(tmp_path), jobs=1)
    table = compile_check.format_table(outcomes, target)
    assert all(o.error is None and o.cubin_bytes > 0 for o in outcomes), table


def test_compile_check_prints_each_case_as_it_completes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    """No compilation (a stand-in for one case's compile): the line of a case is out before the next
    case starts, with its count and time; the table and the verdict follow."""
    cases = compile_check.collect_cases(Arch.SM90)
    printed_before: list[str] = []

    def fake_compile(case: CompileCase, arch: Arch, case_dir: str) -> compile_check.Outcome:
        printed_before.append(capsys.readouterr().out)
        error = "nvcc: out of registers" if case == cases[1] else None
        return compile_check.Outcome(case.key, case.label, 1.25, 0 if error else 4096, True, error)

    monkeypatch.setattr(compile_check, "compile_case", fake_compile)
    assert compile_check.main(arch="sm_90a", out_dir=str(tmp_path), jobs=1) == 1
    total = len(cases)
    width = len(str(total))
    assert printed_before[0] == f"compiling {total} cases for sm90 (nvcc target sm_90a) in 1 jobs\n"
    lines = [
        f"[{n:>{width}}/{total}]    1.2s {case.key.value} {case.label}: "
        + ("error: nvcc: out of registers" if n == 2 else "ok")
        + "\n"
        for n, case in enumerate(cases, start=1)
    ]
    assert printed_before[1:] == lines[:-1]  # each out before the next case started
    rest = capsys.readouterr().out
    assert rest.startswith(lines[-1] + f"compile check sm_90a: {total} cases, 1 jobs, ")
    assert f"FAILED: 1 of {total} cases did not compile" in rest


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_compile_cases_cover_every_tilelang_key(arch: Arch) -> None:
    """No compilation: every key whose TileLang kernel serves `arch` has a case (RoPE and append too)."""
    cases = compile_check.collect_cases(arch)
    assert compile_check.uncovered_keys(arch, cases) == ()
    assert all(compile_check.serves(code_of(case.key), arch) for case in cases), (
        "a case compiles a key for an arch it does not serve"
    )


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_attention_cases_are_exactly_the_keys_of_the_arch(arch: Arch) -> None:
    expected = {key for key in AttentionKey if compile_check.serves(attention_traits(key)[1], arch)}
    assert len(expected) == 5
    assert {case.key for case in attention_tl.compile_cases(arch)} == expected


class _CaseFacts(NamedTuple):
    head_dim: int
    dtype: str
    causal: bool
    page_size: int
    windowed: bool
    capped: bool
    lse: bool


def _facts_of(case: CompileCase) -> _CaseFacts:
    """The static facts of an attention case, read from its program arguments."""
    _source, head_dim, dtype, causal, page_size, _config, windowed, capped, lse = case.args
    assert isinstance(head_dim, int) and isinstance(dtype, str) and isinstance(causal, bool)
    assert isinstance(page_size, int) and isinstance(windowed, bool)
    assert isinstance(capped, bool) and isinstance(lse, bool)
    return _CaseFacts(head_dim, dtype, causal, page_size, windowed, capped, lse)


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_attention_cases_span_the_static_variants(arch: Arch) -> None:
    """Per key a causal fp16 case; dense spans head dims (a 16-column panel one among them), dtypes,
    causality, the window and the softcap; the contiguous cache a window at block_N 64; the paged
    ones page sizes 16 (tiled, at a 32-column panel head dim) and 1 (generic)."""
    by_source: dict[KVSource, set[_CaseFacts]] = {}
    for case in attention_tl.compile_cases(arch):
        assert isinstance(case.key, AttentionKey)
        by_source.setdefault(attention_traits(case.key)[0], set()).add(_facts_of(case))
    for facts in by_source.values():
        assert any(f.dtype == "float16" and f.causal for f in facts)
    dense = by_source[KVSource.DENSE]
    assert {f.head_dim for f in dense} == {64, 80, 128, 256}  # 64: three consumers on SM90
    assert {f.dtype for f in dense} == {"float16", "bfloat16"}
    assert {f.causal for f in dense} == {True, False}
    assert any(f.windowed and f.capped for f in dense)
    assert [f.lse for f in dense].count(True) == 1
    assert {(f.head_dim, f.windowed) for f in by_source[KVSource.CONTIGUOUS]} == {(192, True)}
    assert {(f.head_dim, f.page_size) for f in by_source[KVSource.PAGED_TILED]} == {(96, 16)}
    assert {f.page_size for f in by_source[KVSource.PAGED]} == {1}


@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_cases_compile_what_the_kernels_run(arch: Arch) -> None:
    """A case's factory and arguments are those the kernel class builds for the same static facts."""
    for case in attention_tl.compile_cases(arch):
        assert isinstance(case.key, AttentionKey)
        f = _facts_of(case)
        facts = StaticFacts(
            arch=arch,
            dtype=DType(f.dtype),
            heads=32,
            kv_heads=8,
            head_dim=f.head_dim,
            causal=f.causal,
            sm_scale=f.head_dim**-0.5,
            page_size=f.page_size,
            window=100 if f.windowed else 0,
            softcap=20.0 if f.capped else 0.0,
            lse=f.lse,
        )
        assert attention_tl.program(case.key, facts) == (case.factory, case.args, arch)
        assert attention_tl.program_arch(case.key) is arch


def test_compile_check_rejects_a_fence_of_more_registers_than_a_thread_has() -> None:
    """The fence counts of TileLang's CUDA: a thread's registers pass, a fragment's element count
    (what `T.warpgroup_fence_operand(fragment)` without `num_regs` emits) does not."""
    line = "tl::warpgroup_fence_operand(reinterpret_cast<float*>({name} + 0), {count});"
    counts = (("s", 64), ("o", 128), ("p", 32))
    fine = "\n".join(line.format(name=name, count=count) for name, count in counts)
    assert compile_check.source_errors(fine) is None
    wrong = fine + "\n" + line.format(name="s", count=8192)
    error = compile_check.source_errors(wrong)
    assert error is not None and "at most 255" in error and "got 8192" in error


@pytest.mark.compile
@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_sources_only_hashes_the_cuda_a_build_compiles(arch: Arch, tmp_path: pathlib.Path) -> None:
    """`--sources-only` lowers without nvcc; its hash is that of the source nvcc compiles."""
    (case,) = [c for c in compile_check.collect_cases(arch) if c.label == "batch_paged_tl_p16"]
    (lowered,) = compile_check.lower_all([case], arch, jobs=1)
    (compiled,) = compile_check.compile_all([case], arch, str(tmp_path), jobs=1)
    assert lowered.error is None and compiled.error is None
    assert lowered.sha256 == compiled.sha256 and len(lowered.sha256) == 64


def test_hash_lines_name_the_case_and_its_error() -> None:
    lowered = (
        compile_check.Lowered(AttentionKey.DENSE_SM90, "d128 fp16 causal", "ab" * 32, None),
        compile_check.Lowered(AttentionKey.DENSE_SM80, "d64", "", "lowering failed"),
    )
    first, second = compile_check.format_hashes(lowered).splitlines()
    assert first.split() == ["attn_dense_sm90", "d128", "fp16", "causal", "ab" * 32]
    assert second.split()[0] == "attn_dense_sm80" and second.endswith("error: lowering failed")
    assert compile_check.source_hash("x") == compile_check.source_hash("x") != compile_check.source_hash("y")


def test_compile_check_rejects_an_unknown_arch() -> None:
    with pytest.raises(ValueError, match="arch: expected one of"):
        compile_check.main(arch="sm_70", out_dir=None)


def test_importing_the_kernels_does_not_import_tilelang() -> None:
    code = (
        "import sys, tileprefill.kernels.attention_tl, tileprefill.kernels.registry;"
        "sys.exit(1 if 'tilelang' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_every_tilelang_key_has_one_launch_record_and_custom_op() -> None:
    """One record per TileLang key; its custom op writes the outputs and caches in place and returns
    nothing, so its fake (what torch.compile traces) runs nothing."""
    tl_keys = {key for key in ALL_KEYS if code_of(key) is not Code.REF}
    assert set(launch.OPS) == tl_keys
    for key in tl_keys:
        schema = getattr(torch.ops.tileprefill, key.value).default._schema
        written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
        assert written and list(schema.returns) == [], key.value
        # Every argument positional and required: inductor passes an argument with a default by
        # keyword, which the launch (`*arguments`) would not see (seen on the GPU: the facts shifted).
        assert not [a.name for a in schema.arguments if a.has_default_value() or a.kwarg_only], key.value
    meta = torch.device("meta")
    q = torch.empty(2, 33, 8, 64, dtype=torch.float16, device=meta)
    kv = torch.empty(2, 17, 2, 64, dtype=torch.float16, device=meta)
    facts = ("sm90", "float16", 8, 2, 64, True, 0.125, 0, 0, 0, 0.0, False, 132, "int32")
    assert torch.ops.tileprefill.attn_dense_sm90(q, kv, kv, torch.empty_like(q), *facts) is None
    # The programs with the LSE output: one more custom op a key, writing out and lse.
    lse = torch.empty(2, 33, 8, dtype=torch.float32, device=meta)
    with_lse = (*facts[:-3], True, 132, "int32")
    assert torch.ops.tileprefill.attn_dense_sm90_lse(q, kv, kv, torch.empty_like(q), lse, *with_lse) is None
    for key, record in attention_tl.LSE_RECORDS.items():
        assert record.mutates == ("out", "lse") and record.tensors[-2:] == ("out", "lse"), key.value


def test_launch_scalars_round_trip_the_static_facts() -> None:
    facts = StaticFacts(
        arch=Arch.SM80,
        dtype=DType.BF16,
        heads=16,
        kv_heads=2,
        head_dim=96,
        causal=False,
        sm_scale=0.1,
        page_size=5,
        rotary_dim=32,
        window=64,
        softcap=30.0,
        lse=True,
        sm_count=114,
    )
    assert launch._facts(launch.scalars(facts)) == facts


class _CompiledForReal(Exception):
    """Raised by a factory that `build` reached: it tried to compile."""


def _refusing_factory(*args: object) -> object:
    raise _CompiledForReal(args)


def test_recording_builds_records_and_compiles_nothing() -> None:
    """Inside: no factory runs and the launch does nothing. Outside again: `build` compiles."""
    with compile_module.recording_builds() as requests:
        kernel = compile_module.build(_refusing_factory, (1, "float16"), Arch.SM90)
        compile_module.build(_refusing_factory, (2, "bfloat16"), Arch.SM80)
        assert kernel(torch.zeros(1)) is None
    assert requests == [
        compile_module.BuildRequest(_refusing_factory, (1, "float16"), Arch.SM90),
        compile_module.BuildRequest(_refusing_factory, (2, "bfloat16"), Arch.SM80),
    ]
    pytest.importorskip("tilelang")
    with pytest.raises(_CompiledForReal):
        compile_module.build(_refusing_factory, (9, "float16"), Arch.SM90)


def test_nested_recordings_each_see_their_own_builds() -> None:
    with compile_module.recording_builds() as outer:
        compile_module.build(_refusing_factory, (1,), Arch.SM90)
        with compile_module.recording_builds() as inner:
            compile_module.build(_refusing_factory, (2,), Arch.SM90)
        compile_module.build(_refusing_factory, (3,), Arch.SM90)
    assert [r.args for r in outer] == [(1,), (3,)]
    assert [r.args for r in inner] == [(2,)]


def test_a_recorded_build_is_not_cached_by_the_kernel_modules() -> None:
    """A warm-up must leave no do-nothing kernel behind: binding a kernel asks `build` again each
    time (a cache in front of `build` would hand back the recorded stub)."""
    from tileprefill.kernels import append_tl, rope_append_tl, rope_tl

    facts = StaticFacts(arch=Arch.SM90, dtype=DType.BF16, heads=8, kv_heads=2, head_dim=128, rotary_dim=64)
    for _ in range(2):
        with compile_module.recording_builds() as requests:
            rope_tl.RopeNeoxTLKernel().bind(facts)
            append_tl.AppendContiguousTLKernel().bind(facts)
            append_tl.AppendPagedTLKernel().bind(facts._replace(page_size=16))
            rope_append_tl.RopeAppendNeoxTLKernel().bind(facts)
        assert len(requests) == 4


def test_attention_prebuild_compiles_what_the_kernels_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """`attention_tl.prebuild` hands `kernels.compile.prebuild` the program of each config, for its arch."""
    handed: list[compile_module.BuildRequest] = []

    def capture(requests: list[compile_module.BuildRequest], *, jobs: int | None) -> None:
        handed.extend(requests)

    monkeypatch.setattr(attention_tl, "compile_prebuild", capture)
    facts = StaticFacts(
        arch=Arch.SM90,
        dtype=DType.BF16,
        heads=16,
        kv_heads=2,
        head_dim=64,
        causal=False,
        sm_scale=0.125,
        page_size=5,
    )
    keys = [AttentionKey.PAGED_SM90, AttentionKey.PAGED_SM80]
    attention_tl.prebuild([(key, facts) for key in keys])
    programs = [attention_tl.program(key, facts) for key in keys]
    assert handed == [compile_module.BuildRequest(p.factory, p.args, p.arch) for p in programs]


def test_persistent_programs_launch_one_cta_per_sm_of_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SM count is a static fact of SM90 attention (read from the plan's device): a persistent
    program built for an H100 PCIe (114 SMs) or an H20 (78) launches that many CTAs, not the 132 of
    an H100 SXM, whose surplus would run as a second, partial wave. Other steps and arches do not
    take it, so that they are not compiled once per device kind."""
    pytest.importorskip("tilelang")
    dense_source = KVSource.DENSE
    assert sm90_config(dense_source, 128, sm_count=114).persistent_ctas == 114
    assert sm90_config(dense_source, 128).persistent_ctas == tiles.SM90_PERSISTENT_CTAS
    assert sm90_config(dense_source, 256, sm_count=114).persistent_ctas == 0  # one CTA a query tile
    assert sm90_config(KVSource.CONTIGUOUS, 128, sm_count=114).persistent_ctas == 0
    with pytest.raises(ValueError, match="sm_count: expected the device's SM count"):
        sm90_config(dense_source, 128, sm_count=-1)
    facts = StaticFacts(Arch.SM90, DType.FP16, 8, 2, 128, True, 0.125, sm_count=78)
    dense = attention_tl.program(AttentionKey.DENSE_SM90, facts)
    assert dataclasses.replace(sm90_config(dense_source, 128), persistent_ctas=78) in dense.args
    import tileprefill.ops.op as ops_op

    monkeypatch.setattr(ops_op, "sm_count_of", lambda device: 114)
    op = tp.GQAPrefill()
    cpu = torch.device("cpu")
    assert op.attention_facts(facts._replace(sm_count=0), cpu).sm_count == 114
    assert op.attention_facts(facts._replace(arch=Arch.SM80, sm_count=0), cpu).sm_count == 0


def test_d64_runs_three_consumer_warpgroups_where_the_program_reads_dense_q() -> None:
    """One rule (tiles.sm90_config) for the program factory and explain: D 64 dense and
    contiguous programs run 192-row tiles with three consumers; packed q keeps two."""
    pytest.importorskip("tilelang")
    from tileprefill.kernels.tl import attention_sm90

    three = TileConfig(192, 128, 2, 512, persistent_ctas=132)
    assert sm90_config(KVSource.DENSE, 64) == three
    assert sm90_config(KVSource.CONTIGUOUS, 64) == TileConfig(192, 128, 2, 512)
    for packed in (KVSource.RAGGED, KVSource.PAGED, KVSource.PAGED_TILED):
        assert sm90_config(packed, 64).block_M == 128 and sm90_config(packed, 64).threads == 384
    assert sm90_config(KVSource.DENSE, 80).block_M == 128
    facts = StaticFacts(Arch.SM90, DType.BF16, 16, 4, 64, True, 0.125)
    assert three in attention_tl.program(AttentionKey.DENSE_SM90, facts).args
    with pytest.raises(ValueError, match="expected two consumers for the gathering paged program"):
        attention_sm90.program(KVSource.PAGED, 64, "bfloat16", True, 1, three)
    with pytest.raises(ValueError, match="two or three consumer warpgroups"):
        attention_sm90.program(KVSource.DENSE, 64, "bfloat16", True, 0, TileConfig(256, 128, 2, 640))


def test_the_contiguous_cache_keeps_one_cta_per_query_tile() -> None:
    """One statement of the rule (tiles.sm90_config); the program refuses a persistent
    contiguous configuration rather than building one."""
    pytest.importorskip("tilelang")
    from tileprefill.kernels.tl import attention_sm90

    assert sm90_config(KVSource.DENSE, 128).persistent_ctas == tiles.SM90_PERSISTENT_CTAS
    assert sm90_config(KVSource.CONTIGUOUS, 128).persistent_ctas == 0
    contiguous = attention_tl.program(
        AttentionKey.CONTIGUOUS_SM90, StaticFacts(Arch.SM90, DType.FP16, 8, 2, 128, True, 0.125)
    )
    assert TileConfig(128, 128, 2, 384) in contiguous.args
    with pytest.raises(ValueError, match="expected persistent_ctas 0 for the contiguous cache"):
        attention_sm90.program(KVSource.CONTIGUOUS, 128, "float16", True, 0, sm90_config(KVSource.DENSE, 128))


@pytest.mark.compile
@pytest.mark.parametrize("arch", TL_ARCHS, ids=lambda a: a.value)
def test_lse_cases_compile(arch: Arch, tmp_path: pathlib.Path) -> None:
    """The attention programs with the LSE output (one case an arch) compile to a device binary; the
    whole set compiles in `test_every_compile_case_compiles`."""
    cases = [case for case in attention_tl.compile_cases(arch) if "lse" in case.label]
    assert len(cases) == 1
    for case in cases:
        compile_module.build_to(case, arch, str(tmp_path))
    assert any(
        p.stat().st_size > 0
        for p in pathlib.Path(str(tmp_path)).rglob("*")
        if p.suffix in (".cubin", ".fatbin")
    )
