"""The NaN/Inf policy (README, "Reliability"), on the TileLang kernels (cuda) and the reference (cpu).

- A query row that sees no key is exactly 0.
- A NaN or Inf in one sequence's inputs never reaches another sequence: the other sequences'
  outputs are bit for bit those of the same call without it, and an append writes only that
  sequence's slots.
- It does reach the rows it affects: a NaN in query row i (head h) makes output row i (head h) NaN;
  a NaN in key j (kv head g), every row that sees key j in the query heads of g; a NaN/Inf in value
  j, dim d of every such row. (Infs in q and k follow IEEE arithmetic of the softmax: see
  `test_bad_input_reaches_its_rows`.) Rows that do not read the bad element are bit for bit
  unchanged (for a value, rows sharing a key tile with it may turn NaN too: 0 * NaN in P @ V).

Before one normalisation everywhere (zero a row exactly when l == 0, i.e. it saw no key; divide
otherwise, so a NaN l stays NaN), measured on an H200 on 2026-12-01:
`test_bad_input_reaches_its_rows[*-{q,k}-nan-cpu]` failed (the reference zeroed a row whose
denominator is NaN: `torch.where(denom > 0, ...)`; the SM80 programs normalised the same way) and
`test_masked_rows_stay_zero_beside_bad_values[cuda-*]` failed (on SM90 a row that saw no key was
`o * 0`, and P = 0 times a NaN value of the tile is NaN). Both pass since.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import attrs
import pytest
import reliability as rel
import torch

import tileprefill as tp

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

DEVICES = [torch.device("cuda"), torch.device("cpu")]
# Three sequences; the bad element goes into sequence 1. q_len > kv_len in sequence 2 (causal rows
# that see no key), several key tiles in sequence 1.
Q_LENS = [37, 50, 20]
KV_LENS = [90, 200, 8]


@attrs.frozen
class Layout:
    """One Op's call over the three sequences, and where each sequence's rows live."""

    name: str
    op: Callable[[], object]
    inputs: dict[str, torch.Tensor]
    q_len: list[int]
    kv_len: list[int]
    #: out index of (sequence b, query i) -> a tuple index into out (token-major or batch-major)
    out_row: Callable[[int, int], tuple[int, ...]]
    #: (tensor name, index) of key j of sequence b for 'q' / 'k' / 'v'
    element: Callable[[str, int, int], tuple[str, tuple[int, ...]]]
    caches: tuple[str, ...] = ()
    #: bool over cache rows: sequence 1's written slots (append Ops)
    seq1_slots: torch.Tensor | None = None


def ragged() -> Layout:
    cfg = rel.configs_of(tp.GQAVarlenPrefill)[0]  # d128 bf16 causal, group 2
    gen = torch.Generator().manual_seed(11)
    tq, tkv = sum(Q_LENS), sum(KV_LENS)
    cu_q, cu_kv = rel.cumulative(Q_LENS), rel.cumulative(KV_LENS)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(cfg.dtype)

    inputs = {
        "q": randn(tq, cfg.heads, cfg.head_dim),
        "k": randn(tkv, cfg.kv_heads, cfg.head_dim),
        "v": randn(tkv, cfg.kv_heads, cfg.head_dim),
        "cu_seqlens_q": cu_q,
        "cu_seqlens_kv": cu_kv,
    }

    def element(what: str, b: int, j: int) -> tuple[str, tuple[int, ...]]:
        return (what, (int(cu_q[b]) + j,)) if what == "q" else (what, (int(cu_kv[b]) + j,))

    return Layout(
        f"GQAVarlenPrefill-{cfg.name}",
        lambda: rel.make_op(tp.GQAVarlenPrefill, cfg),
        inputs,
        Q_LENS,
        KV_LENS,
        lambda b, i: (int(cu_q[b]) + i,),
        element,
    )


def dense() -> Layout:
    cfg = rel.configs_of(tp.GQAPrefill)[0]  # d64 fp16 causal, group 1 (persistent SM90 program)
    gen = torch.Generator().manual_seed(12)
    s_q, s_kv = 40, 150

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(cfg.dtype)

    inputs = {
        "q": randn(3, s_q, cfg.heads, cfg.head_dim),
        "k": randn(3, s_kv, cfg.kv_heads, cfg.head_dim),
        "v": randn(3, s_kv, cfg.kv_heads, cfg.head_dim),
    }
    return Layout(
        f"GQAPrefill-{cfg.name}",
        lambda: rel.make_op(tp.GQAPrefill, cfg),
        inputs,
        [s_q] * 3,
        [s_kv] * 3,
        lambda b, i: (b, i),
        lambda what, b, j: (what, (b, j)),
    )


def paged_append() -> Layout:
    cfg = rel.configs_of(tp.GQAPagedCacheAppendPrefill)[3]  # page 16, d128 fp16 causal, group 4
    gen = torch.Generator().manual_seed(13)
    ps = cfg.page_size
    cached = [k - q if k >= q else 0 for q, k in zip(Q_LENS, KV_LENS, strict=True)]
    q_lens = [k - c for k, c in zip(KV_LENS, cached, strict=True)]
    pages_of, cursor = [], 0
    for n in KV_LENS:
        pages_of.append(list(range(cursor, cursor + -(-n // ps))))
        cursor += len(pages_of[-1])
    width = max(len(p) for p in pages_of)
    table = torch.full((3, width), -1, dtype=torch.int32)
    for b, pages in enumerate(pages_of):
        table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
    tq = sum(q_lens)
    cu_q = rel.cumulative(q_lens)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(cfg.dtype)

    inputs = {
        "q": randn(tq, cfg.heads, cfg.head_dim),
        "k_new": randn(tq, cfg.kv_heads, cfg.head_dim),
        "v_new": randn(tq, cfg.kv_heads, cfg.head_dim),
        "k_pages": randn(cursor, ps, cfg.kv_heads, cfg.head_dim),
        "v_pages": randn(cursor, ps, cfg.kv_heads, cfg.head_dim),
        "block_table": table,
        "cache_seqlens": torch.tensor(cached, dtype=torch.int32),
        "cu_seqlens_q": cu_q,
    }
    slots = torch.zeros(cursor, ps, dtype=torch.bool)
    for p in range(cached[1], KV_LENS[1]):
        slots[pages_of[1][p // ps], p % ps] = True

    def element(what: str, b: int, j: int) -> tuple[str, tuple[int, ...]]:
        if what == "q":
            return "q", (int(cu_q[b]) + j,)
        if j >= cached[b]:  # a new key: from k_new / v_new
            return f"{what}_new", (int(cu_q[b]) + j - cached[b],)
        return f"{what}_pages", (pages_of[b][j // ps], j % ps)

    return Layout(
        f"GQAPagedCacheAppendPrefill-{cfg.name}",
        lambda: rel.make_op(tp.GQAPagedCacheAppendPrefill, cfg),
        inputs,
        q_lens,
        KV_LENS,
        lambda b, i: (int(cu_q[b]) + i,),
        element,
        caches=("k_pages", "v_pages"),
        seq1_slots=slots,
    )


LAYOUTS = [ragged, dense, paged_append]


def warm_up() -> None:
    for layout in LAYOUTS:
        call = layout()
        call.op()(*[t.to("cuda") for t in call.inputs.values()])  # type: ignore[operator]


def run(
    layout: Layout, device: torch.device, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    on = {n: t.to(device) for n, t in inputs.items()}
    out = layout.op()(*on.values())  # type: ignore[operator]
    assert isinstance(out, torch.Tensor)
    return out.cpu(), {n: on[n].cpu() for n in layout.caches}


def sees(layout: Layout, b: int, i: int, j: int) -> bool:
    """Whether query i of sequence b sees key j (causal, bottom-right)."""
    return j < layout.kv_len[b] and j <= layout.kv_len[b] - layout.q_len[b] + i


@attrs.frozen
class Poisoned:
    inputs: dict[str, torch.Tensor]
    index: int  # the query row (q) or key (k, v) of sequence 1 that holds the bad element
    head: int  # its head (of q, or of k/v)
    name: str  # the tensor it is in, and where
    where: tuple[int, ...]


DIM = 3  # the head dim the bad element sits at


def poisoned(layout: Layout, what: str, value: float) -> Poisoned:
    """The inputs with `value` in one element of sequence 1: query row 7, or key/value 100 (a cached
    key for the append layout), head 1, dim DIM."""
    index = 7 if what == "q" else 100 if layout.kv_len[1] > 100 else layout.kv_len[1] - 1
    name, where = layout.element(what, 1, index)
    inputs = {n: t.clone() for n, t in layout.inputs.items()}
    where = (*where, 1, DIM)
    inputs[name][where] = value
    return Poisoned(inputs, index, 1, name, where)


CASES = [
    pytest.param(layout, what, value, device, id=f"{layout.__name__}-{what}-{name}-{device.type}")
    for layout, what, (name, value), device in itertools.product(
        LAYOUTS, ("q", "k", "v"), (("nan", float("nan")), ("inf", float("inf"))), DEVICES
    )
]


@pytest.mark.parametrize(("make", "what", "value", "device"), CASES)
def test_bad_input_stays_in_its_sequence(
    make: Callable[[], Layout], what: str, value: float, device: torch.device
) -> None:
    layout = make()
    clean_out, clean_caches = run(layout, device, layout.inputs)
    bad = poisoned(layout, what, value)
    out, caches = run(layout, device, bad.inputs)
    for b in (0, 2):
        for i in range(layout.q_len[b]):
            row = layout.out_row(b, i)
            assert rel.same_bits(out[row], clean_out[row]), f"sequence {b} row {i} changed"
    for name in layout.caches:
        assert layout.seq1_slots is not None
        if name == bad.name:  # the bad element itself sits in this cache (a cached key of sequence 1)
            clean_caches[name][bad.where] = value
        outside = ~layout.seq1_slots
        assert rel.same_bits(caches[name][outside], clean_caches[name][outside]), (
            f"{name}: a slot outside sequence 1's changed"
        )


@pytest.mark.parametrize(("make", "what", "value", "device"), CASES)
def test_bad_input_reaches_its_rows(
    make: Callable[[], Layout], what: str, value: float, device: torch.device
) -> None:
    """A bad q or k element spoils the scores of every row that reads it (all dims of the output);
    a bad value, dim DIM of those rows. An Inf key gives +Inf scores where q[.., DIM] > 0 (Inf - Inf
    in the softmax: NaN), 0 * Inf = NaN where q[.., DIM] == 0, and -Inf where q[.., DIM] < 0: such a
    key is then weighted 0, a legitimate limit, so those rows are not checked."""
    layout = make()
    clean_out, _ = run(layout, device, layout.inputs)
    bad = poisoned(layout, what, value)
    out, _ = run(layout, device, bad.inputs)
    hq = out.shape[-2]
    hkv = layout.inputs[layout.element("k", 1, 0)[0]].shape[-2]
    heads = [bad.head] if what == "q" else [h for h in range(hq) if h // (hq // hkv) == bad.head]
    q_name = layout.element("q", 1, 0)[0]
    wrong: list[str] = []
    for i in range(layout.q_len[1]):
        row = layout.out_row(1, i)
        affected = i == bad.index if what == "q" else sees(layout, 1, i, bad.index)
        for h in range(hq):
            got, before = out[(*row, h)], clean_out[(*row, h)]
            if affected and h in heads:
                q_dim = float(layout.inputs[q_name][(*layout.element("q", 1, i)[1], h, DIM)])
                if what == "k" and math.isinf(value) and q_dim < 0:
                    continue  # a -Inf score: key weighted 0
                hit = got.float() if what != "v" else got.float()[DIM : DIM + 1]
                if torch.isfinite(hit).any():
                    wrong.append(f"row {i} head {h}: finite ({hit[:2].tolist()}...)")
            elif what != "v" and not rel.same_bits(got, before):
                wrong.append(f"row {i} head {h}: changed though it does not read the bad element")
    assert not wrong, f"{len(wrong)} rows break the policy, e.g. {wrong[:4]}"


@pytest.mark.parametrize("make", LAYOUTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.type)
def test_masked_rows_are_zero(make: Callable[[], Layout], device: torch.device) -> None:
    """Causal rows that see no key (q_len > kv_len: the first q_len - kv_len rows) are exactly 0."""
    layout = make()
    if all(k >= q for q, k in zip(layout.q_len, layout.kv_len, strict=True)):
        pytest.skip("no masked rows in this layout (an append attends its own new keys)")
    out, _ = run(layout, device, layout.inputs)
    for b in range(3):
        for i in range(layout.q_len[b] - layout.kv_len[b]):
            row = out[layout.out_row(b, i)]
            assert not row.any(), f"sequence {b} row {i} sees no key but is not 0"


@pytest.mark.parametrize("make", LAYOUTS, ids=lambda m: m.__name__)
@pytest.mark.parametrize("device", DEVICES, ids=lambda d: d.type)
def test_masked_rows_stay_zero_beside_bad_values(make: Callable[[], Layout], device: torch.device) -> None:
    """A row that sees no key is 0 even when its sequence's values hold a NaN (a row that sees no
    key reads no value). Sequence 2 (q_len > kv_len) gets a NaN in its last value."""
    layout = make()
    if layout.kv_len[2] >= layout.q_len[2]:
        pytest.skip("no masked rows in this layout")
    name, where = layout.element("v", 2, layout.kv_len[2] - 1)
    inputs = {n: t.clone() for n, t in layout.inputs.items()}
    inputs[name][where] = float("nan")
    out, _ = run(layout, device, inputs)
    for i in range(layout.q_len[2] - layout.kv_len[2]):
        row = out[layout.out_row(2, i)]
        assert not row.isnan().any() and not row.any(), f"sequence 2 row {i} sees no key but is not 0"
