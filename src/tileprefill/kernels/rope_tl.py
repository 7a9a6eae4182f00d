"""TileLang RoPE kernels (NEOX and INTERLEAVED): one program for sm80 and sm90.

The launch is registered as the custom op `tileprefill::rope` (no mutation,
with a fake implementation), so torch.compile traces it as one opaque node
returning a new tensor; eager calls skip the op's dispatch. tilelang and the
program factory are imported inside the launch only: importing this module
does not import tilelang. The helpers here (`device_arch`, `on_device`,
`aligned`) serve the append kernels too.
"""

from __future__ import annotations

import contextlib
import functools
from typing import TYPE_CHECKING, ClassVar

import torch

from tileprefill.context import Arch, DType
from tileprefill.kernels.base import Kernel, RopeKernel
from tileprefill.kernels.compile import CompileCase, build
from tileprefill.keys import RopeKey

if TYPE_CHECKING:
    from tilelang import JITKernel

#: TileLang reads x and cos/sin in 16-byte vectors.
ALIGNMENT_BYTES = 16


@functools.cache
def device_arch(device: torch.device) -> Arch:
    """The arch a TileLang kernel for `device` is compiled for (read once per device)."""
    return Arch.of_device(device)


def on_device(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """TileLang launches on the current CUDA device: switch to `device` only when it is another."""
    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if it is contiguous and 16-byte aligned, else such a copy of it (for inputs only)."""
    if tensor.is_contiguous() and tensor.data_ptr() % ALIGNMENT_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _check_rope(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> DType:
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
    if not x.is_cuda:  # last, so that the checks above also run (and are tested) on CPU tensors
        raise ValueError(f"x: expected a CUDA tensor for the TileLang kernel, got device {x.device}")
    return dtype


def _kernel(
    num_heads: int, head_dim: int, rotary_dim: int, dtype: DType, interleaved: bool, arch: Arch
) -> JITKernel:
    """The compiled program of one static config (cached by `build`; not here, so that a
    warm-up under `recording_builds` leaves nothing behind)."""
    from tileprefill.kernels.tl.rope import rope_program

    return build(rope_program, (num_heads, head_dim, rotary_dim, dtype.value, interleaved), None, arch)


def rope(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """x (T, H, D) rotated at `positions` by cos/sin (P, R/2) into a new contiguous tensor."""
    dtype = _check_rope(x, positions, cos, sin)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out  # an empty grid is not a valid launch
    _, num_heads, head_dim = x.shape
    kernel = _kernel(num_heads, head_dim, 2 * cos.shape[1], dtype, interleaved, device_arch(x.device))
    with on_device(x.device):
        kernel(aligned(x), positions.contiguous(), aligned(cos), aligned(sin), out)
    return out


#: `rope` as the custom op `tileprefill::rope`: what torch.compile traces (see `_RopeTLKernel`).
rope_op = torch.library.custom_op("tileprefill::rope", rope, mutates_args=())


@rope_op.register_fake
def _rope_fake(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


class _RopeTLKernel(RopeKernel):
    interleaved: ClassVar[bool]

    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            out: torch.Tensor = rope_op(x, positions, cos, sin, self.interleaved)
            return out
        # Eager (CUDA-graph capture included): the same function without the custom-op
        # dispatch, which cost 5-20 us of host time a call on an H100 host.
        return rope(x, positions, cos, sin, self.interleaved)


class RopeNeoxTLKernel(_RopeTLKernel):
    """Rotates halves: (x[:R/2], x[R/2:R])."""

    key = RopeKey.NEOX_TL
    interleaved = False


class RopeInterleavedTLKernel(_RopeTLKernel):
    """Rotates adjacent pairs: (x[0:R:2], x[1:R:2])."""

    key = RopeKey.INTERLEAVED_TL
    interleaved = True


KERNELS: tuple[type[Kernel], ...] = (RopeNeoxTLKernel, RopeInterleavedTLKernel)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """Representative static configs of every key above (the program is the same for every arch)."""
    from tileprefill.kernels.tl.rope import rope_program

    configs = (  # key, heads, head_dim, rotary_dim, dtype
        (RopeKey.NEOX_TL, 32, 128, 128, DType.FP16),
        (RopeKey.NEOX_TL, 8, 128, 64, DType.FP16),
        (RopeKey.NEOX_TL, 8, 64, 64, DType.BF16),
        (RopeKey.INTERLEAVED_TL, 32, 128, 128, DType.FP16),
        (RopeKey.INTERLEAVED_TL, 8, 256, 64, DType.BF16),
    )
    return tuple(
        CompileCase(
            key=key,
            label=f"{key.value}_h{heads}_d{head_dim}_r{rotary_dim}_{dtype.value}",
            factory=rope_program,
            args=(heads, head_dim, rotary_dim, dtype.value, key is RopeKey.INTERLEAVED_TL),
            out_idx=None,
        )
        for key, heads, head_dim, rotary_dim, dtype in configs
    )
