"""KV caches as engines store them, on the TileLang kernels: the cases of `tests/test_cache_views.py`
on a GPU, plus what only a GPU shows.

Every cache Op on an engine layout's views (vLLM's kv-first, FlashInfer-style `(blocks, 2, ...)`,
HND, K|V packed with heads first) gives bit for bit what it gives on contiguous copies, writes the
engine's storage in place, and matches the CPU reference. The kernels read the caller's storage:
a run on views allocates less than one cache's bytes (a copy of K or V would allocate a whole one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

from test_cache_views import (  # noqa: E402
    ENGINE_LAYOUTS,
    HKV,
    ROTARY,
    STRIDED_LAYOUTS,
    D,
    check_contiguous_views,
    check_paged_views,
    check_slot_append_views,
    contiguous_case,
    engine_views,
    paged_case,
    run_paged,
)

if TYPE_CHECKING:
    from conftest import Oracle

DEV = torch.device("cuda")
KINDS = ("read", "append", "rope_append")


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 5, 16, 64])
def test_paged_ops_read_and_write_engine_views(
    oracle: Oracle, gen: torch.Generator, kind: str, layout: str, page_size: int
) -> None:
    check_paged_views(oracle, gen, kind, layout, page_size, DEV)


@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_paged_views_match_the_reference(
    oracle: Oracle, gen: torch.Generator, kind: str, layout: str, page_size: int
) -> None:
    """The TileLang kernels on views against the CPU reference on the same values."""
    case = paged_case(oracle, gen, page_size, DEV)
    cpu = type(case)(*(t.cpu() for t in case))
    k_cpu, v_cpu = cpu.k_pages.clone(), cpu.v_pages.clone()
    views = engine_views(case.k_pages, case.v_pages, layout)
    out = run_paged(kind, case, views.k, views.v)
    expected = run_paged(kind, cpu, k_cpu, v_cpu)
    err = float((out.cpu().double() - expected.double()).abs().max())
    assert err <= oracle.atol(out.dtype), f"{kind} on {layout}: max abs error {err:.3e} against the reference"
    assert torch.equal(views.v.cpu(), v_cpu), f"{kind} on {layout}: values"
    # Rotated keys round like the TileLang RoPE, not bit for bit like the reference's torch ops.
    k_err = float((views.k.cpu().double() - k_cpu.double()).abs().max())
    assert k_err <= (2e-2 * float(k_cpu.double().abs().max()) if kind == "rope_append" else 0.0), (
        f"{kind} on {layout}: keys off by {k_err:.3e}"
    )


@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_kernels_read_the_callers_storage(
    oracle: Oracle, gen: torch.Generator, kind: str, layout: str
) -> None:
    """No copy of a cache: a run on views allocates less than one cache's bytes."""
    case = paged_case(oracle, gen, 16, DEV)
    # A pool large enough that a copy of one cache would show beside the run's own buffers.
    pool = 64 * case.k_pages.shape[0]
    k_pages = torch.randn(pool, *case.k_pages.shape[1:], device=DEV).to(case.k_pages.dtype)
    views = engine_views(k_pages, k_pages.clone(), layout)
    run_paged(kind, case, views.k, views.v)  # warm: compiled programs, plans, launchers
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_paged(kind, case, views.k, views.v)
    torch.cuda.synchronize()
    grown = torch.cuda.max_memory_allocated() - before
    one_cache = views.k.shape.numel() * views.k.element_size()
    assert grown < one_cache // 2, (
        f"{kind} on {layout}: allocated {grown} bytes during the run (a cache is {one_cache})"
    )


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
def test_contiguous_cache_ops_read_and_write_engine_views(
    oracle: Oracle, gen: torch.Generator, layout: str
) -> None:
    check_contiguous_views(oracle, gen, layout, DEV)


@pytest.mark.parametrize("layout", ENGINE_LAYOUTS)
def test_slot_append_writes_engine_views(gen: torch.Generator, layout: str) -> None:
    check_slot_append_views(gen, layout, DEV)


def warm_up() -> None:
    """One pass over the workload's Ops, unchecked (conftest's `compiled_programs` records the builds;
    while it does, no launch writes anything)."""
    import tileprefill as tp
    from conftest import Oracle

    oracle, gen = Oracle(), torch.Generator().manual_seed(0)
    for page_size in (1, 5, 16, 64):
        case = paged_case(oracle, gen, page_size, DEV)
        for kind in KINDS:
            run_paged(kind, case, case.k_pages, case.v_pages)
    q, k_new, v_new, k_cache, v_cache, lengths, cos, sin = contiguous_case(oracle, gen, DEV)
    tp.GQAContiguousCachePrefill()(q, k_cache, v_cache, lengths + q.shape[1])
    rope = tp.GQAContiguousCacheRopeAppendPrefill(rope=tp.RopeMode.INTERLEAVED, rotary_dim=ROTARY)
    rope(q, k_new, v_new, k_cache, v_cache, lengths, cos, sin)
    pages = torch.zeros(6, 4, HKV, D, dtype=torch.bfloat16, device=DEV)
    tp.PagedCacheSlotAppend()(k_new[0], v_new[0], pages, pages.clone(), torch.arange(q.shape[1], device=DEV))
