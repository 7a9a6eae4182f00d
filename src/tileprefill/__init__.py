"""tileprefill: grouped-query attention prefill for LLM inference engines.

TileLang kernels on SM80/SM90, torch reference kernels everywhere else.
Importing this package does not import tilelang.

Ahead of time: `precompile(model, directory)` builds every program a model needs (no GPU, nvcc);
`use_precompiled(directory)` (or `TILEPREFILL_PRECOMPILED`) makes the Ops load them instead of
compiling; `warm_up(model, device)` makes them ready when an engine sets the model up.
"""

from tileprefill.aot import (
    PRESETS,
    BuildOptions,
    ModelConfig,
    PrecompileReport,
    ProgramSpec,
    WarmUp,
    precompile,
    programs_for,
    warm_up,
)
from tileprefill.context import Arch, DType, IndexDType, KVLayout, KVOrder, PrefillContext, RopeMode
from tileprefill.kernels.artifact import PrecompiledFormatError
from tileprefill.kernels.precompiled import PrecompiledError, PrecompiledWarning, use_precompiled
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
    "PRESETS",
    "AppendKey",
    "Arch",
    "AttentionKey",
    "BatchPlan",
    "BuildOptions",
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
    "ModelConfig",
    "NoGPUKernelWarning",
    "OutputAndLSE",
    "PagedCacheSlotAppend",
    "PagedShape",
    "PrecompileReport",
    "PrecompiledError",
    "PrecompiledFormatError",
    "PrecompiledWarning",
    "PrefillContext",
    "PrefillPlan",
    "ProgramSpec",
    "RopeAppendKey",
    "RopeKey",
    "RopeMode",
    "SlotAppendKey",
    "SlotAppendShape",
    "UnsupportedContextError",
    "VarlenShape",
    "WarmUp",
    "explain",
    "precompile",
    "programs_for",
    "select_plan",
    "use_precompiled",
    "warm_up",
]
