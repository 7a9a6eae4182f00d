"""Kernel selection over the full product of contexts, checked against tables written here.

Every combination either cannot be built (ValueError naming the field), or
yields a plan whose steps are the ones the Op orchestrates (RoPE iff rope,
append iff append, then attention) with the keys the tables below expect, or
is refused with `UnsupportedContextError` listing the reasons. The tables are
independent of `selection.py`'s traits, so a wrong trait or preference is caught.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import attrs
import pytest

from tileprefill.context import Arch, DType, KVLayout, KVOrder, PrefillContext, RopeMode
from tileprefill.keys import ALL_KEYS, AppendKey, AttentionKey, BatchKey, KernelKey, RopeAppendKey, RopeKey
from tileprefill.selection import (
    Explanation,
    PrefillPlan,
    UnsupportedContextError,
    explain,
    rejections,
    select_plan,
)

HEAD_DIMS = (64, 72, 96, 128, 256)
PAGE_SIZES = (0, 1, 16, 7, 64, 8)  # 8: a power of two below the tiled minimum
#: Page sizes of PAGE_SIZES that the tiled paged kernels serve (powers of two >= 16).
TILED_PAGE_SIZES = frozenset({16, 64})
#: Head dims of HEAD_DIMS the TileLang attention kernels are built for.
TL_HEAD_DIMS = frozenset(range(64, 257, 16))

EXPECTED_ROPE: dict[tuple[RopeMode, Arch], RopeKey] = {
    (RopeMode.NEOX, Arch.CPU): RopeKey.NEOX_REF,
    (RopeMode.NEOX, Arch.SM80): RopeKey.NEOX_TL,
    (RopeMode.NEOX, Arch.SM90): RopeKey.NEOX_TL,
    (RopeMode.INTERLEAVED, Arch.CPU): RopeKey.INTERLEAVED_REF,
    (RopeMode.INTERLEAVED, Arch.SM80): RopeKey.INTERLEAVED_TL,
    (RopeMode.INTERLEAVED, Arch.SM90): RopeKey.INTERLEAVED_TL,
}

#: Appends into a paged cache derive positions, slots and kv lengths once per plan.
EXPECTED_BATCH: dict[Arch, BatchKey] = {
    Arch.CPU: BatchKey.PAGED_REF,
    Arch.SM80: BatchKey.PAGED_TL,
    Arch.SM90: BatchKey.PAGED_TL,
}
#: TileLang arches rotate and append in one kernel, whatever the cache layout.
EXPECTED_ROPE_APPEND: dict[tuple[RopeMode, Arch], RopeAppendKey] = {
    (RopeMode.NEOX, Arch.SM80): RopeAppendKey.NEOX_TL,
    (RopeMode.NEOX, Arch.SM90): RopeAppendKey.NEOX_TL,
    (RopeMode.INTERLEAVED, Arch.SM80): RopeAppendKey.INTERLEAVED_TL,
    (RopeMode.INTERLEAVED, Arch.SM90): RopeAppendKey.INTERLEAVED_TL,
}
EXPECTED_APPEND: dict[tuple[KVLayout, Arch], AppendKey] = {
    (KVLayout.CONTIGUOUS, Arch.CPU): AppendKey.CONTIGUOUS_REF,
    (KVLayout.CONTIGUOUS, Arch.SM80): AppendKey.CONTIGUOUS_TL,
    (KVLayout.CONTIGUOUS, Arch.SM90): AppendKey.CONTIGUOUS_TL,
    (KVLayout.PAGED, Arch.CPU): AppendKey.PAGED_REF,
    (KVLayout.PAGED, Arch.SM80): AppendKey.PAGED_TL,
    (KVLayout.PAGED, Arch.SM90): AppendKey.PAGED_TL,
}

# Keyed by where attention reads from: "dense", "ragged", "contiguous", "paged" (any page
# size) or "paged_tiled" (page size a power of two >= 16).
EXPECTED_ATTENTION: dict[tuple[str, Arch], AttentionKey] = {
    ("dense", Arch.CPU): AttentionKey.DENSE_REF,
    ("dense", Arch.SM80): AttentionKey.DENSE_SM80,
    ("dense", Arch.SM90): AttentionKey.DENSE_SM90,
    ("ragged", Arch.CPU): AttentionKey.RAGGED_REF,
    ("ragged", Arch.SM80): AttentionKey.RAGGED_SM80,
    ("ragged", Arch.SM90): AttentionKey.RAGGED_SM90,
    ("contiguous", Arch.CPU): AttentionKey.CONTIGUOUS_REF,
    ("contiguous", Arch.SM80): AttentionKey.CONTIGUOUS_SM80,
    ("contiguous", Arch.SM90): AttentionKey.CONTIGUOUS_SM90,
    ("paged", Arch.CPU): AttentionKey.PAGED_REF,
    ("paged", Arch.SM80): AttentionKey.PAGED_SM80,
    ("paged", Arch.SM90): AttentionKey.PAGED_SM90,
    ("paged_tiled", Arch.CPU): AttentionKey.PAGED_REF,
    ("paged_tiled", Arch.SM80): AttentionKey.PAGED_TILED_SM80,
    ("paged_tiled", Arch.SM90): AttentionKey.PAGED_TILED_SM90,
}


def _all_fields(kv_layout: KVLayout, arch: Arch) -> Iterator[dict[str, object]]:
    for rope, append, q_dtype, kv_dtype, head_dim, causal, ragged, page_size, kv_order in itertools.product(
        RopeMode, (False, True), DType, DType, HEAD_DIMS, (False, True), (False, True), PAGE_SIZES, KVOrder
    ):
        yield {
            "kv_layout": kv_layout,
            "rope": rope,
            "append": append,
            "q_dtype": q_dtype,
            "kv_dtype": kv_dtype,
            "arch": arch,
            "head_dim": head_dim,
            "group_size": 4,
            "causal": causal,
            "page_size": page_size,
            "ragged": ragged,
            "kv_order": kv_order,
        }


def _impossible_fields(f: dict[str, object]) -> set[str]:
    """The fields whose value no public Op produces, given the others."""
    bad = set()
    if f["q_dtype"] is not f["kv_dtype"]:
        bad.add("kv_dtype")
    if f["kv_layout"] is KVLayout.NONE and f["append"]:
        bad.add("append")
    if f["kv_layout"] is not KVLayout.NONE and f["rope"] is not RopeMode.NONE and not f["append"]:
        bad.add("rope")
    if f["kv_layout"] is KVLayout.PAGED:
        if f["page_size"] == 0:
            bad.add("page_size")
        if not f["ragged"]:
            bad.add("ragged")
    elif f["page_size"] != 0:
        bad.add("page_size")
    if f["kv_layout"] is KVLayout.CONTIGUOUS and f["ragged"]:
        bad.add("ragged")
    if f["kv_layout"] is KVLayout.NONE and f["kv_order"] is not KVOrder.NHD:
        bad.add("kv_order")
    return bad


def _attention_source(ctx: PrefillContext) -> str:
    if ctx.kv_layout is KVLayout.NONE:
        return "ragged" if ctx.ragged else "dense"
    if ctx.kv_layout is KVLayout.CONTIGUOUS:
        return "contiguous"
    return "paged_tiled" if ctx.page_size in TILED_PAGE_SIZES else "paged"


def _check_explanation_accounts_for_every_key(explanation: Explanation, chosen: set[KernelKey]) -> None:
    """Each key is either chosen for a step or rejected with at least one non-empty reason."""
    rejected = [r.key for r in explanation.rejected]
    assert len(rejected) == len(set(rejected))
    assert set(rejected) | chosen == set(ALL_KEYS)
    assert not set(rejected) & chosen
    for rejection in explanation.rejected:
        assert rejection.reasons, rejection
        assert all(reason.strip() for reason in rejection.reasons), rejection


def _check(fields: dict[str, object]) -> None:
    bad = _impossible_fields(fields)
    if bad:
        with pytest.raises(ValueError) as raised:
            PrefillContext(**fields)  # type: ignore[arg-type]
        for field in bad:
            assert f"{field}: expected" in str(raised.value), (fields, str(raised.value))
        return

    ctx = PrefillContext(**fields)  # type: ignore[arg-type]
    explanation = explain(ctx)
    expected_rope = None if ctx.rope is RopeMode.NONE else EXPECTED_ROPE[ctx.rope, ctx.arch]
    expected_append = EXPECTED_APPEND[ctx.kv_layout, ctx.arch] if ctx.append else None
    expected_fused = EXPECTED_ROPE_APPEND.get((ctx.rope, ctx.arch)) if ctx.append else None
    expected_batch = EXPECTED_BATCH[ctx.arch] if ctx.append and ctx.kv_layout is KVLayout.PAGED else None
    if expected_fused is not None:
        expected_rope = expected_append = None
    if ctx.arch is not Arch.CPU and ctx.head_dim not in TL_HEAD_DIMS:
        with pytest.raises(UnsupportedContextError) as unsupported:
            select_plan(ctx)
        assert explanation.plan is None
        assert unsupported.value.explanation == explanation
        assert explanation.missing_steps == ("attention",)
        message = str(unsupported.value)
        assert f"head_dim {ctx.head_dim} is not compiled" in message
        for attention_key in AttentionKey:  # every attention candidate is listed with its reasons
            assert f"  {attention_key.value}: " in message
        # The RoPE and append steps did find their kernels; only attention is refused.
        served: set[KernelKey] = {
            k for k in (expected_batch, expected_rope, expected_append, expected_fused) if k is not None
        }
        for key in served:
            assert rejections(key, ctx) == (), (key, ctx)
        _check_explanation_accounts_for_every_key(explanation, served)
        return

    plan = select_plan(ctx)
    assert explanation.plan == plan
    assert explanation.missing_steps == ()
    expected_attention = EXPECTED_ATTENTION[_attention_source(ctx), ctx.arch]
    assert plan == PrefillPlan(
        expected_rope, expected_append, expected_attention, expected_fused, expected_batch
    ), ctx
    steps = (expected_batch, expected_rope, expected_append, expected_fused, expected_attention)
    assert plan.steps == tuple(k for k in steps if k is not None)
    for key in plan.steps:
        assert rejections(key, ctx) == (), (key, ctx)
    _check_explanation_accounts_for_every_key(explanation, set(plan.steps))


@pytest.mark.parametrize("arch", Arch, ids=lambda a: a.value)
@pytest.mark.parametrize("kv_layout", KVLayout, ids=lambda k: k.value)
def test_selection_table(kv_layout: KVLayout, arch: Arch) -> None:
    outcomes = {"impossible": 0, "planned": 0, "unsupported": 0}
    for fields in _all_fields(kv_layout, arch):
        _check(fields)
        if _impossible_fields(fields):
            outcomes["impossible"] += 1
        elif arch is not Arch.CPU and fields["head_dim"] not in TL_HEAD_DIMS:
            outcomes["unsupported"] += 1
        else:
            outcomes["planned"] += 1
    # Every arch and layout has contexts that plan; only TileLang arches refuse any.
    assert outcomes["planned"] > 0 and outcomes["impossible"] > 0
    assert (outcomes["unsupported"] > 0) is (arch is not Arch.CPU)


def test_plan_describes_its_steps() -> None:
    ctx = PrefillContext(
        kv_layout=KVLayout.PAGED,
        rope=RopeMode.NEOX,
        append=True,
        q_dtype=DType.FP16,
        kv_dtype=DType.FP16,
        arch=Arch.SM90,
        head_dim=128,
        group_size=8,
        causal=True,
        page_size=16,
        ragged=True,
    )
    plan = select_plan(ctx)
    assert str(plan) == "batch_paged_tl -> rope_append_neox_tl -> attn_paged_tiled_sm90"
    explanation = str(explain(ctx))
    assert "plan: batch_paged_tl -> rope_append_neox_tl -> attn_paged_tiled_sm90" in explanation
    # Every step reads and writes the cache through its strides, in either order.
    assert "cache order: NHD, read (and written) in place" in explanation
    assert "cache order: HND" in str(explain(attrs.evolve(ctx, kv_order=KVOrder.HND)))
    assert select_plan(attrs.evolve(ctx, kv_order=KVOrder.HND)) == plan
    # The separate steps it stands in for say why they were not used.
    assert "rope_neox_tl: rope_append_neox_tl rotates and appends in one kernel" in explanation
    assert "append_paged_tl: rope_append_neox_tl rotates and appends in one kernel" in explanation


def test_selection_does_not_import_tilelang() -> None:
    script = textwrap.dedent(
        """
        import itertools, sys
        import tileprefill
        from tileprefill import Arch, DType, KVLayout, PrefillContext, RopeMode, explain, select_plan
        for arch, layout, rope in itertools.product(Arch, KVLayout, RopeMode):
            append = layout is not KVLayout.NONE
            ctx = PrefillContext(
                kv_layout=layout, rope=rope, append=append, q_dtype=DType.BF16, kv_dtype=DType.BF16,
                arch=arch, head_dim=128, group_size=4, causal=True,
                page_size=16 if layout is KVLayout.PAGED else 0, ragged=layout is KVLayout.PAGED,
            )
            select_plan(ctx)
            str(explain(ctx))
        loaded = sorted(m for m in sys.modules if m == "tilelang" or m.startswith("tilelang."))
        assert not loaded, loaded
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
