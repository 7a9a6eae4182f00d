"""Installable beside vLLM and SGLang: the TileLang releases the requirements admit, and the
0.1.15 frontend features the programs use working on the installed release.

vLLM 0.34 and SGLang 0.5.23 pin `tilelang==0.1.12` and `apache-tvm-ffi==0.1.11`. CI runs this
suite and compiles programs with both releases (`nox -s compat` for 0.1.12).
"""

import pathlib
import tomllib
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tileprefill import compile_check
from tileprefill.context import Arch
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.tilelang_compat import BACKPORTED_RELEASES, SUPPORTED_RELEASES, backport

PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"

#: What the engines pin, read in their wheels' metadata (vLLM 0.34.0, SGLang 0.5.23).
ENGINE_PINS = {"tilelang": "0.1.12", "apache-tvm-ffi": "0.1.11"}

#: TileLang releases CI compiles nothing with: the requirements must not admit them.
UNTESTED_RELEASES = ("0.1.11", "0.1.13", "0.1.14", "0.1.16")


def requirements() -> dict[str, Requirement]:
    with PYPROJECT.open("rb") as file:
        listed = tomllib.load(file)["project"]["dependencies"]
    return {requirement.name: requirement for requirement in map(Requirement, listed)}


def test_requirements_admit_every_supported_tilelang_and_what_the_engines_pin() -> None:
    tilelang = requirements()["tilelang"]
    for release in (*SUPPORTED_RELEASES, ENGINE_PINS["tilelang"]):
        assert tilelang.specifier.contains(release), f"{tilelang} does not admit tilelang {release}"


def test_requirements_admit_no_tilelang_that_ci_does_not_test() -> None:
    tilelang = requirements()["tilelang"]
    for release in UNTESTED_RELEASES:
        assert not tilelang.specifier.contains(release), f"{tilelang} admits untested tilelang {release}"


def test_tvm_ffi_is_left_to_tilelang_or_admits_the_engines_pin() -> None:
    """Each TileLang release names the apache-tvm-ffi it works with; a pin of ours could only
    conflict with it (0.1.12 needs <= 0.1.11, 0.1.15 takes 0.1.11 or 0.1.12)."""
    ffi = requirements().get("apache-tvm-ffi")
    assert ffi is None or ffi.specifier.contains(ENGINE_PINS["apache-tvm-ffi"]), str(ffi)


def test_the_engines_pin_is_a_supported_release_and_backported() -> None:
    assert ENGINE_PINS["tilelang"] in SUPPORTED_RELEASES
    assert BACKPORTED_RELEASES <= set(SUPPORTED_RELEASES)
    assert max(SUPPORTED_RELEASES, key=Version) not in BACKPORTED_RELEASES, (
        "the newest release is the one the programs are written for"
    )


def installed_tilelang() -> str:
    tilelang = pytest.importorskip("tilelang")
    version: str = tilelang.__version__
    return version


def test_backport_changes_only_the_releases_it_names() -> None:
    release = installed_tilelang()
    assert backport() is (release in BACKPORTED_RELEASES)


def stores(func: Any) -> list[Any]:
    """The buffer stores of a traced program, in order."""
    import tilelang

    found: list[Any] = []

    def visit(node: Any) -> None:
        if isinstance(node, tilelang.tvm.tirx.BufferStore):
            found.append(node)

    tilelang.tvm.tirx.stmt_functor.post_order_visit(func.body, visit)
    return found


def traced(body: Any) -> Any:
    """A program `(A: (4, 8) with a dynamic row stride, B: (2, 8))` whose kernel runs the macro
    `body(A, B)`. (TileLang reads the annotations: this module cannot postpone them.)"""
    import tilelang.language as T

    rows = T.dynamic("rows")

    @T.prim_func
    def program(
        A: T.StridedTensor((4, 8), (rows, 1), "float16"),  # type: ignore[valid-type]  # TileLang's types are calls
        B: T.Tensor((2, 8), "float16"),  # type: ignore[valid-type]
    ) -> None:
        with T.Kernel(1, threads=32):
            body(A, B)

    return program


def backported() -> None:
    """Skips without tilelang; teaches the installed release what the programs need of 0.1.15."""
    installed_tilelang()
    backport()


def test_a_loop_over_a_python_tuple_unrolls_while_tracing() -> None:
    """The SM90 attention programs emit one block per consumer warpgroup this way."""
    backported()
    import tilelang.language as T

    @T.macro
    def copy_rows(A: Any, B: Any) -> None:
        for r in (1, 0):
            B[r, 0] = A[r + 2, 0]

    program = traced(copy_rows)
    assert [[int(i) for i in store.indices] for store in stores(program)] == [[1, 0], [0, 0]]


def test_a_view_with_strides_reads_the_same_data_with_those_strides() -> None:
    """`kernels/tl/views.vector_view`: strides written as multiples of a row's widest vector."""
    backported()
    import tilelang.language as T

    @T.macro
    def copy_through_view(A: Any, B: Any) -> None:
        a = T.view(A, strides=(A.strides[0] // 8 * 8, 1))
        B[0, 0] = a[3, 0]

    program = traced(copy_through_view)
    (store,) = stores(program)
    view, source = store.value.buffer, program.buffer_map[program.params[0]]
    assert view.data.same_as(source.data) and [int(n) for n in view.shape] == [4, 8]
    assert str(view.strides[0]) == "rows // 8 * 8" and int(view.strides[1]) == 1


def test_a_break_in_a_backported_python_loop_is_refused() -> None:
    """0.1.15 would leave the Python loop; the backport refuses rather than break a TIR loop."""
    if installed_tilelang() not in BACKPORTED_RELEASES:
        pytest.skip("the installed TileLang unrolls Python loops itself")
    backported()
    import tilelang.language as T

    @T.macro
    def copy_first_row(A: Any, B: Any) -> None:
        for r in (0, 1):
            B[r, 0] = A[r, 0]
            break

    with pytest.raises(TypeError, match="break in a loop over a Python sequence"):
        traced(copy_first_row)


#: What `nox -s compat` compiles with the engines' TileLang, by (key, label) of the CI compile cases:
#: each construct the backport adds in each kind of program that has it. A loop over the consumer
#: warpgroups in a persistent SM90 program with three consumers and in a one-tile-a-CTA one (that
#: one also reads a cache through a view with strides), and the cache view in an SM80 attention
#: program and in each program that writes a cache. The other programs use the same constructs
#: (or neither) with other static arguments. About 100 s on two cores (CI compiles them all with 0.1.15).
COMPAT_CASES: dict[Arch, tuple[tuple[str, str], ...]] = {
    Arch.SM90: (
        ("attn_dense_sm90", "d64 bf16 causal"),
        ("attn_contiguous_sm90", "d192 fp16 causal window"),
        ("append_paged_tl", "append_paged_tl_hkv2_d256_p5_float16"),
        ("rope_append_neox_tl", "rope_append_neox_tl_h16_hkv1_d64_r32_float16"),
        ("slot_append_tl", "slot_append_tl_hkv1_d64_bfloat16_int32"),
    ),
    Arch.SM80: (("attn_contiguous_sm80", "d192 fp16 causal window"),),
}


def compat_cases(arch: Arch) -> tuple[CompileCase, ...]:
    cases = {(case.key.value, case.label): case for case in compile_check.collect_cases(arch)}
    missing = [name for name in COMPAT_CASES[arch] if name not in cases]
    assert not missing, f"no compile case {missing} for {arch.value}: name the representative set anew"
    return tuple(cases[name] for name in COMPAT_CASES[arch])


@pytest.mark.parametrize("arch", list(COMPAT_CASES))
def test_the_representative_set_names_compile_cases(arch: Arch) -> None:
    assert len(compat_cases(arch)) == len(COMPAT_CASES[arch])


@pytest.mark.compile
@pytest.mark.parametrize("arch", list(COMPAT_CASES))
def test_the_representative_set_compiles_on_a_backported_release(arch: Arch, tmp_path: pathlib.Path) -> None:
    if installed_tilelang() not in BACKPORTED_RELEASES:
        pytest.skip("the installed TileLang is the programs' own: the compile check covers it")
    cases = compat_cases(arch)
    outcomes = compile_check.compile_all(cases, arch, str(tmp_path), jobs=compile_check.default_jobs())
    table = compile_check.format_table(outcomes, arch)
    print(table)
    assert all(outcome.error is None for outcome in outcomes), table
