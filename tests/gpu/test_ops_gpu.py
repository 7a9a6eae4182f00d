"""Every public Op on CUDA (TileLang kernels) against the same Op on CPU (reference kernels).

Fresh random inputs every run; the allocator is poisoned with NaN before each GPU
call so an output element a kernel forgets to write shows up as NaN. Append Ops
are checked on their caches too: every slot, not only the new ones.

The kernels themselves are tested over their full matrix in test_attention_gpu.py
and test_rope_append_gpu.py; here each Op runs a cover of it (every group size
1..16, head dim 64/128/256, both dtypes and causal modes, page sizes 1/5/16/48/64,
both RoPE layouts, partial rotary) rather than its product: about 45 programs,
compiled side by side before the first test (`warm_up`, run by the
`compiled_programs` fixture of tests/conftest.py).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
import torch

import tileprefill as tp
from tileprefill.keys import KernelKey

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

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


@attrs.frozen
class Case:
    """One Op call: the Op, a builder of fresh random CPU inputs, and what the call mutates."""

    id: str
    make_op: Callable[[], Any]
    inputs: Callable[[], list[torch.Tensor]]
    mutated: tuple[int, ...] = ()
    exact: bool = True  # mutated inputs equal the reference's bit for bit (no RoPE on the keys)

    def run_against_cpu(self) -> tuple[KernelKey, ...]:
        return run_against_cpu(self.make_op, self.inputs(), self.mutated, self.exact)


def case_ids(cases: Sequence[Case]) -> list[str]:
    return [c.id for c in cases]


DTYPES = [torch.float16, torch.bfloat16]
# (head_dim, hq, hkv): group sizes 1, 2, 4, 8, 8, 16
HEADS = [(128, 8, 8), (64, 8, 4), (128, 16, 4), (256, 8, 1), (128, 32, 4), (64, 16, 1)]
# (dtype, causal) of HEADS[i]: every pair occurs, with each dtype and with each causal mode.
MODES = [(DTYPES[i % 2], i % 4 in (0, 3)) for i in range(len(HEADS))]
ROPES = [tp.RopeMode.NEOX, tp.RopeMode.INTERLEAVED]
PAGE_SIZES = [1, 5, 16, 48, 64]


def _name(dtype: torch.dtype, d: int, hq: int, hkv: int, causal: bool | None = None) -> str:
    mode = "" if causal is None else ("-causal" if causal else "-full")
    return f"{str(dtype).removeprefix('torch.')}-d{d}-g{hq // hkv}{mode}"


def dense_case(d: int, hq: int, hkv: int, dtype: torch.dtype, causal: bool, s_q: int, s_kv: int) -> Case:
    def inputs() -> list[torch.Tensor]:
        return [
            rand(2, s_q, hq, d, dtype=dtype),
            rand(2, s_kv, hkv, d, dtype=dtype),
            rand(2, s_kv, hkv, d, dtype=dtype),
        ]

    return Case(
        f"{_name(dtype, d, hq, hkv, causal)}-q{s_q}-kv{s_kv}", lambda: tp.GQAPrefill(causal=causal), inputs
    )


def dense_rope_case(d: int, hq: int, hkv: int, dtype: torch.dtype, causal: bool, rope: tp.RopeMode) -> Case:
    rotary = d // 2 if rope is tp.RopeMode.NEOX else d

    def inputs() -> list[torch.Tensor]:
        cos, sin = rope_tables(512, rotary)
        return [
            rand(2, 130, hq, d, dtype=dtype),
            rand(2, 130, hkv, d, dtype=dtype),
            rand(2, 130, hkv, d, dtype=dtype),
            cos,
            sin,
        ]

    return Case(
        f"{_name(dtype, d, hq, hkv, causal)}-{rope.value}-r{rotary}",
        lambda: tp.GQARopePrefill(rope=rope, causal=causal),
        inputs,
    )


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


def varlen_case(d: int, hq: int, hkv: int, dtype: torch.dtype, causal: bool) -> Case:
    q_lens = [37, 0, 129, 1, 300]
    kv_lens = [37, 5, 400, 1, 250]  # q_len < kv_len, equal, and q_len > kv_len
    return Case(
        _name(dtype, d, hq, hkv, causal),
        lambda: tp.GQAVarlenPrefill(causal=causal),
        lambda: ragged_inputs(q_lens, kv_lens, hq, hkv, d, dtype),
    )


def varlen_rope_case(dtype: torch.dtype, rope: tp.RopeMode) -> Case:
    def inputs() -> list[torch.Tensor]:
        cos, sin = rope_tables(1024, 64)
        return [*ragged_inputs([37, 0, 129], [37, 0, 129], 8, 2, 128, dtype), cos, sin]

    return Case(
        f"{_name(dtype, 128, 8, 2)}-{rope.value}-r64",
        lambda: tp.GQAVarlenRopePrefill(rope=rope, rotary_dim=64),
        inputs,
    )


def contiguous_case(d: int, hq: int, hkv: int, dtype: torch.dtype) -> Case:
    def inputs() -> list[torch.Tensor]:
        s_max, s_q = 300, 45
        return [
            rand(3, s_q, hq, d, dtype=dtype),
            rand(3, s_max, hkv, d, dtype=dtype),
            rand(3, s_max, hkv, d, dtype=dtype),
            torch.tensor([45, 299, 130], dtype=torch.int32),
        ]

    return Case(_name(dtype, d, hq, hkv), lambda: tp.GQAContiguousCachePrefill(), inputs)


def contiguous_append_case(d: int, hq: int, hkv: int, dtype: torch.dtype, rope: tp.RopeMode | None) -> Case:
    s_max, s_q = 320, 70

    def inputs() -> list[torch.Tensor]:
        tensors = [
            rand(3, s_q, hq, d, dtype=dtype),
            rand(3, s_q, hkv, d, dtype=dtype),
            rand(3, s_q, hkv, d, dtype=dtype),
            rand(3, s_max, hkv, d, dtype=dtype),
            rand(3, s_max, hkv, d, dtype=dtype),
            torch.tensor([0, 13, 250], dtype=torch.int32),
        ]
        return tensors if rope is None else [*tensors, *rope_tables(s_max, d // 2)]

    name = _name(dtype, d, hq, hkv)
    if rope is None:
        return Case(name, lambda: tp.GQAContiguousCacheAppendPrefill(), inputs, mutated=(3, 4))
    return Case(
        f"{name}-{rope.value}-r{d // 2}",
        lambda: tp.GQAContiguousCacheRopeAppendPrefill(rope=rope),
        inputs,
        mutated=(3, 4),
        exact=False,
    )


def paged_case(page_size: int, d: int, hq: int, hkv: int, dtype: torch.dtype) -> Case:
    def inputs() -> list[torch.Tensor]:
        q_lens, kv_lens = [17, 0, 64, 130], [17, 40, 300, 129]
        table, num_pages = paged_layout(kv_lens, page_size)
        return [
            rand(sum(q_lens), hq, d, dtype=dtype),
            rand(num_pages, page_size, hkv, d, dtype=dtype),
            rand(num_pages, page_size, hkv, d, dtype=dtype),
            table,
            torch.tensor(kv_lens, dtype=torch.int32),
            cumulative(q_lens),
        ]

    return Case(f"page{page_size}-{_name(dtype, d, hq, hkv)}", lambda: tp.GQAPagedCachePrefill(), inputs)


def paged_append_case(page_size: int, dtype: torch.dtype, rope: tp.RopeMode | None) -> Case:
    d, hq, hkv = 128, 16, 2

    def inputs() -> list[torch.Tensor]:
        q_lens, cache_lens = [33, 0, 100, 1], [0, 7, 170, 64]
        table, num_pages = paged_layout([q + c for q, c in zip(q_lens, cache_lens, strict=True)], page_size)
        tq = sum(q_lens)
        tensors = [
            rand(tq, hq, d, dtype=dtype),
            rand(tq, hkv, d, dtype=dtype),
            rand(tq, hkv, d, dtype=dtype),
            rand(num_pages, page_size, hkv, d, dtype=dtype),
            rand(num_pages, page_size, hkv, d, dtype=dtype),
            table,
            torch.tensor(cache_lens, dtype=torch.int32),
            cumulative(q_lens),
        ]
        return tensors if rope is None else [*tensors, *rope_tables(512, 96)]

    name = f"page{page_size}-{_name(dtype, d, hq, hkv)}"
    if rope is None:
        return Case(name, lambda: tp.GQAPagedCacheAppendPrefill(), inputs, mutated=(3, 4))
    return Case(
        f"{name}-{rope.value}-r96",
        lambda: tp.GQAPagedCacheRopeAppendPrefill(rope=rope, rotary_dim=96),
        inputs,
        mutated=(3, 4),
        exact=False,
    )


# Sq = Skv, Sq < Skv and Sq > Skv (bottom-right causal rows that see no key).
DENSE = [
    dense_case(*h, *m, s_q, s_kv)
    for h, m in zip(HEADS, MODES, strict=True)
    for s_q, s_kv in ((77, 77), (33, 200), (200, 45))
]
DENSE_ROPE = [dense_rope_case(*h, *m, rope) for h, m in zip(HEADS[:4], MODES, strict=False) for rope in ROPES]
VARLEN = [varlen_case(*h, *m) for h, m in zip(HEADS, MODES, strict=True)]
VARLEN_ROPE = [varlen_rope_case(dtype, rope) for dtype in DTYPES for rope in ROPES]
CONTIGUOUS = [contiguous_case(*h, dtype) for h, (dtype, _) in zip(HEADS, MODES, strict=True)]
CONTIGUOUS_APPEND = [
    contiguous_append_case(*h, dtype, rope)
    for h, (dtype, _) in zip(HEADS[:4], MODES, strict=False)
    for rope in [None, *ROPES]
]
# Two head configurations per page size (rows gathered for 1/5/48, whole pages for 16/64).
PAGED = [
    paged_case(page, *HEADS[(2 * i + j) % len(HEADS)], DTYPES[(i + j) % 2])
    for i, page in enumerate(PAGE_SIZES)
    for j in range(2)
]
PAGED_APPEND = [
    paged_append_case(page, DTYPES[i % 2], rope)
    for i, page in enumerate(PAGE_SIZES)
    for rope in [None, *ROPES]
]


def warm_up() -> None:
    """One pass over every case and the shapes of the graph, compile and demo tests (the
    `compiled_programs` fixture runs this under `recording_builds`, then compiles them side by side)."""
    from tileprefill.cli import main

    cases = [
        *DENSE,
        *DENSE_ROPE,
        *VARLEN,
        *VARLEN_ROPE,
        *CONTIGUOUS,
        *CONTIGUOUS_APPEND,
        *PAGED,
        *PAGED_APPEND,
    ]
    for case in cases:
        case.make_op()(*[x.to(DEV) for x in case.inputs()])
    tp.GQAPagedCacheAppendPrefill()(*[x.to(DEV) for x in _paged_append_inputs(torch.float16)[0]])
    tp.GQAContiguousCacheAppendPrefill()(*[x.to(DEV) for x in _contiguous_append_inputs()])
    main(["demo", "--device", "cuda"])  # its check fails here (nothing ran): only the builds count


@pytest.mark.parametrize("case", DENSE, ids=case_ids(DENSE))
def test_dense(case: Case) -> None:
    case.run_against_cpu()


@pytest.mark.parametrize("case", DENSE_ROPE, ids=case_ids(DENSE_ROPE))
def test_dense_rope(case: Case) -> None:
    case.run_against_cpu()


@pytest.mark.parametrize("case", VARLEN, ids=case_ids(VARLEN))
def test_varlen(case: Case) -> None:
    case.run_against_cpu()


@pytest.mark.parametrize("case", VARLEN_ROPE, ids=case_ids(VARLEN_ROPE))
def test_varlen_rope(case: Case) -> None:
    case.run_against_cpu()


@pytest.mark.parametrize("case", CONTIGUOUS, ids=case_ids(CONTIGUOUS))
def test_contiguous_cache(case: Case) -> None:
    case.run_against_cpu()


@pytest.mark.parametrize("case", CONTIGUOUS_APPEND, ids=case_ids(CONTIGUOUS_APPEND))
def test_contiguous_append(case: Case) -> None:
    case.run_against_cpu()


@pytest.mark.parametrize("case", PAGED, ids=case_ids(PAGED))
def test_paged_cache(case: Case) -> None:
    case.run_against_cpu()


@pytest.mark.parametrize("case", PAGED_APPEND, ids=case_ids(PAGED_APPEND))
def test_paged_append(case: Case) -> None:
    case.run_against_cpu()


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


def _contiguous_append_inputs() -> list[torch.Tensor]:
    dtype = torch.bfloat16
    return [
        rand(2, 20, 8, 128, dtype=dtype),
        rand(2, 20, 2, 128, dtype=dtype),
        rand(2, 20, 2, 128, dtype=dtype),
        rand(2, 96, 2, 128, dtype=dtype),
        rand(2, 96, 2, 128, dtype=dtype),
        torch.tensor([3, 50], dtype=torch.int32),
    ]


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
    inputs = _contiguous_append_inputs()
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
