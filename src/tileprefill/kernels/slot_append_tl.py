"""TileLang slot-append kernel: new keys/values into a paged cache at the rows a slot mapping names
(vLLM's `reshape_and_cache_flash`), sm80 and sm90: one program.

The program (`kernels/tl/slot_append.py`) reads the page size from the pages'
shape (a strided view) at launch, so it is compiled per (Hkv, D, dtype, slot
dtype) and not per page size. It launches through the one launch path (`kernels/launch.py`), whose
custom op (`tileprefill::slot_append_tl`) declares the two caches it writes.
No host syncs: the launch reads nothing on the host.
"""

from __future__ import annotations

from typing import ClassVar, Final

import torch

from tileprefill.context import Arch, DType, IndexDType, arch_of
from tileprefill.kernels.base import Kernel, SlotAppendKernel, SlotAppendLaunch, StaticFacts
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.launch import KernelRecord, Launcher, Program, check_cuda, readable, register
from tileprefill.keys import SlotAppendKey
from tileprefill.validation import check_same_strides, check_view


def program(key: SlotAppendKey, facts: StaticFacts) -> Program:
    from tileprefill.kernels.tl.slot_append import slot_append_program

    args = (facts.kv_heads, facts.head_dim, facts.dtype.value, facts.index_dtype.value)
    return Program(slot_append_program, args, facts.arch)


RECORDS: Final[dict[SlotAppendKey, KernelRecord]] = {
    SlotAppendKey.TL: register(
        KernelRecord(
            key=SlotAppendKey.TL,
            tensors=("k_new", "v_new", "k_pages", "v_pages", "slot_mapping"),
            mutates=("k_pages", "v_pages"),
            views=("k_new", "v_new", "k_pages", "v_pages"),
            program=lambda facts: program(SlotAppendKey.TL, facts),
        )
    )
}


class SlotAppendTLKernel(SlotAppendKernel):
    key: ClassVar[SlotAppendKey] = SlotAppendKey.TL

    def bind(self, facts: StaticFacts) -> SlotAppendLaunch:
        launcher = Launcher.of(RECORDS[self.key], facts)

        def launch(
            k_new: torch.Tensor,
            v_new: torch.Tensor,
            k_pages: torch.Tensor,
            v_pages: torch.Tensor,
            slot_mapping: torch.Tensor,
        ) -> None:
            if k_new.shape[0] == 0 or k_pages.shape[0] == 0:
                return  # nothing to write (or nowhere), and an empty grid is not a valid launch
            launcher(k_new, v_new, k_pages, v_pages, slot_mapping)

        return launch

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Token t of k_new/v_new (T, Hkv, D) goes to slot s = slot_mapping[t] of k_pages/v_pages
        (num_pages, page_size, Hkv, D): row s % page_size of page s // page_size. Metadata checks
        only (the Op checks values)."""
        dtype = DType.of(k_new.dtype, argument="k_new")
        index_dtype = IndexDType.of(slot_mapping.dtype, argument="slot_mapping")
        if k_new.dim() != 3:
            raise ValueError(f"k_new: expected shape (T, Hkv, D), got {tuple(k_new.shape)}")
        like = f"{k_new.dtype} on {k_new.device} (like k_new)"
        if v_new.shape != k_new.shape or v_new.dtype != k_new.dtype or v_new.device != k_new.device:
            raise ValueError(
                f"v_new: expected {tuple(k_new.shape)} {like}, got {v_new.dtype} {tuple(v_new.shape)} "
                f"on {v_new.device}"
            )
        for name, pages in (("k_pages", k_pages), ("v_pages", v_pages)):
            if (
                pages.dim() != 4
                or pages.shape[2:] != k_new.shape[1:]
                or pages.shape != k_pages.shape
                or pages.dtype != k_new.dtype
                or pages.device != k_new.device
            ):
                raise ValueError(
                    f"{name}: expected (num_pages, page_size, {k_new.shape[1]}, {k_new.shape[2]}) {like}, "
                    f"the shape of k_pages, got {pages.dtype} {tuple(pages.shape)} on {pages.device}"
                )
        if slot_mapping.shape != (k_new.shape[0],) or slot_mapping.device != k_new.device:
            raise ValueError(
                f"slot_mapping: expected shape ({k_new.shape[0]},) on {k_new.device}, "
                f"got {tuple(slot_mapping.shape)} on {slot_mapping.device}"
            )
        caches = {"k_pages": k_pages, "v_pages": v_pages}
        for name, pages in caches.items():
            check_view(name, pages)
        check_same_strides(caches)
        check_cuda("k_new", k_new)
        facts = StaticFacts(
            arch=arch_of(k_new.device),
            dtype=dtype,
            heads=k_new.shape[1],
            kv_heads=k_new.shape[1],
            head_dim=k_new.shape[2],
            page_size=k_pages.shape[1],
            index_dtype=index_dtype,
        )
        self.bind(facts)(readable(k_new), readable(v_new), k_pages, v_pages, slot_mapping)


KERNELS: tuple[type[Kernel], ...] = (SlotAppendTLKernel,)


def compile_cases(arch: Arch) -> tuple[CompileCase, ...]:
    """Representative static configs (the program is the same for every arch and page size)."""
    configs = (  # kv heads, head dim, dtype, slot dtype
        (8, 128, DType.FP16, IndexDType.INT64),
        (1, 64, DType.BF16, IndexDType.INT32),
        (4, 256, DType.BF16, IndexDType.INT64),
    )
    cases = []
    for heads, head_dim, dtype, index_dtype in configs:
        facts = StaticFacts(
            arch=arch, dtype=dtype, heads=heads, kv_heads=heads, head_dim=head_dim, index_dtype=index_dtype
        )
        factory, args, _ = program(SlotAppendKey.TL, facts)
        label = f"{SlotAppendKey.TL.value}_hkv{heads}_d{head_dim}_{dtype.value}_{index_dtype.value}"
        cases.append(CompileCase(key=SlotAppendKey.TL, label=label, factory=factory, args=args))
    return tuple(cases)
