"""Kernel keys: one enum member per concrete Kernel class.

A plan is a sequence of keys, one per step: an optional batch step (run once
per plan: what every layer's kernels share), an optional RoPE step, an
optional append step (or one fused RoPE + append step in their place), and
the attention step. A slot-mapped cache write (`PagedCacheSlotAppend`) is one
slot-append step and no attention. Keys name what a kernel does
and the code it is built for (`_REF` is the torch reference, `_TL` a TileLang
kernel that is the same program for SM80 and SM90, `_SM80`/`_SM90` TileLang
kernels tuned per architecture).

Each key owns its traits: what its kernel is built as (`Code`, and so which arches it
serves) and what it does (a RoPE mode, a cache layout, where attention reads from), stated
once here by `*_traits` and read by selection, the kernel registry and CI's compile check.
"""

from __future__ import annotations

import enum
from typing import TypeAlias, assert_never

from tileprefill.context import Arch, KVLayout, RopeMode
from tileprefill.tiles import KVSource


class BatchKey(enum.Enum):
    """What a batch's layers share, derived once per plan: positions, cache slots and kv lengths of the
    new tokens of an append into a paged cache."""

    PAGED_REF = "batch_paged_ref"
    PAGED_TL = "batch_paged_tl"


class RopeKey(enum.Enum):
    NEOX_REF = "rope_neox_ref"
    INTERLEAVED_REF = "rope_interleaved_ref"
    NEOX_TL = "rope_neox_tl"
    INTERLEAVED_TL = "rope_interleaved_tl"


class AppendKey(enum.Enum):
    CONTIGUOUS_REF = "append_contiguous_ref"
    PAGED_REF = "append_paged_ref"
    CONTIGUOUS_TL = "append_contiguous_tl"
    PAGED_TL = "append_paged_tl"


class RopeAppendKey(enum.Enum):
    """RoPE of q and the new keys plus the cache write, one kernel (by slot: any cache layout)."""

    NEOX_TL = "rope_append_neox_tl"
    INTERLEAVED_TL = "rope_append_interleaved_tl"


class SlotAppendKey(enum.Enum):
    """The write of new keys and values into a paged cache at the rows a slot mapping names
    (slot = page * page_size + row, -1: skip the token), with no attention: vLLM's
    `reshape_and_cache_flash`."""

    REF = "slot_append_ref"
    TL = "slot_append_tl"


class AttentionKey(enum.Enum):
    DENSE_REF = "attn_dense_ref"
    RAGGED_REF = "attn_ragged_ref"
    CONTIGUOUS_REF = "attn_contiguous_ref"
    PAGED_REF = "attn_paged_ref"
    DENSE_SM80 = "attn_dense_sm80"
    DENSE_SM90 = "attn_dense_sm90"
    RAGGED_SM80 = "attn_ragged_sm80"
    RAGGED_SM90 = "attn_ragged_sm90"
    CONTIGUOUS_SM80 = "attn_contiguous_sm80"
    CONTIGUOUS_SM90 = "attn_contiguous_sm90"
    # Any page size: each KV row is gathered through the block table.
    PAGED_SM80 = "attn_paged_sm80"
    PAGED_SM90 = "attn_paged_sm90"
    # Fast path: the page size divides the KV tile, so a tile is whole pages
    # and every page is one contiguous copy.
    PAGED_TILED_SM80 = "attn_paged_tiled_sm80"
    PAGED_TILED_SM90 = "attn_paged_tiled_sm90"


KernelKey: TypeAlias = BatchKey | RopeKey | AppendKey | RopeAppendKey | SlotAppendKey | AttentionKey

ALL_KEYS: tuple[KernelKey, ...] = (
    *BatchKey,
    *RopeKey,
    *AppendKey,
    *RopeAppendKey,
    *SlotAppendKey,
    *AttentionKey,
)


def key_from_value(value: str) -> KernelKey:
    """The key whose `.value` is `value` (as written in the manifest and the CLI)."""
    for key in ALL_KEYS:
        if key.value == value:
            return key
    raise ValueError(f"kernel key: expected one of {[k.value for k in ALL_KEYS]}, got {value!r}")


class Code(enum.Enum):
    """What a key's kernel is built as, and so which arches it serves (`serves`, the one statement
    of that rule)."""

    REF = "torch reference"
    TL = "TileLang (sm80 and sm90)"
    SM80 = "TileLang sm80"
    SM90 = "TileLang sm90"

    @property
    def serves(self) -> tuple[Arch, ...]:
        """The arches whose calls a kernel of this code serves."""
        match self:
            case Code.REF:
                return (Arch.CPU,)
            case Code.TL:
                return (Arch.SM80, Arch.SM90)
            case Code.SM80:
                return (Arch.SM80,)
            case Code.SM90:
                return (Arch.SM90,)
            case _:
                assert_never(self)


def code_of(key: KernelKey) -> Code:
    """What the kernel of `key` is built as."""
    match key:
        case BatchKey():
            return batch_traits(key)
        case RopeKey():
            return rope_traits(key)[1]
        case AppendKey():
            return append_traits(key)[1]
        case RopeAppendKey():
            return rope_append_traits(key)[1]
        case SlotAppendKey():
            return slot_append_traits(key)
        case AttentionKey():
            return attention_traits(key)[1]
        case _:
            assert_never(key)


def batch_traits(key: BatchKey) -> Code:
    match key:
        case BatchKey.PAGED_REF:
            return Code.REF
        case BatchKey.PAGED_TL:
            return Code.TL
        case _:
            assert_never(key)


def slot_append_traits(key: SlotAppendKey) -> Code:
    match key:
        case SlotAppendKey.REF:
            return Code.REF
        case SlotAppendKey.TL:
            return Code.TL
        case _:
            assert_never(key)


def rope_append_traits(key: RopeAppendKey) -> tuple[RopeMode, Code]:
    match key:
        case RopeAppendKey.NEOX_TL:
            return RopeMode.NEOX, Code.TL
        case RopeAppendKey.INTERLEAVED_TL:
            return RopeMode.INTERLEAVED, Code.TL
        case _:
            assert_never(key)


def rope_traits(key: RopeKey) -> tuple[RopeMode, Code]:
    match key:
        case RopeKey.NEOX_REF:
            return RopeMode.NEOX, Code.REF
        case RopeKey.INTERLEAVED_REF:
            return RopeMode.INTERLEAVED, Code.REF
        case RopeKey.NEOX_TL:
            return RopeMode.NEOX, Code.TL
        case RopeKey.INTERLEAVED_TL:
            return RopeMode.INTERLEAVED, Code.TL
        case _:
            assert_never(key)


def append_traits(key: AppendKey) -> tuple[KVLayout, Code]:
    match key:
        case AppendKey.CONTIGUOUS_REF:
            return KVLayout.CONTIGUOUS, Code.REF
        case AppendKey.PAGED_REF:
            return KVLayout.PAGED, Code.REF
        case AppendKey.CONTIGUOUS_TL:
            return KVLayout.CONTIGUOUS, Code.TL
        case AppendKey.PAGED_TL:
            return KVLayout.PAGED, Code.TL
        case _:
            assert_never(key)


def attention_traits(key: AttentionKey) -> tuple[KVSource, Code]:
    match key:
        case AttentionKey.DENSE_REF:
            return KVSource.DENSE, Code.REF
        case AttentionKey.RAGGED_REF:
            return KVSource.RAGGED, Code.REF
        case AttentionKey.CONTIGUOUS_REF:
            return KVSource.CONTIGUOUS, Code.REF
        case AttentionKey.PAGED_REF:
            return KVSource.PAGED, Code.REF
        case AttentionKey.DENSE_SM80:
            return KVSource.DENSE, Code.SM80
        case AttentionKey.DENSE_SM90:
            return KVSource.DENSE, Code.SM90
        case AttentionKey.RAGGED_SM80:
            return KVSource.RAGGED, Code.SM80
        case AttentionKey.RAGGED_SM90:
            return KVSource.RAGGED, Code.SM90
        case AttentionKey.CONTIGUOUS_SM80:
            return KVSource.CONTIGUOUS, Code.SM80
        case AttentionKey.CONTIGUOUS_SM90:
            return KVSource.CONTIGUOUS, Code.SM90
        case AttentionKey.PAGED_SM80:
            return KVSource.PAGED, Code.SM80
        case AttentionKey.PAGED_SM90:
            return KVSource.PAGED, Code.SM90
        case AttentionKey.PAGED_TILED_SM80:
            return KVSource.PAGED_TILED, Code.SM80
        case AttentionKey.PAGED_TILED_SM90:
            return KVSource.PAGED_TILED, Code.SM90
        case _:
            assert_never(key)
