"""Ahead-of-time builds on the CPU: the programs a model needs (checked against what the real Ops
build), the preset table, the precompiled directory's stale checks and strict mode, loading before
compiling, the `precompile` command; and (marked `compile`: nvcc, about a minute) a real build of
one small program into a directory, loaded back as far as a machine without a GPU can.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import torch

import tileprefill as tp
from tileprefill import cli
from tileprefill.aot import build, command
from tileprefill.aot.models import OP_CLASSES, PRESETS, BuildOptions, ModelConfig
from tileprefill.aot.programs import ProgramSpec, programs_for
from tileprefill.context import Arch, DType, IndexDType, RopeMode
from tileprefill.kernels import artifact, precompiled
from tileprefill.kernels import compile as compile_module
from tileprefill.kernels.compile import BuildRequest, compile_identity, recording_builds, target_arch
from tileprefill.kernels.launch import _entry_function
from tileprefill.keys import AttentionKey, RopeKey, SlotAppendKey

#: A small model with every feature a program depends on: GQA, two kinds of layer (full and a
#: window), a softcap, its own scale, a partial rotary dim.
FEATURED = ModelConfig(
    heads=8, kv_heads=2, head_dim=128, windows=(0, 64), softcap=30.0, sm_scale=0.1, rotary_dim=64
)
SM90 = BuildOptions(archs=(Arch.SM90,))
LOADING_CUDA = artifact.loading_cuda


@pytest.fixture(autouse=True)
def fresh_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No precompiled directory in use, strict mode off, nothing built yet; a loading process whose
    CUDA is 13.0 (a CPU CI machine may have neither a CUDA torch nor nvcc)."""
    monkeypatch.delenv(precompiled.ENV_DIRECTORIES, raising=False)
    monkeypatch.delenv(precompiled.ENV_STRICT, raising=False)
    monkeypatch.setattr(artifact, "loading_cuda", lambda: ("13.0", "torch.version.cuda"))
    precompiled.forget()
    compile_module._load_or_build.cache_clear()
    yield
    precompiled.forget()
    compile_module._load_or_build.cache_clear()


# --- the programs of a model -----------------------------------------------------------------------


def _ops_of(name: str, config: ModelConfig, window: int, lse: bool) -> Any:
    cls = OP_CLASSES[name]
    if cls is tp.PagedCacheSlotAppend:
        return cls(validate=False)
    options: dict[str, Any] = dict(
        causal=config.causal,
        sm_scale=config.sm_scale,
        sliding_window=window or None,
        softcap=config.softcap or None,
        return_lse=lse,
        validate=False,
    )
    if getattr(cls, "rotates", False):
        options.update(rope=config.rope, rotary_dim=config.rotary_dim)
    return cls(**options)


def _plan(
    name: str, op: Any, config: ModelConfig, dtype: torch.dtype, page_size: int, index: IndexDType
) -> None:
    """Plan one call of Op family `name` on the CPU (the arch is patched): its kernels bind."""
    i32, cpu = torch.int32, torch.device("cpu")
    heads, kv_heads, head_dim = config.heads, config.kv_heads, config.head_dim
    rotary = config.rotary if getattr(op, "rotates", False) else 0
    cu = torch.tensor([0, 3, 5], dtype=i32)
    if name in ("GQAPrefill", "GQARopePrefill"):
        op.plan(shape=tp.DenseShape(2, 3, 3, heads, kv_heads, head_dim, dtype, cpu, rotary))
    elif name in ("GQAVarlenPrefill", "GQAVarlenRopePrefill"):
        op.plan(cu, cu, shape=tp.VarlenShape(5, 5, heads, kv_heads, head_dim, dtype, cpu, rotary))
    elif "Contiguous" in name:
        lengths = torch.tensor([1, 2], dtype=i32)
        op.plan(lengths, shape=tp.ContiguousShape(3, 8, heads, kv_heads, head_dim, dtype, cpu, rotary))
    elif name == "PagedCacheSlotAppend":
        mapping = torch.tensor([0, 1, 2], dtype=index.torch_dtype)
        op.plan(mapping, shape=tp.SlotAppendShape(3, page_size, kv_heads, head_dim, dtype, cpu))
    else:
        table = torch.tensor([[0, 1], [2, 3]], dtype=i32)
        lengths = torch.tensor([1, 2], dtype=i32)
        shape = tp.PagedShape(5, page_size, heads, kv_heads, head_dim, dtype, cpu, rotary)
        op.plan(table, lengths, cu, shape=shape)


@pytest.mark.parametrize("arch", [Arch.SM80, Arch.SM90], ids=lambda a: a.value)
@pytest.mark.parametrize("name", list(OP_CLASSES))
def test_the_programs_of_an_op_family_are_what_its_calls_build(on_gpu: Any, arch: Arch, name: str) -> None:
    """Every call variant of the Op family, planned by the real Op (arch patched, nothing compiles),
    asks `build` for exactly the programs `programs_for` lists for that family."""
    on_gpu.update(arch=arch, sm_count=114)
    options = BuildOptions(
        ops=(name,),
        archs=(arch,),
        page_sizes=(16, 7),  # tiled pages and gathered rows
        lse=(False, True),
        sm_counts=(114,),
        index_dtypes=(IndexDType.INT32, IndexDType.INT64),
    )
    config = attrs.evolve(FEATURED, dtypes=(DType.BF16, DType.FP16))
    with recording_builds() as requests:
        for dtype in config.dtypes:
            for window in config.windows:
                for lse in options.lse:
                    for page_size in options.page_sizes:
                        for index in options.index_dtypes:
                            op = _ops_of(name, config, window, lse)
                            _plan(name, op, config, dtype.torch_dtype, page_size, index)
    listed = programs_for(config, options)
    assert {spec.request for spec in listed} == set(requests)
    assert len(listed) == len(set(requests))  # once each
    assert all(spec.ops == (name,) and spec.arch is arch for spec in listed)


def test_a_program_several_families_need_is_listed_once_with_each() -> None:
    specs = programs_for("llama-3-8b", SM90)
    assert len({spec.request for spec in specs}) == len(specs)
    dense = [s for s in specs if s.key is AttentionKey.DENSE_SM90]
    assert len(dense) == 1 and dense[0].ops == ("GQAPrefill", "GQARopePrefill")


def test_each_variant_multiplies_only_the_programs_that_read_it() -> None:
    base = programs_for("llama-3-8b", SM90)

    def count(specs: tuple[ProgramSpec, ...], kind: type) -> int:
        return sum(isinstance(s.key, kind) for s in specs)

    windows = programs_for(attrs.evolve(PRESETS["llama-3-8b"], windows=(0, 4096)), SM90)
    assert count(windows, AttentionKey) == 2 * count(base, AttentionKey)
    assert len(windows) - count(windows, AttentionKey) == len(base) - count(base, AttentionKey)
    lse = programs_for("llama-3-8b", attrs.evolve(SM90, lse=(False, True)))
    assert count(lse, AttentionKey) == 2 * count(base, AttentionKey)
    int64 = programs_for("llama-3-8b", attrs.evolve(SM90, index_dtypes=(IndexDType.INT64,)))
    assert count(int64, SlotAppendKey) == count(base, SlotAppendKey) - 1
    # The SM count is an argument of the persistent SM90 programs only: not of SM80 ones, nor of
    # the contiguous cache's (one CTA per query tile).
    counts = programs_for("llama-3-8b", attrs.evolve(SM90, sm_counts=(132, 114)))
    assert len(counts) == len(base) + 3  # dense, ragged, paged
    sm80 = BuildOptions(archs=(Arch.SM80,))
    assert len(programs_for("llama-3-8b", attrs.evolve(sm80, sm_counts=(132, 114)))) == len(
        programs_for("llama-3-8b", sm80)
    )


def test_every_preset_has_a_program_list_on_both_arches() -> None:
    for name, model in PRESETS.items():
        specs = programs_for(name)
        assert {spec.arch for spec in specs} == {Arch.SM80, Arch.SM90}, name
        assert model.source, f"{name}: the preset names the configuration it comes from"
        attention = [s for s in specs if isinstance(s.key, AttentionKey)]
        # 2 arches x 4 sources x the kinds of layer: with a window, without one.
        assert len(attention) == 2 * 4 * len({w > 0 for w in model.windows}), name
        # q's and the keys' rotations: one RoPE program an arch.
        assert sum(isinstance(s.key, RopeKey) for s in specs) == 2, name


def _attention_and_rope(specs: tuple[ProgramSpec, ...]) -> set[BuildRequest]:
    return {s.request for s in specs if isinstance(s.key, AttentionKey | RopeKey)}


def test_window_lengths_share_the_programs_of_a_window() -> None:
    """A window's length is a launch value: layers of several windows need the programs of one, and
    full layers beside them the programs without a window."""
    one = attrs.evolve(FEATURED, windows=(0, 64))
    several = attrs.evolve(FEATURED, windows=(0, 64, 512, 4096))
    assert programs_for(several, SM90) == programs_for(one, SM90)
    windowed_only = programs_for(attrs.evolve(FEATURED, windows=(4096,)), SM90)
    full_only = programs_for(attrs.evolve(FEATURED, windows=(0,)), SM90)
    assert {s.request for s in windowed_only} | {s.request for s in full_only} == {
        s.request for s in programs_for(one, SM90)
    }
    full_attention = {s.request for s in full_only if isinstance(s.key, AttentionKey)}
    assert full_attention and not full_attention & {s.request for s in windowed_only}


def test_models_of_one_head_dim_share_their_attention_and_rope_programs() -> None:
    """Head counts (any group), the scale and the softcap's value are launch values: Llama-3-8B
    (32 / 8 heads) and Qwen2.5-7B (28 / 4) need the same attention and RoPE programs, as does a
    model split over GPUs; a cap or a window of other values too. Programs that copy rows per KV
    head (the appends) keep their head count: their tiles are sized by it."""
    llama, qwen = programs_for("llama-3-8b"), programs_for("qwen2.5-7b")
    assert _attention_and_rope(llama) == _attention_and_rope(qwen)
    assert {s.request for s in llama} != {s.request for s in qwen}  # the appends: 8 KV heads, 4
    sharded = programs_for(PRESETS["llama-3-8b"].sharded(4))
    assert _attention_and_rope(sharded) == _attention_and_rope(llama)
    rescaled = attrs.evolve(FEATURED, heads=24, kv_heads=8, softcap=50.0, sm_scale=0.05, windows=(0, 4096))
    assert _attention_and_rope(programs_for(rescaled, SM90)) == _attention_and_rope(
        programs_for(FEATURED, SM90)
    )
    # Whether a model caps its scores is a static fact: no attention program serves both.
    uncapped = programs_for(attrs.evolve(FEATURED, softcap=0.0), SM90)
    capped = {s.request for s in programs_for(FEATURED, SM90) if isinstance(s.key, AttentionKey)}
    assert capped and not capped & {s.request for s in uncapped}


def test_a_program_is_described_by_its_static_facts_alone() -> None:
    """A listing line names what the program is built for, not a head count or a value a launch
    passes (one program serves them all)."""
    (windowed,) = [
        s
        for s in programs_for(FEATURED, SM90)
        if s.key is AttentionKey.DENSE_SM90 and "window" in s.description
    ]
    assert windowed.description == "d128 bf16 causal window softcap 132 CTAs"
    (rope,) = [s for s in programs_for(FEATURED, SM90) if isinstance(s.key, RopeKey)]
    assert rope.description == "d128 r64 bf16"


def test_the_preset_table_is_the_one_the_command_prints() -> None:
    table = command.presets_table().splitlines()
    assert [line.split()[0] for line in table] == list(PRESETS)
    gemma = next(line for line in table if line.startswith("gemma-2-9b"))
    assert "window 4096" in gemma and "softcap 50" in gemma and "scale 0.0625" in gemma


def test_a_sharded_model_has_one_gpus_heads() -> None:
    llama = PRESETS["llama-3-8b"]
    assert (llama.sharded(2).heads, llama.sharded(2).kv_heads) == (16, 4)
    assert (llama.sharded(16).heads, llama.sharded(16).kv_heads) == (2, 1)  # KV heads replicated
    with pytest.raises(ValueError, match=r"tensor_parallel: expected a divisor of heads \(32\), got 3"):
        llama.sharded(3)
    qwen = PRESETS["qwen2.5-7b"]  # 28 heads over 4 KV heads
    with pytest.raises(ValueError, match=r"expected a divisor or a multiple of kv_heads \(4\), got 14"):
        qwen.sharded(14)


def test_a_model_without_rope_leaves_the_rope_families_out() -> None:
    plain = attrs.evolve(PRESETS["llama-3-8b"], rope=RopeMode.NONE)
    names = {name for spec in programs_for(plain, SM90) for name in spec.ops}
    assert names == {n for n, cls in OP_CLASSES.items() if not getattr(cls, "rotates", False)}
    with pytest.raises(
        ValueError, match=r"ops: GQARopePrefill rotates with RoPE, but the model's rope is none"
    ):
        programs_for(plain, attrs.evolve(SM90, ops=("GQARopePrefill",)))


def test_a_model_without_a_kernel_is_refused_with_the_reason() -> None:
    odd = ModelConfig(heads=8, kv_heads=2, head_dim=72)
    with pytest.raises(ValueError, match=r"GQAPrefill: no kernel serves its calls on sm90: head_dim 72"):
        programs_for(odd, SM90)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: ModelConfig(heads=8, kv_heads=3, head_dim=64),
            r"kv_heads: expected a divisor of heads \(8\), got 3",
        ),
        (lambda: ModelConfig(heads=8, kv_heads=2, head_dim=64, windows=()), r"windows: expected a non-empty"),
        (
            lambda: ModelConfig(heads=8, kv_heads=2, head_dim=64, windows=(64,), causal=False),
            r"windows: expected \(0,\) without causal",
        ),
        (
            lambda: ModelConfig(heads=8, kv_heads=2, head_dim=64, rotary_dim=65),
            r"rotary_dim: expected None or an even",
        ),
        (lambda: ModelConfig(heads=8, kv_heads=2, head_dim=64, softcap=-1.0), r"softcap: expected a finite"),
        (lambda: BuildOptions(archs=(Arch.CPU,)), r"archs: expected some of \['sm80', 'sm90'\]"),
        (lambda: BuildOptions(page_sizes=(16, 16)), r"page_sizes: expected distinct values"),
        (lambda: BuildOptions(sm_counts=(0,)), r"sm_counts: expected ints >= 1"),
        (lambda: BuildOptions(ops=("GQAFoo",)), r"ops: expected names of .*, got \['GQAFoo'\]"),
        (lambda: programs_for("llama-4"), r"model: expected a ModelConfig or one of the presets"),
    ],
)
def test_bad_configurations_name_the_argument(make: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


# --- a precompiled directory -----------------------------------------------------------------------


def _small_spec() -> ProgramSpec:
    """The one small program the tests put in a directory: a slot-append program for sm_90a."""
    options = attrs.evolve(SM90, ops=("PagedCacheSlotAppend",), index_dtypes=(IndexDType.INT32,))
    (spec,) = programs_for("llama-3-8b", options)
    return spec


def _identity(request: BuildRequest) -> dict[str, object]:
    return compile_identity(target_arch(request.arch))


def _fake_directory(root: pathlib.Path, spec: ProgramSpec, **built_with: str) -> artifact.ProgramEntry:
    """A directory holding `spec` with a stand-in library (its real bytes need nvcc), as the build
    writes it, built with this process's toolchain but for `built_with`."""
    library = root / artifact.library_name(build.program_id(spec))
    library.parent.mkdir(parents=True)
    library.write_bytes(b"a stand-in library")
    entry = build.program_entry(spec, root, cuda_sha256="", compile_s=0.0)
    here = artifact.current_toolchain(cuda="13.0", cuda_from="nvcc")
    sources = {name: artifact.file_sha256(name) for name in entry.sources}
    artifact.write_index(root, artifact.Index(attrs.evolve(here, **built_with), sources, (entry,)))
    return entry


#: What a stand-in for `kernels.compile._build` returns: a compiled kernel.
COMPILED: Any = object()


class _Module:
    """What the TVM runtime's loader returns, as far as the launch path reads it."""

    def main(self, *tensors: object) -> None:
        return None


def _refuse_to_compile(*args: object) -> Any:
    raise AssertionError(f"compiled {args}")


def test_a_fresh_directory_is_loaded_before_anything_compiles(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _small_spec()
    entry = _fake_directory(tmp_path, spec)
    loaded: list[str] = []

    def load(path: str) -> _Module:
        loaded.append(path)
        return _Module()

    monkeypatch.setattr(precompiled, "load_module", load)
    monkeypatch.setattr(compile_module, "_build", _refuse_to_compile)
    directory = tp.use_precompiled(tmp_path)
    assert (directory.usable, directory.programs, directory.refused) == (1, 1, ())
    request = spec.request
    kernel = compile_module.build(request.factory, request.args, request.arch)
    assert isinstance(kernel, precompiled.PrecompiledKernel) and kernel.program == entry
    assert loaded == [str(tmp_path / entry.library)]
    assert _entry_function(kernel) == kernel.entry  # the launch path calls the library's function
    assert compile_module.build(request.factory, request.args, request.arch) is kernel  # loaded once


def test_the_environment_names_the_directories(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _small_spec()
    _fake_directory(tmp_path / "a", spec)
    monkeypatch.setenv(
        precompiled.ENV_DIRECTORIES, os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])
    )
    with pytest.warns(
        precompiled.PrecompiledWarning, match=r"b/tileprefill-programs.json: expected the index"
    ):
        assert [d.path for d in precompiled.directories()] == [str(tmp_path / "a")]
    assert precompiled.holds(spec.request.factory, spec.request.args, _identity(spec.request))
    assert not precompiled.strict()


@pytest.mark.parametrize(
    ("built_with", "message"),
    [
        ({"tilelang": "0.1.12"}, r"TileLang: built with 0\.1\.12, this process has 0\.1\.15"),
        ({"cuda": "12.8"}, r"CUDA: built with 12\.8, this process has 13\.0 \(torch\.version\.cuda\)"),
        ({"tvm_ffi": "0.1.11"}, r"apache-tvm-ffi: built with 0\.1\.11, this process has "),
        ({"platform": "linux-aarch64"}, r"platform: built on linux-aarch64, this process runs on "),
    ],
)
def test_a_directory_of_another_toolchain_is_refused_naming_what_differs(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, built_with: dict[str, str], message: str
) -> None:
    monkeypatch.setattr(artifact, "distribution_version", lambda name: {"tilelang": "0.1.15"}.get(name, "x"))
    spec = _small_spec()
    _fake_directory(tmp_path, spec, **built_with)
    with pytest.warns(precompiled.PrecompiledWarning, match=message + r".*they compile on first use instead"):
        directory = tp.use_precompiled(tmp_path)
    assert directory.usable == 0
    assert not precompiled.holds(spec.request.factory, spec.request.args, _identity(spec.request))
    precompiled.forget()
    with pytest.raises(tp.PrecompiledError, match=r"refused \(strict mode\): " + message):
        tp.use_precompiled(tmp_path, strict=True)


def test_a_cuda_release_of_the_same_major_version_is_accepted(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_directory(tmp_path, _small_spec(), cuda="13.2")
    assert tp.use_precompiled(tmp_path).refused == ()


def test_programs_whose_sources_changed_are_refused_naming_the_files(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _small_spec()
    _fake_directory(tmp_path, spec)
    index_file = tmp_path / artifact.INDEX_FILE
    document = json.loads(index_file.read_text())
    document["sources"]["tileprefill/kernels/tl/slot_append.py"] = "0" * 64  # as if built from other code
    index_file.write_text(json.dumps(document))
    message = (
        r"1 of 1 programs: their source files differ from the build's \(tileprefill/kernels/tl/slot_append.py"
    )
    with pytest.warns(precompiled.PrecompiledWarning, match=message):
        assert tp.use_precompiled(tmp_path).usable == 0
    monkeypatch.setattr(compile_module, "_build", lambda *args: COMPILED)
    request = spec.request
    assert compile_module.build(request.factory, request.args, request.arch) is COMPILED
    precompiled.forget()
    with pytest.raises(tp.PrecompiledError, match=message):
        tp.use_precompiled(tmp_path, strict=True)


def test_a_library_that_does_not_hash_as_recorded_is_not_loaded(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _small_spec()
    entry = _fake_directory(tmp_path, spec)
    (tmp_path / entry.library).write_bytes(b"cut short")
    monkeypatch.setattr(precompiled, "load_module", _refuse_to_compile)
    monkeypatch.setattr(compile_module, "_build", lambda *args: COMPILED)
    tp.use_precompiled(tmp_path)
    request = spec.request
    with pytest.warns(
        precompiled.PrecompiledWarning, match=r"its library .* has SHA-256 [0-9a-f]{64}, the index records"
    ):
        assert compile_module.build(request.factory, request.args, request.arch) is COMPILED


def test_strict_mode_refuses_to_compile_a_program_no_directory_holds(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_directory(tmp_path, _small_spec())
    monkeypatch.setattr(compile_module, "_build", _refuse_to_compile)
    tp.use_precompiled(tmp_path, strict=True)
    other = programs_for("gemma-2-9b", attrs.evolve(SM90, ops=("PagedCacheSlotAppend",)))[0].request
    message = r"strict mode: program .*slot_append_program.* for sm_90a is in no precompiled directory in use"
    with pytest.raises(tp.PrecompiledError, match=rf"{message} \(searched: {tmp_path}\)"):
        compile_module.build(other.factory, other.args, other.arch)


def test_strict_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(precompiled.ENV_STRICT, "1")
    monkeypatch.setattr(compile_module, "_build", _refuse_to_compile)
    request = _small_spec().request
    with pytest.raises(tp.PrecompiledError, match=r"searched: none \(set TILEPREFILL_PRECOMPILED"):
        compile_module.build(request.factory, request.args, request.arch)


def test_a_directory_without_an_index_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(tp.PrecompiledFormatError, match=r"tileprefill-programs.json: expected the index"):
        tp.use_precompiled(tmp_path)
    (tmp_path / artifact.INDEX_FILE).write_text(json.dumps({"format": 99}))
    with pytest.raises(
        tp.PrecompiledFormatError, match=r"expected index format 1, got ValueError\('format 99'\)"
    ):
        tp.use_precompiled(tmp_path)


def test_prebuild_compiles_only_what_no_directory_holds(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held, other = (
        _small_spec(),
        programs_for("gemma-2-9b", attrs.evolve(SM90, ops=("PagedCacheSlotAppend",)))[0],
    )
    _fake_directory(tmp_path, held)
    monkeypatch.setattr(precompiled, "load_module", lambda path: _Module())
    compiled: list[tuple[object, ...]] = []

    def compile_(*args: Any) -> Any:
        compiled.append(args[1])
        return COMPILED

    monkeypatch.setattr(compile_module, "_build", compile_)
    tp.use_precompiled(tmp_path)
    done = compile_module.prebuild([held.request, other.request], jobs=1)
    assert (done.loaded, done.compiled) == (1, 1)
    assert compiled == [other.request.args]


def test_source_files_follow_the_imports_of_the_program_module() -> None:
    files = artifact.source_files("tileprefill.kernels.tl.attention_sm90")
    for expected in (
        "tileprefill/kernels/tl/attention_sm90.py",
        "tileprefill/kernels/tl/attention_entries.py",
        "tileprefill/kernels/tl/attention_parts.py",
        "tileprefill/kernels/tl/views.py",
        "tileprefill/tiles.py",
        "tileprefill/kernels/tilelang_compat.py",
    ):
        assert expected in files
    assert "tileprefill/ops/op.py" not in files  # nothing the program does not import


def test_a_program_id_changes_with_what_compiles_it() -> None:
    request = _small_spec().request
    ids = {
        artifact.program_id(request.factory, request.args, compile_identity("sm_90a")),
        artifact.program_id(request.factory, request.args, compile_identity("sm_80")),
        artifact.program_id(request.factory, (*request.args[:-1], "int64"), compile_identity("sm_90a")),
    }
    assert len(ids) == 3


# --- the command -----------------------------------------------------------------------------------


def test_precompile_list_prints_every_program(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["precompile", "--preset", "gemma-2-9b", "--arch", "sm_90a", "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    specs = programs_for("gemma-2-9b", SM90)
    assert out[-1] == f"{len(specs)} programs"
    assert sum(line.startswith("sm90 ") for line in out) == len(specs)


def test_precompile_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["precompile", "--presets"]) == 0
    assert capsys.readouterr().out.strip() == command.presets_table()


def test_precompile_builds_what_the_flags_say(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    seen: dict[str, Any] = {}

    def fake(model: Any, directory: Any, options: Any, **kwargs: Any) -> Any:
        seen.update(model=model, directory=directory, options=options, **kwargs)
        return attrs.evolve(_report(), directory=str(directory))

    monkeypatch.setattr(command, "precompile", fake)
    argv = [
        "precompile",
        "--heads",
        "16",
        "--kv-heads",
        "4",
        "--head-dim",
        "64",
        "--window",
        "0",
        "--window",
        "128",
    ]
    argv += ["--softcap", "20", "--dtype", "fp16", "--op", "GQAPrefill", "--arch", "sm90", "--page-size", "1"]
    argv += [
        "--lse",
        "both",
        "--sm-count",
        "114",
        "--index-dtype",
        "int64",
        "--out",
        str(tmp_path),
        "--jobs",
        "3",
    ]
    assert cli.main(argv) == 0
    assert seen["model"] == ModelConfig(
        heads=16, kv_heads=4, head_dim=64, dtypes=(DType.FP16,), windows=(0, 128), softcap=20.0
    )
    assert seen["options"] == BuildOptions(
        ops=("GQAPrefill",),
        archs=(Arch.SM90,),
        page_sizes=(1,),
        lse=(False, True),
        sm_counts=(114,),
        index_dtypes=(IndexDType.INT64,),
    )
    assert (seen["directory"], seen["jobs"], seen["rebuild"]) == (str(tmp_path), 3, False)


def test_precompile_for_tensor_parallel_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    seen: list[Any] = []

    def fake(model: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(model)
        return _report()

    monkeypatch.setattr(command, "precompile", fake)
    assert (
        cli.main(["precompile", "--preset", "gemma-2-9b", "--tensor-parallel", "2", "--out", str(tmp_path)])
        == 0
    )
    assert seen == [PRESETS["gemma-2-9b"].sharded(2)]


def _report() -> Any:
    from tileprefill.aot.build import PrecompileReport

    return PrecompileReport("", (), 0.0, artifact.current_toolchain(cuda="13.0", cuda_from="nvcc"))


@pytest.mark.parametrize(
    ("argv", "errors"),
    [
        (
            ["--preset", "gemma-2-9b", "--heads", "8", "--softcap", "3", "--out", "x"],
            ["--heads, --softcap: expected none with --preset (a preset has its shapes), got them"],
        ),
        (
            ["--heads", "8", "--out", "x"],
            ["--kv-heads, --head-dim: expected a value (or --preset NAME), got none"],
        ),
        (["--preset", "llama-3-8b"], ["--out: expected the directory to build into (or --list), got none"]),
        (
            ["--preset", "llama-4", "--arch", "sm70", "--page-size", "0", "--op", "Foo", "--lse", "maybe"],
            [
                "--preset: expected one of",
                "--arch: expected sm80",
                "--page-size: expected an integer >= 1, got '0'",
                "--op: expected one of GQAPrefill",
                "--lse: expected one of without, with, both, got 'maybe'",
            ],
        ),
        (
            ["--heads", "8", "--kv-heads", "3", "--head-dim", "64", "--list"],
            ["kv_heads: expected a divisor of heads (8), got 3"],
        ),
        (
            [
                "--heads",
                "8",
                "--kv-heads",
                "2",
                "--head-dim",
                "64",
                "--window",
                "64",
                "--non-causal",
                "--list",
            ],
            ["windows: expected (0,) without causal (a window is causal), got (64,)"],
        ),
    ],
)
def test_precompile_reports_every_bad_flag(
    argv: list[str], errors: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["precompile", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for error in errors:
        assert f"precompile: error: {error}" in err


def test_precompile_of_a_model_without_kernels_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["precompile", "--heads", "8", "--kv-heads", "2", "--head-dim", "72", "--list"]) == 2
    assert "head_dim 72 is not compiled" in capsys.readouterr().err


# --- a real build (nvcc) ---------------------------------------------------------------------------


@pytest.mark.compile
def test_precompile_builds_one_program_and_a_process_loads_it_back(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """nvcc builds one small program into a directory (no GPU); this process then loads its library
    instead of compiling (the CUDA module inside is loaded by the GPU at the first launch, which a
    CPU machine cannot do). A second build keeps it; a changed source refuses it."""
    pytest.importorskip("tilelang")
    monkeypatch.setattr(artifact, "loading_cuda", LOADING_CUDA)  # this machine's, as a process reads it
    argv = ["precompile", "--preset", "llama-3-8b", "--op", "PagedCacheSlotAppend", "--index-dtype", "int32"]
    argv += ["--arch", "sm_90a", "--out", str(tmp_path), "--jobs", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "[1/1]" in out and "sm90 slot_append_tl hkv8 d128 bf16 int32 slots: ok" in out
    index = artifact.read_index(tmp_path)
    (entry,) = index.programs
    library = tmp_path / entry.library
    assert library.stat().st_size > 0 and (tmp_path / "programs" / f"{entry.id}.cu").exists()
    assert index.built_with.tilelang == artifact.distribution_version("tilelang")
    assert index.built_with.cuda  # nvcc's release

    spec = _small_spec()
    monkeypatch.setattr(compile_module, "_build", _refuse_to_compile)
    assert tp.use_precompiled(tmp_path).usable == 1
    kernel = compile_module.build(spec.request.factory, spec.request.args, spec.request.arch)
    assert isinstance(kernel, precompiled.PrecompiledKernel)
    assert callable(_entry_function(kernel))

    assert cli.main(argv) == 0
    assert "slot_append_tl hkv8 d128 bf16 int32 slots: kept" in capsys.readouterr().out

    # What TileLang's disk cache keeps for a program (its `executable.so`): a host library with the
    # CUDA module inside and the entry function the launch path calls.
    module = precompiled.load_module(str(library))
    assert module.kind == "library" and [m.kind for m in module.imports_] == ["cuda"]
    assert module.implements_function("main")
