"""Run SGLang's attention on tileprefill: the attention backend "tileprefill" (SGLang 0.5.23).

    pip install -e .          # in SGLang's environment; its entry point registers the backend
    sglang serve --model-path <model> --prefill-attention-backend tileprefill

tileprefill declares `register()` under SGLang's plugin entry-point group `sglang.srt.plugins`, which
SGLang loads in every process it starts (the launcher before it parses the command line, the
engine, each scheduler): installing tileprefill is all the registration a server needs. In a
process of your own, before building `ServerArgs`:

    import tileprefill.integrations.sglang as tp_sglang

    tp_sglang.register()  # the name "tileprefill" for --attention-backend / --prefill-attention-backend

What the backend serves, on SGLang's own KV pool (read and written in place, never copied):

- extend batches (`ForwardMode.EXTEND` and `MIXED`): prefill, and chunked prefill over a prefix
  already in the pool, one `GQAPagedCachePrefill` plan per batch and kind of layer. SGLang's
  `MHATokenToKVPool` is a paged cache: each layer's K and V buffers, viewed as
  `(num_pages, page_size, Hkv, D)` (its NHD or HND layout), with `req_to_token` as the block table
  (page size 1: a request's slots; larger pages: every page's first slot // page_size, as
  SGLang's FlashAttention backend reads it).
- the new keys and values, written at `out_cache_loc` when SGLang asks (`save_kv_cache`), by
  `PagedCacheSlotAppend` into the same views, before attention reads them.
- decode batches (`ForwardMode.DECODE`) through the same path (a decode row is a one-token
  extend), eagerly. tileprefill has no decode kernel of its own (no split-KV schedule) and this
  backend captures no CUDA graphs, so serve decode with another backend:
  `--prefill-attention-backend tileprefill` (SGLang picks the decode backend, or name it with
  `--decode-attention-backend`). With `--attention-backend tileprefill` decode runs here too,
  and SGLang must run without decode CUDA graphs (`--disable-cuda-graph`).
- set-up: when SGLang builds the backend (after loading the model, before its first request), every
  program the model's attention layers run is loaded from the precompiled directories in use, or
  compiled side by side (`tileprefill.aot.warm_up`), so that no request compiles.
- per layer: `layer.scaling`; sliding windows (`sliding_window_size + 1` keys: SGLang's window
  counts the keys before the query); logit softcapping `logit_cap * tanh(s / logit_cap)`; GQA and MQA.

Anything else is refused with `UnsupportedAttentionCall`, naming what and why, instead of being
computed some other way: at start-up MLA models, encoder-decoder models, chunked local attention,
KV pools other than a plain `MHATokenToKVPool` (the hybrid sliding-window pool of Gemma 4, Llama 4
and others: start SGLang with `--disable-hybrid-swa-memory`), quantised (fp8, fp4) KV caches,
pools whose KV ids are translated (unified pools, decode context parallelism); per batch
speculative decoding's verify and draft-extend batches, diffusion-LM and split-prefill batches,
CUDA-graph capture; per layer cross or bidirectional attention, a value head dim other than the
query's, other capping methods, and keyword inputs such as attention sinks or `return_lse`.

`validate=False` by default (no host synchronisation in a plan, as a server wants): the Ops then
trust SGLang's lengths and tables. `TileprefillAttnBackend(runner, validate=True)` checks them on
every plan, for tests and debugging.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Final, NamedTuple, Protocol

import torch

import tileprefill as tp
from tileprefill.aot import WarmUp, warm_up
from tileprefill.aot import models as aot
from tileprefill.context import DType, IndexDType, RopeMode
from tileprefill.ops.paged import GQAPagedCachePrefillPlan
from tileprefill.ops.slots import PagedCacheSlotAppendPlan

try:
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.layers.radix_attention import AttentionType, RadixAttention
    from sglang.srt.mem_cache.memory_pool import KVCache, MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
except ImportError as _error:  # pragma: no cover - sglang is not installed
    raise ImportError(
        "tileprefill.integrations.sglang needs sglang 0.5.23 in the same environment "
        "(tests/engines/requirements-sglang.txt lists what its tests install)"
    ) from _error

#: The attention backend name `register()` adds.
NAME: Final = "tileprefill"

#: The KV dtypes the Ops take (q and the cache share one).
_DTYPES: Final = (torch.float16, torch.bfloat16)


class UnsupportedAttentionCall(ValueError):
    """A configuration, batch or layer the "tileprefill" backend cannot serve exactly (the message
    says why)."""


def register() -> None:
    """Register the attention backend "tileprefill" with SGLang and add it to the command line's
    choices of `--attention-backend`, `--prefill-attention-backend` and
    `--decode-attention-backend`. Idempotent; call it before SGLang parses its arguments."""
    register_attention_backend(NAME)(create_backend)
    if NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([NAME])


class ModelConfig(Protocol):
    """What the backend reads of SGLang's `ModelConfig`."""

    @property
    def is_encoder_decoder(self) -> bool: ...


class ModelRunner(Protocol):
    """What the backend reads of SGLang's `ModelRunner`."""

    @property
    def req_to_token_pool(self) -> ReqToTokenPool: ...
    @property
    def token_to_kv_pool(self) -> KVCache: ...
    @property
    def kv_index_translator(self) -> object: ...
    @property
    def use_mla_backend(self) -> bool: ...
    @property
    def attention_chunk_size(self) -> int | None: ...
    @property
    def model_config(self) -> ModelConfig: ...


def create_backend(runner: ModelRunner) -> TileprefillAttnBackend:
    """The factory `register()` registers: SGLang calls it with its model runner."""
    return TileprefillAttnBackend(runner)


class LayerKind(NamedTuple):
    """What the attention Op of a layer is made of (one Op, and one plan per batch, for each)."""

    sm_scale: float
    sliding_window: int | None
    softcap: float | None


class PlanKey(NamedTuple):
    """A plan serves the layers of one kind and one head layout."""

    kind: LayerKind
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass
class BatchMetadata:
    """One forward pass's inputs of the paged Ops, shared by every layer, and the plans made of
    them (on first use by a layer of each kind)."""

    block_table: torch.Tensor  # int32 (B, max_pages)
    kv_seqlens: torch.Tensor  # int32 (B,): prefix + new tokens of each request
    cu_seqlens_q: torch.Tensor  # int32 (B + 1,)
    tokens_q: int
    out_cache_loc: torch.Tensor
    attention_plans: dict[PlanKey, GQAPagedCachePrefillPlan[torch.Tensor]] = field(default_factory=dict)
    slot_plans: dict[tuple[int, int, torch.dtype], PagedCacheSlotAppendPlan] = field(default_factory=dict)


class TileprefillAttnBackend(AttentionBackend):
    """SGLang's attention backend over tileprefill's paged Ops (module docstring)."""

    def __init__(self, model_runner: ModelRunner, *, validate: bool = False) -> None:
        super().__init__()
        _refuse_configuration(model_runner)
        pool = model_runner.token_to_kv_pool
        assert isinstance(pool, MHATokenToKVPool)  # _refuse_configuration checked it
        self.validate = validate
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = pool
        self.page_size = pool.page_size
        self.kv_order = tp.KVOrder.HND if pool.kv_cache_layout == "hnd" else tp.KVOrder.NHD
        self.kv_index_translator = model_runner.kv_index_translator
        self.forward_metadata: BatchMetadata | None = None
        model = getattr(model_runner, "model", None)  # loaded before SGLang builds its backends
        models, options = (
            model_programs(model, pool.dtype, self.page_size)
            if isinstance(model, torch.nn.Module)
            else ((), None)
        )
        #: What set-up made ready (nothing on a CPU, or for a model without attention layers).
        self.warmed: WarmUp | None = warm_up(models, pool.device, options) if models else None

    # --- per forward pass ---------------------------------------------------------------------------

    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture: bool = False) -> None:
        """The batch's block table, lengths and query offsets (once per forward pass; plans follow on
        each kind of layer's first call)."""
        if in_capture:
            raise UnsupportedAttentionCall(
                "CUDA graph capture: the tileprefill backend captures no graphs; start SGLang without the "
                "graph that captures it: --disable-prefill-cuda-graph (a full prefill graph), "
                "--disable-decode-cuda-graph, or --disable-cuda-graph for both"
            )
        mode = forward_batch.forward_mode
        if mode.is_idle():
            self.forward_metadata = None
            return
        if mode not in (ForwardMode.EXTEND, ForwardMode.MIXED, ForwardMode.DECODE):
            raise UnsupportedAttentionCall(
                f"forward_mode: expected EXTEND, MIXED or DECODE, got {mode.name}; the tileprefill backend "
                "serves no speculative verify or draft-extend, diffusion-LM or split-prefill batch"
            )
        if forward_batch.encoder_lens is not None:
            raise UnsupportedAttentionCall(
                "forward_batch.encoder_lens is set (an encoder-decoder batch); the tileprefill backend "
                "serves decoder self-attention only"
            )
        self.forward_metadata = self._batch_metadata(forward_batch)

    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch) -> None:
        """Nothing runs inside a graph: every input is made outside it."""

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        raise UnsupportedAttentionCall(
            "decode CUDA graphs: the tileprefill backend captures no graphs; use it for prefill only "
            "(--prefill-attention-backend tileprefill) or start SGLang with --disable-decode-cuda-graph"
        )

    def get_cuda_graph_seq_len_fill_value(self) -> int:
        # The sequence length SGLang gives rows it pads a batch with (data-parallel attention): one key,
        # read through request row 0 of req_to_token, whose slots are the pool's padding slot.
        return 1

    def support_triton(self) -> bool:
        return False

    def _batch_metadata(self, forward_batch: ForwardBatch) -> BatchMetadata:
        batch = forward_batch.batch_size
        device = forward_batch.seq_lens.device
        seq_lens_cpu = forward_batch.seq_lens_cpu
        # The table's width comes from the host copy SGLang keeps, so no device value is read here.
        lengths = forward_batch.seq_lens if seq_lens_cpu is None else seq_lens_cpu
        max_len = int(lengths.max()) if batch > 0 else 0
        if forward_batch.forward_mode.is_decode():
            cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=device)
            tokens_q = batch
        else:
            extend_seq_lens = forward_batch.extend_seq_lens
            if extend_seq_lens is None:
                raise UnsupportedAttentionCall(
                    "forward_batch.extend_seq_lens: expected the new tokens of each request, got None"
                )
            cu_seqlens_q = torch.nn.functional.pad(
                torch.cumsum(extend_seq_lens, 0, dtype=torch.int32), (1, 0)
            )
            tokens_q = _extend_tokens(forward_batch, extend_seq_lens)
        return BatchMetadata(
            block_table=self._block_table(forward_batch.req_pool_indices, max_len),
            kv_seqlens=forward_batch.seq_lens.to(torch.int32),
            cu_seqlens_q=cu_seqlens_q,
            tokens_q=tokens_q,
            out_cache_loc=forward_batch.out_cache_loc,
        )

    def _block_table(self, req_pool_indices: torch.Tensor, max_len: int) -> torch.Tensor:
        """The batch's rows of req_to_token as tileprefill's block table: slots at page size 1, the page
        of each page's first slot otherwise (SGLang allocates whole pages, so a page's slots are
        consecutive)."""
        req_to_token = self.req_to_token_pool.req_to_token[:, : max(max_len, 1) : self.page_size]
        rows = torch.index_select(req_to_token, 0, req_pool_indices)
        table = rows if self.page_size == 1 else rows // self.page_size
        return table.to(torch.int32).contiguous()

    # --- per layer ------------------------------------------------------------------------------------

    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs: object,
    ) -> torch.Tensor:
        """Write this layer's new K/V at out_cache_loc (if `save_kv_cache`), then attend q (T, Hq * D)
        over each request's prefix and new tokens in the pool -> (T, Hq * D)."""
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, kwargs)

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs: object,
    ) -> torch.Tensor:
        """A decode step: the same path with one query per request (module docstring)."""
        return self._forward(q, k, v, layer, forward_batch, save_kv_cache, kwargs)

    def _forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool,
        kwargs: dict[str, object],
    ) -> torch.Tensor:
        kind = _layer_kind(layer, kwargs)
        metadata = self.forward_metadata
        if metadata is None:
            raise UnsupportedAttentionCall(
                f"layer {layer.layer_id}: no batch metadata; SGLang calls init_forward_metadata before "
                "the layers of a forward pass"
            )
        heads, kv_heads, head_dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        if kv_heads != self.token_to_kv_pool.head_num or head_dim != self.token_to_kv_pool.head_dim:
            raise UnsupportedAttentionCall(
                f"layer {layer.layer_id}: KV heads x head dim {kv_heads} x {head_dim}, but the KV pool "
                f"holds {self.token_to_kv_pool.head_num} x {self.token_to_kv_pool.head_dim}"
            )
        queries = q.view(-1, heads, head_dim)
        if queries.shape[0] != metadata.tokens_q:
            raise UnsupportedAttentionCall(
                f"layer {layer.layer_id}: q has {queries.shape[0]} tokens, the batch {metadata.tokens_q}"
            )
        k_pages, v_pages = self._pages(layer.layer_id)
        if save_kv_cache and k is not None and v is not None:
            self._append(
                metadata,
                forward_batch,
                k.view(-1, kv_heads, head_dim),
                v.view(-1, kv_heads, head_dim),
                k_pages,
                v_pages,
            )
        key = PlanKey(kind, heads, kv_heads, head_dim, q.dtype)
        plan = metadata.attention_plans.get(key)
        if plan is None:
            shape = tp.PagedShape(
                tokens_q=metadata.tokens_q,
                page_size=self.page_size,
                heads=heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                dtype=q.dtype,
                device=q.device,
                kv_order=self.kv_order,
            )
            op = attention_op(kind, self.validate)
            plan = op.plan(metadata.block_table, metadata.kv_seqlens, metadata.cu_seqlens_q, shape=shape)
            metadata.attention_plans[key] = plan
        out = plan.run(queries, k_pages, v_pages)
        return out.view(-1, heads * head_dim)

    def _pages(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's K and V buffers of the pool as (num_pages, page_size, Hkv, D) views."""
        pool = self.token_to_kv_pool
        return (
            pool_pages(pool.get_key_buffer(layer_id), self.page_size, self.kv_order),
            pool_pages(pool.get_value_buffer(layer_id), self.page_size, self.kv_order),
        )

    def _append(
        self,
        metadata: BatchMetadata,
        forward_batch: ForwardBatch,
        k: torch.Tensor,
        v: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
    ) -> None:
        """Write the new keys and values at their slots (`out_cache_loc`), as SGLang's own backends do
        with `set_kv_buffer` when `save_kv_cache` is set."""
        loc = forward_batch.out_cache_loc
        key = (k.shape[1], k.shape[2], k.dtype)
        # SGLang narrows out_cache_loc to a padded batch's real rows for a call; a plan is for one tensor.
        plan = metadata.slot_plans.get(key) if loc is metadata.out_cache_loc else None
        if plan is None:
            shape = tp.SlotAppendShape(
                tokens=loc.shape[0],
                page_size=self.page_size,
                kv_heads=k.shape[1],
                head_dim=k.shape[2],
                dtype=k.dtype,
                device=k.device,
            )
            plan = slot_append_op(self.validate).plan(loc, shape=shape)
            if loc is metadata.out_cache_loc:
                metadata.slot_plans[key] = plan
        plan.run(k, v, k_pages, v_pages)


def pool_pages(buffer: torch.Tensor, page_size: int, kv_order: tp.KVOrder) -> torch.Tensor:
    """One layer's K or V buffer of an `MHATokenToKVPool` as tileprefill's paged cache
    (num_pages, page_size, Hkv, D), a view: NHD buffers are (slots, Hkv, D) with slot =
    page * page_size + row, HND buffers (pages, Hkv, page_size, D)."""
    if kv_order is tp.KVOrder.HND:
        return buffer.transpose(1, 2)
    rows = buffer.shape[0] - buffer.shape[0] % page_size  # whole pages (SGLang sizes the pool in pages)
    return buffer[:rows].view(rows // page_size, page_size, *buffer.shape[1:])  # splits a dim: always a view


# One Op per layer kind: an Op holds no per-call state, so every backend and batch shares it.
@functools.cache
def attention_op(kind: LayerKind, validate: bool) -> tp.GQAPagedCachePrefill[torch.Tensor]:
    """The cached causal `GQAPagedCachePrefill` of a layer kind."""
    return tp.GQAPagedCachePrefill(
        causal=True,
        sm_scale=kind.sm_scale,
        sliding_window=kind.sliding_window,
        softcap=kind.softcap,
        validate=validate,
    )


@functools.cache
def slot_append_op(validate: bool) -> tp.PagedCacheSlotAppend:
    """The cached `PagedCacheSlotAppend` that writes new keys and values at their slots."""
    return tp.PagedCacheSlotAppend(validate=validate)


def _extend_tokens(forward_batch: ForwardBatch, extend_seq_lens: torch.Tensor) -> int:
    """The batch's new tokens, from SGLang's host-side counts when it has them."""
    if forward_batch.extend_num_tokens is not None:
        return forward_batch.extend_num_tokens
    if forward_batch.extend_seq_lens_cpu is not None:
        return sum(forward_batch.extend_seq_lens_cpu)
    return int(extend_seq_lens.sum())


def _layer_kind(layer: RadixAttention, kwargs: dict[str, object]) -> LayerKind:
    """The layer's Op parameters, after refusing what the Ops do not compute."""
    name = f"layer {layer.layer_id}"
    for keyword, value in kwargs.items():
        if value is not None and value is not False:
            raise UnsupportedAttentionCall(
                f"{name}: {keyword}={_short(value)}; the tileprefill backend takes no attention inputs "
                "beyond q, k and v (no sinks, LSE output, score modifiers or separate RoPE parts)"
            )
    if layer.is_cross_attention or layer.attn_type is not AttentionType.DECODER:
        raise UnsupportedAttentionCall(
            f"{name}: attn_type {layer.attn_type.name}, cross attention {layer.is_cross_attention}; the "
            "tileprefill backend serves causal decoder self-attention"
        )
    if layer.v_head_dim != layer.qk_head_dim:
        raise UnsupportedAttentionCall(
            f"{name}: value head dim {layer.v_head_dim} != query head dim {layer.qk_head_dim}; tileprefill "
            "takes one head dim"
        )
    if layer.pos_encoding_mode != "NONE":
        raise UnsupportedAttentionCall(
            f"{name}: pos_encoding_mode {layer.pos_encoding_mode!r}; the tileprefill backend applies no "
            "position encoding inside attention (expected 'NONE')"
        )
    if layer.xai_temperature_len > 0:
        raise UnsupportedAttentionCall(
            f"{name}: xai_temperature_len={layer.xai_temperature_len}; tileprefill scales no query by "
            "its position"
        )
    softcap: float | None = None
    if layer.logit_cap > 0:
        if layer.logit_capping_method != "tanh":
            raise UnsupportedAttentionCall(
                f"{name}: logit_capping_method {layer.logit_capping_method!r}; tileprefill caps with tanh"
            )
        softcap = float(layer.logit_cap)
    window = layer.sliding_window_size
    # SGLang's window counts the keys before the query (its kernels see kv >= q - window), tileprefill's
    # every key including the query's own.
    return LayerKind(float(layer.scaling), window + 1 if window > -1 else None, softcap)


#: The Op families a forward pass runs: the K/V write at SGLang's slots (int64), then attention.
PASS_OPS: Final = (tp.PagedCacheSlotAppend.__name__, tp.GQAPagedCachePrefill.__name__)


def model_programs(
    model: torch.nn.Module, dtype: torch.dtype, page_size: int
) -> tuple[tuple[aot.ModelConfig, ...], aot.BuildOptions]:
    """The models and options whose programs `warm_up` makes ready for `model`'s attention layers:
    one model per kind of layer and head layout. A layer this backend refuses is left out (its call
    raises with the reason)."""
    layouts: dict[tuple[LayerKind, int, int, int], None] = {}
    for layer in model.modules():
        if isinstance(layer, RadixAttention):
            try:
                kind = _layer_kind(layer, {})
            except UnsupportedAttentionCall:
                continue
            layouts[(kind, layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim)] = None
    dtypes = (DType.of(dtype, argument="the KV pool's dtype"),)
    models = tuple(
        aot.ModelConfig(
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtypes=dtypes,
            windows=(kind.sliding_window or 0,),
            softcap=kind.softcap or 0.0,
            sm_scale=kind.sm_scale,
            rope=RopeMode.NONE,  # the layers take q and k rotated
        )
        for kind, heads, kv_heads, head_dim in layouts
    )
    options = aot.BuildOptions(ops=PASS_OPS, page_sizes=(page_size,), index_dtypes=(IndexDType.INT64,))
    return models, options


def _refuse_configuration(runner: ModelRunner) -> None:
    """Refuse at start-up what no batch of this model could be served for."""
    if runner.use_mla_backend:
        raise UnsupportedAttentionCall(
            "the model uses multi-head latent attention (MLA); the tileprefill backend serves MHA, GQA "
            "and MQA"
        )
    if runner.model_config.is_encoder_decoder:
        raise UnsupportedAttentionCall(
            "the model is an encoder-decoder; the tileprefill backend serves no cross attention"
        )
    if runner.attention_chunk_size is not None:
        raise UnsupportedAttentionCall(
            f"attention_chunk_size={runner.attention_chunk_size} (chunked local attention); tileprefill "
            "masks causally, with or without a sliding window"
        )
    pool = runner.token_to_kv_pool
    if type(pool) is not MHATokenToKVPool:
        raise UnsupportedAttentionCall(
            f"token_to_kv_pool: expected SGLang's MHATokenToKVPool, got {type(pool).__name__}; for a "
            "hybrid sliding-window pool start SGLang with --disable-hybrid-swa-memory"
        )
    if pool.is_quantized_kv_cache or pool.dtype not in _DTYPES or pool.store_dtype != pool.dtype:
        raise UnsupportedAttentionCall(
            f"KV cache dtype {pool.dtype} (stored as {pool.store_dtype}); tileprefill reads float16 or "
            "bfloat16 caches: drop --kv-cache-dtype"
        )
    if pool.kv_cache_layout not in ("nhd", "hnd"):
        raise UnsupportedAttentionCall(
            f"KV cache layout {pool.kv_cache_layout!r}; tileprefill reads SGLang's 'nhd' and 'hnd' pools"
        )
    if pool.v_head_dim != pool.head_dim:
        raise UnsupportedAttentionCall(
            f"KV pool head dims K {pool.head_dim}, V {pool.v_head_dim}; tileprefill takes one head dim"
        )
    translator = runner.kv_index_translator
    if translator is not None and bool(getattr(translator, "needs_read_translate", False)):
        raise UnsupportedAttentionCall(
            "the KV pool's ids are translated (a unified pool or decode context parallelism); the "
            "tileprefill backend reads req_to_token as physical slots"
        )


def _short(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    return repr(value)[:60]
