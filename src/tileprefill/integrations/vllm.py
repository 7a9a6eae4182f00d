"""Run vLLM's attention on tileprefill: the attention backend "TILEPREFILL" (vLLM 0.34).

    pip install -e .          # beside vLLM: the entry point below is then installed
    vllm serve MODEL --attention-backend tileprefill

tileprefill declares a `vllm.general_plugins` entry point, `register()`, which vLLM calls in every
process before it parses the command line; it adds the backend name TILEPREFILL to vLLM's registry
(`register_backend`), and vLLM upper-cases the name it is given. `register()` may also be called
by hand before vLLM builds its config.

What each vLLM piece does here:

- `TilePrefillBackend` states what is served; `validate_configuration` returns the reasons a
  configuration is not, with its values (the head dims and arches come from tileprefill's kernel
  selection, `tileprefill.selection.explain`).
- `TilePrefillMetadataBuilder.build` runs once per batch of a KV-cache group. Its metadata holds
  the batch's block table, sequence lengths and query offsets, and one tileprefill plan
  (`GQAPagedCachePrefill.plan`) per kind of layer in the group (scale, sliding window, softcap),
  made in `build` and reused by every layer of that kind. A mixed batch of chunked prefills, fresh
  prefills and decode rows is one plan: tileprefill's causal mask is bottom-right aligned per
  sequence, as vLLM's. The plans read no device memory on the host (`validate=False`).
- `TilePrefillMetadataBuilder.__init__` runs when a worker sets its caches up: it loads from the
  precompiled directories in use, or compiles side by side, every program the group's steps run
  (`tileprefill.aot.warm_up`), so that no request compiles.
- `TilePrefillImpl.do_kv_cache_update` writes the step's new keys and values into the layer's cache
  by vLLM's slot mapping (`PagedCacheSlotAppend`; slot -1 skips a padding token), and
  `TilePrefillImpl.forward` attends over the cache into vLLM's `output` buffer (`run_into`).

vLLM hands each layer a `(num_blocks, Hkv, block_size, 2 * D)` view of its cache, K and V packed in
each row, strided as the resolved KV-cache layout orders blocks, heads, rows and layers
(`vllm/v1/kv_cache_layout.py`). Its K and V halves, transposed to `(num_blocks, block_size, Hkv,
D)`, are cache views tileprefill reads and writes in place (`cache_views`); the layout's head/row
order is the plan's `kv_order`. vLLM pads the token count of a step (CUDA-graph sizes): the rows
past the batch's last query offset are neither read nor written.

Not served (refused when vLLM selects the backend, or when a layer is built): ALiBi, attention
sinks, fp8 and other quantised KV caches, encoder, encoder-only and cross attention, non-causal
decoder attention, MLA and sparse attention, context parallelism, and head dims or GPUs no
tileprefill kernel serves. CUDA graphs: `AttentionCGSupport.NEVER`; vLLM then runs attention
eagerly between its piecewise graphs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar, Final, NamedTuple

import torch

import tileprefill as tp
from tileprefill.aot import WarmUp, warm_up
from tileprefill.aot.models import BuildOptions, ModelConfig
from tileprefill.context import Arch, DType, IndexDType, KVLayout, KVOrder, PrefillContext, RopeMode
from tileprefill.keys import KernelKey, code_of
from tileprefill.ops.paged import GQAPagedCachePrefillPlan
from tileprefill.ops.slots import PagedCacheSlotAppendPlan
from tileprefill.selection import ATTENTION_PREFERENCE, SLOT_APPEND_PREFERENCE, explain, rejections

try:
    from vllm.config import VllmConfig, get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import (
        AttentionBackend,
        AttentionCGSupport,
        AttentionImpl,
        AttentionLayer,
        AttentionMetadata,
        AttentionMetadataBuilder,
        AttentionType,
        CommonAttentionMetadata,
        MultipleOf,
    )
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec
    from vllm.v1.kv_cache_layout import KVCacheLayout
except ImportError as _error:  # pragma: no cover - vLLM is not installed
    raise ImportError(
        "tileprefill.integrations.vllm needs vLLM 0.34 (pip install vllm==0.34.0): " + str(_error)
    ) from _error

#: The name `register()` gives the backend in vLLM's registry (`--attention-backend tileprefill`).
NAME: Final = "TILEPREFILL"

#: The KV-cache dtypes served: the model's own dtype ("auto"), named or not.
_CACHE_DTYPES: Final = ("auto", "float16", "bfloat16")


def register() -> None:
    """Add the attention backend TILEPREFILL to vLLM's registry (the `vllm.general_plugins` entry
    point). Idempotent: vLLM calls it once in each of its processes, a user may call it again."""
    if NAME not in AttentionBackendEnum.__members__:
        register_backend(NAME, f"{__name__}.{TilePrefillBackend.__qualname__}")


# --- what one layer computes, and the Ops that compute it -------------------------------------------


class LayerKind(NamedTuple):
    """What a layer computes beyond its group's cache shape: layers of one kind share an Op and, in
    each batch, a plan."""

    heads: int
    sm_scale: float
    sliding_window: int | None  # W keys, the query's own included (vLLM's own convention)
    softcap: float | None


@functools.cache
def attention_op(
    sm_scale: float, sliding_window: int | None, softcap: float | None, validate: bool
) -> tp.GQAPagedCachePrefill[torch.Tensor]:
    """The Op of one kind of layer; cached, so that the layers of a kind share it (an Op holds no
    per-call state)."""
    return tp.GQAPagedCachePrefill(
        causal=True, sm_scale=sm_scale, sliding_window=sliding_window, softcap=softcap, validate=validate
    )


@functools.cache
def slot_append_op(validate: bool) -> tp.PagedCacheSlotAppend:
    """The Op that writes new keys and values into a cache by slot (one for every layer)."""
    return tp.PagedCacheSlotAppend(validate=validate)


def cache_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-layer cache `(num_blocks, Hkv, block_size, 2 * D)`, K and V packed in each row, as
    tileprefill's pages `(num_blocks, block_size, Hkv, D)`: K the first D elements of a row, V the
    rest. Views of the cache's memory (nothing is copied), which the Ops read and write in place."""
    pages = kv_cache.transpose(1, 2)
    return pages[..., :head_size], pages[..., head_size:]


def kv_order_of_layout(layout: KVCacheLayout) -> KVOrder:
    """The head/row order of a layout's page views: HND when a block's heads lie outside its rows
    in memory (one head's rows side by side), NHD otherwise."""
    physical = layout.layer_view_order  # the memory order of the logical (blocks, heads, rows, content)
    return KVOrder.HND if physical.index(1) < physical.index(2) else KVOrder.NHD


# --- the backend -------------------------------------------------------------------------------------


class TilePrefillBackend(AttentionBackend):  # type: ignore[misc]
    """vLLM's attention backend TILEPREFILL: decoder self-attention over vLLM's paged cache on
    tileprefill's Ops (the module docstring says what each piece does)."""

    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(_CACHE_DTYPES)
    # vLLM first writes the step's keys and values (`do_kv_cache_update`), then calls `forward`.
    forward_includes_kv_cache_update: bool = False
    #: True: every plan checks its batch's metadata values (one device-to-host copy per plan, which
    #: stalls vLLM's asynchronous scheduling). For debugging and tests; serving leaves it False.
    validate_plans: ClassVar[bool] = False

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls() -> type[TilePrefillImpl]:
        return TilePrefillImpl

    @staticmethod
    def get_builder_cls() -> type[TilePrefillMetadataBuilder]:
        return TilePrefillMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(
        kv_cache_spec: KVCacheSpec | None = None,
    ) -> list[int | MultipleOf]:
        # Any block size: the paged kernels read any page size (powers of two >= 16 tile the KV
        # block, the others run a kernel that gathers rows).
        return [MultipleOf(1)]

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...] | None:
        # Every layout's page views are cache views the kernels take in place (`cache_views`).
        return None

    @classmethod
    def validate_configuration(
        cls,
        head_size: int,
        dtype: torch.dtype,
        kv_cache_dtype: str | None,
        block_size: int | None,
        use_mla: bool,
        has_sink: bool,
        use_sparse: bool,
        use_mm_prefix: bool,
        use_per_head_quant_scales: bool,
        device_capability: DeviceCapability | None,
        attn_type: str,
        has_sliding_window: bool = False,
        use_non_causal: bool = False,
        use_batch_invariant: bool = False,
        use_kv_connector: bool = False,
        use_pcp: bool = False,
        use_adaptive_verification: bool = False,
        use_dcp: bool = False,
        use_rswa: bool = False,
    ) -> list[str]:
        """Why tileprefill cannot serve this configuration, one reason per item, each naming its value (empty:
        it can). A KV connector and adaptive verification need nothing of the backend: the plans
        take the batch's query offsets from the device and its token count from the host copy,
        whose total vLLM keeps exact."""
        del use_kv_connector, use_adaptive_verification
        reasons: list[str] = []
        if dtype not in cls.supported_dtypes:
            reasons.append(f"dtype {dtype}: tileprefill computes in torch.float16 or torch.bfloat16")
        if kv_cache_dtype is not None and kv_cache_dtype not in cls.supported_kv_cache_dtypes:
            reasons.append(
                f"kv_cache_dtype {kv_cache_dtype!r}: tileprefill reads caches of the model's dtype "
                f"({', '.join(map(repr, _CACHE_DTYPES))}); fp8 and other quantised caches are not served"
            )
        elif kv_cache_dtype not in (None, "auto") and f"torch.{kv_cache_dtype}" != str(dtype):
            reasons.append(
                f"kv_cache_dtype {kv_cache_dtype!r}: tileprefill reads a cache of the model's dtype, {dtype}"
            )
        if attn_type != AttentionType.DECODER:
            reasons.append(
                f"attn_type {attn_type}: tileprefill serves decoder self-attention over the paged cache; "
                "encoder, encoder-only and cross attention are not served"
            )
        unserved = {
            "use_mla": (use_mla, "multi-head latent attention (MLA) is not served"),
            "use_sparse": (use_sparse, "sparse attention is not served"),
            "has_sink": (has_sink, "tileprefill has no attention sinks"),
            "use_mm_prefix": (use_mm_prefix, "tileprefill's masks are causal: no bidirectional prefix"),
            "use_non_causal": (use_non_causal, "tileprefill's decoder attention is causal"),
            "use_rswa": (use_rswa, "R-SWA (a global prefix beside a sliding window) is not served"),
            "use_per_head_quant_scales": (use_per_head_quant_scales, "the caches are not quantised"),
            "use_batch_invariant": (use_batch_invariant, "batch invariance is not verified for tileprefill"),
            "use_pcp": (use_pcp, "context parallelism needs an attention LSE the backend does not return"),
            "use_dcp": (use_dcp, "context parallelism needs an attention LSE the backend does not return"),
        }
        reasons += [f"{name}=True: {why}" for name, (asked, why) in unserved.items() if asked]
        if dtype in cls.supported_dtypes:
            reasons += kernel_gaps(head_size, dtype, block_size, device_capability, has_sliding_window)
        return reasons


def kernel_gaps(
    head_size: int,
    dtype: torch.dtype,
    block_size: int | None,
    device_capability: DeviceCapability | None,
    has_sliding_window: bool,
) -> list[str]:
    """Why no tileprefill kernel would serve this configuration's attention or cache write on the
    device (None: vLLM's CPU platform, where the reference kernels run), from kernel selection."""
    if device_capability is None:
        arch = Arch.CPU
    else:
        try:
            arch = Arch.of_capability(device_capability.major, device_capability.minor)
        except ValueError as error:
            return [f"device_capability: {error}"]
    data = DType.of(dtype, argument="dtype")
    attention = PrefillContext(
        kv_layout=KVLayout.PAGED,
        rope=RopeMode.NONE,
        append=False,
        q_dtype=data,
        kv_dtype=data,
        arch=arch,
        head_dim=head_size,
        group_size=1,  # read by no kernel decision
        causal=True,
        # vLLM may not have chosen the block size yet; every page size has a kernel, so any stands in.
        page_size=block_size or 1,
        ragged=True,
        sliding_window=1 if has_sliding_window else 0,  # the window's size is read by no decision
    )
    write = PrefillContext(
        kv_layout=KVLayout.PAGED,
        rope=RopeMode.NONE,
        append=True,
        q_dtype=data,
        kv_dtype=data,
        arch=arch,
        head_dim=head_size,
        group_size=1,
        causal=False,
        page_size=block_size or 1,
        ragged=True,
        slot_mapping=True,
    )
    return [
        *_gap("attention", attention, ATTENTION_PREFERENCE),
        *_gap("cache write", write, SLOT_APPEND_PREFERENCE),
    ]


def _gap(step: str, ctx: PrefillContext, preference: tuple[KernelKey, ...]) -> list[str]:
    """The reasons of the kernel nearest to serving `ctx` on its arch (fewest reasons), when none
    does; empty when one does."""
    if explain(ctx).plan is not None:
        return []
    candidates = [key for key in preference if ctx.arch in code_of(key).serves]
    nearest = min((rejections(key, ctx) for key in candidates), key=len)
    return [
        f"no {ctx.arch.value} kernel serves the {step} of head_size {ctx.head_dim}: " + "; ".join(nearest)
    ]


# --- per batch ---------------------------------------------------------------------------------------


class GroupShape(NamedTuple):
    """The cache shape of one KV-cache group, the same in every layer and batch."""

    page_size: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    kv_order: KVOrder


class TilePrefillMetadata(AttentionMetadata):  # type: ignore[misc]
    """One batch of a KV-cache group, as every layer of the group reads it: the batch's metadata
    tensors (vLLM's own, not copies) and a plan per kind of layer, made once per batch."""

    def __init__(
        self,
        tokens: int,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        query_start_loc: torch.Tensor,
        group: GroupShape,
        validate: bool,
    ) -> None:
        #: The batch's query rows: q and the output rows past them (padding) are not touched.
        self.tokens = tokens
        self.block_table = block_table
        self.seq_lens = seq_lens
        self.query_start_loc = query_start_loc
        self.group = group
        self.validate = validate
        self._plans: dict[LayerKind, GQAPagedCachePrefillPlan[torch.Tensor]] = {}

    def plan(self, kind: LayerKind) -> GQAPagedCachePrefillPlan[torch.Tensor]:
        """The batch's plan for layers of `kind`: made on the first ask (the builder asks for every
        kind it knows of), then the same one."""
        plan = self._plans.get(kind)
        if plan is None:
            group = self.group
            shape = tp.PagedShape(
                tokens_q=self.tokens,
                page_size=group.page_size,
                heads=kind.heads,
                kv_heads=group.kv_heads,
                head_dim=group.head_dim,
                dtype=group.dtype,
                device=group.device,
                kv_order=group.kv_order,
            )
            op = attention_op(kind.sm_scale, kind.sliding_window, kind.softcap, self.validate)
            plan = op.plan(self.block_table, self.seq_lens, self.query_start_loc, shape=shape)
            self._plans[kind] = plan
        return plan


# --- set-up --------------------------------------------------------------------------------------------

#: The Op families a step runs: the K/V write by slot mapping (vLLM's is int64), then attention over
#: the paged cache.
STEP_OPS: Final = (tp.PagedCacheSlotAppend.__name__, tp.GQAPagedCachePrefill.__name__)


def step_programs(
    group: GroupShape, kinds: Sequence[LayerKind]
) -> tuple[tuple[ModelConfig, ...], BuildOptions]:
    """What the steps of a KV-cache group with these kinds of layer run, as the models and options
    whose programs `warm_up` makes ready: one model per kind (the Ops take q and k rotated)."""
    dtype = DType.of(group.dtype, argument="kv_cache_spec.dtype")
    models = tuple(
        ModelConfig(
            heads=kind.heads,
            kv_heads=group.kv_heads,
            head_dim=group.head_dim,
            dtypes=(dtype,),
            windows=(kind.sliding_window or 0,),
            softcap=kind.softcap or 0.0,
            sm_scale=kind.sm_scale,
            rope=RopeMode.NONE,
        )
        for kind in kinds
    )
    options = BuildOptions(ops=STEP_OPS, page_sizes=(group.page_size,), index_dtypes=(IndexDType.INT64,))
    return models, options


class TilePrefillMetadataBuilder(AttentionMetadataBuilder[TilePrefillMetadata]):  # type: ignore[misc]
    """Builds each batch's `TilePrefillMetadata` for one KV-cache group, with the plans of the kinds
    of layers the group holds."""

    # The plans are bound to a batch's token count and tensors, and no replay of a captured
    # graph has been checked: attention runs eagerly, between vLLM's piecewise graphs.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(
        self,
        kv_cache_spec: KVCacheSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not isinstance(kv_cache_spec, AttentionSpec):
            raise TypeError(
                "kv_cache_spec: expected an AttentionSpec (a paged K/V cache), got "
                f"{type(kv_cache_spec).__name__}"
            )
        if kv_cache_spec.head_size_v != kv_cache_spec.head_size:
            raise ValueError(
                f"kv_cache_spec.head_size_v: expected the key head size {kv_cache_spec.head_size}, got "
                f"{kv_cache_spec.head_size_v}"
            )
        layout = vllm_config.cache_config.get_resolved_kv_cache_layout()
        self.group = GroupShape(
            page_size=kv_cache_spec.block_size,
            kv_heads=kv_cache_spec.num_kv_heads,
            head_dim=kv_cache_spec.head_size,
            dtype=kv_cache_spec.dtype,
            device=torch.device(device),
            kv_order=kv_order_of_layout(layout),
        )
        layers = get_layers_from_vllm_config(vllm_config, AttentionLayerBase, layer_names)
        impls = (getattr(layer, "impl", None) for layer in layers.values())
        #: The kinds of the group's layers, each planned once per batch (in order, without repeats).
        self.kinds: tuple[LayerKind, ...] = tuple(
            dict.fromkeys(impl.kind for impl in impls if isinstance(impl, TilePrefillImpl))
        )
        # vLLM builds the builders once a worker's caches exist, before its first request: the
        # programs the group's steps run are loaded (or compiled, side by side) now, not in a step.
        models, options = step_programs(self.group, self.kinds)
        #: What set-up made ready (nothing on a CPU).
        self.warmed: WarmUp | None = warm_up(models, self.group.device, options) if models else None

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> TilePrefillMetadata:
        del common_prefix_len, fast_build  # always 0 in vLLM 0.34; every build is fast
        common = common_attn_metadata
        if common.causal is not True:
            raise NotImplementedError(
                f"common_attn_metadata.causal: expected True, got {common.causal!r}; tileprefill's "
                "decoder attention is causal"
            )
        requests = common.num_reqs
        metadata = TilePrefillMetadata(
            # The host copy: reading it costs no device sync. Rows past it are vLLM's padding.
            tokens=int(common.query_start_loc_cpu[requests]),
            block_table=common.block_table_tensor[:requests],
            seq_lens=common.seq_lens[:requests],
            query_start_loc=common.query_start_loc[: requests + 1],
            group=self.group,
            validate=TilePrefillBackend.validate_plans,
        )
        for kind in self.kinds:
            metadata.plan(kind)
        return metadata


# --- per layer ---------------------------------------------------------------------------------------


class SlotPlans:
    """The slot-append plans of the latest slot-mapping tensors. vLLM hands every layer of a
    KV-cache group the same slot-mapping tensor in a step, so the group's first layer plans the
    write and the others reuse its plan, whatever the order of the groups' layers."""

    #: Plans kept: more than a model's KV-cache groups, so that a step's plans outlive its layers;
    #: the oldest go first.
    kept: ClassVar[int] = 16

    def __init__(self) -> None:
        # By the tensor's id; each entry holds the tensor, so no other tensor can take that id.
        self._plans: dict[int, tuple[torch.Tensor, tp.SlotAppendShape, bool, PagedCacheSlotAppendPlan]] = {}

    def plan(
        self, slot_mapping: torch.Tensor, shape: tp.SlotAppendShape, validate: bool
    ) -> PagedCacheSlotAppendPlan:
        key = id(slot_mapping)
        kept = self._plans.get(key)
        # The tensor itself, not its values: a plan reads the slots from it at every run.
        if kept is not None and kept[0] is slot_mapping and kept[1:3] == (shape, validate):
            return kept[3]
        plan = slot_append_op(validate).plan(slot_mapping, shape=shape)
        self._plans.pop(key, None)
        self._plans[key] = (slot_mapping, shape, validate, plan)
        while len(self._plans) > self.kept:
            del self._plans[next(iter(self._plans))]
        return plan


_SLOT_PLANS: Final = SlotPlans()


class TilePrefillImpl(AttentionImpl[TilePrefillMetadata]):  # type: ignore[misc]
    """One attention layer: its K/V write by slot mapping, then its attention, on tileprefill."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        reasons = unserved_layer(
            alibi_slopes, kv_cache_dtype, attn_type, sinks, sliding_window, logits_soft_cap
        )
        if reasons:
            raise NotImplementedError("tileprefill cannot serve this attention layer: " + "; ".join(reasons))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        self.sliding_window = sliding_window
        self.kv_cache_dtype = kv_cache_dtype
        self.logits_soft_cap = logits_soft_cap
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        #: What this layer computes; layers of one kind share an Op and each batch's plan.
        self.kind = LayerKind(
            heads=num_heads,
            sm_scale=self.scale,
            sliding_window=sliding_window,
            # vLLM passes None or 0 for a layer without softcapping; tileprefill's "none" is None.
            softcap=float(logits_soft_cap) if logits_soft_cap else None,
        )

    def do_kv_cache_update(
        self,
        layer: AttentionLayer,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Write the step's keys and values into this layer's cache, in place, at vLLM's slots
        (slot -1: a padding token, skipped). The slot mapping may be shorter than key (vLLM pads
        the activations more than the slots); the rows past it are not written."""
        del layer
        tokens = slot_mapping.shape[0]
        k_pages, v_pages = cache_views(kv_cache, self.head_size)
        shape = tp.SlotAppendShape(
            tokens=tokens,
            page_size=k_pages.shape[1],
            kv_heads=self.num_kv_heads,
            head_dim=self.head_size,
            dtype=key.dtype,
            device=key.device,
        )
        plan = _SLOT_PLANS.plan(slot_mapping, shape, TilePrefillBackend.validate_plans)
        plan.run(key[:tokens], value[:tokens], k_pages, v_pages)

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: torch.Tensor,
        attn_metadata: TilePrefillMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of the batch's queries (`query`, (tokens, Hq, D)) over this layer's cache,
        written into `output` (tokens, Hq, D); the keys and values are already in the cache."""
        del layer, key, value
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                "output_scale / output_block_scale: expected None, got a scale; tileprefill writes the "
                "output in the model's dtype (no fused output quantisation)"
            )
        if attn_metadata is None:  # vLLM's profiling run: no batch to attend
            return output.fill_(0)
        tokens = attn_metadata.tokens
        k_pages, v_pages = cache_views(kv_cache, self.head_size)
        plan = attn_metadata.plan(self.kind)
        # query, key and value are strided views of the fused QKV projection, read where they are;
        # a leading slice of vLLM's output buffer is written in place.
        plan.run_into(output[:tokens], query[:tokens], k_pages, v_pages)
        return output


def unserved_layer(
    alibi_slopes: list[float] | None,
    kv_cache_dtype: str,
    attn_type: str,
    sinks: torch.Tensor | None,
    sliding_window: int | None,
    logits_soft_cap: float | None,
) -> list[str]:
    """Why tileprefill cannot serve a layer built with these arguments (empty: it can). vLLM checks
    the configuration before it builds layers, but ALiBi and a layer's own window and softcap
    reach only the layer."""
    reasons: list[str] = []
    if alibi_slopes is not None:
        reasons.append(
            f"alibi_slopes: expected None, got {len(alibi_slopes)} slopes; tileprefill adds no position bias"
        )
    if sinks is not None:
        reasons.append(
            f"sinks: expected None, got a tensor of shape {tuple(sinks.shape)}; no attention sinks"
        )
    if kv_cache_dtype not in _CACHE_DTYPES:
        reasons.append(
            f"kv_cache_dtype: expected one of {', '.join(map(repr, _CACHE_DTYPES))}, got {kv_cache_dtype!r}; "
            "quantised caches are not served"
        )
    if attn_type != AttentionType.DECODER:
        reasons.append(
            f"attn_type: expected {AttentionType.DECODER.value!r}, got {str(attn_type)!r}; encoder and cross "
            "attention are not served"
        )
    if sliding_window is not None and (isinstance(sliding_window, bool) or sliding_window < 1):
        reasons.append(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
    if logits_soft_cap is not None and logits_soft_cap < 0:
        reasons.append(f"logits_soft_cap: expected None, 0 (none) or a number > 0, got {logits_soft_cap!r}")
    return reasons
