"""q, k, v, the new keys and values and `out` as views of a caller's storage, on the TileLang kernels:
the cases of `tests/test_activation_views.py` on a GPU, plus what only a GPU shows.

Every public Op (and the SM80 and SM90 attention program of every source, called directly) on views
gives bit for bit what it gives on contiguous copies, writes a strided `out` without touching the
memory around it, and hands its launches the caller's storage: the addresses that reach each
compiled program (spied on at the launch layer) are the views' own, not those of copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest
import torch

import tileprefill as tp
from tileprefill.context import Arch
from tileprefill.kernels import attention_tl, launch
from tileprefill.kernels.base import NO_LSE
from tileprefill.keys import AttentionKey, attention_traits
from tileprefill.ops import PUBLIC_OPS, OpClass
from tileprefill.tiles import KVSource

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

from test_activation_views import (  # noqa: E402
    LAYOUTS,
    SENTINEL,
    activation_views,
    outside_out,
    strided_out,
)

if TYPE_CHECKING:
    from conftest import Oracle

DEV = torch.device("cuda")
try:
    DEVICE_ARCH = Arch.of_device(DEV)
except ValueError as exc:
    pytest.skip(f"no TileLang code for this device: {exc}", allow_module_level=True)


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The data addresses of the tensors each compiled program is called with, call by call: every
    launcher made while the test runs calls its program through this spy."""
    calls: list[tuple[int, ...]] = []
    entry_of = launch._entry_function

    def spying(kernel: Any) -> Callable[..., object]:
        entry = entry_of(kernel)

        def spy(*tensors: torch.Tensor) -> object:
            calls.append(tuple(t.data_ptr() for t in tensors))
            return entry(*tensors)

        return spy

    monkeypatch.setattr(launch, "_entry_function", spying)
    monkeypatch.setattr(launch, "_LAUNCHERS", {})  # launchers made before hold the unspied entry
    return calls


def on_device(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.to(DEV) for name, t in named.items()}


def passed_in_place(op_cls: OpClass, name: str, view: torch.Tensor, layout: str) -> bool:
    """Whether `view` reaches a launch as it is. The RoPE steps take rows (T, H, D): a (B, S, H, D)
    view whose sequences are not one row stride apart (heads-first storage, a padded batch) has no
    such view and is copied first (`ops.steps.as_rows`); every other view is read in place."""
    rotated = name in ("q", "k", "k_new", "v_new") if op_cls.appends else name in ("q", "k")
    return layout == "fused" or not (op_cls.rotates and rotated and view.dim() == 4)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_every_op_reads_views_in_place(
    oracle: Oracle,
    gen: torch.Generator,
    launched: list[tuple[int, ...]],
    op_cls: OpClass,
    layout: str,
) -> None:
    """The Op on views (and plan.run_into a strided out) gives what it gives on contiguous copies, bit
    for bit, output and caches; its launches receive the views' and out's own addresses."""
    op = oracle.make_op(op_cls)
    named = on_device(oracle.named_inputs(op_cls, gen))
    contiguous = {name: t.clone() for name, t in named.items()}
    expected = op(*contiguous.values())
    _, views = activation_views(named, layout)
    inputs = {**{name: t.clone() for name, t in named.items()}, **views}
    plan: Any = oracle.plan_of(op, op_cls, list(inputs.values()))
    buffer, out = strided_out(expected)
    launched.clear()
    assert plan.run_into(out, *(inputs[s.name] for s in op_cls.run_specs)) is out
    torch.cuda.synchronize()
    assert torch.equal(oracle.bits(out), oracle.bits(expected)), f"{layout} views: output differs"
    assert bool((outside_out(buffer, out) == SENTINEL).all()), f"{layout} views: wrote beside out"
    for name in ("k_cache", "v_cache", "k_pages", "v_pages"):
        if name in inputs:
            assert torch.equal(inputs[name], contiguous[name]), f"{layout} views: {name} differs"
    addresses = {address for call in launched for address in call}
    assert out.data_ptr() in addresses, "the attention launch did not write the caller's out"
    for name, view in views.items():
        if passed_in_place(op_cls, name, view, layout):
            assert view.data_ptr() in addresses, f"{name}: a launch read a copy, not the caller's view"


def test_the_slot_write_reads_views_in_place(gen: torch.Generator, launched: list[tuple[int, ...]]) -> None:
    tokens, heads, head_dim = 9, 2, 64
    named = {
        n: torch.randn(tokens, heads, head_dim, generator=gen).half().to(DEV) for n in ("k_new", "v_new")
    }
    pages = torch.randn(6, 4, heads, head_dim, generator=gen).half().to(DEV)
    slots = torch.tensor([3, -1, 0, 9, 15, 4, 11, 23, 20], device=DEV)
    k_ref, v_ref = pages.clone(), pages.clone()
    tp.PagedCacheSlotAppend()(named["k_new"], named["v_new"], k_ref, v_ref, slots)
    for layout in LAYOUTS:
        _, views = activation_views(named, layout)
        k_pages, v_pages = pages.clone(), pages.clone()
        launched.clear()
        tp.PagedCacheSlotAppend()(views["k_new"], views["v_new"], k_pages, v_pages, slots)
        assert torch.equal(k_pages, k_ref) and torch.equal(v_pages, v_ref), layout
        (call,) = launched
        assert call[:2] == (views["k_new"].data_ptr(), views["v_new"].data_ptr()), layout


#: A public Op of each source, whose inputs (`Oracle.named_inputs`) a kernel of that source takes.
SOURCE_OPS: dict[KVSource, OpClass] = {
    KVSource.DENSE: tp.GQAPrefill,
    KVSource.RAGGED: tp.GQAVarlenPrefill,
    KVSource.CONTIGUOUS: tp.GQAContiguousCachePrefill,
    KVSource.PAGED: tp.GQAPagedCachePrefill,
    KVSource.PAGED_TILED: tp.GQAPagedCachePrefill,
}


def kernel_inputs(oracle: Oracle, gen: torch.Generator, source: KVSource) -> dict[str, torch.Tensor]:
    """The inputs of an attention kernel of `source` (its Op's, on the device); the tiled paged
    programs take pages of 16 rows."""
    named = on_device(oracle.named_inputs(SOURCE_OPS[source], gen))
    if source is KVSource.PAGED_TILED:
        for name in ("k_pages", "v_pages"):
            named[name] = torch.randn(4, 16, *named[name].shape[2:], generator=gen).half().to(DEV)
    return named


def tl_keys() -> Iterator[Any]:
    for key in AttentionKey:
        _, code = attention_traits(key)
        if code.name not in ("SM80", "SM90"):
            continue
        arch = attention_tl.program_arch(key)
        skip = arch is Arch.SM90 and DEVICE_ARCH is not Arch.SM90
        marks = pytest.mark.skip(reason="SM90 programs need compute capability 9.0") if skip else ()
        yield pytest.param(key, id=key.value, marks=marks)


def kernel_of(key: AttentionKey) -> Any:
    """The TileLang attention kernel of `key` (its `bind` is its family's: typed by the class)."""
    (cls,) = (c for c in attention_tl.KERNELS if c.key is key)
    return cls()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("key", list(tl_keys()))
def test_every_attention_program_reads_and_writes_views(
    oracle: Oracle, gen: torch.Generator, launched: list[tuple[int, ...]], key: AttentionKey, layout: str
) -> None:
    """Each SM80 and SM90 program, launched directly (as a plan launches it) on q (and dense or
    ragged k and v) views and a strided out: the launch on contiguous copies, bit for bit, and the
    addresses it received are the views'."""
    source, _ = attention_traits(key)
    named = kernel_inputs(oracle, gen, source)
    q, kv = named["q"], list(named.values())[1]
    facts = attention_tl.facts_of(key, q, kv, causal=True, sm_scale=q.shape[-1] ** -0.5)
    run = kernel_of(key).bind(facts)
    expected = torch.full_like(q, SENTINEL)
    run(*named.values(), expected, NO_LSE)
    _, views = activation_views(named, layout)
    buffer, out = strided_out(q)
    launched.clear()
    run(*{**named, **views}.values(), out, NO_LSE)
    torch.cuda.synchronize()
    assert not bool((expected == SENTINEL).any()), "the program left output elements unwritten"
    assert torch.equal(out, expected), f"{key.value} on {layout} views: output differs"
    assert bool((outside_out(buffer, out) == SENTINEL).all()), f"{key.value}: wrote beside out"
    (call,) = launched
    received = dict(zip(attention_tl.record_of(key, facts).tensors, call, strict=True))
    for name, view in views.items():
        assert received[name] == view.data_ptr(), f"{key.value}: {name} reached the program as a copy"
    assert received["out"] == out.data_ptr()


def warm_up() -> None:
    """One pass over the workload's programs, unchecked (conftest's `compiled_programs` records the
    builds; while it does, no launch writes anything)."""
    from conftest import Oracle

    oracle, gen = Oracle(), torch.Generator().manual_seed(0)
    for op_cls in PUBLIC_OPS:
        oracle.make_op(op_cls)(*on_device(oracle.named_inputs(op_cls, gen)).values())
    k_new = torch.zeros(3, 2, 64, dtype=torch.float16, device=DEV)
    pages = torch.zeros(6, 4, 2, 64, dtype=torch.float16, device=DEV)
    tp.PagedCacheSlotAppend()(k_new, k_new.clone(), pages, pages.clone(), torch.arange(3, device=DEV))
    for param in tl_keys():
        (key,) = param.values
        if param.marks:
            continue
        source, _ = attention_traits(key)
        named = kernel_inputs(oracle, gen, source)
        q, kv = named["q"], list(named.values())[1]
        facts = attention_tl.facts_of(key, q, kv, causal=True, sm_scale=q.shape[-1] ** -0.5)
        kernel_of(key).bind(facts)(*named.values(), torch.empty_like(q), NO_LSE)
