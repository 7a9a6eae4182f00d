"""Run a transformers model's attention on tileprefill: the attention implementation "tileprefill".

    import tileprefill.integrations.transformers as tp_transformers

    tp_transformers.register()
    model = LlamaForCausalLM(config, attn_implementation="tileprefill")  # or from_pretrained(...)
    model.set_attn_implementation("tileprefill")                          # or switch a loaded model

Every attention call of the model then runs on tileprefill's public Ops:

- a plain batch, q (B, H, Sq, D) over k, v (B, Hkv, Skv, D) with Sq <= Skv: `GQAPrefill`. That is
  prefill (Sq == Skv), a prefill chunk over a cache and a decode step (Sq == 1): transformers hands
  the attention function the whole cache, and tileprefill's causal mask is bottom-right aligned
  (query i sees keys j <= Skv - Sq + i), which is what a cache means.
- a packed call carrying `cu_seq_lens_q` / `cu_seq_lens_k` (continuous batching, padding-free
  batches), q (1, H, Tq, D) over k, v (1, Hkv, Tkv, D): `GQAVarlenPrefill`, bottom-right causal per
  sequence.

Causality is the module's `is_causal` (what the layer is), not the call's `is_causal`, which
transformers uses as a hint for SDPA's kernel choice. The scale is the call's `scaling` (None:
D ** -0.5). K and V stay at Hkv heads: tileprefill maps query head h to KV head h // (H // Hkv)
itself, so nothing repeats them. Dtypes are float16 or bfloat16, as the Ops take them.

A call it cannot serve exactly raises `UnsupportedAttentionCall`, naming what and why, instead of
computing something else: a mask that masks something (padding, a static cache's unfilled slots,
a custom 4D mask), a sliding window, logit softcapping, attention sinks, a position bias, dropout
(training), a backward pass, attention weights, value head dim != query head dim.

`register()` also registers a mask function under the same name. transformers builds no mask at
all for an implementation without one (so padding would be dropped unseen); ours returns None for
a plain causal (or bidirectional) batch and raises for padding or for any pattern beyond that.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final

import torch

import tileprefill as tp

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        AttentionMaskInterface,
        bidirectional_mask_function,
        causal_mask_function,
    )
except ImportError as _error:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "tileprefill.integrations.transformers needs transformers >= 5.0: "
        "pip install 'tileprefill[transformers]'"
    ) from _error

#: The attention implementation name `register()` adds.
NAME: Final = "tileprefill"
#: The name transformers 5.17's continuous batching switches "tileprefill" to (it prefixes "paged|").
PAGED_NAME: Final = "paged|tileprefill"

#: Keyword arguments some models pass that change what attention computes; not served.
_UNSERVED_KWARGS: Final = {
    "sliding_window": "this integration serves no sliding-window layers yet (the Ops do, with "
    "sliding_window=...; set config.sliding_window = None only if no sequence is longer than the window)",
    "softcap": "this integration serves no logit softcapping yet (the Ops do, with softcap=...)",
    "s_aux": "tileprefill has no attention sinks",
    "sinks": "tileprefill has no attention sinks",
    "position_bias": "tileprefill adds no position bias to the scores",
    "block_table": "tileprefill's integration reads the packed K/V of the call, not a flash block table",
}


#: What the mask function returns for a pattern beyond plain causal (it is never read as a mask: the
#: attention function serves it only as a packed call with cu_seq_lens, and rejects it otherwise).
BEYOND_CAUSAL: Final = torch.empty(0, dtype=torch.bool)


class UnsupportedAttentionCall(ValueError):
    """A call the "tileprefill" attention implementation cannot serve exactly (the message says why)."""


def register() -> None:
    """Register the attention implementation "tileprefill" (and its mask function) with transformers.

    Afterwards `attn_implementation="tileprefill"` / `model.set_attn_implementation("tileprefill")`
    runs every attention call on tileprefill. Idempotent. "paged|tileprefill" is registered too:
    transformers 5.17's `generate_batch` switches a model to "paged|<name>" (see the README).
    """
    for name in (NAME, PAGED_NAME):
        AttentionInterface.register(name, attention_forward)
        AttentionMaskInterface.register(name, mask)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """One attention call of a transformers model: query (B, H, Sq, D), key/value (B, Hkv, Skv, D)
    -> (output (B, Sq, H, D), None), as transformers' attention functions return.

    `is_causal` is taken and ignored: causality is `module.is_causal` (module docstring).
    """
    del is_causal
    causal = getattr(module, "is_causal", True)  # transformers' own default for a module without it
    if not isinstance(causal, bool):
        raise UnsupportedAttentionCall(f"module.is_causal: expected a bool, got {causal!r}")
    beyond_causal = attention_mask is BEYOND_CAUSAL
    _reject_unserved(module, query, key, value, None if beyond_causal else attention_mask, dropout, kwargs)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if kwargs.get("cache") is not None or cu_q is not None or cu_k is not None:
        # The pattern beyond causal that a packed call's mask function saw is its packing, which
        # cu_seq_lens state exactly (transformers' flash path reads them the same way).
        return _packed(module, query, key, value, causal, scaling, cu_q, cu_k, kwargs), None
    if beyond_causal:
        raise UnsupportedAttentionCall(
            f"{_layer(module)}: the model asks for a mask beyond plain causal or bidirectional: a sliding "
            "window, packed sequences read from position_ids without cu_seq_lens_q / cu_seq_lens_k, or an "
            "overlay such as bidirectional image tokens; tileprefill serves causal or full attention, and "
            "packed sequences only with cu_seq_lens_q / cu_seq_lens_k"
        )
    return _dense(query, key, value, causal, scaling), None


def mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable[[int, int, int, int], bool] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: object,
) -> torch.Tensor | None:
    """The mask function of "tileprefill": None for an unpadded causal (or bidirectional) batch, the
    marker `BEYOND_CAUSAL` for a pattern beyond that, and for padding it raises.

    transformers calls it once per forward (with the mask factory and the caller's 2D padding mask);
    what the attention layers then get is None, and tileprefill applies causality itself.
    """
    if attention_mask is not None:
        covered = attention_mask[:, -kv_length:]
        if covered.shape[-1] < kv_length:
            raise UnsupportedAttentionCall(
                f"attention_mask covers {covered.shape[-1]} of {kv_length} keys (a static cache's unfilled "
                "slots?); tileprefill attends to every key it is given: use a DynamicCache"
            )
        if not bool(covered.all()):
            rows = (~covered.bool()).any(dim=-1).nonzero().flatten().tolist()
            raise UnsupportedAttentionCall(
                f"attention_mask masks keys of batch rows {rows} (padding); tileprefill serves unpadded "
                "batches: give every row the same length, or use generate_batch (see the README)"
            )
    if mask_function is causal_mask_function or mask_function is bidirectional_mask_function:
        return None
    # A pattern beyond plain causal: packed sequences read from position_ids (continuous batching in
    # transformers 5.17, padding-free batches), a sliding window, or an overlay such as bidirectional
    # image tokens. Only the first is servable, and only where the call also carries cu_seq_lens_q /
    # cu_seq_lens_k; the attention function decides on seeing this marker.
    return BEYOND_CAUSAL


def _layer(module: torch.nn.Module) -> str:
    return f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"


def _reject_unserved(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, object],
) -> None:
    layer = _layer(module)
    if attention_mask is not None:
        raise UnsupportedAttentionCall(
            f"{layer}: got an attention_mask of shape {tuple(attention_mask.shape)}; tileprefill masks "
            "only causally (module.is_causal). register()'s mask function passes None for every batch "
            "it can serve, so this is a custom mask or one the model built itself"
        )
    if dropout > 0.0:
        raise UnsupportedAttentionCall(
            f"{layer}: dropout={dropout} (the module is training); tileprefill computes attention without "
            "dropout: call model.eval()"
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        raise UnsupportedAttentionCall(
            f"{layer}: the inputs require grad; tileprefill's Ops have no backward: run under torch.no_grad()"
        )
    for name, why in _UNSERVED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise UnsupportedAttentionCall(f"{layer}: {name}={kwargs[name]!r}; {why}")
    if kwargs.get("output_attentions"):
        raise UnsupportedAttentionCall(
            f"{layer}: output_attentions=True; tileprefill never forms the attention weights"
        )
    if value.shape[-1] != query.shape[-1] or key.shape[-1] != query.shape[-1]:
        raise UnsupportedAttentionCall(
            f"{layer}: head dims q {query.shape[-1]}, k {key.shape[-1]}, v {value.shape[-1]}; "
            "tileprefill takes one head dim for q, k and v"
        )
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise UnsupportedAttentionCall(
            f"{layer}: expected query, key, value of rank 4 (batch, heads, tokens, head_dim), got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )


# One Op per (kind, causal, scale): constructing one per call would redo its kernel-map setup on
# every layer of every step. Ops hold no per-call state, so sharing them is safe.
@functools.cache
def dense_op(causal: bool, sm_scale: float | None) -> tp.GQAPrefill:
    """The cached `GQAPrefill` that serves plain batches of this causality and scale."""
    return tp.GQAPrefill(causal=causal, sm_scale=sm_scale)


@functools.cache
def varlen_op(causal: bool, sm_scale: float | None) -> tp.GQAVarlenPrefill:
    """The cached `GQAVarlenPrefill` that serves packed calls of this causality and scale."""
    return tp.GQAVarlenPrefill(causal=causal, sm_scale=sm_scale)


def _dense(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float | None
) -> torch.Tensor:
    s_q, s_kv = query.shape[2], key.shape[2]
    if causal and s_q > s_kv:
        # Bottom-right alignment would leave the first Sq - Skv queries with no key; transformers never
        # makes such a causal call, so it is a caller's mistake rather than something to compute.
        raise UnsupportedAttentionCall(
            f"causal call with {s_q} queries over {s_kv} keys; a causal call needs queries <= keys"
        )
    # transformers' (B, heads, tokens, D) -> tileprefill's (B, tokens, heads, D). The Ops take dense
    # tensors only, so this is a copy; the output is already transformers' (B, Sq, H, D).
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    return dense_op(causal, scaling)(q, k, v)


def _packed(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    causal: bool,
    scaling: float | None,
    cu_q: object,
    cu_k: object,
    kwargs: dict[str, object],
) -> torch.Tensor:
    if query.shape[0] != 1 or key.shape[0] != 1:
        raise UnsupportedAttentionCall(
            f"a packed call (cu_seq_lens_q / cu_seq_lens_k) has batch 1, got query {tuple(query.shape)}, "
            f"key {tuple(key.shape)}"
        )
    if isinstance(cu_k, dict):  # transformers 5.17's continuous batching: one per layer type
        cu_k = cu_k.get("full_attention")
    if not isinstance(cu_q, torch.Tensor) or not isinstance(cu_k, torch.Tensor):
        raise UnsupportedAttentionCall(
            f"a packed call needs both cu_seq_lens_q and cu_seq_lens_k as tensors, got "
            f"{type(cu_q).__name__} and {type(cu_k).__name__}"
        )
    q = query[0].transpose(0, 1).contiguous()  # (Tq, H, D)
    cache = kwargs.get("cache")
    if cache is not None:
        k, v = _update_paged_cache(module, cache, key, value, kwargs)
    else:
        k, v = (t[0].transpose(0, 1).contiguous() for t in (key, value))  # (Tkv, Hkv, D)
    # Exact conversions: transformers' collators may hand int64 cumulative lengths.
    cu_q32, cu_k32 = (t.to(device=q.device, dtype=torch.int32) for t in (cu_q, cu_k))
    return varlen_op(causal, scaling)(q, k, v, cu_q32, cu_k32).unsqueeze(0)


def _update_paged_cache(
    module: torch.nn.Module, cache: object, key: torch.Tensor, value: torch.Tensor, kwargs: dict[str, object]
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers 5.17's continuous batching hands the attention function its paged cache (later
    versions update it in the model): write this call's K/V and read back every key of the batch,
    packed (Tkv, Hkv, D), as its own paged attention functions do."""
    from transformers.generation.continuous_batching import PagedAttentionCache

    if not isinstance(cache, PagedAttentionCache):
        raise UnsupportedAttentionCall(
            f"cache: expected transformers' PagedAttentionCache, got {type(cache).__name__}"
        )
    update: Callable[..., tuple[torch.Tensor, torch.Tensor]] = cache.update
    k, v = update(
        key_states=key,
        value_states=value,
        layer_idx=getattr(module, "layer_idx"),  # noqa: B009 - not every nn.Module has one
        read_index=kwargs["read_index"],
        write_index=kwargs["write_index"],
    )
    return k.contiguous(), v.contiguous()
