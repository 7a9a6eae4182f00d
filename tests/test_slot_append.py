"""PagedCacheSlotAppend on CPU: the reference write against a plain Python loop, every rejection (named
argument, expected and actual value, cache left bit for bit unchanged), plan/run reuse, selection,
the manifest entry and explain."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

import tileprefill as tp
from tileprefill.context import Arch, DType, KVLayout, PrefillContext, RopeMode
from tileprefill.kernels.base import SlotAppendKernel
from tileprefill.kernels.reference import SlotAppendRefKernel
from tileprefill.keys import ALL_KEYS, AppendKey, AttentionKey, BatchKey, SlotAppendKey
from tileprefill.manifest import load_manifest
from tileprefill.selection import PrefillPlan, explain, rejections, select_plan

CPU = torch.device("cpu")


def _loop_write(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    slots: list[int],
) -> None:
    """The oracle: token by token, page slot // page_size, row slot % page_size."""
    page_size = k_pages.shape[1]
    for t, slot in enumerate(slots):
        if slot == -1:
            continue
        k_pages[slot // page_size, slot % page_size] = k_new[t]
        v_pages[slot // page_size, slot % page_size] = v_new[t]


class Case:
    def __init__(
        self,
        *,
        tokens: int,
        num_pages: int,
        page_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        index_dtype: torch.dtype,
        seed: int,
        skip: float = 0.25,
    ) -> None:
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.k_new = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
        self.v_new = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(dtype)
        shape = (num_pages, page_size, kv_heads, head_dim)
        self.k_pages = torch.randn(shape, generator=gen).to(dtype)
        self.v_pages = torch.randn(shape, generator=gen).to(dtype)
        rows = rng.sample(range(num_pages * page_size), tokens)
        self.slots = [-1 if rng.random() < skip else row for row in rows]
        self.slot_mapping = torch.tensor(self.slots, dtype=index_dtype)

    @property
    def caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_pages, self.v_pages

    def expected(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k_pages.clone(), self.v_pages.clone()
        _loop_write(self.k_new, self.v_new, k, v, self.slots)
        return k, v

    def shape(self) -> tp.SlotAppendShape:
        return tp.SlotAppendShape(
            tokens=self.k_new.shape[0],
            page_size=self.k_pages.shape[1],
            kv_heads=self.k_new.shape[1],
            head_dim=self.k_new.shape[2],
            dtype=self.k_new.dtype,
            device=CPU,
        )


def _case(**overrides: object) -> Case:
    fields: dict[str, object] = dict(
        tokens=11,
        num_pages=6,
        page_size=5,
        kv_heads=2,
        head_dim=64,
        dtype=torch.float16,
        index_dtype=torch.int64,
        seed=0,
    )
    fields.update(overrides)
    return Case(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("tokens", "num_pages", "page_size", "kv_heads", "head_dim"),
    [(11, 6, 5, 2, 64), (1, 1, 1, 1, 128), (33, 3, 16, 4, 256), (7, 40, 1, 8, 64), (0, 2, 16, 2, 64)],
)
def test_writes_what_a_python_loop_writes(
    index_dtype: torch.dtype,
    dtype: torch.dtype,
    tokens: int,
    num_pages: int,
    page_size: int,
    kv_heads: int,
    head_dim: int,
) -> None:
    case = _case(
        tokens=tokens,
        num_pages=num_pages,
        page_size=page_size,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype,
        index_dtype=index_dtype,
        seed=tokens + page_size,
    )
    expected_k, expected_v = case.expected()
    tp.PagedCacheSlotAppend()(case.k_new, case.v_new, *case.caches, case.slot_mapping)
    assert torch.equal(case.k_pages, expected_k) and torch.equal(case.v_pages, expected_v)


def test_minus_one_skips_the_token() -> None:
    case = _case(skip=0.0)
    case.slots[3] = -1
    case.slot_mapping[3] = -1
    before_k = case.k_pages.clone()
    tp.PagedCacheSlotAppend()(case.k_new, case.v_new, *case.caches, case.slot_mapping)
    expected_k, _ = case.expected()
    assert torch.equal(case.k_pages, expected_k)
    # Every row no token names is untouched (token 3's row among them).
    written = {s for s in case.slots if s != -1}
    rows, before = case.k_pages.view(-1, 2, 64), before_k.view(-1, 2, 64)
    for row in range(rows.shape[0]):
        if row not in written:
            assert torch.equal(rows[row], before[row]), row
    all_skipped = _case()
    all_skipped.slot_mapping.fill_(-1)
    k_before, v_before = all_skipped.k_pages.clone(), all_skipped.v_pages.clone()
    tp.PagedCacheSlotAppend()(
        all_skipped.k_new, all_skipped.v_new, *all_skipped.caches, all_skipped.slot_mapping
    )
    assert torch.equal(all_skipped.k_pages, k_before) and torch.equal(all_skipped.v_pages, v_before)


def test_plan_is_reused_across_layers() -> None:
    """One plan, several layers' caches: each run writes its own layer."""
    op = tp.PagedCacheSlotAppend()
    layers = [_case(seed=s) for s in range(3)]
    for layer in layers[1:]:  # one batch: the same slots in every layer
        layer.slots, layer.slot_mapping = layers[0].slots, layers[0].slot_mapping
    plan = op.plan(layers[0].slot_mapping, shape=layers[0].shape())
    assert plan.slot_mapping is layers[0].slot_mapping
    for layer in layers:
        expected_k, expected_v = layer.expected()
        plan.run(layer.k_new, layer.v_new, *layer.caches)
        assert torch.equal(layer.k_pages, expected_k) and torch.equal(layer.v_pages, expected_v)


def test_plan_makes_one_host_copy_with_validate_and_none_without(monkeypatch: pytest.MonkeyPatch) -> None:
    copies: list[int] = []
    tolist = torch.Tensor.tolist

    def counting(self: torch.Tensor) -> object:
        copies.append(self.numel())
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    case = _case()
    plan = tp.PagedCacheSlotAppend().plan(case.slot_mapping, shape=case.shape())
    assert copies == [case.slot_mapping.numel()]
    copies.clear()
    plan.run(case.k_new, case.v_new, *case.caches)
    tp.PagedCacheSlotAppend(validate=False).plan(case.slot_mapping, shape=case.shape()).run(
        case.k_new, case.v_new, *case.caches
    )
    assert copies == []


def _slots(values: list[int], dtype: torch.dtype = torch.int64) -> Callable[[Case], None]:
    def change(case: Case) -> None:
        case.slot_mapping = torch.tensor(values + [-1] * (case.k_new.shape[0] - len(values)), dtype=dtype)

    return change


def _set(name: str, make: Callable[[Case], torch.Tensor]) -> Callable[[Case], None]:
    def change(case: Case) -> None:
        setattr(case, name, make(case))

    return change


# (what to break, the message's pieces: the argument, then the expected and the actual value)
REJECTIONS: dict[str, tuple[Callable[[Case], None], tuple[str, ...]]] = {
    "slot below -1": (_slots([0, -2]), ("slot_mapping:", ">= -1", "slot_mapping[1] = -2")),
    "slot past the cache": (_slots([0, 30]), ("slot_mapping:", "[-1, 30)", "slot_mapping[1] = 30")),
    "duplicate slot": (
        _slots([4, 9, 4]),
        ("slot_mapping:", "distinct", "slot_mapping[0] = slot_mapping[2] = 4"),
    ),
    "float slot_mapping": (
        _set("slot_mapping", lambda c: c.slot_mapping.float()),
        ("slot_mapping:", "torch.int32 or torch.int64", "torch.float32"),
    ),
    "int16 slot_mapping": (
        _set("slot_mapping", lambda c: c.slot_mapping.to(torch.int16)),
        ("slot_mapping:", "torch.int32 or torch.int64", "torch.int16"),
    ),
    "short slot_mapping": (
        _set("slot_mapping", lambda c: c.slot_mapping[:-1]),
        ("slot_mapping:", "T=11", "(10,)"),
    ),
    "2-D slot_mapping": (
        _set("slot_mapping", lambda c: c.slot_mapping[:, None]),
        ("slot_mapping:", "rank 1", "(11, 1)"),
    ),
    "v_new tokens": (_set("v_new", lambda c: c.v_new[:-1]), ("v_new:", "T=11", "(10, 2, 64)")),
    "k_pages heads": (
        _set("k_pages", lambda c: c.k_pages[:, :, :1].contiguous()),
        ("k_pages:", "Hkv=2", "(6, 5, 1, 64)"),
    ),
    "v_pages head dim": (
        _set("v_pages", lambda c: c.v_pages[..., :32].contiguous()),
        ("v_pages:", "D=64", "(6, 5, 2, 32)"),
    ),
    "v_pages pages": (
        _set("v_pages", lambda c: c.v_pages[:5].contiguous()),
        ("v_pages:", "NP=6", "(5, 5, 2, 64)"),
    ),
    "k_pages dtype": (
        _set("k_pages", lambda c: c.k_pages.to(torch.bfloat16)),
        ("k_pages:", "torch.float16", "torch.bfloat16"),
    ),
    "k_new fp32": (
        _set("k_new", lambda c: c.k_new.float()),
        ("k_new:", "float16 or bfloat16", "torch.float32"),
    ),
    "k_new device": (
        _set("k_new", lambda c: c.k_new.to("meta")),
        ("v_new:", "expected a tensor on meta", "got cpu"),
    ),
    "non-contiguous v_pages": (
        _set("v_pages", lambda c: c.v_pages.transpose(2, 3).contiguous().transpose(2, 3)),
        ("v_pages:", "contiguous", "strides"),
    ),
    "v_pages is k_pages": (
        _set("v_pages", lambda c: c.k_pages),
        ("v_pages:", "apart from k_pages", "shared"),
    ),
}


@pytest.mark.parametrize("what", list(REJECTIONS))
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
def test_rejected_call_names_the_argument_and_changes_nothing(what: str, validate: bool) -> None:
    change, pieces = REJECTIONS[what]
    value_check = what in ("slot below -1", "slot past the cache", "duplicate slot")
    if value_check and not validate:
        pytest.skip("value checks read device values: validate=False skips them (docstring)")
    case = _case()
    change(case)
    k_before, v_before = case.k_pages.clone(), case.v_pages.clone()
    with pytest.raises((ValueError, TypeError)) as raised:
        tp.PagedCacheSlotAppend(validate=validate)(case.k_new, case.v_new, *case.caches, case.slot_mapping)
    message = str(raised.value)
    for piece in pieces:
        assert piece in message, (piece, message)
    assert torch.equal(case.k_pages, k_before) and torch.equal(case.v_pages, v_before)


def test_run_rejects_tensors_other_than_the_plans() -> None:
    """A plan's run checks each layer's tensors against the plan (named, nothing written)."""
    case = _case()
    plan = tp.PagedCacheSlotAppend().plan(case.slot_mapping, shape=case.shape())
    k_before = case.k_pages.clone()
    with pytest.raises(
        ValueError, match=r"k_new: expected shape \(T, Hkv, D\) with T=11 \(from shape.tokens\)"
    ):
        plan.run(case.k_new[:5], case.v_new, *case.caches)
    with pytest.raises(
        TypeError, match=r"k_new: expected dtype torch.float16 \(the dtype of the plan\), got torch.bfloat16"
    ):
        plan.run(case.k_new.bfloat16(), case.v_new.bfloat16(), *case.caches)
    small = torch.zeros(2, 5, 2, 64, dtype=torch.float16)  # 10 rows: the plan's slots do not fit
    with pytest.raises(ValueError, match=r"slot_mapping: expected values in \[-1, 10\)"):
        plan.run(case.k_new, case.v_new, small, small.clone())
    assert torch.equal(case.k_pages, k_before)


def test_shape_is_checked() -> None:
    case = _case()
    op = tp.PagedCacheSlotAppend()
    with pytest.raises(ValueError, match=r"shape.page_size: expected PS >= 1, got PS=0"):
        op.plan(case.slot_mapping, shape=case.shape()._replace(page_size=0))
    with pytest.raises(
        TypeError, match=r"shape.dtype: expected dtype float16 or bfloat16, got torch.float32"
    ):
        op.plan(case.slot_mapping, shape=case.shape()._replace(dtype=torch.float32))
    with pytest.raises(TypeError, match=r"shape.tokens: expected an int, got 1.5"):
        op.plan(case.slot_mapping, shape=case.shape()._replace(tokens=1.5))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"slot_mapping: expected shape \(T,\) with T=3 \(from shape.tokens\)"
    ):
        op.plan(case.slot_mapping, shape=case.shape()._replace(tokens=3))
    with pytest.raises(TypeError, match="validate: expected a bool, got 1"):
        tp.PagedCacheSlotAppend(validate=1)  # type: ignore[arg-type]


def test_validate_false_skips_out_of_range_slots_like_the_kernel() -> None:
    """With validate=False the caller vouches for the slots; a slot outside the cache writes nothing."""
    case = _case(skip=0.0)
    case.slots[0] = 30  # num_pages 6 * page_size 5 = 30 rows
    case.slots[1] = -7
    case.slot_mapping = torch.tensor(case.slots, dtype=torch.int64)
    expected_k, expected_v = case.k_pages.clone(), case.v_pages.clone()
    _loop_write(case.k_new[2:], case.v_new[2:], expected_k, expected_v, case.slots[2:])
    tp.PagedCacheSlotAppend(validate=False)(case.k_new, case.v_new, *case.caches, case.slot_mapping)
    assert torch.equal(case.k_pages, expected_k) and torch.equal(case.v_pages, expected_v)


def _slot_context(arch: Arch, **overrides: object) -> PrefillContext:
    fields: dict[str, object] = dict(
        kv_layout=KVLayout.PAGED,
        rope=RopeMode.NONE,
        append=True,
        q_dtype=DType.BF16,
        kv_dtype=DType.BF16,
        arch=arch,
        head_dim=72,  # no TileLang attention kernel: a slot-mapped write needs none
        group_size=1,
        causal=False,
        page_size=5,
        ragged=True,
        slot_mapping=True,
    )
    fields.update(overrides)
    return PrefillContext(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arch", "key"),
    [(Arch.CPU, SlotAppendKey.REF), (Arch.SM80, SlotAppendKey.TL), (Arch.SM90, SlotAppendKey.TL)],
)
def test_selection_plans_one_slot_append_step(arch: Arch, key: SlotAppendKey) -> None:
    ctx = _slot_context(arch)
    plan = select_plan(ctx)
    assert plan == PrefillPlan(None, None, None, slot_append=key)
    assert plan.steps == (key,) and str(plan) == key.value
    explanation = explain(ctx)
    assert explanation.plan == plan and explanation.missing_steps == ()
    rejected = {r.key: r.reasons for r in explanation.rejected}
    assert set(rejected) | {key} == set(ALL_KEYS) and key not in rejected
    assert (
        "the call only writes the cache by its slot mapping; it attends nothing"
        in rejected[AttentionKey.PAGED_REF]
    )
    assert "this kernel finds the rows from cache_seqlens" in " ".join(rejected[AppendKey.PAGED_REF])
    assert "the call's slot mapping names every new token's row" in rejected[BatchKey.PAGED_REF]
    text = str(explanation)
    assert f"plan: {key.value}" in text and "attention config" not in text
    # A call without a slot mapping never gets a slot-append kernel.
    no_slots = _slot_context(arch, slot_mapping=False, head_dim=128)
    assert "the call has no slot mapping" in rejections(key, no_slots)
    assert select_plan(no_slots).slot_append is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            dict(kv_layout=KVLayout.CONTIGUOUS, page_size=0, ragged=False),
            "slot_mapping: expected kv_layout paged",
        ),
        (dict(append=False), "slot_mapping: expected kv_layout paged and append"),
        (dict(rope=RopeMode.NEOX), "slot_mapping: expected rope none"),
    ],
)
def test_impossible_slot_contexts_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _slot_context(Arch.CPU, **fields)


def test_plan_explains_itself() -> None:
    case = _case()
    plan = tp.PagedCacheSlotAppend().plan(case.slot_mapping, shape=case.shape())
    assert plan.steps == (SlotAppendKey.REF,)
    assert repr(plan) == "PagedCacheSlotAppendPlan(slot_append_ref)"
    text = str(plan.explain())
    assert "plan: slot_append_ref" in text
    assert "slot_mapping=True" in text
    assert (
        "slot_append_tl: TileLang (sm80 and sm90) code serves arch sm80 or sm90; the call's arch is cpu"
        in text
    )


def test_kernel_map_and_override() -> None:
    op = tp.PagedCacheSlotAppend()
    assert set(op.kernel_keys) == set(SlotAppendKey)
    assert dict(op.default_kernel_map) == {
        SlotAppendKey.REF: SlotAppendRefKernel,
        SlotAppendKey.TL: tp.PagedCacheSlotAppend.default_kernel_map[SlotAppendKey.TL],
    }
    calls: list[int] = []

    class Counting(SlotAppendRefKernel):
        def __call__(self, *tensors: torch.Tensor) -> None:
            calls.append(tensors[0].shape[0])
            super().__call__(*tensors)

    case = _case()
    expected_k, _ = case.expected()
    tp.PagedCacheSlotAppend(kernel_map={SlotAppendKey.REF: Counting})(
        case.k_new, case.v_new, *case.caches, case.slot_mapping
    )
    assert calls == [11] and torch.equal(case.k_pages, expected_k)
    with pytest.raises(
        ValueError, match="kernel_map: key append_paged_ref cannot serve any call of PagedCacheSlotAppend"
    ):
        tp.PagedCacheSlotAppend(kernel_map={AppendKey.PAGED_REF: SlotAppendRefKernel})
    with pytest.raises(
        ValueError, match=r"kernel_map\[slot_append_tl\]: expected a class whose .key is slot_append_tl"
    ):
        tp.PagedCacheSlotAppend(kernel_map={SlotAppendKey.TL: SlotAppendRefKernel})
    assert issubclass(SlotAppendRefKernel, SlotAppendKernel)


def test_manifest_entry() -> None:
    entry = load_manifest().op("PagedCacheSlotAppend")
    assert [i.name for i in entry.inputs] == ["k_new", "v_new", "k_pages", "v_pages", "slot_mapping"]
    assert entry.plan.inputs == ("slot_mapping",) and entry.plan.shape == "SlotAppendShape"
    assert entry.run.inputs == ("k_new", "v_new", "k_pages", "v_pages") and entry.run_into is None
    assert entry.outputs == () and entry.mutates == ("k_pages", "v_pages")
    assert {k.key: k.kernel for k in entry.kernel_map} == {
        SlotAppendKey.REF: "SlotAppendRefKernel",
        SlotAppendKey.TL: "SlotAppendTLKernel",
    }


def test_cli_explains_a_slot_mapped_write(capsys: pytest.CaptureFixture[str]) -> None:
    from tileprefill import cli

    argv = ["explain", "--layout", "paged", "--rope", "none", "--append", "--slot-mapping", "--dtype", "bf16"]
    argv += ["--arch", "sm90", "--head-dim", "128", "--group-size", "1", "--page-size", "16"]
    assert cli.main(argv) == 0
    assert "plan: slot_append_tl\n" in capsys.readouterr().out
