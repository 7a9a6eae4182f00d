"""`return_lse=True` on CUDA (TileLang kernels): split-KV merges and every Op against the reference.

Cascade attention with the public Ops: each sequence's keys split into a shared prefix (attended
non-causally) and the rest (causally), the two partial results merged by their LSEs, match the
causal call over all keys, for the four read-only layouts (the paged cache at a tiled and an
untiled page size), fp16 and bf16, with unaligned lengths, an empty query chunk and an empty
prefix. Fresh random inputs every run; the allocator is poisoned with NaN before each call, and
`run_into` writes into NaN-filled buffers, so an element a kernel forgets shows up as NaN. Every
public Op with the LSE is also checked against the same Op on CPU (reference kernels).

The builders and the merge are tests/test_lse.py's (its CPU tests run the same merge on the
reference kernels). Run with `nox -s gpu` or `python -m pytest -m gpu tests/gpu/test_lse_gpu.py`;
the programs compile side by side first (`warm_up`, run by conftest's `compiled_programs`).
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, cast

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

import tileprefill as tp  # noqa: E402

# The CPU module (tests/ is on sys.path through its conftest) holds the builders and the merge.
from test_lse import (  # noqa: E402
    READ_ONLY,
    case_of,
    cloned,
    lse_op,
    split_and_merge,
)
from tileprefill.ops import PUBLIC_OPS, OpClass  # noqa: E402

if TYPE_CHECKING:
    from conftest import Oracle

DEV = torch.device("cuda")
HEADS, KV_HEADS, HEAD_DIM = 8, 2, 128
DTYPES = [torch.float16, torch.bfloat16]
#: Max abs error of a merged output against the whole call's: each part is rounded to its dtype.
OUT_ERR = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
#: Max abs error of an LSE (natural-log units) against the reference's or the whole call's.
LSE_ERR = 2e-2


def poison_allocator() -> None:
    """Fill recently freed device memory with NaN so an unwritten output element is NaN."""
    blob = torch.full((64 << 20,), float("nan"), dtype=torch.float16, device=DEV)
    del blob


def merge_lengths(op_cls: OpClass) -> tuple[list[int], list[int], list[int]]:
    """(q_lens, kv_lens, splits): unaligned to every tile; split <= kv_len - q_len (the prefix is
    fully visible); a split of 0 (empty prefix, LSE -inf) and an empty query chunk."""
    if op_cls.kv_layout is tp.KVLayout.NONE and not op_cls.ragged:
        return [130, 130], [401, 401], [150, 150]
    if op_cls.kv_layout is tp.KVLayout.CONTIGUOUS:
        return [67, 67, 67], [300, 67, 257], [200, 0, 100]
    return [37, 0, 200, 5], [300, 20, 200, 513], [100, 20, 0, 256]


MERGE_CASES = [
    (op_cls, page_size)
    for op_cls in READ_ONLY
    for page_size in ((16, 5) if op_cls.kv_layout is tp.KVLayout.PAGED else (0,))
]


def _merge_call(
    op_cls: OpClass, page_size: int, dtype: torch.dtype, seed: int
) -> tuple[tp.OutputAndLSE, tuple[torch.Tensor, torch.Tensor]]:
    """(the whole call, the merged parts) on fresh random inputs of `seed`."""
    gen = torch.Generator().manual_seed(seed)
    q_lens, kv_lens, splits = merge_lengths(op_cls)
    qs = [torch.randn(n, HEADS, HEAD_DIM, generator=gen).to(dtype) for n in q_lens]
    ks = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for n in kv_lens]
    vs = [torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen).to(dtype) for n in kv_lens]
    # page_size is read by the paged layout only.
    pages = page_size if page_size else 16
    return split_and_merge(op_cls, qs, ks, vs, splits, random.Random(seed), DEV, pages, poison_allocator)


def warm_up() -> None:
    """One pass over every workload (conftest's `compiled_programs` records the builds, then compiles
    them side by side)."""
    from conftest import Oracle

    for (op_cls, page_size), dtype in ((c, d) for c in MERGE_CASES for d in DTYPES):
        _merge_call(op_cls, page_size, dtype, 0)
    for op_cls in PUBLIC_OPS:
        case = case_of(op_cls, Oracle(), torch.Generator().manual_seed(0))
        lse_op(op_cls)(*[t.to(DEV) for t in case.inputs.values()])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("op_cls", "page_size"),
    MERGE_CASES,
    ids=[f"{c.__name__}{f'-page{p}' if p else ''}" for c, p in MERGE_CASES],
)
def test_split_kv_merge_matches_the_whole(op_cls: OpClass, page_size: int, dtype: torch.dtype) -> None:
    """Cascade attention on the TileLang kernels: the shared prefix (non-causal) and the rest
    (causal), merged with the two LSEs, is the causal call over all keys."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    (out, lse), (merged_out, merged_lse) = _merge_call(op_cls, page_size, dtype, seed)
    torch.cuda.synchronize()
    assert not out.isnan().any() and not lse.isnan().any(), "NaN: an element was not written"
    assert bool(torch.isneginf(lse).sum() == 0), "every query sees a key of its own sequence here"
    torch.testing.assert_close(merged_lse, lse, rtol=0, atol=1e-3)
    torch.testing.assert_close(merged_out, out.float(), rtol=0, atol=OUT_ERR[dtype])


@pytest.mark.parametrize("op_cls", PUBLIC_OPS, ids=lambda c: c.__name__)
def test_every_op_matches_the_reference(oracle: Oracle, gen: torch.Generator, op_cls: OpClass) -> None:
    """Every public Op with the LSE on CUDA against the same Op on CPU: the LSE within LSE_ERR, -inf
    exactly where the reference has it; `run_into` writes NaN-filled (out, lse) buffers whole, the
    same bits as the one-shot call."""
    case = case_of(op_cls, oracle, gen)
    want_out, want_lse = lse_op(op_cls)(*cloned(case.inputs).values())
    on_device = {name: t.to(DEV) for name, t in case.inputs.items()}
    into_inputs = {name: t.clone() for name, t in on_device.items()}
    poison_allocator()
    out, lse = lse_op(op_cls)(*on_device.values())
    plan = cast(Any, oracle.plan_of(cast(Any, lse_op(op_cls)), op_cls, list(into_inputs.values())))
    buffers = (torch.full_like(out, float("nan")), torch.full_like(lse, float("nan")))
    plan.run_into(buffers, *[into_inputs[s.name] for s in op_cls.run_specs])
    torch.cuda.synchronize()
    assert (lse.dtype, lse.shape) == (torch.float32, out.shape[:-1])
    assert not lse.isnan().any() and not out.isnan().any(), "NaN: an element was not written"
    assert torch.equal(buffers[0], out) and torch.equal(buffers[1], lse), "run_into differs from the call"
    lse_cpu = lse.cpu()
    assert torch.equal(torch.isneginf(lse_cpu), torch.isneginf(want_lse))
    seen = torch.isfinite(want_lse)
    torch.testing.assert_close(lse_cpu[seen], want_lse[seen], rtol=0, atol=LSE_ERR)
    torch.testing.assert_close(out.cpu().float(), want_out.float(), rtol=0, atol=OUT_ERR[out.dtype])
