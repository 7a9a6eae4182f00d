"""q, k, v, the new keys and values, and `out`, as views of a caller's storage: slices of a fused QKV
projection (rows (Hq + 2 Hkv) D apart), heads-first storage seen tokens-first, a padded batch.

Every public Op on such views gives bit for bit what it gives on contiguous copies and changes none
of them; `run_into` writes a strided `out` in place without touching the columns beside it; a view
the kernels cannot take as it is (head dim not contiguous, rows or data not 16-byte aligned) is
refused before anything is written, naming the argument, the rule and the strides. The GPU module
(`tests/gpu/test_activation_views_gpu.py`) runs the same cases on the TileLang kernels and checks
that what reaches each launch is the caller's storage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import pytest
import torch

import tileprefill as tp
from tileprefill.kernels import append_tl, attention_tl, rope_append_tl, rope_tl, slot_append_tl
from tileprefill.kernels.launch import KernelRecord, readable
from tileprefill.ops import PUBLIC_OPS, OpClass
from tileprefill.validation import view_problem

if TYPE_CHECKING:
    from conftest import Oracle

#: The inputs of rows (..., H, D) an Op may take as views (the caches have tests/test_cache_views.py).
ROW_INPUTS = ("q", "k", "v", "k_new", "v_new")
#: The layouts of `activation_views`.
LAYOUTS = ("fused", "heads_first", "padded")
#: A value no attention output of inputs of magnitude ~1 takes: what `out`'s neighbours hold.
SENTINEL = -777.0


class Views(NamedTuple):
    """Storage holding the row inputs of a call, and views of it with their values, by name."""

    storage: tuple[torch.Tensor, ...]
    views: dict[str, torch.Tensor]


def activation_views(tensors: Mapping[str, torch.Tensor], layout: str) -> Views:
    """The row inputs among `tensors` ((T, H, D) or (B, S, H, D), one leading shape) as views in
    `layout`, holding the same values:

    - fused: one (..., sum of H * D + 2 D) storage, the inputs side by side in each row: a fused QKV
      projection's output (q = qkv[..., :Hq * D].view(..., Hq, D)).
    - heads_first: each input in its own (..., H, tokens, D) storage, seen tokens-first (attention
      modules' (B, H, S, D)).
    - padded: fused, in a storage with 3 more rows (tokens) than the inputs use, per sequence for
      (B, S, H, D) inputs: a padded batch, whose sequences are not one row stride apart.
    """
    names = [name for name in ROW_INPUTS if name in tensors]
    first = tensors[names[0]]
    lead = first.shape[:-2]
    match layout:
        case "fused" | "padded":
            rows = [tensors[name].reshape(*lead, -1) for name in names]
            # Two heads' columns more, which no input takes (q of a cache read alone is strided too):
            # the keys and values of a projection whose Op reads them from the cache.
            unread = first.new_zeros(*lead, 2 * first.shape[-1])
            fused = torch.cat([*rows, unread], dim=-1)
            if layout == "padded":
                padded = fused.new_zeros(*lead[:-1], lead[-1] + 3, fused.shape[-1])
                padded[..., : lead[-1], :] = fused
                fused = padded
            views: dict[str, torch.Tensor] = {}
            start = 0
            for name, row in zip(names, rows, strict=True):
                width = row.shape[-1]
                views[name] = fused[..., : lead[-1], start : start + width].view(tensors[name].shape)
                start += width
            return Views((fused,), views)
        case "heads_first":
            stores = {name: tensors[name].transpose(-3, -2).contiguous() for name in names}
            return Views(tuple(stores.values()), {name: t.transpose(-3, -2) for name, t in stores.items()})
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


#: Elements left and right of each row of `strided_out` (16 bytes of fp16), and rows after its last.
PAD, EXTRA_ROWS = 8, 3


def strided_out(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, out): `out` of `like`'s shape (..., H, D), dtype and device, a view of a larger buffer
    filled with SENTINEL: the middle columns of its rows (PAD elements left and right), and for each
    sequence EXTRA_ROWS rows more than `out` has (a padded batch's output)."""
    *lead, heads, head_dim = like.shape
    buffer = torch.full(
        (*lead[:-1], lead[-1] + EXTRA_ROWS, heads * head_dim + 2 * PAD),
        SENTINEL,
        dtype=like.dtype,
        device=like.device,
    )
    return buffer, buffer[..., : lead[-1], PAD : PAD + heads * head_dim].view(like.shape)


def outside_out(buffer: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The elements of a `strided_out` buffer that are not `out`'s (each must still be SENTINEL)."""
    inside = torch.zeros(buffer.shape, dtype=torch.bool, device=buffer.device)
    inside[..., : out.shape[-3], PAD : PAD + out.shape[-2] * out.shape[-1]] = True
    return buffer[~inside]


def _cloned(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in tensors.items()}


def _ids(op_cls: OpClass) -> str:
    return op_cls.__name__


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=_ids)
def test_every_op_reads_views_as_it_reads_copies(
    oracle: Oracle, gen: torch.Generator, op_cls: OpClass, layout: str
) -> None:
    """The one-shot call, plan + run and plan + run_into (into a strided out) on views: the output and
    the caches of the call on contiguous copies, bit for bit; the views' storage unchanged."""
    op = oracle.make_op(op_cls)
    named = oracle.named_inputs(op_cls, gen)
    contiguous = _cloned(named)
    expected = op(*contiguous.values())
    storage, views = activation_views(named, layout)
    storage_before = tuple(s.clone() for s in storage)
    assert all(not v.is_contiguous() for v in views.values()), "the views must be strided"
    for run in ("call", "run", "run_into"):
        inputs = {**_cloned(named), **views}  # fresh caches each time: the appends write them
        if run == "call":
            out = op(*inputs.values())
        else:
            plan: Any = oracle.plan_of(op, op_cls, list(inputs.values()))
            data = [inputs[s.name] for s in op_cls.run_specs]
            if run == "run":
                out = plan.run(*data)
            else:
                buffer, out = strided_out(expected)
                assert plan.run_into(out, *data) is out
                assert bool((outside_out(buffer, out) == SENTINEL).all()), f"{run} wrote beside out"
        assert torch.equal(oracle.bits(out), oracle.bits(expected)), f"{run} on {layout} views: output"
        for name in ("k_cache", "v_cache", "k_pages", "v_pages"):
            if name in inputs:
                assert torch.equal(inputs[name], contiguous[name]), f"{run} on {layout} views: {name}"
        for before, after in zip(storage_before, storage, strict=True):
            assert torch.equal(oracle.bits(before), oracle.bits(after)), f"{run} changed an input"


def test_the_slot_write_reads_views_as_it_reads_copies(gen: torch.Generator) -> None:
    """vLLM's reshape_and_cache_flash with k and v slices of the fused projection."""
    tokens, heads, head_dim = 7, 2, 64
    named = {n: torch.randn(tokens, heads, head_dim, generator=gen).half() for n in ("k_new", "v_new")}
    pages = torch.randn(4, 4, heads, head_dim, generator=gen).half()
    slots = torch.tensor([3, -1, 0, 9, 15, 4, 11])
    k_ref, v_ref = pages.clone(), pages.clone()
    tp.PagedCacheSlotAppend()(named["k_new"], named["v_new"], k_ref, v_ref, slots)
    for layout in LAYOUTS:
        _, views = activation_views(named, layout)
        k_pages, v_pages = pages.clone(), pages.clone()
        tp.PagedCacheSlotAppend()(views["k_new"], views["v_new"], k_pages, v_pages, slots)
        assert torch.equal(k_pages, k_ref) and torch.equal(v_pages, v_ref), layout
    assert not torch.equal(k_ref, pages), "the write wrote nothing (the test proves nothing)"


class Bad(NamedTuple):
    """A view of a tensor's values the kernels cannot take, and what its error must say."""

    view: Callable[[torch.Tensor], torch.Tensor]
    message: str


def _d_not_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def _rows_off_16_bytes(t: torch.Tensor) -> torch.Tensor:
    """Rows 4 elements (8 bytes) longer than the tensor's: strides off the 16-byte vector."""
    storage = torch.zeros(*t.shape[:-2], t.shape[-2] * t.shape[-1] + 4, dtype=t.dtype)
    view = storage[..., : t.shape[-2] * t.shape[-1]].view(t.shape)
    return view.copy_(t)


def _data_off_16_bytes(t: torch.Tensor) -> torch.Tensor:
    """Contiguous, but 8 bytes past a 16-byte boundary."""
    storage = torch.zeros(t.numel() + 4, dtype=t.dtype)
    return storage[4:].view(t.shape).copy_(t)


BAD_VIEWS = {
    "head dim not contiguous": Bad(
        _d_not_contiguous, r"expected the last dim \(D\) contiguous \(stride 1\), got strides \("
    ),
    "rows off 16 bytes": Bad(
        _rows_off_16_bytes,
        r"expected every stride a multiple of 16 bytes \(8 elements, the widest vector of a row of D 64\), "
        r"got strides \(",
    ),
    "data off 16 bytes": Bad(_data_off_16_bytes, r"expected data 16-byte aligned, got address 0x"),
}


def _bad_cases() -> list[Any]:
    cases = []
    for op_cls in PUBLIC_OPS:
        for name in (s.name for s in op_cls.input_specs if s.name in ROW_INPUTS):
            for kind in BAD_VIEWS:
                cases.append(pytest.param(op_cls, name, kind, id=f"{op_cls.__name__}-{name}-{kind}"))
    return cases


@pytest.mark.parametrize(("op_cls", "name", "kind"), _bad_cases())
def test_a_view_the_kernels_cannot_take_is_refused_before_any_write(
    oracle: Oracle, gen: torch.Generator, op_cls: OpClass, name: str, kind: str
) -> None:
    op = oracle.make_op(op_cls)
    named = oracle.named_inputs(op_cls, gen)
    bad = BAD_VIEWS[kind]
    named[name] = bad.view(named[name])
    before = _cloned(named)
    with pytest.raises(ValueError, match=rf"^{name}: {bad.message}"):
        op(*named.values())
    for key, t in named.items():
        assert torch.equal(t, before[key]), f"a rejected call changed {key}"


@pytest.mark.parametrize("kind", list(BAD_VIEWS))
@pytest.mark.parametrize("op_cls", [tp.GQAVarlenPrefill, tp.GQAPagedCacheRopeAppendPrefill], ids=_ids)
def test_run_into_refuses_an_out_the_kernels_cannot_write(
    oracle: Oracle, gen: torch.Generator, op_cls: OpClass, kind: str
) -> None:
    """Named, with the rule and the strides (or the address), before anything is written: the caches
    and out keep their bytes."""
    op = oracle.make_op(op_cls)
    named = oracle.named_inputs(op_cls, gen)
    plan: Any = oracle.plan_of(op, op_cls, list(named.values()))
    bad = BAD_VIEWS[kind]
    out = bad.view(torch.full(named["q"].shape, SENTINEL, dtype=named["q"].dtype))
    before = _cloned(named)
    with pytest.raises(ValueError, match=rf"^out: {bad.message}"):
        plan.run_into(out, *(named[s.name] for s in op_cls.run_specs))
    assert bool((out == SENTINEL).all()), "a rejected call wrote out"
    for key, t in named.items():
        assert torch.equal(t, before[key]), f"a rejected call changed {key}"


def test_a_view_of_a_view_is_judged_by_its_own_strides() -> None:
    """The rule reads strides, not how a view was made: a slice of a contiguous q passes, one whose
    rows start 8 bytes apart from a 16-byte boundary does not; a broadcast (stride 0) one does not."""
    qkv = torch.zeros(6, (4 + 2 * 2) * 64, dtype=torch.float16)
    assert view_problem(qkv[:, : 4 * 64].view(6, 4, 64)) is None
    assert view_problem(qkv[:, 4 * 64 : 6 * 64].view(6, 2, 64)) is None
    off = view_problem(qkv[:, 4 : 4 + 4 * 64].view(6, 4, 64))
    assert off is not None and "16-byte aligned" in off, off
    expanded = view_problem(torch.zeros(1, 4, 64, dtype=torch.float16).expand(6, 4, 64))
    assert expanded is not None and "do not overlap" in expanded, expanded


def test_an_allocating_kernel_call_reads_views_in_place_and_copies_the_rest() -> None:
    """What a kernel's own call (not an Op's plan) hands its launch: a view the program takes as it is,
    anything else a contiguous, aligned copy (the TileLang launch would misread it)."""
    qkv = torch.zeros(6, 8 * 64, dtype=torch.float16)
    q = qkv[:, : 4 * 64].view(6, 4, 64)
    assert readable(q) is q
    transposed = _d_not_contiguous(torch.zeros(6, 4, 64, dtype=torch.float16))
    copied = readable(transposed)
    assert copied.is_contiguous() and torch.equal(copied, transposed)
    misaligned = _data_off_16_bytes(torch.ones(6, 4, 64, dtype=torch.float16))
    realigned = readable(misaligned)
    assert realigned.data_ptr() % 16 == 0 and torch.equal(realigned, misaligned)


#: The parameters a launch may copy into the layout its program reads: index tensors, RoPE tables.
COPYABLE = frozenset(
    {
        "positions",
        "slots",
        "cos",
        "sin",
        "cu_seqlens_q",
        "cu_seqlens_kv",
        "kv_seqlens",
        "cache_seqlens",
        "block_table",
        "slot_mapping",
    }
)


def _records() -> list[KernelRecord]:
    modules = (append_tl, rope_append_tl, rope_tl, slot_append_tl)
    return [
        *attention_tl.RECORDS.values(),
        *attention_tl.LSE_RECORDS.values(),
        *(record for module in modules for record in module.RECORDS.values()),
    ]


@pytest.mark.parametrize("record", _records(), ids=lambda r: r.op_name)
def test_every_launch_passes_its_rows_as_they_are(record: KernelRecord) -> None:
    """Each TileLang launch record names every tensor of rows a view (never copied at launch); what a
    launch may copy is the index tensors and RoPE tables only."""
    copied = {name for name in record.tensors if name not in record.mutates and name not in record.views}
    assert copied <= COPYABLE, f"{record.op_name} would copy {sorted(copied - COPYABLE)}"
    rows = {name for name in record.tensors if name not in COPYABLE and name != "lse"}
    assert rows == set(record.views), f"{record.op_name}: views {record.views}, rows {sorted(rows)}"


@pytest.mark.parametrize("layout", ["fused", "heads_first"])
def test_a_call_on_views_traces_as_one_graph(oracle: Oracle, gen: torch.Generator, layout: str) -> None:
    """The view checks trace under torch.compile (symbolic sizes, no address read): a paged RoPE +
    append call on views compiles to one graph and gives the eager call's output and caches."""
    from test_ops import TracedPagedAppend, TracedPagedAttention, TracedRope
    from tileprefill.keys import AppendKey, AttentionKey, RopeKey

    traced = tp.GQAPagedCacheRopeAppendPrefill(
        rope=tp.RopeMode.NEOX,
        validate=False,
        kernel_map={
            RopeKey.NEOX_REF: TracedRope,
            AppendKey.PAGED_REF: TracedPagedAppend,
            AttentionKey.PAGED_REF: TracedPagedAttention,
        },
    )
    named = oracle.named_inputs(tp.GQAPagedCacheRopeAppendPrefill, gen)
    reference = _cloned(named)
    _, views = activation_views(named, layout)
    inputs = {**_cloned(named), **views}
    out = torch.compile(traced, fullgraph=True, backend="eager", dynamic=True)(*inputs.values())
    expected = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX)(*reference.values())
    assert float((out.float() - expected.float()).abs().max()) < 1e-2
    assert torch.equal(inputs["k_pages"], reference["k_pages"])
    assert torch.equal(inputs["v_pages"], reference["v_pages"])
