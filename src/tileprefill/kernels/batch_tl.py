"""TileLang batch kernel: what a paged append batch's layers share, derived in one launch per plan.

The program (`kernels/tl/batch.py`) computes each new token's position and cache
slot and each sequence's kv length from the block table and lengths; it
launches through the one launch path (`kernels/launch.py`). One program for
sm80 and sm90.
"""

from __future__ import annotations

from typing import ClassVar, Final

import torch

from tileprefill.context import Arch, DType, arch_of
from tileprefill.kernels.base import Kernel, PagedBatchKernel, PagedBatchLaunch, StaticFacts
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.launch import KernelRecord, Launcher, Program, check_cuda, register
from tileprefill.keys import BatchKey


def program(key: BatchKey, facts: StaticFacts) -> Program:
    from tileprefill.kernels.tl.batch import paged_batch_program

    return Program(paged_batch_program, (facts.page_size,), facts.arch)


RECORDS: Final[dict[BatchKey, KernelRecord]] = {
    BatchKey.PAGED_TL: register(
        KernelRecord(
            key=BatchKey.PAGED_TL,
            tensors=("block_table", "cache_seqlens", "cu_seqlens_q", "positions", "slots", "kv_seqlens"),
            mutates=("positions", "slots", "kv_seqlens"),
            program=lambda facts: program(BatchKey.PAGED_TL, facts),
        )
    )
}


class BatchPagedTLKernel(PagedBatchKernel):
    key: ClassVar[BatchKey] = BatchKey.PAGED_TL

    def bind(self, facts: StaticFacts) -> PagedBatchLaunch:
        launcher = Launcher.of(RECORDS[self.key], facts)

        def launch(
            block_table: torch.Tensor,
            cache_seqlens: torch.Tensor,
            cu_seqlens_q: torch.Tensor,
            positions: torch.Tensor,
            slots: torch.Tensor,
            kv_seqlens: torch.Tensor,
        ) -> None:
            if block_table.shape[0] == 0:
                return  # no sequence, no token: nothing to derive
            launcher(block_table, cache_seqlens, cu_seqlens_q, positions, slots, kv_seqlens)

        return launch

    def __call__(
        self,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        tokens: int,
        page_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        check_cuda("block_table", block_table)
        device = block_table.device
        positions = torch.empty(tokens, dtype=torch.int32, device=device)
        slots = torch.empty(tokens, dtype=torch.int32, device=device)
        kv_seqlens = torch.empty(block_table.shape[0], dtype=torch.int32, device=device)
        facts = StaticFacts(
            arch=arch_of(device), dtype=DType.FP16, heads=1, kv_heads=1, head_dim=1, page_size=page_size
        )
        self.bind(facts)(block_table, cache_seqlens, cu_seqlens_q, positions, slots, kv_seqlens)
        return positions, slots, kv_seqlens


KERNELS: tuple[type[Kernel], ...] = (BatchPagedTLKernel,)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """Page sizes 1, 16 and a non-power-of-two (the program is the same for every arch)."""
    cases = []
    for page_size in (1, 16, 48):
        facts = StaticFacts(arch=arch, dtype=DType.FP16, heads=1, kv_heads=1, head_dim=1, page_size=page_size)
        factory, args, _ = program(BatchKey.PAGED_TL, facts)
        label = f"{BatchKey.PAGED_TL.value}_p{page_size}"
        cases.append(CompileCase(key=BatchKey.PAGED_TL, label=label, factory=factory, args=args))
    return tuple(cases)
