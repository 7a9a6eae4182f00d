"""Every public Op on CUDA (TileLang kernels) against the same Op on CPU (reference kernels).

Fresh random inputs every run; the allocator is poisoned with NaN before each GPU
call so an output element a kernel forgets to write shows up as NaN. Append Ops
are checked on their caches too: every slot, not only the new ones.

The kernels themselves are tested over their full matrix in test_attention_gpu.py
and test_rope_append_gpu.py; here each Op runs a cover of it (every group size
1..16, head dim 64/128/256, both dtypes and causal modes, page sizes 1/5/16/48/64,
both RoPE layouts, partial rotary) rather than its product: about 45 programs,
compiled side by side before the first test (`warm_up`, run by the
`compiled_programs` fixture of tests/conftest.py). On the GPU, RoPE + append Ops
plan one fused step (`rope_append_<mode>_tl`) before attention.

The plan/run split: `op.plan(<metadata>, shape=...)` once per batch, `plan.run(<data>)`
per layer. Tested here: plan + run is the one-shot call bit for bit for every public
Op; `run` reads no device memory on the host (torch's sync debug mode raises on a
sync); a captured `plan.run` replays with new data, and a new batch is a new plan and
a new capture.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import attrs
import pytest
import torch

import tileprefill as tp
from tileprefill.keys import AppendKey, AttentionKey, KernelKey, RopeAppendKey, RopeKey
from tileprefill.ops import PUBLIC_OPS, OpClass

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


def plan_call(op: Any, inputs: Sequence[torch.Tensor]) -> tp.BatchPlan[Any]:
    """The plan `op(*inputs)` makes (`oracle.plan_of` of tests/conftest.py, without the fixture)."""
    names = [s.name for s in type(op).input_specs]
    plan = op._plan_call(dict(zip(names, inputs, strict=True)))
    assert isinstance(plan, tp.BatchPlan)
    return plan


def check_gpu_plan(op: Any, plan: tp.BatchPlan[Any]) -> None:
    """A GPU plan: TileLang kernels only, attention last; a RoPE + append Op plans the fused
    `rope_append_<mode>_tl` step right before attention, never a RoPE step and an append step."""
    steps = plan.steps
    assert all(not k.value.endswith("_ref") for k in steps), f"GPU plan uses a reference kernel: {plan}"
    assert isinstance(steps[-1], AttentionKey), f"GPU plan {plan}: expected attention last"
    kinds = {type(k) for k in steps}
    if op.rotates and op.appends:
        fused = RopeAppendKey.NEOX_TL if op.rope is tp.RopeMode.NEOX else RopeAppendKey.INTERLEAVED_TL
        assert steps[-2] is fused and [k for k in steps if isinstance(k, RopeAppendKey)] == [fused], (
            f"GPU plan {plan}: expected {fused.value} right before attention"
        )
        assert not kinds & {RopeKey, AppendKey}, f"GPU plan {plan}: RoPE and append are one fused step"
        assert str(plan.plan).endswith(f"{fused.value} -> {steps[-1].value}"), f"plan string {plan.plan}"
    elif op.rotates:
        rope = RopeKey.NEOX_TL if op.rope is tp.RopeMode.NEOX else RopeKey.INTERLEAVED_TL
        assert rope in steps and RopeAppendKey not in kinds, f"GPU plan {plan}: expected {rope.value}"
    elif op.appends:
        assert AppendKey in kinds and RopeAppendKey not in kinds, f"GPU plan {plan}: expected an append"
    else:
        assert not kinds & {RopeKey, AppendKey, RopeAppendKey}, f"GPU plan {plan}: expected attention only"


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
    plan = plan_call(op_gpu, gpu_inputs)
    check_gpu_plan(op_gpu, plan)
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
    """One pass over every case and the shapes of the graph, compile, plan/run and demo tests (the
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
    for op_cls in PUBLIC_OPS:  # plan + run, sync-free runs and the plan.run graph share these programs
        make_op(op_cls)(*[x.to(DEV) for x in op_inputs(op_cls).values()])
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


@contextlib.contextmanager
def side_stream() -> Iterator[None]:
    """Work on a side stream that waits for the current one, and is waited for after (warm-ups
    before a CUDA-graph capture, as torch's CUDA-graph notes do)."""
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream().wait_stream(stream)


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
    with side_stream():  # warm up (compiles) outside the graph, on a side stream as capture requires
        for _ in range(2):
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


# --------------------------------------------------------------------- plan once, run per layer

#: The Ops below share one static configuration (D 128, Hq 16, Hkv 4, fp16, causal, page size 16,
#: NEOX RoPE of 64 dims), so their programs are few.
PLAN_D, PLAN_HQ, PLAN_HKV, PLAN_PAGE, PLAN_ROTARY = 128, 16, 4, 16, 64

Shape = tp.DenseShape | tp.VarlenShape | tp.ContiguousShape | tp.PagedShape


def op_inputs(op_cls: OpClass, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Valid CPU inputs of any public Op, by name (in call order): an empty sequence in every batch,
    q_len above and below kv_len, caches that end mid-page, partial rotary, a shuffled page pool."""
    d, hq, hkv = PLAN_D, PLAN_HQ, PLAN_HKV
    cos, sin = rope_tables(256, PLAN_ROTARY)
    tensors: dict[str, torch.Tensor] = {"cos": cos, "sin": sin}
    if op_cls.kv_layout is tp.KVLayout.NONE and not op_cls.ragged:
        tensors |= {
            "q": rand(2, 70, hq, d, dtype=dtype),
            "k": rand(2, 90, hkv, d, dtype=dtype),
            "v": rand(2, 90, hkv, d, dtype=dtype),
        }
    elif op_cls.kv_layout is tp.KVLayout.NONE:
        names = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_kv")
        tensors |= dict(zip(names, ragged_inputs([37, 0, 50], [37, 5, 80], hq, hkv, d, dtype), strict=True))
    elif op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
        s_q, s_max = 20, 128
        tensors |= {
            "q": rand(3, s_q, hq, d, dtype=dtype),
            "k_new": rand(3, s_q, hkv, d, dtype=dtype),
            "v_new": rand(3, s_q, hkv, d, dtype=dtype),
            "k_cache": rand(3, s_max, hkv, d, dtype=dtype),
            "v_cache": rand(3, s_max, hkv, d, dtype=dtype),
            "kv_seqlens": torch.tensor([45, 20, 100], dtype=torch.int32),
            "cache_seqlens": torch.tensor([0, 13, 100], dtype=torch.int32),
        }
    else:
        q_lens, kv_lens, cache_lens = [33, 0, 40], [33, 7, 120], [0, 13, 100]
        capacity = [max(n, q + c) for n, q, c in zip(kv_lens, q_lens, cache_lens, strict=True)]
        table, num_pages = paged_layout(capacity, PLAN_PAGE)
        tq = sum(q_lens)
        tensors |= {
            "q": rand(tq, hq, d, dtype=dtype),
            "k_new": rand(tq, hkv, d, dtype=dtype),
            "v_new": rand(tq, hkv, d, dtype=dtype),
            "k_pages": rand(num_pages, PLAN_PAGE, hkv, d, dtype=dtype),
            "v_pages": rand(num_pages, PLAN_PAGE, hkv, d, dtype=dtype),
            "block_table": table,
            "kv_seqlens": torch.tensor(kv_lens, dtype=torch.int32),
            "cache_seqlens": torch.tensor(cache_lens, dtype=torch.int32),
            "cu_seqlens_q": cumulative(q_lens),
        }
    return {s.name: tensors[s.name] for s in op_cls.input_specs}


def make_op(op_cls: OpClass, *, validate: bool = True) -> Any:
    """An Op of any class (RoPE Ops: NEOX, rotary dim from the plan's shape or from cos)."""
    kwargs: dict[str, object] = {"validate": validate}
    if op_cls.rotates:
        kwargs["rope"] = tp.RopeMode.NEOX
    return cast(Any, op_cls)(**kwargs)


def shape_of(op_cls: OpClass, named: Mapping[str, torch.Tensor]) -> Shape:
    """The plan shape of a call's inputs: what an engine knows of every layer's data tensors."""
    q = named["q"]
    kv = next(named[n] for n in ("k", "k_new", "k_cache", "k_pages") if n in named)
    rotary_dim = 2 * named["cos"].shape[1] if op_cls.rotates else 0
    common: tuple[int, int, int, torch.dtype, torch.device, int] = (
        q.shape[-2],
        kv.shape[-2],
        q.shape[-1],
        q.dtype,
        q.device,
        rotary_dim,
    )
    if op_cls.kv_layout is tp.KVLayout.NONE:
        if op_cls.ragged:
            return tp.VarlenShape(q.shape[0], named["k"].shape[0], *common)
        return tp.DenseShape(q.shape[0], q.shape[1], named["k"].shape[1], *common)
    if op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
        return tp.ContiguousShape(q.shape[1], named["k_cache"].shape[1], *common)
    return tp.PagedShape(q.shape[0], named["k_pages"].shape[1], *common)


def plan_of(op: Any, op_cls: OpClass, named: Mapping[str, torch.Tensor]) -> tp.BatchPlan[Any]:
    """`op.plan(<its plan inputs>, shape=...)`, the public way."""
    plan = op.plan(*[named[n] for n in op_cls.plan_inputs], shape=shape_of(op_cls, named))
    assert isinstance(plan, tp.BatchPlan)
    return plan


def run_inputs(op_cls: OpClass, named: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """`plan.run`'s tensors, in its order."""
    return [named[s.name] for s in op_cls.run_specs]


def run_plan(plan: tp.BatchPlan[Any], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """`plan.run(*tensors)` of a plan of any Op (each plan class names its own tensors)."""
    out = cast(Any, plan).run(*tensors)
    assert isinstance(out, torch.Tensor)
    return out


def raw(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes: equal bytes is bit-for-bit equality, NaN included."""
    return t.contiguous().view(torch.uint8)


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_plan_and_run_match_the_one_shot_call_bit_for_bit(op_cls: OpClass) -> None:
    """`op.plan(...).run(...)` is `op(...)`: one plan (the same steps), the same launches, so the
    same output and the same cache bytes, on the same inputs."""
    named = {name: t.to(DEV) for name, t in op_inputs(op_cls).items()}
    one_shot = {name: t.clone() for name, t in named.items()}
    op = make_op(op_cls)
    poison_allocator()
    want = op(*one_shot.values())
    plan = plan_of(op, op_cls, named)
    check_gpu_plan(op, plan)
    assert plan.steps == plan_call(op, list(one_shot.values())).steps
    poison_allocator()
    got = run_plan(plan, run_inputs(op_cls, named))
    torch.cuda.synchronize()
    assert not got.isnan().any(), "NaN in the output: an element was not written"
    assert torch.equal(raw(got), raw(want)), "plan + run and the one-shot call differ"
    for name, tensor in named.items():
        assert torch.equal(raw(tensor), raw(one_shot[name])), f"{name}: plan + run and the call differ"


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_run_into_matches_run_bit_for_bit(op_cls: OpClass) -> None:
    """`plan.run_into(out, ...)` writes into the caller's NaN-poisoned `out` exactly what `run`
    returns (and the same cache bytes), and returns `out` itself."""
    named = {name: t.to(DEV) for name, t in op_inputs(op_cls).items()}
    into = {name: t.clone() for name, t in named.items()}
    op = make_op(op_cls)
    want = run_plan(plan_of(op, op_cls, named), run_inputs(op_cls, named))
    plan = plan_of(op, op_cls, into)
    out = torch.full_like(want, float("nan"))
    got = cast(Any, plan).run_into(out, *run_inputs(op_cls, into))
    torch.cuda.synchronize()
    assert got is out
    assert torch.equal(raw(out), raw(want)), "run_into and run differ"
    for name, tensor in into.items():
        assert torch.equal(raw(tensor), raw(named[name])), f"{name}: run_into and run differ"


SYNC_FREE_OPS: list[OpClass] = [
    tp.GQAPrefill,
    tp.GQAVarlenPrefill,
    tp.GQAContiguousCacheAppendPrefill,
    tp.GQAPagedCacheRopeAppendPrefill,
]


@pytest.mark.parametrize("op_cls", SYNC_FREE_OPS, ids=lambda c: c.__name__)
def test_run_reads_no_device_memory_on_the_host(op_cls: OpClass) -> None:
    """`plan.run` of a validate=False plan makes no synchronising CUDA call: under torch's sync debug
    mode "error" any (a device-to-host copy, `.item()`, `.tolist()`, `nonzero`) raises. It still
    computes what the one-shot call does."""
    named = {name: t.to(DEV) for name, t in op_inputs(op_cls).items()}
    one_shot = [t.clone() for t in named.values()]
    op = make_op(op_cls, validate=False)
    want = op(*one_shot)
    plan = plan_of(op, op_cls, named)  # plan may synchronise (validate=True does); run may not
    check_gpu_plan(op, plan)
    data = run_inputs(op_cls, named)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the mode is on: a sync raises
            torch.ones(1, device=DEV).item()
        for _ in range(2):  # the first run of a plan and a later one (every layer after the first)
            got = run_plan(plan, data)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.equal(raw(got), raw(want))
    for name, old in zip(named, one_shot, strict=True):
        assert torch.equal(raw(named[name]), raw(old)), f"{name}: run and the one-shot call differ"


def _graph_metadata(
    q_lens: Sequence[int], cache_lens: Sequence[int], num_pages: int, max_pages: int
) -> list[torch.Tensor]:
    """block_table (each sequence owns max_pages distinct pages of a shuffled pool), cache_seqlens,
    cu_seqlens_q: CPU tensors of the shapes every batch of the graph test shares."""
    pool = random.sample(range(num_pages), len(q_lens) * max_pages)
    table = torch.tensor(pool, dtype=torch.int32).reshape(len(q_lens), max_pages)
    return [table, torch.tensor(cache_lens, dtype=torch.int32), cumulative(q_lens)]


def _written_slots(metadata: Sequence[torch.Tensor], num_pages: int, page_size: int) -> torch.Tensor:
    """bool (num_pages, page_size): the cache slots an append of this batch writes (a host loop)."""
    table, cache_lens, cu = (t.tolist() for t in metadata)
    mask = torch.zeros(num_pages, page_size, dtype=torch.bool)
    for b, start in enumerate(cache_lens):
        for p in range(start, start + cu[b + 1] - cu[b]):
            mask[table[b][p // page_size], p % page_size] = True
    return mask


def test_paged_rope_append_plan_run_cuda_graph_replay() -> None:
    """A captured `plan.run` of the paged RoPE + append Op (validate=False) replays with new data;
    a new batch is a new plan and a new capture.

    `plan(block_table, cache_seqlens, cu_seqlens_q, shape=...)` derives, on the device and once, the
    kv lengths (cache_seqlens + q lengths), every new token's RoPE position and its cache slot, into
    tensors of the plan's own; a graph captured on `plan.run` reads those. So a replay follows new
    contents of q, k_new, v_new, the caches and cos/sin written into the captured buffers (every layer,
    and every step that keeps the batch's metadata), but NOT new values written into the planned
    block_table / cache_seqlens / cu_seqlens_q: an engine must call `plan` again whenever any of them
    changes (every step, as cache_seqlens grows) and capture `plan.run` of the new plan. Writing the new
    metadata into the same buffers first is fine (here it does), replaying the old graph is not.
    """
    dtype, tokens, num_pages, max_pages = torch.float16, 96, 40, 8  # 3 sequences of 8 pages each
    op = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, rotary_dim=PLAN_ROTARY, validate=False)
    reference = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, rotary_dim=PLAN_ROTARY)
    shape = tp.PagedShape(tokens, PLAN_PAGE, PLAN_HQ, PLAN_HKV, PLAN_D, dtype, DEV)
    cos, sin = rope_tables(512, PLAN_ROTARY)
    tables = [cos.to(DEV), sin.to(DEV)]

    def fresh_data() -> list[torch.Tensor]:  # q, k_new, v_new, k_pages, v_pages (CPU)
        return [
            rand(tokens, PLAN_HQ, PLAN_D, dtype=dtype),
            rand(tokens, PLAN_HKV, PLAN_D, dtype=dtype),
            rand(tokens, PLAN_HKV, PLAN_D, dtype=dtype),
            rand(num_pages, PLAN_PAGE, PLAN_HKV, PLAN_D, dtype=dtype),
            rand(num_pages, PLAN_PAGE, PLAN_HKV, PLAN_D, dtype=dtype),
        ]

    # The captured buffers: metadata (planned) and data (run); new contents are copied into them.
    metadata = [t.to(DEV) for t in _graph_metadata([40, 0, 56], [10, 70, 0], num_pages, max_pages)]
    data = [t.to(DEV) for t in fresh_data()]

    def capture(plan: tp.BatchPlan[Any]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        with side_stream():  # warm up outside the graph, on copies (the caches stay as they are)
            for _ in range(2):
                run_plan(plan, [*[t.clone() for t in data], *tables])
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run_plan(plan, [*data, *tables])
        return graph, out

    def replay_with_new_data(plan: tp.BatchPlan[Any], graph: torch.cuda.CUDAGraph, out: torch.Tensor) -> None:
        fresh = fresh_data()
        for buffer, new in zip(data, fresh, strict=True):
            buffer.copy_(new.to(DEV))
        eager = [t.clone() for t in data]  # the same plan run eagerly: what the replay must write
        eager_out = run_plan(plan, [*eager, *tables])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(raw(out), raw(eager_out)), "the replay and an eager run differ"
        for name, got, want in zip(("k_pages", "v_pages"), data[3:], eager[3:], strict=True):
            assert torch.equal(raw(got), raw(want)), f"{name}: the replay and an eager run differ"
        # Against the reference Op on CPU, with the metadata the buffers now hold.
        q, k_new, v_new, k_pages, v_pages = fresh
        ref_k, ref_v = k_pages.clone(), v_pages.clone()
        block_table, cache_seqlens, cu_seqlens_q = (t.cpu() for t in metadata)
        ref_out = reference(q, k_new, v_new, ref_k, ref_v, block_table, cache_seqlens, cu_seqlens_q, cos, sin)
        err = rel_err(out, ref_out)
        assert err < REL_TOL[dtype], f"output rel err {err:.2e}"
        k_got, v_got = data[3].cpu(), data[4].cpu()
        assert torch.equal(v_got, ref_v), "v_pages differ from the reference append"
        written = _written_slots(metadata, num_pages, PLAN_PAGE)
        assert int(written.sum()) == tokens
        assert torch.equal(k_got[~written], k_pages[~written]), "k_pages: a slot not appended changed"
        off = (k_got[written].double() - ref_k[written].double()).abs().max().item()
        assert off < 2e-2 * max(1.0, ref_k.double().abs().max().item()), f"k_pages off by {off}"

    plan = op.plan(*metadata, shape=shape)
    check_gpu_plan(op, plan)
    graph, out = capture(plan)
    for _ in range(3):  # new data, the batch's metadata unchanged: replay
        replay_with_new_data(plan, graph, out)

    # The next batch: new lengths and a new table in the same buffers (same shapes), so plan again
    # (new positions, slots and kv lengths) and capture the new plan's run.
    next_batch = _graph_metadata([1, 95, 0], [127, 20, 5], num_pages, max_pages)
    for buffer, new in zip(metadata, next_batch, strict=True):
        buffer.copy_(new.to(DEV))
    next_plan = op.plan(*metadata, shape=shape)
    next_graph, next_out = capture(next_plan)
    for _ in range(2):
        replay_with_new_data(next_plan, next_graph, next_out)
