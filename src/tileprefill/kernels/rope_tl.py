"""TileLang RoPE kernels (NEOX and INTERLEAVED): one program for sm80 and sm90.

The program (`kernels/tl/rope.py`) rotates x (T, H, D) at one position per
token into a new tensor, one program for any H (q's heads and the keys' alike: it divides
its rows by H with the scalar parameters `scalar_params` gives); it launches through the one launch path
(`kernels/launch.py`), whose custom op `tileprefill::rope_<mode>_tl` is what
torch.compile traces. tilelang and the program factory are imported when a
program is first built: importing this module does not import tilelang.
"""

from __future__ import annotations

from typing import ClassVar, Final

import torch

from tileprefill.context import Arch, DType, arch_of
from tileprefill.kernels.base import Kernel, RopeKernel, RopeLaunch, StaticFacts
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.launch import KernelRecord, Launcher, Program, check_cuda, readable, register
from tileprefill.kernels.tl.fast_divide import Divisor, divisor
from tileprefill.keys import RopeKey


def program(key: RopeKey, facts: StaticFacts) -> Program:
    from tileprefill.kernels.tl.rope import rope_program

    # The head count is read from x at launch: q's and the keys' rotations are one program.
    args = (facts.head_dim, facts.rotary_dim, facts.dtype.value, key is RopeKey.INTERLEAVED_TL)
    return Program(rope_program, args, facts.arch)


def scalar_params(facts: StaticFacts) -> Divisor:
    """What the program divides its rows by, x's head count (`facts.heads`), as it takes it."""
    return divisor(facts.heads)


def _record(key: RopeKey) -> KernelRecord:
    return register(
        KernelRecord(
            key=key,
            tensors=("x", "positions", "cos", "sin", "out"),
            mutates=("out",),
            views=("x", "out"),
            program=lambda facts: program(key, facts),
            scalar_params=scalar_params,
        )
    )


RECORDS: Final[dict[RopeKey, KernelRecord]] = {
    key: _record(key) for key in (RopeKey.NEOX_TL, RopeKey.INTERLEAVED_TL)
}


def check_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> DType:
    """Metadata only (no host sync): what the program needs and TileLang would reject obscurely."""
    dtype = DType.of(x.dtype, argument="x")
    if x.dim() != 3:
        raise ValueError(f"x: expected 3 dims (T, H, D), got shape {tuple(x.shape)}")
    num_tokens, _, head_dim = x.shape
    if positions.dtype != torch.int32 or positions.shape != (num_tokens,):
        raise ValueError(
            f"positions: expected int32 of shape ({num_tokens},), "
            f"got {positions.dtype} {tuple(positions.shape)}"
        )
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dtype != torch.float32 or table.dim() != 2 or table.shape != cos.shape:
            raise ValueError(
                f"{name}: expected float32 of shape (max_position, rotary_dim // 2) = {tuple(cos.shape)}, "
                f"got {table.dtype} {tuple(table.shape)}"
            )
    if not 1 <= cos.shape[1] <= head_dim // 2:
        raise ValueError(
            f"cos: expected rotary_dim = 2 * cos.shape[1] in [2, head_dim={head_dim}], got {2 * cos.shape[1]}"
        )
    for name, tensor in (("positions", positions), ("cos", cos), ("sin", sin)):
        if tensor.device != x.device:
            raise ValueError(f"{name}: expected device {x.device} (that of x), got {tensor.device}")
    check_cuda("x", x)
    return dtype


class _RopeTLKernel(RopeKernel):
    def bind(self, facts: StaticFacts) -> RopeLaunch:
        launcher = Launcher.of(RECORDS[self.key], facts)
        heads = facts.heads

        def launch(
            x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor
        ) -> None:
            # The program divides x's rows by the head count it was bound with (its scalar
            # parameters), not by x's, which it cannot check itself.
            if x.shape[1] != heads:
                raise ValueError(
                    f"x: expected {heads} heads (what the launch was bound for), got {x.shape[1]}"
                )
            if out.numel() == 0:
                return  # an empty grid is not a valid launch
            launcher(x, positions, cos, sin, out)

        return launch

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """x (T, H, D) rotated at `positions` by cos/sin (P, R/2) into a new contiguous tensor; x is
        read in place where it is a view the program takes (`validation.check_view`), else copied."""
        dtype = check_rope(x, positions, cos, sin)
        _, heads, head_dim = x.shape
        facts = StaticFacts(
            arch=arch_of(x.device),
            dtype=dtype,
            heads=heads,
            kv_heads=heads,
            head_dim=head_dim,
            rotary_dim=2 * cos.shape[1],
        )
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        self.bind(facts)(readable(x), positions, cos, sin, out)
        return out


class RopeNeoxTLKernel(_RopeTLKernel):
    """Rotates halves: (x[:R/2], x[R/2:R])."""

    key: ClassVar[RopeKey] = RopeKey.NEOX_TL


class RopeInterleavedTLKernel(_RopeTLKernel):
    """Rotates adjacent pairs: (x[0:R:2], x[1:R:2])."""

    key: ClassVar[RopeKey] = RopeKey.INTERLEAVED_TL


KERNELS: tuple[type[Kernel], ...] = (RopeNeoxTLKernel, RopeInterleavedTLKernel)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """Representative static configs of every key above (the program is the same for every arch)."""
    configs = (  # key, head_dim, rotary_dim, dtype
        (RopeKey.NEOX_TL, 128, 128, DType.FP16),
        (RopeKey.NEOX_TL, 128, 64, DType.FP16),
        (RopeKey.NEOX_TL, 64, 64, DType.BF16),
        (RopeKey.INTERLEAVED_TL, 128, 128, DType.FP16),
        (RopeKey.INTERLEAVED_TL, 256, 64, DType.BF16),
    )
    cases = []
    for key, head_dim, rotary_dim, dtype in configs:
        # The head count is not an argument of the program (any value does here).
        facts = StaticFacts(
            arch=arch, dtype=dtype, heads=8, kv_heads=8, head_dim=head_dim, rotary_dim=rotary_dim
        )
        factory, args, _ = program(key, facts)
        label = f"{key.value}_d{head_dim}_r{rotary_dim}_{dtype.value}"
        cases.append(CompileCase(key=key, label=label, factory=factory, args=args))
    return tuple(cases)
