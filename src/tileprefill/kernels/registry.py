"""Every concrete Kernel class, by key, and the base class each key's kernel must extend."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import assert_never

from tileprefill.context import KVLayout
from tileprefill.kernels import (
    append_tl,
    attention_tl,
    batch_tl,
    reference,
    rope_append_tl,
    rope_tl,
    slot_append_tl,
)
from tileprefill.kernels.base import (
    ContiguousAppendKernel,
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    Kernel,
    PagedAppendKernel,
    PagedAttentionKernel,
    PagedBatchKernel,
    RaggedAttentionKernel,
    RopeAppendKernel,
    RopeKernel,
    SlotAppendKernel,
)
from tileprefill.keys import (
    ALL_KEYS,
    AppendKey,
    AttentionKey,
    BatchKey,
    KernelKey,
    RopeAppendKey,
    RopeKey,
    SlotAppendKey,
    append_traits,
    attention_traits,
)
from tileprefill.tiles import KVSource


def kernel_family(key: KernelKey) -> type[Kernel]:
    """The abstract base class whose call signature the kernel of `key` implements."""
    match key:
        case BatchKey():
            return PagedBatchKernel
        case RopeKey():
            return RopeKernel
        case AppendKey():
            layout, _ = append_traits(key)
            return PagedAppendKernel if layout is KVLayout.PAGED else ContiguousAppendKernel
        case RopeAppendKey():
            return RopeAppendKernel
        case SlotAppendKey():
            return SlotAppendKernel
        case AttentionKey():
            source, _ = attention_traits(key)
            match source:
                case KVSource.DENSE:
                    return DenseAttentionKernel
                case KVSource.RAGGED:
                    return RaggedAttentionKernel
                case KVSource.CONTIGUOUS:
                    return ContiguousAttentionKernel
                case KVSource.PAGED | KVSource.PAGED_TILED:
                    return PagedAttentionKernel
                case _:
                    assert_never(source)
        case _:
            assert_never(key)


def _collect() -> dict[KernelKey, type[Kernel]]:
    found: dict[KernelKey, type[Kernel]] = {}
    for cls in (
        *reference.KERNELS,
        *batch_tl.KERNELS,
        *rope_tl.KERNELS,
        *append_tl.KERNELS,
        *rope_append_tl.KERNELS,
        *slot_append_tl.KERNELS,
        *attention_tl.KERNELS,
    ):
        if cls.key in found:
            raise RuntimeError(f"kernel key {cls.key.value} has two classes: {found[cls.key]} and {cls}")
        if not issubclass(cls, kernel_family(cls.key)):
            raise RuntimeError(
                f"{cls.__name__} serves {cls.key.value} but does not extend {kernel_family(cls.key)}"
            )
        found[cls.key] = cls
    return found


#: key -> the one concrete class serving it. Keys without a class yet are absent
#: (tests/test_registry.py insists that none are).
ALL_KERNELS: Mapping[KernelKey, type[Kernel]] = MappingProxyType(_collect())

__all__ = ["ALL_KERNELS", "ALL_KEYS", "kernel_family"]
