"""TileLang RoPE + append kernels: q rotated into a new tensor, new keys rotated and written with the
new values into any cache, in one launch (sm80 and sm90: one program).

The program (`kernels/tl/rope_append.py`) writes by slot: the plan computes one
int32 slot per new token once per batch (`positions.paged_slots`,
`positions.contiguous_slots`: row slot % rows of block slot // rows of the 4-D
cache, a strided view), so the program depends on neither the page size nor
the cache layout. It launches through
the one launch path (`kernels/launch.py`); its custom op declares q_out and
the two caches as written.
"""

from __future__ import annotations

from typing import ClassVar, Final

import torch

from tileprefill.context import Arch, DType
from tileprefill.kernels.base import Kernel, RopeAppendKernel, RopeAppendLaunch, StaticFacts
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.launch import KernelRecord, Launcher, Program, register
from tileprefill.keys import RopeAppendKey


def program(key: RopeAppendKey, facts: StaticFacts) -> Program:
    from tileprefill.kernels.tl.rope_append import rope_append_program

    args = (
        facts.heads,
        facts.kv_heads,
        facts.head_dim,
        facts.rotary_dim,
        facts.dtype.value,
        key is RopeAppendKey.INTERLEAVED_TL,
    )
    return Program(rope_append_program, args, facts.arch)


def _record(key: RopeAppendKey) -> KernelRecord:
    return register(
        KernelRecord(
            key=key,
            tensors=(
                "q",
                "k_new",
                "v_new",
                "positions",
                "slots",
                "cos",
                "sin",
                "k_cache",
                "v_cache",
                "q_out",
            ),
            mutates=("k_cache", "v_cache", "q_out"),
            views=("q", "k_new", "v_new", "k_cache", "v_cache", "q_out"),
            program=lambda facts: program(key, facts),
        )
    )


RECORDS: Final[dict[RopeAppendKey, KernelRecord]] = {key: _record(key) for key in RopeAppendKey}


class _RopeAppendTLKernel(RopeAppendKernel):
    def bind(self, facts: StaticFacts) -> RopeAppendLaunch:
        launcher = Launcher.of(RECORDS[self.key], facts)

        def launch(
            q: torch.Tensor,
            k_new: torch.Tensor,
            v_new: torch.Tensor,
            positions: torch.Tensor,
            slots: torch.Tensor,
            cos: torch.Tensor,
            sin: torch.Tensor,
            k_cache: torch.Tensor,
            v_cache: torch.Tensor,
            q_out: torch.Tensor,
        ) -> None:
            if q.shape[0] == 0:
                return  # nothing to rotate or write, and an empty grid is not a valid launch
            launcher(
                q,
                k_new,
                v_new,
                positions,
                slots,
                cos,
                sin,
                k_cache,
                v_cache,
                q_out,
            )

        return launch


class RopeAppendNeoxTLKernel(_RopeAppendTLKernel):
    """NEOX RoPE (halves) of q and the new keys, and their write with the new values by slot."""

    key: ClassVar[RopeAppendKey] = RopeAppendKey.NEOX_TL


class RopeAppendInterleavedTLKernel(_RopeAppendTLKernel):
    """INTERLEAVED RoPE (adjacent pairs) of q and the new keys, and their write by slot."""

    key: ClassVar[RopeAppendKey] = RopeAppendKey.INTERLEAVED_TL


KERNELS: tuple[type[Kernel], ...] = (RopeAppendNeoxTLKernel, RopeAppendInterleavedTLKernel)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """Representative static configs of every key above (the program is the same for every arch)."""
    configs = (  # key, heads, kv heads, head dim, rotary dim, dtype
        (RopeAppendKey.NEOX_TL, 32, 8, 128, 128, DType.BF16),
        (RopeAppendKey.NEOX_TL, 16, 1, 64, 32, DType.FP16),
        (RopeAppendKey.INTERLEAVED_TL, 8, 8, 256, 64, DType.FP16),
    )
    cases = []
    for key, heads, kv_heads, head_dim, rotary_dim, dtype in configs:
        facts = StaticFacts(
            arch=arch, dtype=dtype, heads=heads, kv_heads=kv_heads, head_dim=head_dim, rotary_dim=rotary_dim
        )
        factory, args, _ = program(key, facts)
        label = f"{key.value}_h{heads}_hkv{kv_heads}_d{head_dim}_r{rotary_dim}_{dtype.value}"
        cases.append(CompileCase(key=key, label=label, factory=factory, args=args))
    return tuple(cases)
