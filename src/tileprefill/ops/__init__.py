"""The public Ops: fixed, ordered tensor inputs; scalars are constructor parameters.

The ten attention Ops (`PUBLIC_OPS`) and the cache write without attention (`CACHE_OPS`).
"""

from typing import Any, TypeAlias

from tileprefill.ops.contiguous import (
    ContiguousCacheOp,
    ContiguousShape,
    GQAContiguousCacheAppendPrefill,
    GQAContiguousCachePrefill,
    GQAContiguousCacheRopeAppendPrefill,
)
from tileprefill.ops.decision import NoGPUKernelWarning
from tileprefill.ops.dense import (
    DenseShape,
    GQAPrefill,
    GQARopePrefill,
    GQAVarlenPrefill,
    GQAVarlenRopePrefill,
    NoCacheOp,
    VarlenShape,
)
from tileprefill.ops.op import OpOptions, OutputAndLSE, PrefillOp, RopeOpOptions
from tileprefill.ops.paged import (
    GQAPagedCacheAppendPrefill,
    GQAPagedCachePrefill,
    GQAPagedCacheRopeAppendPrefill,
    PagedCacheOp,
    PagedShape,
)
from tileprefill.ops.plan import BatchPlan
from tileprefill.ops.slots import PagedCacheSlotAppend, PagedCacheSlotAppendPlan, SlotAppendShape

#: The class of a public Op (each extends one layout base), with or without the LSE.
OpClass: TypeAlias = type[NoCacheOp[Any]] | type[ContiguousCacheOp[Any]] | type[PagedCacheOp[Any]]

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

#: The public Ops that write a cache and attend nothing (not PrefillOps: no q, no output).
CACHE_OPS: tuple[type[PagedCacheSlotAppend], ...] = (PagedCacheSlotAppend,)

__all__ = [
    "CACHE_OPS",
    "PUBLIC_OPS",
    "BatchPlan",
    "ContiguousCacheOp",
    "ContiguousShape",
    "DenseShape",
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
    "NoGPUKernelWarning",
    "OpClass",
    "OpOptions",
    "OutputAndLSE",
    "PagedCacheOp",
    "PagedCacheSlotAppend",
    "PagedCacheSlotAppendPlan",
    "PagedShape",
    "PrefillOp",
    "RopeOpOptions",
    "SlotAppendShape",
    "VarlenShape",
]
