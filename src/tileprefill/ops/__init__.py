"""The ten public Ops: fixed, ordered tensor inputs; scalars are constructor parameters."""

from typing import TypeAlias

from tileprefill.ops.base import PrefillOp
from tileprefill.ops.contiguous import (
    ContiguousCacheOp,
    GQAContiguousCacheAppendPrefill,
    GQAContiguousCachePrefill,
    GQAContiguousCacheRopeAppendPrefill,
)
from tileprefill.ops.dense import (
    GQAPrefill,
    GQARopePrefill,
    GQAVarlenPrefill,
    GQAVarlenRopePrefill,
    NoCacheOp,
)
from tileprefill.ops.paged import (
    GQAPagedCacheAppendPrefill,
    GQAPagedCachePrefill,
    GQAPagedCacheRopeAppendPrefill,
    PagedCacheOp,
)

#: The class of a public Op (each extends one layout base).
OpClass: TypeAlias = type[NoCacheOp] | type[ContiguousCacheOp] | type[PagedCacheOp]

#: Every public Op class, in the order of the architecture's table.
PUBLIC_OPS: tuple[OpClass, ...] = (
    GQAPrefill,
    GQAVarlenPrefill,
    GQARopePrefill,
    GQAVarlenRopePrefill,
    GQAContiguousCachePrefill,
    GQAContiguousCacheAppendPrefill,
    GQAContiguousCacheRopeAppendPrefill,
    GQAPagedCachePrefill,
    GQAPagedCacheAppendPrefill,
    GQAPagedCacheRopeAppendPrefill,
)

__all__ = [
    "PUBLIC_OPS",
    "ContiguousCacheOp",
    "GQAContiguousCacheAppendPrefill",
    "GQAContiguousCachePrefill",
    "GQAContiguousCacheRopeAppendPrefill",
    "GQAPagedCacheAppendPrefill",
    "GQAPagedCachePrefill",
    "GQAPagedCacheRopeAppendPrefill",
    "GQAPrefill",
    "GQARopePrefill",
    "GQAVarlenPrefill",
    "GQAVarlenRopePrefill",
    "NoCacheOp",
    "OpClass",
    "PagedCacheOp",
    "PrefillOp",
]
