"""tileprefill: grouped-query attention prefill for LLM inference engines.

TileLang kernels on SM80/SM90, torch reference kernels everywhere else.
Importing this package does not import tilelang.
"""

from tileprefill.context import Arch, DType, IndexDType, KVLayout, KVOrder, PrefillContext, RopeMode
from tileprefill.keys import AppendKey, AttentionKey, KernelKey, RopeAppendKey, RopeKey, SlotAppendKey
from tileprefill.ops import (
    BatchPlan,
    ContiguousShape,
    DenseShape,
    GQAContiguousCacheAppendPrefill,
    GQAContiguousCachePrefill,
    GQAContiguousCacheRopeAppendPrefill,
    GQAPagedCacheAppendPrefill,
    GQAPagedCachePrefill,
    GQAPagedCacheRopeAppendPrefill,
    GQAPrefill,
    GQARopePrefill,
    GQAVarlenPrefill,
    GQAVarlenRopePrefill,
    NoGPUKernelWarning,
    OutputAndLSE,
    PagedCacheSlotAppend,
    PagedShape,
    SlotAppendShape,
    VarlenShape,
)
from tileprefill.selection import Explanation, PrefillPlan, UnsupportedContextError, explain, select_plan

__all__ = [
    "AppendKey",
    "Arch",
    "AttentionKey",
    "BatchPlan",
    "ContiguousShape",
    "DType",
    "DenseShape",
    "Explanation",
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
    "IndexDType",
    "KVLayout",
    "KVOrder",
    "KernelKey",
    "NoGPUKernelWarning",
    "OutputAndLSE",
    "PagedCacheSlotAppend",
    "PagedShape",
    "PrefillContext",
    "PrefillPlan",
    "RopeAppendKey",
    "RopeKey",
    "RopeMode",
    "SlotAppendKey",
    "SlotAppendShape",
    "UnsupportedContextError",
    "VarlenShape",
    "explain",
    "select_plan",
]
