"""CPU-side checks of the TileLang RoPE and append kernels: wiring, op schemas, programs.

Numerics need a GPU (tests/gpu/test_rope_append_gpu.py); here: the modules load
without tilelang, compile cases cover every key, the custom ops declare exactly
the mutations they make and have fake implementations, bad metadata is rejected
by name before any launch, and the program factories lower for edge configs.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from tileprefill.context import Arch, DType
from tileprefill.kernels import append_tl, rope_tl
from tileprefill.kernels.base import StaticFacts
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.launch import scalars
from tileprefill.kernels.registry import ALL_KERNELS
from tileprefill.keys import AppendKey, RopeKey


def test_importing_the_kernel_modules_does_not_import_tilelang() -> None:
    code = (
        "import sys\n"
        "import tileprefill.kernels.rope_tl, tileprefill.kernels.append_tl, tileprefill.kernels.registry\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('tilelang', 'tvm'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("module", [rope_tl, append_tl], ids=["rope_tl", "append_tl"])
@pytest.mark.parametrize("arch", [Arch.SM80, Arch.SM90])
def test_compile_cases_cover_every_key_of_the_module(module: ModuleType, arch: Arch) -> None:
    cases: tuple[CompileCase, ...] = module.compile_cases(arch)
    assert {case.key for case in cases} == {cls.key for cls in module.KERNELS}
    assert len({case.label for case in cases}) == len(cases), "CI output names cases by label"
    for case in cases:
        hash(case.args)  # build() caches on them


def test_these_modules_serve_the_tl_rope_and_append_keys() -> None:
    tl_keys = {
        key for key in ALL_KERNELS if isinstance(key, RopeKey | AppendKey) and key.value.endswith("_tl")
    }
    assert {cls.key for cls in (*rope_tl.KERNELS, *append_tl.KERNELS)} == tl_keys
    assert {ALL_KERNELS[key] for key in tl_keys} == {*rope_tl.KERNELS, *append_tl.KERNELS}


def _schema(name: str) -> torch.FunctionSchema:
    schema: torch.FunctionSchema = getattr(torch.ops.tileprefill, name).default._schema
    return schema


def _written(schema: torch.FunctionSchema) -> set[str]:
    return {arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write}


@pytest.mark.parametrize("key", [RopeKey.NEOX_TL, RopeKey.INTERLEAVED_TL], ids=lambda k: k.value)
def test_rope_op_writes_only_its_output(key: RopeKey) -> None:
    schema = _schema(key.value)
    assert schema.is_mutable
    assert _written(schema) == {"out"}
    assert list(schema.returns) == []


@pytest.mark.parametrize(
    ("key", "caches"),
    [(AppendKey.CONTIGUOUS_TL, {"k_cache", "v_cache"}), (AppendKey.PAGED_TL, {"k_pages", "v_pages"})],
    ids=lambda x: x.value if isinstance(x, AppendKey) else "",
)
def test_append_ops_declare_exactly_the_two_caches_as_mutated(key: AppendKey, caches: set[str]) -> None:
    schema = _schema(key.value)
    assert schema.is_mutable
    assert _written(schema) == caches
    assert list(schema.returns) == []


def test_fakes_return_nothing() -> None:
    """What torch.compile traces: every launch writes its outputs in place and returns nothing."""
    meta = torch.device("meta")
    x = torch.empty(7, 4, 64, dtype=torch.bfloat16, device=meta)
    positions = torch.empty(7, dtype=torch.int32, device=meta)
    table = torch.empty(100, 16, dtype=torch.float32, device=meta)
    # The static facts as the custom ops take them (every schema scalar, in schema order).
    facts = scalars(StaticFacts(Arch.SM90, DType.BF16, 4, 4, 64, rotary_dim=32))
    assert torch.ops.tileprefill.rope_neox_tl(x, positions, table, table, torch.empty_like(x), *facts) is None
    new = torch.empty(2, 3, 4, 64, dtype=torch.float16, device=meta)
    cache = torch.empty(2, 9, 4, 64, dtype=torch.float16, device=meta)
    lens = torch.empty(2, dtype=torch.int32, device=meta)
    assert torch.ops.tileprefill.append_contiguous_tl(new, new, cache, cache, lens, *facts) is None
    tokens = torch.empty(6, 4, 64, dtype=torch.float16, device=meta)
    pages = torch.empty(5, 16, 4, 64, dtype=torch.float16, device=meta)
    block_table = torch.empty(2, 3, dtype=torch.int32, device=meta)
    cu = torch.empty(3, dtype=torch.int32, device=meta)
    op = torch.ops.tileprefill.append_paged_tl
    assert op(tokens, tokens, pages, pages, block_table, lens, cu, *facts) is None


# --- bad metadata is rejected by name, before any launch (the kernel classes check CPU tensors too) ---


def _rope_inputs() -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(5, 2, 64, dtype=torch.float16),
        "positions": torch.arange(5, dtype=torch.int32),
        "cos": torch.randn(16, 32),
        "sin": torch.randn(16, 32),
    }


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("x", torch.randn(5, 2, 64), "x: expected dtype float16 or bfloat16"),
        ("x", torch.randn(5, 128, dtype=torch.float16), "x: expected 3 dims"),
        ("positions", torch.arange(5), "positions: expected int32 of shape (5,)"),
        ("positions", torch.arange(4, dtype=torch.int32), "positions: expected int32 of shape (5,)"),
        ("cos", torch.randn(16, 32, dtype=torch.float64), "cos: expected float32"),
        (
            "sin",
            torch.randn(16, 31),
            "sin: expected float32 of shape (max_position, rotary_dim // 2) = (16, 32)",
        ),
        ("cos", torch.randn(16, 33), "sin: expected float32"),
        ("x", torch.randn(5, 2, 62, dtype=torch.float16), "cos: expected rotary_dim"),
        ("x", torch.randn(5, 2, 64, dtype=torch.float16), "x: expected a CUDA tensor"),
    ],
)
def test_rope_op_rejects_bad_metadata_by_name(name: str, bad: torch.Tensor, message: str) -> None:
    inputs = {**_rope_inputs(), name: bad}
    with pytest.raises((ValueError, TypeError)) as info:
        rope_tl.RopeNeoxTLKernel()(*inputs.values())
    assert message in str(info.value)


def _paged_inputs() -> dict[str, torch.Tensor]:
    return {
        "k_new": torch.randn(6, 2, 64, dtype=torch.float16),
        "v_new": torch.randn(6, 2, 64, dtype=torch.float16),
        "k_pages": torch.randn(8, 16, 2, 64, dtype=torch.float16),
        "v_pages": torch.randn(8, 16, 2, 64, dtype=torch.float16),
        "block_table": torch.zeros(2, 4, dtype=torch.int32),
        "cache_seqlens": torch.zeros(2, dtype=torch.int32),
        "cu_seqlens_q": torch.tensor([0, 2, 6], dtype=torch.int32),
    }


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("v_new", torch.randn(5, 2, 64, dtype=torch.float16), "v_new: expected torch.float16 (6, 2, 64)"),
        (
            "k_pages",
            torch.randn(8, 16, 2, 64, dtype=torch.bfloat16),
            "k_pages: expected a 4-dim torch.float16",
        ),
        ("v_pages", torch.randn(8, 16, 2, 32, dtype=torch.float16), "v_pages: expected (Hkv, D) = (2, 64)"),
        (
            "k_pages",
            # HND pages are a cache view the program writes through; a strided head dim is not.
            torch.randn(8, 16, 64, 2, dtype=torch.float16).transpose(2, 3),
            "k_pages: expected the last dim (D) contiguous",
        ),
        ("block_table", torch.zeros(2, 4, dtype=torch.int64), "block_table: expected int32 of shape (2, 4)"),
        ("block_table", torch.zeros(8, dtype=torch.int32), "block_table: expected int32 of shape (-1, -1)"),
        (
            "cu_seqlens_q",
            torch.tensor([0, 6], dtype=torch.int32),
            "cu_seqlens_q: expected int32 of shape (3,)",
        ),
        ("cache_seqlens", torch.zeros(3, dtype=torch.int32), "cache_seqlens: expected int32 of shape (2,)"),
        ("k_new", torch.randn(6, 2, 64, dtype=torch.float16), "k_new: expected a CUDA tensor"),
    ],
)
def test_append_paged_op_rejects_bad_metadata_by_name(name: str, bad: torch.Tensor, message: str) -> None:
    inputs = _paged_inputs()
    before = {key: t.clone() for key, t in inputs.items() if key in ("k_pages", "v_pages")}
    inputs[name] = bad
    with pytest.raises(ValueError) as info:
        append_tl.AppendPagedTLKernel()(*inputs.values())
    assert message in str(info.value)
    for key, cache in before.items():
        if inputs[key] is not bad:
            assert torch.equal(inputs[key], cache)


def test_append_contiguous_op_rejects_a_cache_of_another_batch() -> None:
    new = torch.randn(2, 3, 4, 64, dtype=torch.float16)
    cache = torch.randn(3, 9, 4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"k_cache: expected batch 2"):
        append_tl.AppendContiguousTLKernel()(new, new, cache, cache, torch.zeros(2, dtype=torch.int32))


# --- the programs: factories reject what they cannot build, and lower (no nvcc) for edge configs ---


def test_program_factories_reject_impossible_static_configs() -> None:
    from tileprefill.kernels.tl.append import append_paged_program
    from tileprefill.kernels.tl.rope import rope_program

    with pytest.raises(ValueError, match="rotary_dim: expected an even value in"):
        rope_program(64, 33, "float16", False)
    with pytest.raises(ValueError, match="rotary_dim: expected an even value in"):
        rope_program(64, 66, "float16", False)
    with pytest.raises(ValueError, match="head_dim: expected an even value"):
        rope_program(65, 32, "float16", True)
    with pytest.raises(ValueError, match="page_size: expected an integer >= 1"):
        append_paged_program(4, 64, 0, "float16")


def test_vector_widths_divide_the_extents() -> None:
    from tileprefill.validation import widest_vector

    assert widest_vector(128, 2) == 8
    assert widest_vector(36, 2) == 4
    assert widest_vector(6, 2) == 2
    assert widest_vector(5, 2) == 1
    assert widest_vector(64, 4) == 4
    assert widest_vector(2, 4) == 2


EDGE_PROGRAMS: list[tuple[str, tuple[object, ...]]] = [
    ("rope", (2, 2, "float16", True)),  # one pair per row
    ("rope", (80, 32, "bfloat16", False)),  # partial, rows not a power of two
    ("rope", (96, 96, "float16", True)),
    ("rope", (36, 12, "float16", False)),  # 4-wide rows, 2-element halves
    ("rope", (256, 256, "bfloat16", True)),
    ("contiguous", (1, 8, "float16")),
    ("contiguous", (3, 36, "bfloat16")),
    ("paged", (1, 8, 3, "float16")),
    ("paged", (64, 256, 7, "bfloat16")),  # one token per CTA
]


@pytest.mark.compile
@pytest.mark.parametrize(("program", "args"), EDGE_PROGRAMS, ids=[f"{p}{a}" for p, a in EDGE_PROGRAMS])
def test_programs_lower_for_edge_configs(program: str, args: tuple[object, ...]) -> None:
    import tilelang

    from tileprefill.kernels.compile import target_arch
    from tileprefill.kernels.tl.append import append_contiguous_program, append_paged_program
    from tileprefill.kernels.tl.rope import rope_program

    factories: dict[str, Callable[..., object]] = {
        "rope": rope_program,
        "contiguous": append_contiguous_program,
        "paged": append_paged_program,
    }
    factory = factories[program]
    target = tilelang.tvm.target.Target({"kind": "cuda", "arch": target_arch(Arch.SM90)})
    with target:
        tilelang.lower(factory(*args), target=target)
