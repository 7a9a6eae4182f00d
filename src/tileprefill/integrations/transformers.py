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
transformers uses as a hint for SDPA's kernel choice. A sliding-window layer (Mistral, Qwen2,
Gemma 2/3) runs with the Ops' `sliding_window`: the call's `sliding_window` keyword, or the window
of the sliding-window causal mask transformers built for it, checked against the mask function
itself (a query sees the last `sliding_window` keys up to itself, as in transformers). A
`softcap` keyword (Gemma 2's logit softcapping) becomes the Ops' `softcap`. The scale is the
call's `scaling` (None: D ** -0.5). K and V stay at Hkv heads: tileprefill maps query head h to
KV head h // (H // Hkv) itself, so nothing repeats them. Dtypes are float16 or bfloat16, as the Ops take them.

A call it cannot serve exactly raises `UnsupportedAttentionCall`, naming what and why, instead of
computing something else: a mask that masks something (padding, a static cache's unfilled slots,
a custom 4D mask), a mask pattern beyond causal or sliding-window causal (chunked attention,
bidirectional windows, image-token overlays), a sliding window in continuous batching, attention
sinks, a position bias, dropout (training), a backward pass, attention weights, value head dim !=
query head dim.

Set-up: `warm_up(model)` loads or compiles, when the model is set up, every program its calls can
need on its device (from the precompiled directories in use, `TILEPREFILL_PRECOMPILED`, else
compiled side by side), so that the first request compiles nothing. The model's kinds of
attention layer (`model_configs`) are read from its attention modules as they hand them to the
attention function: heads, head dim, `scaling`, `is_causal`, the sliding window and the logit
softcap.

`register()` also registers a mask function under the same name. transformers builds no mask at
all for an implementation without one (so padding would be dropped unseen); ours returns None for
a plain causal (or bidirectional) batch, a marker for a sliding-window causal one, and raises for
padding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import torch

import tileprefill as tp
from tileprefill.aot import BuildOptions, ModelConfig, WarmUp
from tileprefill.aot import warm_up as warm_up_models
from tileprefill.context import DType, RopeMode

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
    "s_aux": "tileprefill has no attention sinks",
    "sinks": "tileprefill has no attention sinks",
    "position_bias": "tileprefill adds no position bias to the scores",
    "block_table": "tileprefill's integration reads the packed K/V of the call, not a flash block table",
}


#: What the mask function returns for a pattern beyond plain causal (it is never read as a mask: the
#: attention function serves it only as a packed call with cu_seq_lens, and rejects it otherwise).
BEYOND_CAUSAL: Final = torch.empty(0, dtype=torch.bool)


class SizedMarkers:
    """Empty tensors the mask function returns for a pattern with a size, one per size; read by
    identity, never as a mask."""

    def __init__(self) -> None:
        self._by_size: dict[int, torch.Tensor] = {}

    def of(self, size: int) -> torch.Tensor:
        return self._by_size.setdefault(size, torch.empty(0, dtype=torch.bool))

    def size_of(self, attention_mask: torch.Tensor | None) -> int | None:
        """The size of the marker `attention_mask` is, else None."""
        for size, marker in self._by_size.items():
            if attention_mask is marker:
                return size
        return None


#: A sliding-window causal batch of `size` keys (the mask function checked the pattern).
SLIDING: Final = SizedMarkers()
#: A pattern beyond causal that carries a local size (transformers' `local_size`: a sliding window
#: or attention chunks of `size` keys) and is not a plain window: packing on top of one, chunks,
#: overlays. A packed call serves it only when its own `sliding_window` says the same size.
BEYOND_LOCAL: Final = SizedMarkers()


class UnsupportedAttentionCall(ValueError):
    """A call the "tileprefill" attention implementation cannot serve exactly (the message says why)."""


def model_configs(model: torch.nn.Module) -> tuple[ModelConfig, ...]:
    """The kinds of attention layer of `model` (a transformers model), one `ModelConfig` per
    distinct (heads, KV heads, head dim, scale, causality, softcap) with the windows of its layers:
    what its attention calls hand the Ops. Empty for a model without such modules."""
    dtype = DType.of(_parameter_dtype(model), argument="model dtype")
    kinds: dict[tuple[int, int, int, float, bool, float], list[int]] = {}
    for module in model.modules():
        layer: Any = module  # an attention module of any model: read by attribute
        config = getattr(layer, "config", None)
        if config is None or not all(hasattr(layer, name) for name in ("scaling", "head_dim", "is_causal")):
            continue
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        # What the model passes as `sliding_window`: the layer's own (Qwen2, Gemma 2, gpt-oss), else
        # the config's (Mistral passes `config.sliding_window` from every layer).
        owner = layer if hasattr(layer, "sliding_window") else config
        window = int(getattr(owner, "sliding_window", None) or 0)
        softcap = float(getattr(layer, "attn_logit_softcapping", None) or 0)
        kind = (heads, kv_heads, int(layer.head_dim), float(layer.scaling), bool(layer.is_causal), softcap)
        windows = kinds.setdefault(kind, [])
        if window not in windows:
            windows.append(window)
    return tuple(
        ModelConfig(
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            dtypes=(dtype,),
            windows=tuple(sorted(windows)),
            softcap=softcap,
            sm_scale=scale,
            rope=RopeMode.NONE,  # the integration's Ops take q and k rotated
            causal=causal,
        )
        for (heads, kv_heads, head_dim, scale, causal, softcap), windows in kinds.items()
    )


#: The Op families the integration calls: plain batches and packed calls.
OPS: Final = (tp.GQAPrefill.__name__, tp.GQAVarlenPrefill.__name__)


def warm_up(model: torch.nn.Module, *, jobs: int | None = None) -> WarmUp:
    """Make every program `model`'s attention calls can need on its device ready now, at set-up: loaded
    from the precompiled directories in use (`tileprefill.use_precompiled`, `TILEPREFILL_PRECOMPILED`),
    the others compiled in up to `jobs` processes side by side. Nothing to do on a CPU. Raises
    ValueError when a layer has no kernel on the device (a head dim the programs are not built for),
    as its first call would."""
    device = next(iter(model.parameters())).device
    return warm_up_models(model_configs(model), device, BuildOptions(ops=OPS), jobs=jobs)


def _parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(iter(model.parameters())).dtype


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
    local = BEYOND_LOCAL.size_of(attention_mask)
    beyond_causal = attention_mask is BEYOND_CAUSAL or local is not None
    masked_window = SLIDING.size_of(attention_mask)
    unmarked = None if beyond_causal or masked_window is not None else attention_mask
    _reject_unserved(module, query, key, value, unmarked, dropout, kwargs)
    features = _features(module, causal, masked_window, kwargs)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if kwargs.get("cache") is not None or cu_q is not None or cu_k is not None:
        # The pattern beyond causal that a packed call's mask function saw is its packing, which
        # cu_seq_lens state exactly (transformers' flash path reads them the same way), on top of a
        # window the call must state itself: the mask cannot be checked against cu_seq_lens here.
        if local is not None and features.sliding_window != local:
            raise UnsupportedAttentionCall(
                f"{_layer(module)}: the mask of this packed call has a local pattern of {local} keys (a "
                f"sliding window or attention chunks) and the call says sliding_window="
                f"{features.sliding_window}; tileprefill serves a packed window only when the call states it"
            )
        return _packed(module, query, key, value, causal, scaling, features, cu_q, cu_k, kwargs), None
    if beyond_causal:
        raise UnsupportedAttentionCall(
            f"{_layer(module)}: the model asks for a mask beyond plain causal or bidirectional: a sliding "
            "window, packed sequences read from position_ids without cu_seq_lens_q / cu_seq_lens_k, or an "
            "overlay such as bidirectional image tokens; tileprefill serves causal or full attention, and "
            "packed sequences only with cu_seq_lens_q / cu_seq_lens_k"
        )
    return _dense(query, key, value, causal, scaling, features), None


class Features(NamedTuple):
    """The score transforms of one layer, as the Ops take them (None: none)."""

    sliding_window: int | None
    softcap: float | None


#: A layer with neither transform.
NO_FEATURES: Final = Features(None, None)


def _features(
    module: torch.nn.Module, causal: bool, masked_window: int | None, kwargs: dict[str, object]
) -> Features:
    """The layer's sliding window (from the call's keyword, or the mask's marker: they must agree)
    and logit softcap, checked."""
    layer = _layer(module)
    stated = kwargs.get("sliding_window")
    window = _positive_int(stated)
    if stated is not None and window is None:
        raise UnsupportedAttentionCall(f"{layer}: sliding_window: expected an int >= 1, got {stated!r}")
    if masked_window is not None:
        if window is not None and window != masked_window:
            raise UnsupportedAttentionCall(
                f"{layer}: sliding_window={window}, but the mask transformers built is a window of "
                f"{masked_window} keys"
            )
        window = masked_window
    if window is not None and not causal:
        raise UnsupportedAttentionCall(
            f"{layer}: sliding_window={window} on a bidirectional layer; tileprefill's windows are causal"
        )
    if window is not None and kwargs.get("cache") is not None:
        raise UnsupportedAttentionCall(
            f"{layer}: sliding_window={window} in continuous batching; this integration reads the "
            "full-attention keys of a paged cache only"
        )
    softcap = kwargs.get("softcap")
    if softcap is not None and (
        isinstance(softcap, bool) or not isinstance(softcap, int | float) or not softcap > 0
    ):
        raise UnsupportedAttentionCall(f"{layer}: softcap: expected a number > 0, got {softcap!r}")
    return Features(window, None if softcap is None else float(softcap))


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
    size = _positive_int(kwargs.get("local_size"))  # transformers' window (or chunk) size, for SDPA
    if size is not None and _is_sliding_causal(mask_function, size, q_length, kv_length, q_offset, kv_offset):
        return SLIDING.of(size)
    # A pattern beyond (sliding-window) causal: packed sequences read from position_ids (continuous
    # batching in transformers 5.17, padding-free batches), chunked attention, or an overlay such as
    # bidirectional image tokens. Only the first is servable, and only where the call also carries
    # cu_seq_lens_q / cu_seq_lens_k; the attention function decides on seeing this marker.
    return BEYOND_CAUSAL if size is None else BEYOND_LOCAL.of(size)


def _positive_int(value: object) -> int | None:
    """`value` if it is an int >= 1 (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def _is_sliding_causal(
    mask_function: Callable[..., object],
    window: int,
    q_length: int,
    kv_length: int,
    q_offset: int,
    kv_offset: int,
) -> bool:
    """Whether `mask_function` is what tileprefill computes with `sliding_window=window`: query i
    (of q_length, bottom-right aligned over kv_length keys) sees local keys j with
    kv_length - q_length + i - window < j <= kv_length - q_length + i.

    Checked on a few query rows (the last two, the first, the middle) against every key: two
    adjacent rows tell a window from chunked attention (whose rows agree with a window only at a
    chunk's end), and the rows' absolute positions check the alignment of queries to keys.
    """
    if q_length < 1 or kv_length < 1:
        return False
    rows = torch.tensor(sorted({q_length - 1, max(0, q_length - 2), 0, q_length // 2}))
    cols = torch.arange(kv_length)
    last_key = (kv_length - q_length + rows)[:, None]
    want = (cols[None, :] <= last_key) & (cols[None, :] > last_key - window)
    zero = torch.zeros((), dtype=torch.long)
    try:
        got = mask_function(zero, zero, (q_offset + rows)[:, None], (kv_offset + cols)[None, :])
    except Exception:  # a mask function that is not index-based: not one we can recognise
        return False
    return isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.equal(got.bool(), want))


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


# One Op per (kind, causal, scale, features): constructing one per call would redo its kernel-map
# setup on every layer of every step. Ops hold no per-call state, so sharing them is safe.
def dense_op(causal: bool, sm_scale: float | None, features: Features = NO_FEATURES) -> tp.GQAPrefill:
    """The cached `GQAPrefill` that serves plain batches of this causality, scale and features."""
    return _dense_op(causal, sm_scale, features)


def varlen_op(causal: bool, sm_scale: float | None, features: Features = NO_FEATURES) -> tp.GQAVarlenPrefill:
    """The cached `GQAVarlenPrefill` that serves packed calls of this causality, scale and features."""
    return _varlen_op(causal, sm_scale, features)


@functools.cache  # called with every argument given, so a default never makes a second key
def _dense_op(causal: bool, sm_scale: float | None, features: Features) -> tp.GQAPrefill:
    return tp.GQAPrefill(
        causal=causal, sm_scale=sm_scale, sliding_window=features.sliding_window, softcap=features.softcap
    )


@functools.cache
def _varlen_op(causal: bool, sm_scale: float | None, features: Features) -> tp.GQAVarlenPrefill:
    return tp.GQAVarlenPrefill(
        causal=causal, sm_scale=sm_scale, sliding_window=features.sliding_window, softcap=features.softcap
    )


def _dense(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    causal: bool,
    scaling: float | None,
    features: Features,
) -> torch.Tensor:
    s_q, s_kv = query.shape[2], key.shape[2]
    if causal and s_q > s_kv:
        # Bottom-right alignment would leave the first Sq - Skv queries with no key; transformers never
        # makes such a causal call, so it is a caller's mistake rather than something to compute.
        raise UnsupportedAttentionCall(
            f"causal call with {s_q} queries over {s_kv} keys; a causal call needs queries <= keys"
        )
    # transformers' (B, heads, tokens, D) -> tileprefill's (B, tokens, heads, D): views, read in place
    # (the head dim stays contiguous); the output is already transformers' (B, Sq, H, D).
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    return dense_op(causal, scaling, features)(q, k, v)


def _packed(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    causal: bool,
    scaling: float | None,
    features: Features,
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
    q = query[0].transpose(0, 1)  # (Tq, H, D), a view read in place
    cache = kwargs.get("cache")
    if cache is not None:
        k, v = _update_paged_cache(module, cache, key, value, kwargs)
    else:
        k, v = (t[0].transpose(0, 1) for t in (key, value))  # (Tkv, Hkv, D), views
    # Exact conversions: transformers' collators may hand int64 cumulative lengths.
    cu_q32, cu_k32 = (t.to(device=q.device, dtype=torch.int32) for t in (cu_q, cu_k))
    return varlen_op(causal, scaling, features)(q, k, v, cu_q32, cu_k32).unsqueeze(0)


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
