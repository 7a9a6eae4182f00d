"""Kernel base classes: one abstract class per plan step family.

A concrete Kernel serves exactly one key (`key`), says which contexts it can
serve through `supports(ctx)` (the reasons from `selection.rejections`, the
single statement of each key's capabilities), and is called by an Op with
tensors that the Op has already validated. Kernels take no optional tensors.
Kernels are constructed with no arguments and must be cheap to construct;
compiled programs are cached by the kernel modules, not by instances.

Shapes (B batch, S/T tokens, Hq/Hkv heads, D head dim, R rotary dim):

- RoPE: x (T, H, D), positions int32 (T,), cos/sin float32 (P, R/2) -> new (T, H, D)
- contiguous append: k_new/v_new (B, S, Hkv, D) into caches (B, S_max, Hkv, D)
  at rows cache_seqlens[b] + i
- paged append: k_new/v_new (T, Hkv, D) packed by cu_seqlens_q into pages
  (num_pages, page_size, Hkv, D) at position cache_seqlens[b] + i
- attention: see each family; causal masks are bottom-right aligned and a query
  row that sees no key is 0.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch

from tileprefill.context import PrefillContext
from tileprefill.keys import AppendKey, AttentionKey, KernelKey, RopeKey
from tileprefill.selection import rejections


class Kernel(abc.ABC):
    key: ClassVar[KernelKey]

    @classmethod
    def supports(cls, ctx: PrefillContext) -> tuple[str, ...]:
        """Why this kernel cannot serve `ctx`; empty when it can."""
        return rejections(cls.key, ctx)


class RopeKernel(Kernel):
    key: ClassVar[RopeKey]

    @abc.abstractmethod
    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """A new (T, H, D) tensor: x with its first R = 2 * cos.shape[1] dims rotated at `positions`."""


class ContiguousAppendKernel(Kernel):
    key: ClassVar[AppendKey]

    @abc.abstractmethod
    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> None:
        """Write k_new[b, i] / v_new[b, i] into k_cache[b, cache_seqlens[b] + i] / v_cache[...]."""


class PagedAppendKernel(Kernel):
    key: ClassVar[AppendKey]

    @abc.abstractmethod
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
        """Write token t = cu_seqlens_q[b] + i of k_new/v_new at position p = cache_seqlens[b] + i,
        i.e. page block_table[b, p // page_size], row p % page_size."""


class DenseAttentionKernel(Kernel):
    key: ClassVar[AttentionKey]

    @abc.abstractmethod
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, sm_scale: float
    ) -> torch.Tensor:
        """q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D) -> (B, Sq, Hq, D)."""


class RaggedAttentionKernel(Kernel):
    key: ClassVar[AttentionKey]

    @abc.abstractmethod
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        """q (Tq, Hq, D), k/v (Tkv, Hkv, D), cu_seqlens int32 (B+1,) -> (Tq, Hq, D)."""


class ContiguousAttentionKernel(Kernel):
    key: ClassVar[AttentionKey]

    @abc.abstractmethod
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        """q (B, Sq, Hq, D) over the first kv_seqlens[b] rows of k/v_cache (B, S_max, Hkv, D)."""


class PagedAttentionKernel(Kernel):
    key: ClassVar[AttentionKey]

    @abc.abstractmethod
    def __call__(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        causal: bool,
        sm_scale: float,
    ) -> torch.Tensor:
        """q (Tq, Hq, D) packed by cu_seqlens_q over the first kv_seqlens[b] keys of sequence b,
        key p at page block_table[b, p // page_size], row p % page_size -> (Tq, Hq, D)."""
