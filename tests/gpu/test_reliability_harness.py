"""The reliability harness itself, on the CPU (no GPU, no TileLang): every call of the pool is a valid
call of its Op, and the comparison with the reference catches what it exists to catch (a wrong
output element, a NaN, a cache row written outside the call's slots, a changed read-only input).
Runs in CPU CI: a checker that cannot fail would make the fuzzer and the sanitizer workload vacuous.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
import reliability as rel
import torch

from tileprefill.ops import PUBLIC_OPS

CPU = torch.device("cpu")


@pytest.mark.parametrize(("op_cls", "cfg"), rel.POOL, ids=[f"{c.__name__}-{f.name}" for c, f in rel.POOL])
def test_pool_calls_are_valid_and_agree_with_themselves(op_cls: Any, cfg: rel.Config) -> None:
    call = rel.build_call(op_cls, cfg, random.Random(f"harness:{op_cls.__name__}:{cfg.name}"), small=True)
    assert rel.check_against_reference(call, CPU) is None


def faulty(call: rel.Call, fault: Callable[[torch.Tensor, dict[str, torch.Tensor]], None]) -> Any:
    """The call's Op, with `fault(out, inputs by name)` applied after it runs."""
    op = call.op()
    names = list(call.inputs)

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        out = op(*tensors)
        assert isinstance(out, torch.Tensor)
        fault(out, dict(zip(names, tensors, strict=True)))
        return out

    return run


def a_call(op_cls: Any) -> rel.Call:
    cfg = rel.configs_of(op_cls)[0]
    for seed in range(50):
        call = rel.build_call(op_cls, cfg, random.Random(seed))
        if call.inputs["q"].numel() and (call.written is None or call.written.any()):
            return call
    raise AssertionError("no call with work")


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_a_wrong_output_element_is_caught(op_cls: Any) -> None:
    call = a_call(op_cls)

    def fault(out: torch.Tensor, _: dict[str, torch.Tensor]) -> None:
        out.view(-1)[out.numel() // 2] += 0.5

    assert "output" in (rel.check_against_reference(call, CPU, device_op=faulty(call, fault)) or "")


def test_an_unwritten_output_element_is_caught() -> None:
    call = a_call(PUBLIC_OPS[0])

    def fault(out: torch.Tensor, _: dict[str, torch.Tensor]) -> None:
        out.view(-1)[0] = float("nan")

    assert "NaN" in (rel.check_against_reference(call, CPU, device_op=faulty(call, fault)) or "")


@pytest.mark.parametrize("op_cls", [c for c in PUBLIC_OPS if c.appends], ids=lambda c: c.__name__)
def test_a_write_outside_the_slots_is_caught(op_cls: Any) -> None:
    call = a_call(op_cls)
    assert call.written is not None
    outside = (~call.written).nonzero()[0].tolist()

    def fault(_: torch.Tensor, named: dict[str, torch.Tensor]) -> None:
        named[call.caches[1]][tuple(outside)] = 1.0

    assert "outside the written slots" in (
        rel.check_against_reference(call, CPU, device_op=faulty(call, fault)) or ""
    )


@pytest.mark.parametrize("op_cls", [c for c in PUBLIC_OPS if not c.appends], ids=lambda c: c.__name__)
def test_a_changed_read_only_input_is_caught(op_cls: Any) -> None:
    call = a_call(op_cls)

    def fault(_: torch.Tensor, named: dict[str, torch.Tensor]) -> None:
        named["q"].view(-1)[0] += 1

    assert "only reads changed" in (
        rel.check_against_reference(call, CPU, device_op=faulty(call, fault)) or ""
    )
