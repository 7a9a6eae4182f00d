"""TileLang append kernels: new keys/values into a contiguous or a paged cache, sm80 and sm90.

Each program (`kernels/tl/append.py`) launches through the one launch path
(`kernels/launch.py`), whose custom op (`tileprefill::append_contiguous_tl`,
`tileprefill::append_paged_tl`) declares the two caches it writes, so
torch.compile orders reads of the caches after it. No host syncs: the
destination of every token is found on the device. tilelang and the program
factories are imported when a program is first built.
"""

from __future__ import annotations

from typing import ClassVar, Final

import torch

from tileprefill.context import Arch, DType, arch_of
from tileprefill.kernels.base import (
    ContiguousAppendKernel,
    ContiguousAppendLaunch,
    Kernel,
    PagedAppendKernel,
    PagedAppendLaunch,
    StaticFacts,
)
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.launch import (
    KernelRecord,
    Launcher,
    Program,
    check_cuda,
    readable,
    register,
)
from tileprefill.keys import AppendKey
from tileprefill.validation import check_same_strides, check_view


def program(key: AppendKey, facts: StaticFacts) -> Program:
    from tileprefill.kernels.tl.append import append_contiguous_program, append_paged_program

    if key is AppendKey.PAGED_TL:
        args = (facts.kv_heads, facts.head_dim, facts.page_size, facts.dtype.value)
        return Program(append_paged_program, args, facts.arch)
    return Program(append_contiguous_program, (facts.kv_heads, facts.head_dim, facts.dtype.value), facts.arch)


RECORDS: Final[dict[AppendKey, KernelRecord]] = {
    AppendKey.CONTIGUOUS_TL: register(
        KernelRecord(
            key=AppendKey.CONTIGUOUS_TL,
            tensors=("k_new", "v_new", "k_cache", "v_cache", "cache_seqlens"),
            mutates=("k_cache", "v_cache"),
            views=("k_new", "v_new", "k_cache", "v_cache"),
            program=lambda facts: program(AppendKey.CONTIGUOUS_TL, facts),
        )
    ),
    AppendKey.PAGED_TL: register(
        KernelRecord(
            key=AppendKey.PAGED_TL,
            tensors=("k_new", "v_new", "k_pages", "v_pages", "block_table", "cache_seqlens", "cu_seqlens_q"),
            mutates=("k_pages", "v_pages"),
            views=("k_new", "v_new", "k_pages", "v_pages"),
            program=lambda facts: program(AppendKey.PAGED_TL, facts),
        )
    ),
}


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
    they cannot be copied into a layout the program reads: they must be views it writes through
    (`validation.check_view`), with the same strides."""
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
        check_view(name, cache)
    check_same_strides(caches)


def _check_int32(name: str, tensor: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if tensor.dtype != torch.int32 or tensor.shape != shape or tensor.device != device:
        raise ValueError(
            f"{name}: expected int32 of shape {shape} on {device}, "
            f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}"
        )


def _facts(k_new: torch.Tensor, dtype: DType, page_size: int) -> StaticFacts:
    kv_heads, head_dim = k_new.shape[-2], k_new.shape[-1]
    return StaticFacts(
        arch=arch_of(k_new.device),
        dtype=dtype,
        heads=kv_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        page_size=page_size,
    )


class AppendContiguousTLKernel(ContiguousAppendKernel):
    key: ClassVar[AppendKey] = AppendKey.CONTIGUOUS_TL

    def bind(self, facts: StaticFacts) -> ContiguousAppendLaunch:
        launcher = Launcher.of(RECORDS[self.key], facts)

        def launch(
            k_new: torch.Tensor,
            v_new: torch.Tensor,
            k_cache: torch.Tensor,
            v_cache: torch.Tensor,
            cache_seqlens: torch.Tensor,
        ) -> None:
            if k_new.shape[0] == 0 or k_new.shape[1] == 0:
                return  # nothing to write, and an empty grid is not a valid launch
            launcher(k_new, v_new, k_cache, v_cache, cache_seqlens)

        return launch

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> None:
        """k_new/v_new (B, S, Hkv, D) into k_cache/v_cache (B, S_max, Hkv, D) at rows cache_seqlens[b] + i."""
        dtype = _check_new(k_new, v_new, dims=4)
        _check_caches(k_new, {"k_cache": k_cache, "v_cache": v_cache}, k_new.shape[0])
        _check_int32("cache_seqlens", cache_seqlens, (k_new.shape[0],), k_new.device)
        check_cuda("k_new", k_new)
        launch = self.bind(_facts(k_new, dtype, 0))
        launch(readable(k_new), readable(v_new), k_cache, v_cache, cache_seqlens)


class AppendPagedTLKernel(PagedAppendKernel):
    key: ClassVar[AppendKey] = AppendKey.PAGED_TL

    def bind(self, facts: StaticFacts) -> PagedAppendLaunch:
        launcher = Launcher.of(RECORDS[self.key], facts)

        def launch(
            k_new: torch.Tensor,
            v_new: torch.Tensor,
            k_pages: torch.Tensor,
            v_pages: torch.Tensor,
            block_table: torch.Tensor,
            cache_seqlens: torch.Tensor,
            cu_seqlens_q: torch.Tensor,
        ) -> None:
            if k_new.shape[0] == 0 or block_table.shape[0] == 0 or k_pages.shape[0] == 0:
                return  # nothing to write, and an empty grid is not a valid launch
            launcher(
                k_new,
                v_new,
                k_pages,
                v_pages,
                block_table,
                cache_seqlens,
                cu_seqlens_q,
            )

        return launch

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
        """Token t = cu_seqlens_q[b] + i of k_new/v_new (T, Hkv, D) goes to position p = cache_seqlens[b] + i
        of k_pages/v_pages (num_pages, page_size, Hkv, D): page block_table[b, p // page_size], row
        p % page_size."""
        dtype = _check_new(k_new, v_new, dims=3)
        _check_caches(k_new, {"k_pages": k_pages, "v_pages": v_pages}, None)
        batch, max_pages = block_table.shape if block_table.dim() == 2 else (-1, -1)  # -1: never matches
        _check_int32("block_table", block_table, (batch, max_pages), k_new.device)
        _check_int32("cache_seqlens", cache_seqlens, (batch,), k_new.device)
        _check_int32("cu_seqlens_q", cu_seqlens_q, (batch + 1,), k_new.device)
        check_cuda("k_new", k_new)
        launch = self.bind(_facts(k_new, dtype, k_pages.shape[1]))
        launch(readable(k_new), readable(v_new), k_pages, v_pages, block_table, cache_seqlens, cu_seqlens_q)


KERNELS: tuple[type[Kernel], ...] = (AppendContiguousTLKernel, AppendPagedTLKernel)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """Representative static configs of every key above (the programs are the same for every arch)."""
    configs = (  # key, kv heads, head dim, page size, dtype
        (AppendKey.CONTIGUOUS_TL, 8, 128, 0, DType.FP16),
        (AppendKey.CONTIGUOUS_TL, 4, 64, 0, DType.BF16),
        (AppendKey.PAGED_TL, 8, 128, 1, DType.FP16),
        (AppendKey.PAGED_TL, 8, 128, 16, DType.BF16),
        (AppendKey.PAGED_TL, 2, 256, 5, DType.FP16),
    )
    cases = []
    for key, heads, head_dim, page_size, dtype in configs:
        facts = StaticFacts(
            arch=arch, dtype=dtype, heads=heads, kv_heads=heads, head_dim=head_dim, page_size=page_size
        )
        factory, args, _ = program(key, facts)
        page = f"_p{page_size}" if key is AppendKey.PAGED_TL else ""
        label = f"{key.value}_hkv{heads}_d{head_dim}{page}_{dtype.value}"
        cases.append(CompileCase(key=key, label=label, factory=factory, args=args))
    return tuple(cases)
