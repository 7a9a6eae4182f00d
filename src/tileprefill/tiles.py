"""What the attention programs are built for: where they read q, k and v from (`KVSource`) and
their tile configurations, one small table per architecture.

Pure Python (no torch, no tilelang): selection explains with it, the kernel classes choose
a program's static arguments with it, and the TileLang programs are built from it, so none
of them imports another for it. A configuration is part of a program's static arguments,
hence of its compile-cache key.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import assert_never


class KVSource(enum.Enum):
    """Where an attention program reads q, k and v from (one program family per member)."""

    DENSE = "dense"  # q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D)
    RAGGED = "ragged"  # q (Tq, Hq, D), k/v (Tkv, Hkv, D), cu_seqlens_q/kv
    CONTIGUOUS = "contiguous"  # q (B, Sq, Hq, D), caches (B, S_max, Hkv, D), kv_seqlens
    PAGED = "paged"  # q (Tq, Hq, D) by cu_seqlens_q, pages (P, page_size, Hkv, D), block_table
    PAGED_TILED = "paged_tiled"  # as PAGED, page_size a power of two >= 16

    @property
    def description(self) -> str:
        """The source in words (what `explain` says a kernel reads)."""
        match self:
            case KVSource.DENSE:
                return "dense (B, S, H, D) inputs"
            case KVSource.RAGGED:
                return "ragged (T, H, D) inputs with cu_seqlens"
            case KVSource.CONTIGUOUS:
                return "a contiguous cache"
            case KVSource.PAGED:
                return "a paged cache, any page size"
            case KVSource.PAGED_TILED:
                return "a paged cache whose page size divides the KV tile"
            case _:
                assert_never(self)

    @property
    def ragged_q(self) -> bool:
        """Whether q and the output are packed token-major by cu_seqlens_q."""
        return self in (KVSource.RAGGED, KVSource.PAGED, KVSource.PAGED_TILED)

    @property
    def paged(self) -> bool:
        """Whether k and v are pages read through a block table."""
        return self in (KVSource.PAGED, KVSource.PAGED_TILED)


def pages_tile_evenly(page_size: int) -> bool:
    """Whether a power-of-two KV tile is whole pages (or lies inside one page).

    True for powers of two >= 16: then either the page size divides the tile or
    the tile divides the page, and every page's part of a tile is one copy.
    """
    return page_size >= 16 and page_size & (page_size - 1) == 0


def pages_tile_whole(page_size: int, block_N: int) -> bool:
    """A key tile of `block_N` (a power of two) keys is whole pages or lies inside one page: each
    page's part of it is one rectangular copy (the tiled paged programs' condition)."""
    return pages_tile_evenly(page_size) and (page_size >= block_N or not block_N % page_size)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """block_M query rows x block_N keys per step; num_stages K/V buffers; threads per CTA.

    persistent_ctas > 0 (SM90 dense, ragged and paged sources; the contiguous cache keeps its
    grid): launch that many CTAs, each looping over query tiles in a static order, instead of
    one CTA per query tile.
    """

    block_M: int
    block_N: int
    num_stages: int
    threads: int
    persistent_ctas: int = 0


# SM90: one producer warpgroup (TMA or cp.async gathers) and two or three consumer
# warpgroups of 64 query rows each (block_M = 128 or 192) that take turns on the tensor
# cores (ping-pong), so one's softmax hides under the others' wgmma.
# - D 64: three consumers (192 x 128 tiles, 512 threads, 160 registers a consumer, as
#   TileOPs 0.1.0 and FlashAttention-3 at D 64). A score costs 4 x 64 FLOPs and one exp2:
#   at tensor peak that is the whole MUFU pipe of an SM (16 a clock), so the softmax of
#   one tile must run under the products of two others, not one (docs/design.md). Dense and
#   contiguous programs only: the packed ones (ragged, paged) carry their
#   schedule's walk through the loop and spill 44-148 bytes at 160 registers (ptxas), and the
#   gathering paged producer needs 88 registers; they keep two consumers until measured.
# - D 64 to 128: 128 x 128 tiles, two K/V stages: Q 16-32 KiB + K/V 64-128 KiB of
#   shared memory, 64 fp32 score registers per thread; the FlashAttention-3 shape.
#   Head dims that 64 columns do not divide (80, 96, 112, ...) use 32- or 64-byte
#   swizzle panels, which TileLang's TMA copies split into (80 = 5 x 16 columns,
#   96 = 3 x 32; `attention_sm90.panel_columns`).
# - D 144 to 256: block_N 64 keeps the fp32 output (80-128 registers a thread) plus
#   scores inside the consumers' 240 registers, and Q + 2 x K/V (+ the output staging
#   tile) inside 227 KiB.
# - Persistent (dense, ragged, paged) up to D 192: one CTA per SM of the device (the table
#   says 132, an H100 SXM / H200; `sm90_config(sm_count=...)` puts the plan's device's count,
#   `StaticFacts.sm_count`), each looping over query tiles; outputs go through a separate
#   2 x 64-row staging tile so the next tile's Q load overlaps the current tile's epilogue.
#   More CTAs than SMs would run as a second, partial wave. D 224 and up have no shared
#   memory left for the staging tile and keep one CTA per query tile; so does D 208
#   (212 of 227 KiB with it: not yet measured persistent).
SM90_PERSISTENT_CTAS = 132
_SM90_WIDE = TileConfig(
    block_M=128, block_N=128, num_stages=2, threads=384, persistent_ctas=SM90_PERSISTENT_CTAS
)
_SM90_DEEP = TileConfig(
    block_M=128, block_N=64, num_stages=2, threads=384, persistent_ctas=SM90_PERSISTENT_CTAS
)
_SM90_WIDEST = TileConfig(block_M=128, block_N=64, num_stages=2, threads=384)
_SM90_THREE_CONSUMERS = TileConfig(
    block_M=192, block_N=128, num_stages=2, threads=512, persistent_ctas=SM90_PERSISTENT_CTAS
)
SM90_CONFIGS: dict[int, TileConfig] = {
    64: _SM90_THREE_CONSUMERS,
    80: _SM90_WIDE,
    96: _SM90_WIDE,
    112: _SM90_WIDE,
    128: _SM90_WIDE,
    144: _SM90_DEEP,
    160: _SM90_DEEP,
    176: _SM90_DEEP,
    192: _SM90_DEEP,
    208: _SM90_WIDEST,
    224: _SM90_WIDEST,
    240: _SM90_WIDEST,
    256: _SM90_WIDEST,
}

# SM80 (also run by SM86/SM89): eight warps of 16 query rows (block_M = 128),
# K and V single-buffered with the next tile's loads issued under the current
# tile's math (TileLang's num_stages=1 pipeline). num_stages >= 2 is not an
# option: with a data-dependent trip count (every causal or varlen loop here)
# TileLang 0.1.15 emits a non-constant cp.async wait and fails to compile.
# Four warps of 32 rows (the FlashAttention-2 shape) spill under TileLang's
# register allocation at every head dim; eight warps do not (ptxas: D 64 198,
# D 128 224, D 256 236 registers, no spills). block_N shrinks with D to keep the
# fp32 scores plus output in registers (D 144 and up: block_N 32), and shared memory stays under the 99 KiB
# SM86/SM89 allow a block (Q + K + V: 48 / 64 / 96 KiB at D 64 / 128 / 256).
SM80_CONFIGS: dict[int, TileConfig] = {
    64: TileConfig(block_M=128, block_N=128, num_stages=1, threads=256),
    **{
        head_dim: TileConfig(block_M=128, block_N=64, num_stages=1, threads=256)
        for head_dim in (80, 96, 112, 128)
    },
    **{
        head_dim: TileConfig(block_M=128, block_N=32, num_stages=1, threads=256)
        for head_dim in range(144, 257, 16)
    },
}

#: The head dims both tables serve (what selection offers the TileLang attention kernels).
HEAD_DIMS: tuple[int, ...] = tuple(sorted(set(SM90_CONFIGS) & set(SM80_CONFIGS)))


def describe(config: TileConfig) -> str:
    """One line naming a configuration (what `explain` prints for a TileLang attention step)."""
    grid = f", persistent {config.persistent_ctas} CTAs (one per SM)" if config.persistent_ctas else ""
    return (
        f"{config.block_M}x{config.block_N} tiles, {config.num_stages} stage(s), "
        f"{config.threads} threads{grid}"
    )


def sm90_config(source: KVSource, head_dim: int, sm_count: int = 0) -> TileConfig:
    """The SM90 configuration of `source`'s programs at `head_dim` on a device of `sm_count` SMs (0:
    the table's SM90_PERSISTENT_CTAS): what the program factory builds and `explain` names. A
    persistent program launches one CTA per SM. Programs of packed q (ragged, paged) keep two
    consumers (see the table's comment). The contiguous cache keeps one CTA per query tile:
    persistent, its longest-first order over the batch made the resident CTAs read every
    sequence's cache at once (4 x 4608 keys: 75 MB of K/V, over the L2) and measured 9% slower
    (docs/design.md)."""
    if sm_count < 0:
        raise ValueError(f"sm_count: expected the device's SM count (>= 1) or 0, got {sm_count}")
    config = _lookup(SM90_CONFIGS, head_dim, "sm90")
    if source.ragged_q and config.block_M > 128:
        config = dataclasses.replace(config, block_M=128, threads=384)
    if source is KVSource.CONTIGUOUS:
        return dataclasses.replace(config, persistent_ctas=0)
    if config.persistent_ctas and sm_count:
        return dataclasses.replace(config, persistent_ctas=sm_count)
    return config


def sm80_config(head_dim: int) -> TileConfig:
    return _lookup(SM80_CONFIGS, head_dim, "sm80")


def _lookup(table: dict[int, TileConfig], head_dim: int, arch: str) -> TileConfig:
    try:
        return table[head_dim]
    except KeyError:
        raise ValueError(
            f"head_dim: expected one of {sorted(table)} for the {arch} attention kernels, got {head_dim}"
        ) from None
