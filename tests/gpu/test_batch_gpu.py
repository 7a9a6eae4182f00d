"""The TileLang batch kernel (`batch_paged_tl`) against the torch reference (`batch_paged_ref`).

Fresh random batches every run: zero-length sequences, one token, page sizes from 1
up, block tables padded with -1 and with entries past the pool, positions past the
table (slot -1), and no new token at all. Outputs are poisoned first, so a value the
kernel does not write shows up.
"""

from __future__ import annotations

import random

import pytest
import torch

from tileprefill.context import Arch, DType
from tileprefill.kernels.base import StaticFacts
from tileprefill.kernels.batch_tl import BatchPagedTLKernel
from tileprefill.kernels.reference import BatchPagedRefKernel

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

DEV = torch.device("cuda")
PAGE_SIZES = (1, 5, 16, 64)


def warm_up() -> None:
    """The programs the tests below build (run under `recording_builds` by `compiled_programs`)."""
    for page_size in PAGE_SIZES:
        facts = StaticFacts(
            arch=Arch.of_device(DEV), dtype=DType.FP16, heads=1, kv_heads=1, head_dim=1, page_size=page_size
        )
        BatchPagedTLKernel().bind(facts)


def batch(q_lens: list[int], cached: list[int], page_size: int) -> tuple[torch.Tensor, ...]:
    """A block table with room for most sequences (some rows cut short), -1 padding and stray entries."""
    width = max(1, max(-(-(c + n) // page_size) for c, n in zip(cached, q_lens, strict=True)))
    table = torch.randint(0, 50, (len(q_lens), width), dtype=torch.int32)
    table[table % 7 == 0] = -1  # unused or missing pages
    table[table % 11 == 0] = 1000  # past any pool: the slot lands past the cache
    if len(q_lens) > 1:
        table[1, width // 2 :] = -1  # a sequence whose later positions have no page
    cu = torch.tensor([0, *[sum(q_lens[: i + 1]) for i in range(len(q_lens))]], dtype=torch.int32)
    return table.to(DEV), torch.tensor(cached, dtype=torch.int32, device=DEV), cu.to(DEV)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_batch_kernel_matches_the_reference(page_size: int) -> None:
    for _ in range(4):
        q_lens = [random.choice([0, 1, 3, 17, 130]) for _ in range(random.randint(1, 9))]
        cached = [random.randint(0, 300) for _ in q_lens]
        table, cache_seqlens, cu = batch(q_lens, cached, page_size)
        tokens = sum(q_lens)
        expected = BatchPagedRefKernel()(table, cache_seqlens, cu, tokens=tokens, page_size=page_size)
        outputs = [torch.full_like(t, -12345) for t in expected]
        facts = StaticFacts(
            arch=Arch.of_device(DEV), dtype=DType.FP16, heads=1, kv_heads=1, head_dim=1, page_size=page_size
        )
        BatchPagedTLKernel().bind(facts)(table, cache_seqlens, cu, *outputs)
        for name, got, want in zip(("positions", "slots", "kv_seqlens"), outputs, expected, strict=True):
            assert torch.equal(got, want), (name, q_lens, cached, got, want)
