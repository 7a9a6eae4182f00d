"""What a program is compiled for, and what it takes at launch (no GPU, nothing compiled).

An attention program is built for its head dim, dtype, causality, page size, tile configuration and
whether it has a window, a logit cap and the LSE output; it reads its head counts from its tensors
and takes the scale, the cap's value and the window's length as scalar parameters. So calls that
differ only in those map to one program (one compile, one precompiled entry), through the kernels'
`program` and through the real Ops' plans; each still computes its own values (the reference path,
here; the compiled programs in tests/gpu/test_attention_gpu.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import tileprefill as tp
from tileprefill.context import Arch, DType
from tileprefill.kernels import attention_tl, rope_tl
from tileprefill.kernels import launch as launch_module
from tileprefill.kernels.base import StaticFacts
from tileprefill.kernels.compile import BuildRequest, recording_builds
from tileprefill.kernels.tl.fast_divide import DIVIDEND_LIMIT, divisor, quotient
from tileprefill.kernels.tl.scores import LOG2E, MAX_WINDOW, ScoreScalars, score_scalars
from tileprefill.keys import AttentionKey, Code, RopeKey, attention_traits
from tileprefill.ops import decision, slots
from tileprefill.ops import op as op_module

TL_ATTENTION = [key for key in AttentionKey if attention_traits(key)[1] in (Code.SM80, Code.SM90)]

#: A windowed, capped call (group 4) and calls that differ from it only in what a program takes at
#: launch or reads from its tensors.
BASE = StaticFacts(
    arch=Arch.SM90,
    dtype=DType.BF16,
    heads=32,
    kv_heads=8,
    head_dim=128,
    causal=True,
    sm_scale=128**-0.5,
    page_size=16,
    window=4096,
    softcap=50.0,
    sm_count=132,
)
LAUNCH_VARIANTS = {
    "sm_scale": BASE._replace(sm_scale=0.0625),
    "softcap": BASE._replace(softcap=30.0),
    "window": BASE._replace(window=128),
    "heads, same group": BASE._replace(heads=16, kv_heads=4),
    "heads, another group": BASE._replace(heads=28, kv_heads=4),
}
#: Calls that need another program: what changes the generated code.
STATIC_VARIANTS = {
    "no window": BASE._replace(window=0),
    "no cap": BASE._replace(softcap=0.0),
    "head dim": BASE._replace(head_dim=64),
    "dtype": BASE._replace(dtype=DType.FP16),
    "lse": BASE._replace(lse=True),
}


def _on(facts: StaticFacts, key: AttentionKey) -> StaticFacts:
    return facts._replace(arch=attention_tl.program_arch(key))


@pytest.mark.parametrize("key", TL_ATTENTION, ids=lambda k: k.value)
@pytest.mark.parametrize("change", list(LAUNCH_VARIANTS))
def test_calls_that_differ_in_launch_values_share_one_program(key: AttentionKey, change: str) -> None:
    base, other = _on(BASE, key), _on(LAUNCH_VARIANTS[change], key)
    assert attention_tl.program(key, other) == attention_tl.program(key, base)
    assert attention_tl.record_of(key, other) is attention_tl.record_of(key, base)
    heads_only = change.startswith("heads")
    assert (attention_tl.scalar_params(other) == attention_tl.scalar_params(base)) is heads_only


@pytest.mark.parametrize("key", TL_ATTENTION, ids=lambda k: k.value)
@pytest.mark.parametrize("change", list(STATIC_VARIANTS))
def test_what_changes_the_code_chooses_another_program(key: AttentionKey, change: str) -> None:
    base, other = _on(BASE, key), _on(STATIC_VARIANTS[change], key)
    assert attention_tl.program(key, other) != attention_tl.program(key, base)


def test_the_scalar_params_are_the_scale_the_cap_and_the_window() -> None:
    """In the programs' parameter order; the scale is the held score's (softcap when capped), the
    cap's factor sm_scale / softcap, and a window past int32 sees every key as the longest does."""
    assert score_scalars(0.125, 0.0, 0) == ScoreScalars(0.125, 0.0, 0)
    assert score_scalars(0.125, 50.0, 4096) == ScoreScalars(50.0, 0.125 / 50.0, 4096)
    assert score_scalars(0.125, 0.0, 2**40).window == MAX_WINDOW == 2**31 - 1
    assert attention_tl.scalar_params(BASE) == (50.0, BASE.sm_scale / 50.0, 4096)
    assert math.isclose(LOG2E, 1 / math.log(2))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((0.0, 0.0, 0), "sm_scale: expected a finite float > 0, got 0.0"),
        ((math.inf, 0.0, 0), "sm_scale: expected a finite float > 0, got inf"),
        ((0.1, -1.0, 0), r"softcap: expected a finite float >= 0 \(0: none\), got -1.0"),
        ((0.1, math.nan, 0), r"softcap: expected a finite float >= 0 \(0: none\), got nan"),
        ((0.1, 0.0, -2), r"window: expected an int >= 0 \(0: none\), got -2"),
        ((0.1, 0.0, True), r"window: expected an int >= 0 \(0: none\), got True"),
    ],
)
def test_a_scalar_out_of_range_is_refused_by_name(arguments: tuple[Any, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        score_scalars(*arguments)


class _FakeProgram:
    """What `build` returns in place of a compiled program: it records each launch's arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def __call__(self, *arguments: object) -> None:
        self.calls.append(arguments)


def test_a_launch_passes_the_scalar_params_after_the_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """One compiled program for both calls; each launch passes its own scale, cap and window."""
    program = _FakeProgram()
    built: list[tuple[Any, ...]] = []

    def fake_build(factory: Any, args: Any, arch: Arch) -> _FakeProgram:
        built.append((factory, args, arch))
        return program

    monkeypatch.setattr(launch_module, "build", fake_build)
    key = AttentionKey.DENSE_SM90
    record = attention_tl.record_of(key, BASE)
    tensors = [torch.zeros(4) for _ in record.tensors]
    for facts in (BASE, LAUNCH_VARIANTS["sm_scale"], LAUNCH_VARIANTS["window"]):
        launch_module.Launcher(record, facts).direct(*tensors)
    assert len(set(built)) == 1
    scalars = [call[len(record.tensors) :] for call in program.calls]
    assert scalars == [
        (50.0, BASE.sm_scale / 50.0, 4096),
        (50.0, 0.0625 / 50.0, 4096),
        (50.0, BASE.sm_scale / 50.0, 128),
    ]
    assert all(len(call) == len(record.tensors) + 3 for call in program.calls)


def test_a_rejected_scalar_builds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch_module, "build", lambda *args: pytest.fail("built a program"))
    record = attention_tl.record_of(AttentionKey.DENSE_SM80, BASE)
    with pytest.raises(ValueError, match=r"sm_scale: expected a finite float > 0, got -1\.0"):
        launch_module.Launcher(record, BASE._replace(arch=Arch.SM80, sm_scale=-1.0))


def test_the_rotations_of_q_and_of_the_keys_are_one_program() -> None:
    """RoPE reads its head count from x: q's heads and the keys' share one program."""
    for key in (RopeKey.NEOX_TL, RopeKey.INTERLEAVED_TL):
        q = BASE._replace(rotary_dim=64)
        keys = q._replace(heads=q.kv_heads)
        assert rope_tl.program(key, q) == rope_tl.program(key, keys)
        assert rope_tl.program(key, q) != rope_tl.program(key, q._replace(rotary_dim=128))


# --- through the Ops' plans ------------------------------------------------------------------------


@pytest.fixture
def on_sm90(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The Ops plan as on an SM90 GPU of 132 SMs, on CPU tensors (nothing compiles: builds are
    recorded)."""
    monkeypatch.setattr(decision, "arch_of", lambda _: Arch.SM90)
    monkeypatch.setattr(slots, "arch_of", lambda _: Arch.SM90)
    monkeypatch.setattr(op_module, "sm_count_of", lambda _: 132)
    decision.decided.cache_clear()
    yield
    decision.decided.cache_clear()


def _planned(op: Any, heads: int, kv_heads: int) -> set[BuildRequest]:
    """The programs a plan of `op` builds (q (2, 40, heads, 128) over 300 paged keys a sequence)."""
    cpu, i32 = torch.device("cpu"), torch.int32
    with recording_builds() as requests:
        if isinstance(op, tp.GQAPrefill | tp.GQARopePrefill):
            op.plan(shape=tp.DenseShape(2, 40, 300, heads, kv_heads, 128, torch.bfloat16, cpu, 128))
        else:
            table = torch.arange(40, dtype=i32).view(2, 20)
            lengths = torch.tensor([300, 300], dtype=i32)
            cu = torch.tensor([0, 40, 80], dtype=i32)
            shape = tp.PagedShape(80, 16, heads, kv_heads, 128, torch.bfloat16, cpu, 128)
            op.plan(table, lengths, cu, shape=shape)
    return set(requests)


OP_VARIANTS: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {
    "sm_scale": ({"sm_scale": 0.05}, (32, 8)),
    "softcap": ({"softcap": 30.0}, (32, 8)),
    "window": ({"sliding_window": 128}, (32, 8)),
    "heads, same group": ({}, (16, 4)),
    "heads, another group": ({}, (28, 4)),
}


@pytest.mark.usefixtures("on_sm90")
@pytest.mark.parametrize("cls", [tp.GQAPrefill, tp.GQARopePrefill, tp.GQAPagedCachePrefill])
@pytest.mark.parametrize("change", list(OP_VARIANTS))
def test_ops_that_differ_in_launch_values_plan_the_same_programs(cls: type[Any], change: str) -> None:
    base: dict[str, Any] = {"sm_scale": 0.1, "sliding_window": 4096, "softcap": 50.0}
    options, (heads, kv_heads) = OP_VARIANTS[change]
    rope = {"rope": tp.RopeMode.NEOX} if cls is tp.GQARopePrefill else {}
    first = _planned(cls(**base, **rope), 32, 8)
    assert first and all(r.arch is Arch.SM90 for r in first)
    assert _planned(cls(**{**base, **options}, **rope), heads, kv_heads) == first
    if cls is tp.GQARopePrefill:  # q's rotation, the keys', the attention
        assert len(first) == 2


@pytest.mark.usefixtures("on_sm90")
def test_ops_with_and_without_a_window_plan_other_programs() -> None:
    windowed = _planned(tp.GQAPrefill(sliding_window=4096), 32, 8)
    assert windowed.isdisjoint(_planned(tp.GQAPrefill(), 32, 8))
    assert windowed.isdisjoint(_planned(tp.GQAPrefill(sliding_window=4096, softcap=30.0), 32, 8))


# --- the reference path computes each call's own values ----------------------------------------------


def _oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sm_scale: float, window: int, softcap: float
) -> torch.Tensor:
    """float64 causal (bottom-right) attention of q (B, Sq, Hq, D) over k/v (B, Skv, Hkv, D)."""
    group = q.shape[2] // k.shape[2]
    k64, v64 = (t.double().repeat_interleave(group, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k64) * sm_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    seq_q, seq_kv = q.shape[1], k.shape[1]
    row = torch.arange(seq_q).view(-1, 1) + seq_kv - seq_q
    key = torch.arange(seq_kv).view(1, -1)
    visible = (key <= row) & ((row - key < window) if window else True)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v64)


@pytest.mark.parametrize("change", ["base", *LAUNCH_VARIANTS])
def test_the_reference_path_computes_each_variant(change: str) -> None:
    """The Op on the CPU (reference kernels) for each call that shares the base's program: its own
    scale, cap, window and heads, against a float64 formulation."""
    facts = BASE if change == "base" else LAUNCH_VARIANTS[change]
    gen = torch.Generator().manual_seed(len(change))
    q = torch.randn(2, 33, facts.heads, 64, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(2, 150, facts.kv_heads, 64, generator=gen).to(torch.bfloat16) for _ in range(2))
    # Over 150 keys the base's window (4096) sees every key, the variant's (128) not.
    op = tp.GQAPrefill(sm_scale=facts.sm_scale, sliding_window=facts.window, softcap=facts.softcap)
    out = op(q, k, v)
    expected = _oracle(q, k, v, sm_scale=facts.sm_scale, window=facts.window, softcap=facts.softcap)
    torch.testing.assert_close(out.double(), expected, atol=1.6e-2, rtol=1.6e-2)


@pytest.mark.parametrize(
    ("key", "page_size"),
    [
        (AttentionKey.DENSE_SM90, 0),  # persistent dense grid
        (AttentionKey.PAGED_SM90, 1),  # persistent packed grid
        (AttentionKey.CONTIGUOUS_SM90, 0),  # one CTA a query tile
        (AttentionKey.RAGGED_SM80, 0),
    ],
    ids=lambda x: x.value if isinstance(x, AttentionKey) else str(x),
)
def test_the_prim_funcs_declare_the_scalar_params_in_the_order_launches_pass_them(
    key: AttentionKey, page_size: int
) -> None:
    """Every grid's prim_func takes the three scalars after its tensors, in `ScoreScalars` order and
    of the types its host code checks, and no head count among its parameters (traced, not
    lowered)."""
    pytest.importorskip("tilelang")
    from tileprefill.kernels.tilelang_compat import backport

    backport()
    facts = _on(BASE._replace(page_size=page_size), key)
    factory, args, _ = attention_tl.program(key, facts)
    func = factory(*args)
    record = attention_tl.record_of(key, facts)
    params = list(func.params)
    assert len(params) == len(record.tensors) + len(ScoreScalars._fields)
    scalars = params[len(record.tensors) :]
    assert [p.name for p in scalars] == list(ScoreScalars._fields)
    assert [str(p.dtype) for p in scalars] == ["float32", "float32", "int32"]
    assert not {"heads", "kv_heads"} & {p.name for p in params}


# --- division by a launch value (RoPE's rows into tokens and heads) ---------------------------------


def test_fast_division_is_exact_for_every_dividend_below_two_to_the_31() -> None:
    """Every divisor up to 4096 and a few large ones, on the dividends where an error would show
    first: 0, around every multiple near the ends of the range, and the largest."""
    top = DIVIDEND_LIMIT - 1
    for d in [*range(1, 4097), 65535, 65536, 65537, 2**20 + 3, 2**30, 2**31 - 1]:
        by = divisor(d)
        assert 0 < by.multiplier < 2**32 and 31 <= by.shift <= 62, (d, by)
        for base in (0, d, 1000 * d, (top // d) * d, (top // d - 1) * d):
            for n in (base - 1, base, base + 1, base + d - 1):
                if 0 <= n <= top:
                    assert quotient(n, by) == n // d, (n, d)
        assert quotient(top, by) == top // d


@pytest.mark.parametrize("d", [0, -3, 2**31, True, 2.0])
def test_a_divisor_out_of_range_is_refused_by_name(d: Any) -> None:
    with pytest.raises(ValueError, match=r"divisor: expected an int in \[1, 2\*\*31\), got"):
        divisor(d)


def test_a_rope_launch_refuses_another_head_count_than_it_was_bound_for() -> None:
    """The program divides its rows by the bound head count (a launch value it cannot check)."""
    facts = BASE._replace(heads=8, rotary_dim=64, head_dim=64)
    with recording_builds():
        launch = rope_tl.RopeNeoxTLKernel().bind(facts)
    x = torch.zeros(3, 4, 64, dtype=torch.bfloat16)
    positions = torch.zeros(3, dtype=torch.int32)
    table = torch.zeros(16, 32)
    with pytest.raises(ValueError, match=r"x: expected 8 heads \(what the launch was bound for\), got 4"):
        launch(x, positions, table, table, torch.empty_like(x))
    assert rope_tl.scalar_params(facts) == divisor(8)
