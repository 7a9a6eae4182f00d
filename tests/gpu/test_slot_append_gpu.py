"""The TileLang slot-append kernel (`slot_append_tl`) and `PagedCacheSlotAppend` on a GPU, against the
reference kernel.

Fresh random inputs every run (the seed is printed; replay with TILEPREFILL_SEED). The caches are
NaN-poisoned before every call and the kernel's caches must equal the reference's bit for bit: a row
written that should not be (or not written that should) shows. Page sizes 1, 5, 16, 64; Hkv 1, 3, 8;
D 64, 128, 256; fp16 and bf16; int32 and int64 slot mappings; token counts that fill no CTA evenly;
-1 slots. Also: the Op picks the TileLang kernel and writes what a Python loop writes, out-of-range
slots with validate=False write nothing, row offsets past 2**31 elements, CUDA-graph replay of `run`
with new slot values written into the plan's slot mapping, and opcheck of the custom op.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator

import pytest
import torch

import tileprefill as tp
from tileprefill.context import DType, IndexDType, arch_of
from tileprefill.kernels import launch
from tileprefill.kernels.base import SlotAppendKernel, StaticFacts
from tileprefill.kernels.registry import ALL_KERNELS
from tileprefill.keys import SlotAppendKey

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

DEV = torch.device("cuda")
DTYPES = [torch.float16, torch.bfloat16]
INDEX_DTYPES = [torch.int32, torch.int64]
PAGE_SIZES = [1, 5, 16, 64]
KV_HEADS = [1, 3, 8]
HEAD_DIMS = [64, 128, 256]


@pytest.fixture(autouse=True)
def fresh_seed() -> Iterator[int]:
    seed = int(os.environ.get("TILEPREFILL_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed {seed} (replay with TILEPREFILL_SEED={seed})")
    random.seed(seed)
    torch.manual_seed(seed)
    yield seed


def kernels() -> tuple[SlotAppendKernel, SlotAppendKernel]:
    tl, ref = ALL_KERNELS[SlotAppendKey.TL](), ALL_KERNELS[SlotAppendKey.REF]()
    assert isinstance(tl, SlotAppendKernel) and isinstance(ref, SlotAppendKernel)
    return tl, ref


def facts(kv_heads: int, head_dim: int, dtype: torch.dtype, index_dtype: torch.dtype) -> StaticFacts:
    return StaticFacts(
        arch=arch_of(DEV),
        dtype=DType.of(dtype, argument="dtype"),
        heads=kv_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        index_dtype=IndexDType.of(index_dtype, argument="index_dtype"),
    )


def warm_up() -> None:
    """Every program this module builds (the conftest compiles them side by side first)."""
    tl, _ = kernels()
    for kv_heads, head_dim, dtype, index_dtype in itertools.product(
        KV_HEADS, HEAD_DIMS, DTYPES, INDEX_DTYPES
    ):
        tl.bind(facts(kv_heads, head_dim, dtype, index_dtype))
    for kv_heads, head_dim in ((2, 128), (8, 128), (4, 64)):
        for dtype, index_dtype in itertools.product(DTYPES, INDEX_DTYPES):
            tl.bind(facts(kv_heads, head_dim, dtype, index_dtype))


def poisoned(
    num_pages: int, page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> torch.Tensor:
    return torch.full((num_pages, page_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEV)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16)


def random_slots(tokens: int, num_rows: int, index_dtype: torch.dtype, skip: float = 0.2) -> torch.Tensor:
    """Distinct rows, some tokens -1 (skipped)."""
    slots = torch.randperm(num_rows, device=DEV)[:tokens]
    slots[torch.rand(tokens, device=DEV) < skip] = -1
    return slots.to(index_dtype)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("kv_heads", KV_HEADS)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_tl_matches_reference_bit_for_bit(
    page_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, index_dtype: torch.dtype
) -> None:
    tl, ref = kernels()
    for tokens in (1, random.randrange(2, 40), random.randrange(100, 700)):  # fills no CTA evenly
        num_pages = max(1, -(-tokens * 3 // (2 * page_size)))  # room for every token, and spare rows
        num_rows = num_pages * page_size
        tokens = min(tokens, num_rows)
        k_new = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
        v_new = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
        slots = random_slots(tokens, num_rows, index_dtype)
        k_got = poisoned(num_pages, page_size, kv_heads, head_dim, dtype)
        v_got = poisoned(num_pages, page_size, kv_heads, head_dim, dtype)
        k_want, v_want = k_got.clone(), v_got.clone()
        tl(k_new, v_new, k_got, v_got, slots)
        ref(k_new, v_new, k_want, v_want, slots)
        torch.cuda.synchronize()
        assert torch.equal(bits(k_got), bits(k_want)), (tokens, num_pages)
        assert torch.equal(bits(v_got), bits(v_want)), (tokens, num_pages)
        # The reference wrote exactly the rows of the kept tokens; every other row is still NaN.
        kept = int((slots >= 0).sum())
        assert int(k_got.view(num_rows, -1).isnan().all(dim=1).logical_not().sum()) == kept


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_uses_the_tl_kernel_and_writes_what_a_loop_writes(
    dtype: torch.dtype, index_dtype: torch.dtype
) -> None:
    tokens, num_pages, page_size, kv_heads, head_dim = 333, 30, 16, 8, 128
    op = tp.PagedCacheSlotAppend()
    k_new = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
    v_new = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
    slots = random_slots(tokens, num_pages * page_size, index_dtype)
    k_pages = poisoned(num_pages, page_size, kv_heads, head_dim, dtype)
    v_pages = poisoned(num_pages, page_size, kv_heads, head_dim, dtype)
    k_want, v_want = k_pages.clone(), v_pages.clone()
    for t, slot in enumerate(slots.tolist()):
        if slot >= 0:
            k_want[slot // page_size, slot % page_size] = k_new[t]
            v_want[slot // page_size, slot % page_size] = v_new[t]
    shape = tp.SlotAppendShape(tokens, page_size, kv_heads, head_dim, dtype, DEV)
    plan = op.plan(slots, shape=shape)
    assert plan.steps == (SlotAppendKey.TL,)
    plan.run(k_new, v_new, k_pages, v_pages)
    torch.cuda.synchronize()
    assert torch.equal(bits(k_pages), bits(k_want)) and torch.equal(bits(v_pages), bits(v_want))
    # A rejected call (a duplicate slot) leaves the caches as they were.
    before = k_pages.clone()
    bad = slots.clone()
    bad[1] = bad[0] = 7
    with pytest.raises(ValueError, match="slot_mapping: expected distinct slots"):
        op(k_new, v_new, k_pages, v_pages, bad)
    assert torch.equal(bits(k_pages), bits(before))


def test_out_of_range_slots_write_nothing_with_validate_off() -> None:
    _, ref = kernels()
    tokens, num_pages, page_size, kv_heads, head_dim = 200, 16, 16, 2, 128
    k_new = torch.randn(tokens, kv_heads, head_dim, dtype=torch.float16, device=DEV)
    v_new = torch.randn_like(k_new)
    slots = random_slots(tokens, num_pages * page_size, torch.int64)
    slots[::7] = num_pages * page_size + torch.arange(0, tokens, 7, device=DEV)  # past the cache
    slots[3::11] = -5
    slots[5] = 2**40  # no int32 truncation of an int64 slot
    k_got = poisoned(num_pages, page_size, kv_heads, head_dim, torch.float16)
    v_got = poisoned(num_pages, page_size, kv_heads, head_dim, torch.float16)
    k_want, v_want = k_got.clone(), v_got.clone()
    op = tp.PagedCacheSlotAppend(validate=False)
    op(k_new, v_new, k_got, v_got, slots)
    ref(k_new, v_new, k_want, v_want, slots)
    torch.cuda.synchronize()
    assert torch.equal(bits(k_got), bits(k_want)) and torch.equal(bits(v_got), bits(v_want))
    shape = tp.SlotAppendShape(tokens, page_size, kv_heads, head_dim, torch.float16, DEV)
    assert op.plan(slots, shape=shape).steps == (SlotAppendKey.TL,)


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_row_offsets_past_two_to_the_31_elements(index_dtype: torch.dtype) -> None:
    """8 KV heads of 128: a row is 1024 elements, so rows >= 2**21 start past 2**31 elements (4 GiB of
    fp16 per cache): the program must index in int64."""
    tl, _ = kernels()
    kv_heads, head_dim, page_size = 8, 128, 64
    num_pages = (2**21 + 2 * page_size) // page_size
    k_pages = torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=torch.float16, device=DEV)
    v_pages = torch.zeros_like(k_pages)
    rows = torch.tensor([2**21 - 1, 2**21, 2**21 + 1, num_pages * page_size - 1, 5], device=DEV)
    k_new = torch.randn(len(rows), kv_heads, head_dim, dtype=torch.float16, device=DEV)
    v_new = torch.randn_like(k_new)
    tl(k_new, v_new, k_pages, v_pages, rows.to(index_dtype))
    torch.cuda.synchronize()
    k_rows, v_rows = k_pages.view(-1, kv_heads, head_dim), v_pages.view(-1, kv_heads, head_dim)
    assert torch.equal(k_rows[rows], k_new) and torch.equal(v_rows[rows], v_new)
    # No other row was written (an int32 offset would wrap to another row, or out of the cache).
    assert int(k_rows.abs().sum(dim=(1, 2)).count_nonzero()) <= len(rows)
    assert int(v_rows.abs().sum(dim=(1, 2)).count_nonzero()) <= len(rows)
    del k_pages, v_pages
    torch.cuda.empty_cache()


def test_cuda_graph_replays_run_with_new_slots_in_the_plans_buffer() -> None:
    """Capture `run` once; each replay writes the new tokens at the slots copied into the plan's slot
    mapping (validate=False: the plan checks nothing, and no run reads device values on the host)."""
    _, ref = kernels()
    tokens, num_pages, page_size, kv_heads, head_dim, dtype = 77, 12, 16, 4, 64, torch.bfloat16
    num_rows = num_pages * page_size
    op = tp.PagedCacheSlotAppend(validate=False)
    slot_buffer = random_slots(tokens, num_rows, torch.int64)
    plan = op.plan(slot_buffer, shape=tp.SlotAppendShape(tokens, page_size, kv_heads, head_dim, dtype, DEV))
    assert plan.slot_mapping is slot_buffer
    k_new = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
    v_new = torch.randn_like(k_new)
    k_pages = poisoned(num_pages, page_size, kv_heads, head_dim, dtype)
    v_pages = poisoned(num_pages, page_size, kv_heads, head_dim, dtype)
    plan.run(k_new, v_new, k_pages, v_pages)  # compiled and loaded before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.run(k_new, v_new, k_pages, v_pages)
    for _ in range(3):
        plan.slot_mapping.copy_(random_slots(tokens, num_rows, torch.int64))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))
        k_pages.fill_(float("nan"))
        v_pages.fill_(float("nan"))
        k_want, v_want = k_pages.clone(), v_pages.clone()
        ref(k_new, v_new, k_want, v_want, plan.slot_mapping)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(bits(k_pages), bits(k_want)) and torch.equal(bits(v_pages), bits(v_want))


@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
def test_slot_append_opcheck(index_dtype: torch.dtype) -> None:
    """k_new, v_new, the caches as pages, slot_mapping, then the static facts: the caches are written;
    the direct launch a plan holds writes what the custom op writes, bit for bit."""
    op = launch.OPS[SlotAppendKey.TL]
    schema = torch.ops.tileprefill.slot_append_tl.default._schema
    written = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert written == {"k_pages", "v_pages"}
    f = facts(2, 128, torch.bfloat16, index_dtype)
    tokens, num_rows = 23, 64
    slots = random_slots(tokens, num_rows, index_dtype, skip=0.0)
    slots[5] = -1
    args = (
        torch.randn(tokens, 2, 128, dtype=torch.bfloat16, device=DEV),
        torch.randn(tokens, 2, 128, dtype=torch.bfloat16, device=DEV),
        torch.randn(num_rows, 1, 2, 128, dtype=torch.bfloat16, device=DEV),  # pages of one row
        torch.randn(num_rows, 1, 2, 128, dtype=torch.bfloat16, device=DEV),
        slots,
    )
    torch.library.opcheck(op, (*args, *launch.scalars(f)))
    direct = [t.clone() for t in args]
    tl, _ = kernels()
    tl.bind(f)(*direct)
    op(*args, *launch.scalars(f))
    torch.cuda.synchronize()
    assert torch.equal(bits(args[2]), bits(direct[2])) and torch.equal(bits(args[3]), bits(direct[3]))
