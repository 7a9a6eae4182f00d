"""Kernel base classes: one abstract class per plan step family.

A concrete Kernel serves exactly one key (`key`); which contexts a key can
serve is stated once, in `selection.rejections`. An Op calls kernels with
tensors it has already validated, in two phases:

- `bind(facts)` once per plan: the kernel resolves everything that depends only
  on the static facts of the calls (for a TileLang kernel, its compiled
  program) and returns a *launch*, a callable of fixed tensor arguments that
  writes into caller-allocated outputs and returns nothing;
- the launch, once per run (every layer).

`__call__` is the same computation as one allocating call (tests and tools
use it). The default `bind` wraps `__call__`, so a kernel class that only
implements `__call__` (a reference kernel, or a `kernel_map` override) works
in plans unchanged; TileLang kernels override `bind` with their fast path.
Kernels take no optional tensors, are constructed with no arguments and are
cheap to construct.

Shapes (B batch, S/T tokens, Hq/Hkv heads, D head dim, R rotary dim):

- paged batch (once per plan): block_table (B, MP), cache_seqlens (B,), cu_seqlens_q
  (B+1,) -> positions (T,), slots (T,), kv_seqlens (B,)
- RoPE: x (T, H, D), positions int32 (T,), cos/sin float32 (P, R/2) -> new (T, H, D)
- contiguous append: k_new/v_new (B, S, Hkv, D) into caches (B, S_max, Hkv, D)
  at rows cache_seqlens[b] + i
- paged append: k_new/v_new (T, Hkv, D) packed by cu_seqlens_q into pages
  (num_pages, page_size, Hkv, D) at position cache_seqlens[b] + i
- RoPE + append by slot: q (T, Hq, D) rotated into q_out; k_new (T, Hkv, D)
  rotated and v_new written at row slots[t] of caches viewed as (S, Hkv, D)
- slot append (no attention): k_new/v_new (T, Hkv, D) written at row slot_mapping[t]
  (int32 or int64; -1 skips the token) of pages viewed as (num_pages * page_size, Hkv, D)
- attention: see each family; causal masks are bottom-right aligned and a query
  row that sees no key is 0. Every attention launch takes `out` and then `lse`,
  float32 with out's shape less the head dim ((B, Sq, Hq) or (Tq, Hq)): with
  `facts.lse` it receives the natural-log log-sum-exp of each row's scaled (and
  capped) visible scores (-inf for a row that sees no key); without, it is not
  touched (plans pass an empty tensor). `with_lse(...)` is the allocating call
  that returns (out, lse). The scalars of the allocating attention calls are keywords
  (`AttentionOptions`): causal and sm_scale always, window and softcap when set.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar, NamedTuple, Protocol, Required, TypedDict, cast

import torch
from typing_extensions import Unpack

from tileprefill.context import Arch, DType, IndexDType
from tileprefill.keys import (
    AppendKey,
    AttentionKey,
    BatchKey,
    KernelKey,
    RopeAppendKey,
    RopeKey,
    SlotAppendKey,
)


class StaticFacts(NamedTuple):
    """What a kernel is specialised for: the same in every call a plan serves.

    `heads` are the heads of the rows a kernel reads first (query heads for
    attention and RoPE of q, kv heads for RoPE of keys and for append).
    Fields a family does not read are 0 (`page_size` outside paged caches,
    `rotary_dim` outside RoPE) or the defaults below. `index_dtype` is the element type of a slot
    mapping (read by the slot-append programs only).
    """

    arch: Arch
    dtype: DType
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    sm_scale: float = 1.0
    page_size: int = 0
    rotary_dim: int = 0
    window: int = 0  # attention: a causal sliding window of this many keys (0: none)
    softcap: float = 0.0  # attention: the logit softcap (0: none)
    lse: bool = False  # attention: also write the log-sum-exp of every (query token, query head)
    #: SM90 attention: the device's SM count, one CTA each for a persistent program (0: the
    #: table's count, tiles.SM90_PERSISTENT_CTAS). Other families and arches: 0.
    sm_count: int = 0
    index_dtype: IndexDType = IndexDType.INT32


class Kernel(abc.ABC):
    key: ClassVar[KernelKey]


class AttentionOptions(TypedDict, total=False):
    """The keyword scalars of an allocating attention call (`__call__`, `with_lse`): `causal` and
    `sm_scale` always; `window` and `softcap` where set (`AttentionScalars` has their defaults)."""

    causal: Required[bool]
    sm_scale: Required[float]
    window: int
    softcap: float


class AttentionScalars(NamedTuple):
    """The scalars of an attention call, with the defaults of those `AttentionOptions` may leave out:
    `AttentionScalars(**options)`."""

    causal: bool
    sm_scale: float
    window: int = 0  # a causal sliding window of this many keys (0: none)
    softcap: float = 0.0  # the logit softcap (0: none)


def attention_options(facts: StaticFacts) -> AttentionOptions:
    """The scalars of `facts` as an allocating attention call takes them (a dict literal: torch.compile
    traces it, not a TypedDict's constructor)."""
    options: AttentionOptions = {
        "causal": facts.causal,
        "sm_scale": facts.sm_scale,
        "window": facts.window,
        "softcap": facts.softcap,
    }
    return options


#: What a caller without the LSE (`facts.lse` false) passes an attention launch for `lse`: never
#: read nor written.
NO_LSE: torch.Tensor = torch.empty(0)


# --- launches: what `bind` returns (outputs are the caller's, written in place) ---------------------


class PagedBatchLaunch(Protocol):
    def __call__(
        self,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_seqlens: torch.Tensor,
    ) -> None: ...


class RopeLaunch(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        out: torch.Tensor,
    ) -> None: ...


class ContiguousAppendLaunch(Protocol):
    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> None: ...


class PagedAppendLaunch(Protocol):
    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> None: ...


class RopeAppendLaunch(Protocol):
    def __call__(
        self,
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
    ) -> None: ...


class SlotAppendLaunch(Protocol):
    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...


class DenseAttentionLaunch(Protocol):
    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
    ) -> None: ...


class RaggedAttentionLaunch(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None: ...


class ContiguousAttentionLaunch(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None: ...


class PagedAttentionLaunch(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None: ...


# --- the families -----------------------------------------------------------------------------------


class PagedBatchKernel(Kernel):
    """What the layers of an append into a paged cache share, derived once per plan: each new token's
    position (cache_seqlens[b] + i) and cache row (slot; -1 where its page is outside the block table
    or its entry is negative), and each sequence's kv length (cache_seqlens[b] + q_len_b)."""

    key: ClassVar[BatchKey]

    @abc.abstractmethod
    def __call__(
        self,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        *,
        tokens: int,
        page_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, slots, kv_seqlens), int32 (T,), (T,), (B,)."""

    def bind(self, facts: StaticFacts) -> PagedBatchLaunch:
        def launch(
            block_table: torch.Tensor,
            cache_seqlens: torch.Tensor,
            cu_seqlens_q: torch.Tensor,
            positions: torch.Tensor,
            slots: torch.Tensor,
            kv_seqlens: torch.Tensor,
        ) -> None:
            derived = self(
                block_table, cache_seqlens, cu_seqlens_q, tokens=positions.shape[0], page_size=facts.page_size
            )
            for out, value in zip((positions, slots, kv_seqlens), derived, strict=True):
                out.copy_(value)

        return launch


class RopeKernel(Kernel):
    key: ClassVar[RopeKey]

    @abc.abstractmethod
    def __call__(
        self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """A new (T, H, D) tensor: x with its first R = 2 * cos.shape[1] dims rotated at `positions`."""

    def bind(self, facts: StaticFacts) -> RopeLaunch:
        def launch(
            x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor
        ) -> None:
            out.copy_(self(x, positions, cos, sin))

        return launch


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

    def bind(self, facts: StaticFacts) -> ContiguousAppendLaunch:
        return self


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

    def bind(self, facts: StaticFacts) -> PagedAppendLaunch:
        return self


class RopeAppendKernel(Kernel):
    """RoPE of q and the new keys, and the write of the new keys and values, in one kernel.

    The caches are 4-D views (blocks, rows, Hkv, D): pages (num_pages,
    page_size, Hkv, D) or a contiguous cache's sequences (B, S_max, Hkv, D).
    `slots[t]` is the row token t goes to, counted across blocks (block
    slots[t] // rows, row slots[t] % rows), computed once per plan. A slot
    outside [0, blocks * rows) writes nothing.
    """

    key: ClassVar[RopeAppendKey]

    @abc.abstractmethod
    def bind(self, facts: StaticFacts) -> RopeAppendLaunch:
        """`facts.heads` are q's heads, `facts.kv_heads` the new keys' heads."""


def _no_lse(kernel: Kernel) -> NotImplementedError:
    return NotImplementedError(
        f"{type(kernel).__name__} does not compute the log-sum-exp (an Op built with return_lse=True "
        "needs a kernel class that implements with_lse)"
    )


def _attention_launch(
    output: Callable[..., torch.Tensor],
    with_lse: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    facts: StaticFacts,
) -> Callable[..., None]:
    """The launch `bind` makes of an attention kernel's allocating calls: its tensors, then `out` and
    `lse`, which it copies the result into (`lse` only with `facts.lse`)."""
    options = attention_options(facts)

    def launch(*tensors: torch.Tensor) -> None:
        *inputs, out, lse = tensors
        if facts.lse:
            result, row_lse = with_lse(*inputs, **options)
            lse.copy_(row_lse)
        else:
            result = output(*inputs, **options)
        out.copy_(result)

    return launch


class SlotAppendKernel(Kernel):
    """The write of new keys and values into a paged cache at the rows a slot mapping names.

    Token t goes to row slot_mapping[t] of the pages viewed as (num_pages * page_size,
    Hkv, D), i.e. page slot // page_size, row slot % page_size. A slot outside
    [0, num_pages * page_size) (-1 marks a token to skip) writes nothing. Two tokens with
    one slot race (the Op rejects that with validate=True).
    """

    key: ClassVar[SlotAppendKey]

    @abc.abstractmethod
    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """k_new/v_new (T, Hkv, D) into k_pages/v_pages (num_pages, page_size, Hkv, D), in place."""

    def bind(self, facts: StaticFacts) -> SlotAppendLaunch:
        return self


class DenseAttentionKernel(Kernel):
    key: ClassVar[AttentionKey]

    @abc.abstractmethod
    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        """q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D) -> (B, Sq, Hq, D)."""

    def with_lse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse): `__call__`'s output and the float32 log-sum-exp (B, Sq, Hq)."""
        raise _no_lse(self)

    def bind(self, facts: StaticFacts) -> DenseAttentionLaunch:
        return cast(DenseAttentionLaunch, _attention_launch(self, self.with_lse, facts))


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
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        """q (Tq, Hq, D), k/v (Tkv, Hkv, D), cu_seqlens int32 (B+1,) -> (Tq, Hq, D)."""

    def with_lse(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_kv: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse): `__call__`'s output and the float32 log-sum-exp (Tq, Hq)."""
        raise _no_lse(self)

    def bind(self, facts: StaticFacts) -> RaggedAttentionLaunch:
        return cast(RaggedAttentionLaunch, _attention_launch(self, self.with_lse, facts))


class ContiguousAttentionKernel(Kernel):
    key: ClassVar[AttentionKey]

    @abc.abstractmethod
    def __call__(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        """q (B, Sq, Hq, D) over the first kv_seqlens[b] rows of k/v_cache (B, S_max, Hkv, D)."""

    def with_lse(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        kv_seqlens: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse): `__call__`'s output and the float32 log-sum-exp (B, Sq, Hq)."""
        raise _no_lse(self)

    def bind(self, facts: StaticFacts) -> ContiguousAttentionLaunch:
        return cast(ContiguousAttentionLaunch, _attention_launch(self, self.with_lse, facts))


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
        **options: Unpack[AttentionOptions],
    ) -> torch.Tensor:
        """q (Tq, Hq, D) packed by cu_seqlens_q over the first kv_seqlens[b] keys of sequence b,
        key p at page block_table[b, p // page_size], row p % page_size -> (Tq, Hq, D)."""

    def with_lse(
        self,
        q: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        kv_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        **options: Unpack[AttentionOptions],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, lse): `__call__`'s output and the float32 log-sum-exp (Tq, Hq)."""
        raise _no_lse(self)

    def bind(self, facts: StaticFacts) -> PagedAttentionLaunch:
        return cast(PagedAttentionLaunch, _attention_launch(self, self.with_lse, facts))
