"""Every public Op on CUDA (TileLang kernels) against the same Op on CPU (reference kernels).

Fresh random inputs every run; the allocator is poisoned with NaN before each GPU
call so an output element a kernel forgets to write shows up as NaN. Append Ops
are checked on their caches too: every slot, not only the new ones.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

import tileprefill as tp
from tileprefill.keys import KernelKey

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

DEV = torch.device("cuda")
REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 2e-2}


def poison_allocator() -> None:
    """Fill recently freed device memory with NaN so an unwritten output element is NaN."""
    blob = torch.full((64 << 20,), float("nan"), dtype=torch.float16, device=DEV)
    del blob


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    assert not torch.isnan(out64).any(), "output has NaN: an element was not written"
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-12))


def cumulative(lens: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def rope_tables(max_pos: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def paged_layout(cache_lens: Sequence[int], page_size: int, spare_pages: int = 3) -> tuple[torch.Tensor, int]:
    """A block table over a shuffled page pool, each sequence with room for its final length."""
    pages = [max(1, math.ceil(n / page_size)) for n in cache_lens]
    num_pages = sum(pages) + spare_pages
    pool = list(range(num_pages))
    random.shuffle(pool)
    table = torch.zeros(len(cache_lens), max(pages), dtype=torch.int32)
    cursor = 0
    for b, n in enumerate(pages):
        table[b, :n] = torch.tensor(pool[cursor : cursor + n], dtype=torch.int32)
        cursor += n
    return table, num_pages


def run_against_cpu(
    make_op: Callable[[], Any],
    inputs: Sequence[torch.Tensor],
    mutated: Sequence[int] = (),
    exact: bool = True,
) -> tuple[KernelKey, ...]:
    """Run the Op on CUDA copies and on CPU copies of `inputs`; compare output and mutated inputs."""
    cpu_inputs = [x.clone() for x in inputs]
    gpu_inputs = [x.to(DEV) for x in inputs]
    op_gpu, op_cpu = make_op(), make_op()
    plan: tp.PrefillPlan = op_gpu.plan_for(*gpu_inputs)
    assert all(not k.value.endswith("_ref") for k in plan.steps), f"GPU plan uses a reference kernel: {plan}"
    poison_allocator()
    out = op_gpu(*gpu_inputs)
    torch.cuda.synchronize()
    ref = op_cpu(*cpu_inputs)
    dtype = inputs[0].dtype
    err = rel_err(out, ref)
    assert err < REL_TOL[dtype], f"output rel err {err:.2e} (plan {plan})"
    for i in mutated:
        got, want = gpu_inputs[i].cpu(), cpu_inputs[i]
        if exact:
            assert torch.equal(got, want), f"input {i} (cache) differs from the reference append"
        else:
            changed = (got.double() - want.double()).abs().max().item()
            assert changed < 2e-2 * max(1.0, want.double().abs().max().item()), f"cache {i} off by {changed}"
    return plan.steps


def rand(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


DTYPES = [torch.float16, torch.bfloat16]
# (head_dim, hq, hkv): group sizes 1, 2, 4, 8, 16
HEADS = [(128, 8, 8), (64, 8, 4), (128, 16, 4), (256, 8, 1), (128, 32, 4), (64, 16, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS)
@pytest.mark.parametrize("causal", [True, False])
def test_dense(dtype: torch.dtype, d: int, hq: int, hkv: int, causal: bool) -> None:
    for s_q, s_kv in ((77, 77), (33, 200), (200, 45)):
        inputs = [
            rand(2, s_q, hq, d, dtype=dtype),
            rand(2, s_kv, hkv, d, dtype=dtype),
            rand(2, s_kv, hkv, d, dtype=dtype),
        ]
        run_against_cpu(lambda: tp.GQAPrefill(causal=causal), inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS[:4])
@pytest.mark.parametrize("rope", [tp.RopeMode.NEOX, tp.RopeMode.INTERLEAVED])
def test_dense_rope(dtype: torch.dtype, d: int, hq: int, hkv: int, rope: tp.RopeMode) -> None:
    rotary = d // 2 if rope is tp.RopeMode.NEOX else d
    cos, sin = rope_tables(512, rotary)
    inputs = [
        rand(2, 130, hq, d, dtype=dtype),
        rand(2, 130, hkv, d, dtype=dtype),
        rand(2, 130, hkv, d, dtype=dtype),
        cos,
        sin,
    ]
    run_against_cpu(lambda: tp.GQARopePrefill(rope=rope), inputs)


def ragged_inputs(
    q_lens: list[int], kv_lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype
) -> list[torch.Tensor]:
    tq, tkv = sum(q_lens), sum(kv_lens)
    return [
        rand(tq, hq, d, dtype=dtype),
        rand(tkv, hkv, d, dtype=dtype),
        rand(tkv, hkv, d, dtype=dtype),
        cumulative(q_lens),
        cumulative(kv_lens),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen(dtype: torch.dtype, d: int, hq: int, hkv: int, causal: bool) -> None:
    q_lens = [37, 0, 129, 1, 300]
    kv_lens = [37, 5, 400, 1, 250]  # q_len < kv_len, equal, and q_len > kv_len
    run_against_cpu(
        lambda: tp.GQAVarlenPrefill(causal=causal), ragged_inputs(q_lens, kv_lens, hq, hkv, d, dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", [tp.RopeMode.NEOX, tp.RopeMode.INTERLEAVED])
def test_varlen_rope(dtype: torch.dtype, rope: tp.RopeMode) -> None:
    cos, sin = rope_tables(1024, 64)
    inputs = [*ragged_inputs([37, 0, 129], [37, 0, 129], 8, 2, 128, dtype), cos, sin]
    run_against_cpu(lambda: tp.GQAVarlenRopePrefill(rope=rope, rotary_dim=64), inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS)
def test_contiguous_cache(dtype: torch.dtype, d: int, hq: int, hkv: int) -> None:
    s_max, s_q = 300, 45
    kv_lens = torch.tensor([45, 299, 130], dtype=torch.int32)
    inputs = [
        rand(3, s_q, hq, d, dtype=dtype),
        rand(3, s_max, hkv, d, dtype=dtype),
        rand(3, s_max, hkv, d, dtype=dtype),
        kv_lens,
    ]
    run_against_cpu(lambda: tp.GQAContiguousCachePrefill(), inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,hq,hkv", HEADS[:4])
@pytest.mark.parametrize("rope", [None, tp.RopeMode.NEOX, tp.RopeMode.INTERLEAVED])
def test_contiguous_append(dtype: torch.dtype, d: int, hq: int, hkv: int, rope: tp.RopeMode | None) -> None:
    s_max, s_q = 320, 70
    cache_lens = torch.tensor([0, 13, 250], dtype=torch.int32)
    inputs = [
        rand(3, s_q, hq, d, dtype=dtype),
        rand(3, s_q, hkv, d, dtype=dtype),
        rand(3, s_q, hkv, d, dtype=dtype),
        rand(3, s_max, hkv, d, dtype=dtype),
        rand(3, s_max, hkv, d, dtype=dtype),
        cache_lens,
    ]
    if rope is None:
        run_against_cpu(lambda: tp.GQAContiguousCacheAppendPrefill(), inputs, mutated=(3, 4))
    else:
        cos, sin = rope_tables(s_max, d // 2)
        run_against_cpu(
            lambda: tp.GQAContiguousCacheRopeAppendPrefill(rope=rope),
            [*inputs, cos, sin],
            mutated=(3, 4),
            exact=False,
        )


PAGE_SIZES = [1, 5, 16, 48, 64]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("d,hq,hkv", [HEADS[0], HEADS[1], HEADS[3], HEADS[4]])
def test_paged_cache(dtype: torch.dtype, page_size: int, d: int, hq: int, hkv: int) -> None:
    q_lens, kv_lens = [17, 0, 64, 130], [17, 40, 300, 129]
    table, num_pages = paged_layout(kv_lens, page_size)
    inputs = [
        rand(sum(q_lens), hq, d, dtype=dtype),
        rand(num_pages, page_size, hkv, d, dtype=dtype),
        rand(num_pages, page_size, hkv, d, dtype=dtype),
        table,
        torch.tensor(kv_lens, dtype=torch.int32),
        cumulative(q_lens),
    ]
    run_against_cpu(lambda: tp.GQAPagedCachePrefill(), inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("rope", [None, tp.RopeMode.NEOX, tp.RopeMode.INTERLEAVED])
def test_paged_append(dtype: torch.dtype, page_size: int, rope: tp.RopeMode | None) -> None:
    d, hq, hkv = 128, 16, 2
    q_lens, cache_lens = [33, 0, 100, 1], [0, 7, 170, 64]
    table, num_pages = paged_layout([q + c for q, c in zip(q_lens, cache_lens, strict=True)], page_size)
    tq = sum(q_lens)
    inputs = [
        rand(tq, hq, d, dtype=dtype),
        rand(tq, hkv, d, dtype=dtype),
        rand(tq, hkv, d, dtype=dtype),
        rand(num_pages, page_size, hkv, d, dtype=dtype),
        rand(num_pages, page_size, hkv, d, dtype=dtype),
        table,
        torch.tensor(cache_lens, dtype=torch.int32),
        cumulative(q_lens),
    ]
    if rope is None:
        run_against_cpu(lambda: tp.GQAPagedCacheAppendPrefill(), inputs, mutated=(3, 4))
    else:
        cos, sin = rope_tables(512, 96)
        run_against_cpu(
            lambda: tp.GQAPagedCacheRopeAppendPrefill(rope=rope, rotary_dim=96),
            [*inputs, cos, sin],
            mutated=(3, 4),
            exact=False,
        )


def _paged_append_inputs(dtype: torch.dtype) -> tuple[list[torch.Tensor], int]:
    q_lens, cache_lens = [40, 7, 90], [16, 100, 3]
    table, num_pages = paged_layout([q + c for q, c in zip(q_lens, cache_lens, strict=True)], 16)
    tq = sum(q_lens)
    inputs = [
        rand(tq, 8, 128, dtype=dtype),
        rand(tq, 2, 128, dtype=dtype),
        rand(tq, 2, 128, dtype=dtype),
        rand(num_pages, 16, 2, 128, dtype=dtype),
        rand(num_pages, 16, 2, 128, dtype=dtype),
        table,
        torch.tensor(cache_lens, dtype=torch.int32),
        cumulative(q_lens),
    ]
    return inputs, tq


def test_paged_append_cuda_graph_replay() -> None:
    """Capture the paged append Op once, replay it with new data in the same buffers."""
    dtype = torch.float16
    op = tp.GQAPagedCacheAppendPrefill(validate=False)
    static, _ = _paged_append_inputs(dtype)
    static_gpu = [x.to(DEV) for x in static]
    for _ in range(2):  # warm up (compiles) outside the graph, on a side stream as capture requires
        op(*[x.clone() for x in static_gpu])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*static_gpu)
    for _ in range(2):
        fresh, _ = _paged_append_inputs(dtype)
        for buf, new in zip(static_gpu, fresh, strict=True):
            buf.copy_(new.to(DEV))
        graph.replay()
        torch.cuda.synchronize()
        ref_inputs = [x.clone() for x in fresh]
        ref = tp.GQAPagedCacheAppendPrefill()(*ref_inputs)
        assert rel_err(out, ref) < REL_TOL[dtype]
        assert torch.equal(static_gpu[3].cpu(), ref_inputs[3]) and torch.equal(
            static_gpu[4].cpu(), ref_inputs[4]
        )


def test_contiguous_append_torch_compile_fullgraph() -> None:
    """torch.compile(fullgraph=True) of an append Op sees the cache mutation."""
    dtype = torch.bfloat16
    op = tp.GQAContiguousCacheAppendPrefill(validate=False)

    def step(
        q: torch.Tensor,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = op(q, k_new, v_new, k_cache, v_cache, lens)
        return out, k_cache.sum(dim=(1, 2, 3))  # reads the cache after the append

    compiled = torch.compile(step, fullgraph=True)
    lens = torch.tensor([3, 50], dtype=torch.int32)
    inputs = [
        rand(2, 20, 8, 128, dtype=dtype),
        rand(2, 20, 2, 128, dtype=dtype),
        rand(2, 20, 2, 128, dtype=dtype),
        rand(2, 96, 2, 128, dtype=dtype),
        rand(2, 96, 2, 128, dtype=dtype),
        lens,
    ]
    ref_inputs = [x.clone() for x in inputs]
    ref_out = tp.GQAContiguousCacheAppendPrefill()(*ref_inputs)
    gpu = [x.to(DEV) for x in inputs]
    out, k_sum = compiled(*gpu)
    torch.cuda.synchronize()
    assert rel_err(out, ref_out) < REL_TOL[dtype]
    assert torch.equal(gpu[3].cpu(), ref_inputs[3])
    torch.testing.assert_close(
        k_sum.cpu().float(), ref_inputs[3].float().sum(dim=(1, 2, 3)), rtol=2e-2, atol=1.0
    )


def test_demo_runs_on_tilelang() -> None:
    from tileprefill.cli import main

    assert main(["demo", "--device", "cuda"]) == 0
