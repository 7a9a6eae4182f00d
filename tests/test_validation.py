"""The bad-input matrix: one case per rejection, each checked for the argument it names.

Every message must name the argument and say what was expected and what was got.
For append Ops every rejection must leave the caches byte-for-byte unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import attrs
import pytest
import torch

import tileprefill as tp
from tileprefill.ops import PUBLIC_OPS, OpClass, decision

if TYPE_CHECKING:
    from conftest import Oracle

Inputs = dict[str, torch.Tensor]
CACHE_NAMES = ("k_cache", "v_cache", "k_pages", "v_pages")


@attrs.frozen
class Case:
    op: OpClass
    label: str
    mutate: Callable[[Inputs], None]
    error: type[Exception]
    words: tuple[str, ...]  # the argument's name first


def _set(name: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Inputs], None]:
    def mutate(inputs: Inputs) -> None:
        inputs[name] = make(inputs[name])

    return mutate


def _poke(name: str, index: tuple[int, ...], value: int) -> Callable[[Inputs], None]:
    def mutate(inputs: Inputs) -> None:
        t = inputs[name].clone()
        t[index] = value
        inputs[name] = t

    return mutate


def _as_list(t: torch.Tensor) -> torch.Tensor:
    """Not a tensor at all (typed as one: the Op must still say so)."""
    return cast(torch.Tensor, t.tolist())


def _non_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Same shape and values, transposed strides in the last two dims."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _names(op: OpClass) -> list[str]:
    return [s.name for s in op.input_specs]


def _cases() -> list[Case]:
    cases: list[Case] = []
    for op in PUBLIC_OPS:
        names = _names(op)
        kv = names[1]  # k, k_cache, k_new or k_pages: the first key-side tensor
        last_kv = names[2]
        cases += [
            Case(op, "q float32", _set("q", lambda t: t.float()), TypeError, ("q", "float16 or bfloat16")),
            Case(
                op,
                "q not a tensor",
                _set("q", _as_list),
                TypeError,
                ("q", "torch.Tensor", "list"),
            ),
            Case(
                op,
                f"{kv} bfloat16",
                _set(kv, lambda t: t.bfloat16()),
                TypeError,
                (kv, "torch.float16", "bfloat16"),
            ),
            Case(
                op,
                f"{last_kv} extra dim",
                _set(last_kv, lambda t: t.unsqueeze(0)),
                ValueError,
                (last_kv, "rank"),
            ),
            Case(
                op, f"{last_kv} strides", _set(last_kv, _non_contiguous), ValueError, (last_kv, "contiguous")
            ),
            Case(
                op,
                f"{last_kv} on meta",
                _set(last_kv, lambda t: t.to("meta")),
                ValueError,
                (last_kv, "cpu", "meta"),
            ),
            Case(
                op,
                "Hq not a multiple of Hkv",
                _set("q", lambda t: t[..., :3, :].contiguous()),
                ValueError,
                ("q", "Hkv=2", "Hq=3"),
            ),
            Case(
                op, f"{kv} head dim", _set(kv, lambda t: t[..., :32].contiguous()), ValueError, (kv, "D=64")
            ),
            Case(
                op,
                f"{last_kv} batch/tokens",
                _set(last_kv, lambda t: t[:1].contiguous()),
                ValueError,
                (last_kv, "(from"),
            ),
        ]
        for index_name in ("cu_seqlens_q", "cu_seqlens_kv", "kv_seqlens", "cache_seqlens", "block_table"):
            if index_name in names:
                cases.append(
                    Case(
                        op,
                        f"{index_name} int64",
                        _set(index_name, lambda t: t.long()),
                        TypeError,
                        (index_name, "torch.int32", "int64"),
                    )
                )
        if "cos" in names:
            cases += [
                Case(
                    op,
                    "cos float64",
                    _set("cos", lambda t: t.double()),
                    TypeError,
                    ("cos", "torch.float32", "float64"),
                ),
                Case(
                    op,
                    "sin narrower than cos",
                    _set("sin", lambda t: t[:, :8].contiguous()),
                    ValueError,
                    ("sin", "R2=16"),
                ),
                Case(
                    op,
                    "rotary dim > head dim",
                    _both_tables(lambda t: torch.rand(32, 40)),
                    ValueError,
                    ("cos", "D / 2 = 32", "got 40"),
                ),
            ]
        if "cu_seqlens_q" in names:
            cases += [
                Case(
                    op,
                    "cu_seqlens_q start",
                    _poke("cu_seqlens_q", (0,), 1),
                    ValueError,
                    ("cu_seqlens_q", "cu_seqlens_q[0] = 0", "got 1"),
                ),
                Case(
                    op,
                    "cu_seqlens_q decreasing",
                    _poke("cu_seqlens_q", (1,), 6),
                    ValueError,
                    ("cu_seqlens_q", "nondecreasing"),
                ),
                Case(
                    op,
                    "cu_seqlens_q end",
                    _poke("cu_seqlens_q", (2,), 4),
                    ValueError,
                    ("cu_seqlens_q", "= 5", "got 4"),
                ),
                Case(
                    op,
                    "cu_seqlens_q length",
                    _set("cu_seqlens_q", lambda t: t[:2].contiguous()),
                    ValueError,
                    # varlen: B is bound by cu_seqlens_q itself, so the other table disagrees
                    ("cu_seqlens_kv", "B=1 (from cu_seqlens_q)")
                    if "cu_seqlens_kv" in names
                    else ("cu_seqlens_q", "B=2 (from block_table)"),
                ),
            ]
        if "cu_seqlens_kv" in names:
            cases.append(
                Case(
                    op,
                    "cu_seqlens_kv end",
                    _poke("cu_seqlens_kv", (2,), 6),
                    ValueError,
                    ("cu_seqlens_kv", "= 5", "got 6"),
                )
            )
    return cases


def _both_tables(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Inputs], None]:
    def mutate(inputs: Inputs) -> None:
        inputs["cos"], inputs["sin"] = make(inputs["cos"]), make(inputs["sin"])

    return mutate


def _both_caches(make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Inputs], None]:
    def mutate(inputs: Inputs) -> None:
        inputs["k_cache"], inputs["v_cache"] = make(inputs["k_cache"]), make(inputs["v_cache"])

    return mutate


# Rejections specific to one layout or Op (the inputs are those of conftest's named_inputs).
SPECIFIC: list[Case] = [
    # dense RoPE: positions 0 .. max(Sq, Skv) - 1 need rows (a metadata check)
    Case(
        tp.GQARopePrefill,
        "cos too short",
        _both_tables(lambda t: t[:4].contiguous()),
        ValueError,
        ("cos", "at least 5 rows", "got 4"),
    ),
    Case(
        tp.GQAVarlenRopePrefill,
        "cos too short",
        _both_tables(lambda t: t[:2].contiguous()),
        ValueError,
        ("cos", "position 2", "got 2"),
    ),
    Case(
        tp.GQAVarlenPrefill,
        "cu_seqlens_kv decreasing",
        _poke("cu_seqlens_kv", (1,), 6),
        ValueError,
        ("cu_seqlens_kv", "nondecreasing"),
    ),
    # contiguous
    Case(
        tp.GQAContiguousCachePrefill,
        "kv_seqlens > S_max",
        _poke("kv_seqlens", (1,), 17),
        ValueError,
        ("kv_seqlens", "[0, 16]", "got 17"),
    ),
    Case(
        tp.GQAContiguousCachePrefill,
        "kv_seqlens < 0",
        _poke("kv_seqlens", (0,), -1),
        ValueError,
        ("kv_seqlens", "got -1"),
    ),
    Case(
        tp.GQAContiguousCachePrefill,
        "kv_seqlens length",
        _set("kv_seqlens", lambda t: t[:1].contiguous()),
        ValueError,
        ("kv_seqlens", "B=2"),
    ),
    *[
        c
        for op in (tp.GQAContiguousCacheAppendPrefill, tp.GQAContiguousCacheRopeAppendPrefill)
        for c in (
            Case(
                op,
                "append overflows S_max",
                _poke("cache_seqlens", (1,), 12),
                ValueError,
                ("cache_seqlens", "<= 16", "12 + 5 = 17"),
            ),
            Case(
                op,
                "cache_seqlens < 0",
                _poke("cache_seqlens", (0,), -2),
                ValueError,
                ("cache_seqlens", ">= 0", "got -2"),
            ),
            Case(
                op,
                "S_max < Sq",
                _both_caches(lambda t: t[:, :4].contiguous()),
                ValueError,
                ("k_cache", "S_max >= Sq = 5", "got S_max = 4"),
            ),
            Case(
                op,
                "k_new length",
                _set("k_new", lambda t: t[:, :4].contiguous()),
                ValueError,
                ("k_new", "Sq=5"),
            ),
        )
    ],
    Case(
        tp.GQAContiguousCacheRopeAppendPrefill,
        "cos too short",
        _both_tables(lambda t: t[:11].contiguous()),
        ValueError,
        ("cos", "position 11", "got 11"),
    ),
    # paged
    Case(
        tp.GQAPagedCachePrefill,
        "kv_seqlens > capacity",
        _poke("kv_seqlens", (0,), 17),
        ValueError,
        ("kv_seqlens", "[0, 16]", "got 17"),
    ),
    Case(
        tp.GQAPagedCachePrefill,
        "block_table past num_pages",
        _poke("block_table", (1, 0), 4),
        ValueError,
        ("block_table", "[0, 4)", "block_table[1, 0] = 4"),
    ),
    Case(
        tp.GQAPagedCachePrefill,
        "block_table negative",
        _poke("block_table", (0, 0), -1),
        ValueError,
        ("block_table", "block_table[0, 0] = -1"),
    ),
    Case(
        tp.GQAPagedCachePrefill,
        "pages of different shape",
        _set("v_pages", lambda t: t[:, :4].contiguous()),
        ValueError,
        ("v_pages", "PS=8"),
    ),
    *[
        c
        for op in (tp.GQAPagedCacheAppendPrefill, tp.GQAPagedCacheRopeAppendPrefill)
        for c in (
            Case(
                op,
                "append overflows the block table",
                _poke("cache_seqlens", (1,), 14),
                ValueError,
                ("cache_seqlens", "<= 16", "14 + 3 = 17"),
            ),
            Case(
                op,
                "cache_seqlens < 0",
                _poke("cache_seqlens", (0,), -1),
                ValueError,
                ("cache_seqlens", ">= 0", "got -1"),
            ),
            # sequence 1 writes positions 7..9: its second page (entry [1, 1]) must be valid
            Case(
                op,
                "block_table page to write",
                _poke("block_table", (1, 1), 9),
                ValueError,
                ("block_table", "block_table[1, 1] = 9"),
            ),
            Case(
                op, "k_new tokens", _set("k_new", lambda t: t[:4].contiguous()), ValueError, ("k_new", "Tq=5")
            ),
            Case(
                op,
                "v_new heads",
                _set("v_new", lambda t: t[:, :1].contiguous()),
                ValueError,
                ("v_new", "Hkv=2"),
            ),
        )
    ],
    Case(
        tp.GQAPagedCacheRopeAppendPrefill,
        "cos too short",
        _both_tables(lambda t: t[:9].contiguous()),
        ValueError,
        ("cos", "position 9", "got 9"),
    ),
]


ALL_CASES = [*_cases(), *SPECIFIC]


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: f"{c.op.__name__}-{c.label}")
def test_rejected(oracle: Oracle, gen: torch.Generator, case: Case) -> None:
    inputs = oracle.named_inputs(case.op, gen)
    case.mutate(inputs)
    caches = {
        n: oracle.bits(inputs[n]).clone()
        for n in CACHE_NAMES
        if n in inputs and inputs[n].device.type == "cpu"
    }
    op = oracle.make_op(case.op)
    with pytest.raises(case.error) as raised:
        op(*(inputs[n] for n in _names(case.op)))
    message = str(raised.value)
    assert message.startswith(f"{case.words[0]}:") or f" {case.words[0]}:" in message, message
    for word in (*case.words, "expected", "got"):
        assert word in message, f"{word!r} not in {message!r}"
    for name, before in caches.items():
        assert torch.equal(oracle.bits(inputs[name]), before), f"rejected call changed {name}"


def test_every_append_rejection_is_checked_on_the_caches() -> None:
    """The matrix covers append Ops with value and metadata rejections alike."""
    append_cases = [c for c in ALL_CASES if c.op.appends]
    assert {c.op for c in append_cases} == {op for op in PUBLIC_OPS if op.appends}
    assert len(append_cases) >= 3 * 14


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_valid_inputs_pass(oracle: Oracle, gen: torch.Generator, op_cls: OpClass) -> None:
    """The unmutated inputs are accepted, so each rejection above is due to its one change."""
    out = oracle.make_op(op_cls)(*oracle.inputs(op_cls, gen))
    assert not torch.isnan(out).any()


def test_unused_block_table_entries_are_not_checked(oracle: Oracle, gen: torch.Generator) -> None:
    """Entries past the pages a sequence uses may hold anything (engines pad with -1 or 0)."""
    inputs = oracle.named_inputs(tp.GQAPagedCachePrefill, gen)
    inputs["block_table"] = torch.tensor(
        [[2, -1], [1, 999]], dtype=torch.int32
    )  # kv lens 3, 7: one page each
    tp.GQAPagedCachePrefill()(*inputs.values())


def test_validate_false_skips_value_checks(oracle: Oracle, gen: torch.Generator) -> None:
    """A value-only problem is rejected with validate=True and not looked at with validate=False."""
    inputs = oracle.named_inputs(tp.GQAVarlenPrefill, gen)
    inputs["cu_seqlens_kv"] = torch.tensor([0, 3, 2], dtype=torch.int32)  # decreasing, and not ending at Tkv
    with pytest.raises(ValueError, match="cu_seqlens_kv"):
        tp.GQAVarlenPrefill()(*inputs.values())
    tp.GQAVarlenPrefill(validate=False)(*inputs.values())  # the reference kernel copes; nothing checked it


def test_validate_false_keeps_metadata_checks(oracle: Oracle, gen: torch.Generator) -> None:
    inputs = oracle.named_inputs(tp.GQAPagedCacheAppendPrefill, gen)
    inputs["block_table"] = inputs["block_table"].long()
    before = oracle.bits(inputs["k_pages"]).clone()
    with pytest.raises(TypeError, match=r"block_table: expected dtype torch\.int32"):
        tp.GQAPagedCacheAppendPrefill(validate=False)(*inputs.values())
    assert torch.equal(oracle.bits(inputs["k_pages"]), before)


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda: tp.GQAPrefill(causal=1), ("causal", "bool", "got 1")),  # type: ignore[call-overload]
        (lambda: tp.GQAPrefill(sm_scale=-0.5), ("sm_scale", "positive", "got -0.5")),
        (lambda: tp.GQAPrefill(validate="no"), ("validate", "bool", "'no'")),  # type: ignore[call-overload]
        (lambda: tp.GQARopePrefill(rope=tp.RopeMode.NONE), ("rope", "NEOX", "RopeMode.NONE")),
        (lambda: tp.GQARopePrefill(rope="neox"), ("rope", "NEOX", "'neox'")),  # type: ignore[call-overload]
        (lambda: tp.GQARopePrefill(rope=tp.RopeMode.NEOX, rotary_dim=33), ("rotary_dim", "even", "got 33")),
        (lambda: tp.GQAPrefill(sliding_window=0), ("sliding_window", ">= 1", "got 0")),
        (lambda: tp.GQAPrefill(sliding_window=True), ("sliding_window", ">= 1", "got True")),
        (
            lambda: tp.GQAPrefill(causal=False, sliding_window=64),
            ("sliding_window", "causal=False", "got 64"),
        ),
        (lambda: tp.GQAPagedCachePrefill(softcap=-1.0), ("softcap", "positive", "got -1.0")),
        (lambda: tp.GQAPrefill(softcap=float("inf")), ("softcap", "finite", "got inf")),
    ],
)
def test_constructor_rejections(make: Callable[[], object], words: tuple[str, ...]) -> None:
    with pytest.raises((TypeError, ValueError)) as raised:
        make()
    for word in (*words, "expected", "got"):
        assert word in str(raised.value), f"{word!r} not in {raised.value}"


def test_rotary_dim_must_match_tables(oracle: Oracle, gen: torch.Generator) -> None:
    inputs = oracle.inputs(tp.GQAContiguousCacheRopeAppendPrefill, gen)  # cos/sin have 16 columns
    caches = [oracle.bits(inputs[3]).clone(), oracle.bits(inputs[4]).clone()]
    op = tp.GQAContiguousCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, rotary_dim=16)
    with pytest.raises(ValueError, match=r"rotary_dim: expected 2 \* cos.shape\[1\] = 32 .*got 16"):
        op(*inputs)
    assert torch.equal(oracle.bits(inputs[3]), caches[0]) and torch.equal(oracle.bits(inputs[4]), caches[1])
    tp.GQAContiguousCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, rotary_dim=32)(
        *inputs
    )  # the matching one runs


def test_unsupported_call_raises_with_reasons(
    oracle: Oracle, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No kernel for a step: the Op raises with every candidate's reasons, before any write."""
    monkeypatch.setattr(decision, "arch_of", lambda device: tp.Arch.SM90)  # as if on an H100
    decision.decided.cache_clear()
    try:
        inputs = oracle.named_inputs(tp.GQAPagedCacheAppendPrefill, gen)
        for name in ("q", "k_new", "v_new", "k_pages", "v_pages"):
            inputs[name] = inputs[name][..., :48].contiguous()  # head dim 48: no TileLang attention
        before = oracle.bits(inputs["k_pages"]).clone()
        op = tp.GQAPagedCacheAppendPrefill()
        with pytest.raises(tp.UnsupportedContextError, match="no kernel serves step attention") as raised:
            op(*inputs.values())
        assert "head_dim 48 is not compiled" in str(raised.value)
        assert torch.equal(oracle.bits(inputs["k_pages"]), before)
        with pytest.raises(tp.UnsupportedContextError) as planned:
            oracle.plan_of(op, tp.GQAPagedCacheAppendPrefill, tuple(inputs.values()))
        assert planned.value.explanation.missing_steps == ("attention",)
    finally:
        decision.decided.cache_clear()


@pytest.mark.parametrize(
    "op_cls", [tp.GQAContiguousCacheAppendPrefill, tp.GQAPagedCacheAppendPrefill], ids=lambda c: c.__name__
)
@pytest.mark.parametrize("wrong", ["k_new", "v_new"])
def test_a_new_tensor_with_the_wrong_kv_heads_is_the_one_named(
    op_cls: OpClass, wrong: str, oracle: Oracle, gen: torch.Generator
) -> None:
    """k_new binds Hkv first; when it alone is wrong, the error names k_new (the others agree on Hkv),
    not v_new, which is checked against it. A wrong v_new is named as before."""
    inputs = oracle.named_inputs(op_cls, gen)
    hkv = inputs["k_new"].shape[-2]
    inputs[wrong] = inputs[wrong][..., : hkv // 2, :].contiguous()
    with pytest.raises(ValueError) as raised:
        oracle.make_op(op_cls)(*inputs.values())
    message = str(raised.value)
    assert message.startswith(f"{wrong}: expected shape"), message
    assert f"Hkv={hkv}" in message and str(tuple(inputs[wrong].shape)) in message, message
