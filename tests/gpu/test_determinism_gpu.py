"""Determinism: every public Op gives bit-for-bit the same output and caches for the same inputs,
across repeated eager calls and across replays of a CUDA graph captured on `plan.run`.

Inputs are random calls of `reliability.py`'s pool (several query and key tiles, a shuffled page
pool); an append Op's caches are restored from a pristine copy before every call and replay, so
each one starts from the same bytes. Nothing here compares with the reference: two runs of the same
program on the same bytes must agree exactly (no atomics, no run-to-run split of the work).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import pytest
import reliability as rel
import torch

import tileprefill as tp
from tileprefill.ops import PUBLIC_OPS, OpClass

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

DEV = torch.device("cuda")
REPEATS = 3


def warm_up() -> None:
    rel.run_calls([call_of(op_cls) for op_cls in PUBLIC_OPS], DEV)


def call_of(op_cls: OpClass) -> rel.Call:
    """A call with work in it (tokens and keys), from the Op's first configuration."""
    cfg = rel.configs_of(op_cls)[0]
    for seed in range(100):
        call = rel.build_call(op_cls, cfg, random.Random(f"determinism:{op_cls.__name__}:{seed}"))
        if call.inputs["q"].numel() and all(t.numel() for t in call.inputs.values()):
            return call
    raise AssertionError(f"no call with work for {op_cls.__name__}")


Shape = tp.DenseShape | tp.VarlenShape | tp.ContiguousShape | tp.PagedShape


def shape_of(op_cls: OpClass, named: Mapping[str, torch.Tensor], cfg: rel.Config) -> Shape:
    q = named["q"]
    kv = next(named[n] for n in ("k", "k_new", "k_cache", "k_pages") if n in named)
    rotary = cfg.rotary if op_cls.rotates else 0
    common = (q.shape[-2], kv.shape[-2], q.shape[-1], q.dtype, q.device, rotary)
    if op_cls.kv_layout is tp.KVLayout.NONE:
        if op_cls.ragged:
            return tp.VarlenShape(q.shape[0], named["k"].shape[0], *common)
        return tp.DenseShape(q.shape[0], q.shape[1], named["k"].shape[1], *common)
    if op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
        return tp.ContiguousShape(q.shape[1], named["k_cache"].shape[1], *common)
    return tp.PagedShape(q.shape[0], named["k_pages"].shape[1], *common)


def restore(
    named: Mapping[str, torch.Tensor], pristine: Mapping[str, torch.Tensor], caches: tuple[str, ...]
) -> None:
    for name in caches:
        named[name].copy_(pristine[name])


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_repeated_calls_and_graph_replays_are_bit_identical(op_cls: OpClass) -> None:
    call = call_of(op_cls)
    pristine = call.gpu_inputs(DEV)
    op = call.op(validate=False)

    # Eager: the one-shot call REPEATS times, each on fresh copies of the same bytes.
    results: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    for _ in range(REPEATS):
        named = {n: t.clone() for n, t in pristine.items()}
        rel.poison_allocator(DEV)
        out = op(*named.values())
        torch.cuda.synchronize()
        results.append((out.clone(), {n: named[n].clone() for n in call.caches}))
    first_out, first_caches = results[0]
    assert not first_out.isnan().any(), "NaN in the output: an element was not written"
    for i, (out, caches) in enumerate(results[1:], start=2):
        assert rel.same_bits(out, first_out), f"call {i}: the output differs from call 1"
        for name in call.caches:
            assert rel.same_bits(caches[name], first_caches[name]), f"call {i}: {name} differs from call 1"

    # A CUDA graph of plan.run, replayed REPEATS times from the same cache bytes.
    named = {n: t.clone() for n, t in pristine.items()}
    plan: Any = op.plan(*[named[n] for n in op_cls.plan_inputs], shape=shape_of(op_cls, named, call.cfg))
    data = [named[s.name] for s in op_cls.run_specs]
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph, as capture requires
        plan.run(*data)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    restore(named, pristine, call.caches)
    with torch.cuda.graph(graph):
        graph_out = plan.run(*data)
    for replay in range(1, REPEATS + 1):
        restore(named, pristine, call.caches)
        graph.replay()
        torch.cuda.synchronize()
        assert rel.same_bits(graph_out, first_out), f"replay {replay}: the output differs from the eager call"
        for name in call.caches:
            assert rel.same_bits(named[name], first_caches[name]), f"replay {replay}: {name} differs"
