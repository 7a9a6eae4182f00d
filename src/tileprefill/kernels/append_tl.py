"""TileLang append kernels: new keys/values into a contiguous or a paged cache, sm80 and sm90.

Each launch is registered as a custom op that declares the two caches it
writes (`tileprefill::append_contiguous`, `tileprefill::append_paged`), so
torch.compile orders reads of the caches after it; eager calls skip the op's
dispatch, and CUDA graphs replay the launch like any other kernel. No host
syncs: the destination of every token is found on the device. tilelang and the
program factories are imported inside the launches only: importing this
module does not import tilelang.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tileprefill.context import Arch, DType
from tileprefill.kernels.base import ContiguousAppendKernel, Kernel, PagedAppendKernel
from tileprefill.kernels.compile import CompileCase, build
from tileprefill.kernels.rope_tl import ALIGNMENT_BYTES, aligned, device_arch, on_device
from tileprefill.keys import AppendKey

if TYPE_CHECKING:
    from tilelang import JITKernel


def _check_new(k_new: torch.Tensor, v_new: torch.Tensor, dims: int) -> DType:
    dtype = DType.of(k_new.dtype, argument="k_new")
    if k_new.dim() != dims:
        raise ValueError(f"k_new: expected {dims} dims, got shape {tuple(k_new.shape)}")
    if v_new.shape != k_new.shape or v_new.dtype != k_new.dtype or v_new.device != k_new.device:
        raise ValueError(
            f"v_new: expected {k_new.dtype} {tuple(k_new.shape)} on {k_new.device} (like k_new), "
            f"got {v_new.dtype} {tuple(v_new.shape)} on {v_new.device}"
        )
    return dtype


def _check_caches(new: torch.Tensor, caches: dict[str, torch.Tensor], batch: int | None) -> None:
    """Metadata only (no host sync). The caches are written in place, so unlike the inputs
    they cannot be copied into a layout the program reads: they must come contiguous and aligned."""
    first = next(iter(caches.values()))
    for name, cache in caches.items():
        if cache.dim() != 4 or cache.dtype != new.dtype or cache.device != new.device:
            raise ValueError(
                f"{name}: expected a 4-dim {new.dtype} tensor on {new.device} (like k_new), "
                f"got {cache.dtype} {tuple(cache.shape)} on {cache.device}"
            )
        if cache.shape != first.shape or cache.shape[2:] != new.shape[-2:]:
            raise ValueError(
                f"{name}: expected (Hkv, D) = {tuple(new.shape[-2:])} (that of k_new) and the shape of every "
                f"cache, got {tuple(cache.shape)}"
            )
        if batch is not None and cache.shape[0] != batch:
            raise ValueError(
                f"{name}: expected batch {batch} (that of k_new), got shape {tuple(cache.shape)}"
            )
        if not cache.is_contiguous() or cache.data_ptr() % ALIGNMENT_BYTES:
            raise ValueError(
                f"{name}: expected a contiguous tensor whose data is {ALIGNMENT_BYTES}-byte aligned, "
                f"got strides {cache.stride()} at address {cache.data_ptr():#x}"
            )


def _check_cuda(k_new: torch.Tensor) -> None:
    """Last, so that the checks before it also run (and are tested) on CPU tensors."""
    if not k_new.is_cuda:
        raise ValueError(f"k_new: expected a CUDA tensor for the TileLang kernel, got device {k_new.device}")


def _check_int32(name: str, tensor: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if tensor.dtype != torch.int32 or tensor.shape != shape or tensor.device != device:
        raise ValueError(
            f"{name}: expected int32 of shape {shape} on {device}, "
            f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        )


def _contiguous_kernel(num_kv_heads: int, head_dim: int, dtype: DType, arch: Arch) -> JITKernel:
    """The compiled program of one static config (cached by `build`; not here, so that a
    warm-up under `recording_builds` leaves nothing behind)."""
    from tileprefill.kernels.tl.append import append_contiguous_program

    return build(append_contiguous_program, (num_kv_heads, head_dim, dtype.value), None, arch)


def _paged_kernel(num_kv_heads: int, head_dim: int, page_size: int, dtype: DType, arch: Arch) -> JITKernel:
    from tileprefill.kernels.tl.append import append_paged_program

    return build(append_paged_program, (num_kv_heads, head_dim, page_size, dtype.value), None, arch)


def append_contiguous(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
) -> None:
    """k_new/v_new (B, S, Hkv, D) into k_cache/v_cache (B, S_max, Hkv, D) at rows cache_seqlens[b] + i."""
    dtype = _check_new(k_new, v_new, dims=4)
    batch, new_len, num_kv_heads, head_dim = k_new.shape
    _check_caches(k_new, {"k_cache": k_cache, "v_cache": v_cache}, batch)
    _check_int32("cache_seqlens", cache_seqlens, (batch,), k_new.device)
    _check_cuda(k_new)
    if batch == 0 or new_len == 0:
        return  # nothing to write, and an empty grid is not a valid launch
    kernel = _contiguous_kernel(num_kv_heads, head_dim, dtype, device_arch(k_new.device))
    with on_device(k_new.device):
        kernel(aligned(k_new), aligned(v_new), k_cache, v_cache, cache_seqlens.contiguous())


#: `append_contiguous` as a custom op that writes the two caches: what torch.compile traces.
append_contiguous_op = torch.library.custom_op(
    "tileprefill::append_contiguous", append_contiguous, mutates_args=("k_cache", "v_cache")
)


@append_contiguous_op.register_fake
def _append_contiguous_fake(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
) -> None:
    return None


def append_paged(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
) -> None:
    """Token t = cu_seqlens_q[b] + i of k_new/v_new (T, Hkv, D) goes to position p = cache_seqlens[b] + i
    of k_pages/v_pages (num_pages, page_size, Hkv, D): page block_table[b, p // page_size], row
    p % page_size."""
    dtype = _check_new(k_new, v_new, dims=3)
    _check_caches(k_new, {"k_pages": k_pages, "v_pages": v_pages}, None)
    batch, max_pages = block_table.shape if block_table.dim() == 2 else (-1, -1)  # -1: never matches
    _check_int32("block_table", block_table, (batch, max_pages), k_new.device)
    _check_int32("cache_seqlens", cache_seqlens, (batch,), k_new.device)
    _check_int32("cu_seqlens_q", cu_seqlens_q, (batch + 1,), k_new.device)
    _check_cuda(k_new)
    num_tokens, num_kv_heads, head_dim = k_new.shape
    if num_tokens == 0 or batch == 0 or k_pages.shape[0] == 0:
        return  # nothing to write, and an empty grid is not a valid launch
    kernel = _paged_kernel(num_kv_heads, head_dim, k_pages.shape[1], dtype, device_arch(k_new.device))
    with on_device(k_new.device):
        kernel(
            aligned(k_new),
            aligned(v_new),
            k_pages,
            v_pages,
            block_table.contiguous(),
            cache_seqlens.contiguous(),
            cu_seqlens_q.contiguous(),
        )


#: `append_paged` as a custom op that writes the two caches: what torch.compile traces.
append_paged_op = torch.library.custom_op(
    "tileprefill::append_paged", append_paged, mutates_args=("k_pages", "v_pages")
)


@append_paged_op.register_fake
def _append_paged_fake(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
) -> None:
    return None


class AppendContiguousTLKernel(ContiguousAppendKernel):
    key = AppendKey.CONTIGUOUS_TL

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> None:
        # Eager calls (CUDA-graph capture included) skip the custom-op dispatch (see rope_tl).
        launch = append_contiguous_op if torch.compiler.is_compiling() else append_contiguous
        launch(k_new, v_new, k_cache, v_cache, cache_seqlens)


class AppendPagedTLKernel(PagedAppendKernel):
    key = AppendKey.PAGED_TL

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> None:
        launch = append_paged_op if torch.compiler.is_compiling() else append_paged
        launch(k_new, v_new, k_pages, v_pages, block_table, cache_seqlens, cu_seqlens_q)


KERNELS: tuple[type[Kernel], ...] = (AppendContiguousTLKernel, AppendPagedTLKernel)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """Representative static configs of every key above (the programs are the same for every arch)."""
    from tileprefill.kernels.tl.append import append_contiguous_program, append_paged_program

    contiguous = tuple(
        CompileCase(
            key=AppendKey.CONTIGUOUS_TL,
            label=f"{AppendKey.CONTIGUOUS_TL.value}_hkv{heads}_d{head_dim}_{dtype.value}",
            factory=append_contiguous_program,
            args=(heads, head_dim, dtype.value),
            out_idx=None,
        )
        for heads, head_dim, dtype in ((8, 128, DType.FP16), (4, 64, DType.BF16))
    )
    paged = tuple(
        CompileCase(
            key=AppendKey.PAGED_TL,
            label=f"{AppendKey.PAGED_TL.value}_hkv{heads}_d{head_dim}_p{page_size}_{dtype.value}",
            factory=append_paged_program,
            args=(heads, head_dim, page_size, dtype.value),
            out_idx=None,
        )
        for heads, head_dim, page_size, dtype in (
            (8, 128, 1, DType.FP16),
            (8, 128, 16, DType.BF16),
            (2, 256, 5, DType.FP16),
        )
    )
    return (*contiguous, *paged)
