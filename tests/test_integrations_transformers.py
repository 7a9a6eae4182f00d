"""The transformers integration on CPU (reference kernels): random-weight Llama and Qwen2 models.

Every attention call goes through the registered function; a spy on the Ops' `__call__` records
each call (which Op, q and k shapes), so a test proves what ran rather than assuming it.
bf16 throughout: the Ops take fp16/bf16 only, and bf16 on CPU is fast enough at this size.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import pytest
import torch

import tileprefill as tp

try:
    import transformers
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    import tileprefill.integrations.transformers as tpt
except ImportError:
    if os.environ.get("CI"):  # CI installs the extra: a missing transformers there is a failure
        raise
    pytest.skip("transformers is not installed: pip install -e '.[transformers]'", allow_module_level=True)

if TYPE_CHECKING:
    from conftest import Oracle

LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 2, 8, 2, 64, 256


#: A transformers model. mypy does not follow transformers (mypy.ini: it costs CI ~45 s), so its
#: classes are untyped here; these tests exercise what they use.
Model: TypeAlias = Any

# hidden 512 over 8 heads: head_dim 64 in both models (Qwen2Config takes no head_dim argument).
_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=HEADS * HEAD_DIM,
    intermediate_size=1024,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=256,
    # A wider init than the default 0.02 spreads the logits (max |logit| ~ 5 instead of ~ 1), so greedy
    # choices are not near-ties that bf16 rounding alone could flip.
    initializer_range=0.08,
)


def llama() -> Model:
    torch.manual_seed(0)
    return _ready(LlamaForCausalLM(LlamaConfig(**_SIZES)))


def qwen2(sliding_window: int | None = None) -> Model:
    torch.manual_seed(0)
    window = {} if sliding_window is None else {"use_sliding_window": True, "sliding_window": sliding_window}
    config = Qwen2Config(**_SIZES, **window, max_window_layers=0)
    return _ready(Qwen2ForCausalLM(config))


def gemma2(sliding_window: int = 8, softcap: float = 50.0) -> Model:
    """Gemma 2's attention: every other layer sliding-window, logit softcap, scale from
    query_pre_attn_scalar (not head_dim)."""
    torch.manual_seed(0)
    sizes = {k: v for k, v in _SIZES.items() if k != "initializer_range"}
    config = Gemma2Config(
        **sizes,
        head_dim=HEAD_DIM,
        sliding_window=sliding_window,
        attn_logit_softcapping=softcap,
        query_pre_attn_scalar=48,
        initializer_range=0.08,
    )
    return _ready(Gemma2ForCausalLM(config))


def _ready(model: Model) -> Model:
    model.bfloat16()
    torch.nn.Module.eval(model)  # transformers' own `eval` override is untyped
    return model


MODELS = {"llama": llama, "qwen2": qwen2}


class Call(NamedTuple):
    op: str
    q: tuple[int, ...]
    k: tuple[int, ...]
    op_id: int


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Call]]:
    """Every Op call the integration makes during the test, in order."""
    tpt.register()
    record: list[Call] = []
    for cls in (tp.GQAPrefill, tp.GQAVarlenPrefill):
        original = cls.__call__

        def spy(
            self: object, q: torch.Tensor, k: torch.Tensor, *rest: torch.Tensor, _orig: object = original
        ) -> torch.Tensor:
            record.append(Call(type(self).__name__, tuple(q.shape), tuple(k.shape), id(self)))
            return _orig(self, q, k, *rest)  # type: ignore[operator, no-any-return]

        monkeypatch.setattr(cls, "__call__", spy)
    yield record


def logits_of(model: Model, implementation: str, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        out: torch.Tensor = model(ids, **kwargs).logits.float()
    return out


def assert_close_at_every_position(ours: torch.Tensor, sdpa: torch.Tensor) -> None:
    """bf16 tolerance per position: both models round every layer's activations to bf16, so their logits
    differ by a few bf16 ulps of the logit scale; 3% of the largest logit leaves room for two layers."""
    tol = 0.03 * float(sdpa.abs().max())
    err = (ours - sdpa).abs().amax(dim=-1)  # (B, S): the worst vocab entry at each position
    assert err.shape == sdpa.shape[:-1]
    bad = (err > tol).nonzero().tolist()
    assert not bad, f"positions {bad[:8]} differ by up to {float(err.max()):.4f} > {tol:.4f}"


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_sdpa_at_every_position(name: str, calls: list[Call]) -> None:
    model = MODELS[name]()
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    sdpa = logits_of(model, "sdpa", ids)
    ours = logits_of(model, tpt.NAME, ids)
    assert_close_at_every_position(ours, sdpa)
    # One dense Op call per layer, on transformers' K/V as they are: Hkv heads, never repeated.
    assert [c[:3] for c in calls] == [
        ("GQAPrefill", (2, 40, HEADS, HEAD_DIM), (2, 40, KV_HEADS, HEAD_DIM))
    ] * 2
    assert len({c.op_id for c in calls}) == 1, "one cached Op serves every layer"


def test_causality_comes_from_the_module(calls: list[Call]) -> None:
    """Layers marked non-causal run full attention, as SDPA does for them, and differ from the causal
    result: the module's is_causal is what the Op gets. (Also shows the comparison can fail.)"""
    model = llama()
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    causal = logits_of(model, tpt.NAME, ids)
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    full = logits_of(model, tpt.NAME, ids)
    assert_close_at_every_position(full, logits_of(model, "sdpa", ids))
    err = (full - causal).abs().amax(dim=-1)[0]
    assert float(err[:-1].min()) > 0.03 * float(causal.abs().max()), "non-causal layers changed nothing"
    assert {c.op_id for c in calls} == {id(tpt.dense_op(True, 0.125)), id(tpt.dense_op(False, 0.125))}


def _check_greedy(model: Model, sequence: list[int], prompt_len: int, reference: str = "sdpa") -> None:
    """Each generated token is the reference implementation's greedy choice at its position, up to bf16
    near-ties: its logit there (teacher-forced on the generated sequence) is within the logits
    tolerance of the maximum."""
    logits = logits_of(model, reference, torch.tensor([sequence], device=model.device))[0]
    tol = 0.03 * float(logits.abs().max())
    for pos in range(prompt_len, len(sequence)):
        row = logits[pos - 1]
        assert float(row.max() - row[sequence[pos]]) <= tol, f"token {pos} is not SDPA's greedy choice"


@pytest.mark.parametrize("name", MODELS)
def test_generate_runs_prefill_and_every_decode_step_on_tileprefill(name: str, calls: list[Call]) -> None:
    model = MODELS[name]()
    prompt_len, new = 12, 5
    ids = torch.randint(0, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    model.set_attn_implementation(tpt.NAME)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
    assert out.shape == (2, prompt_len + new)
    # Prefill over the prompt, then one decode step per further token (the last token needs no step):
    # q_len 1 over the whole cache on the dense Op, whose bottom-right causal mask lets it see every key.
    expected = [
        ("GQAPrefill", (2, prompt_len, HEADS, HEAD_DIM), (2, prompt_len, KV_HEADS, HEAD_DIM))
    ] * LAYERS
    for step in range(1, new):
        expected += [
            ("GQAPrefill", (2, 1, HEADS, HEAD_DIM), (2, prompt_len + step, KV_HEADS, HEAD_DIM))
        ] * LAYERS
    assert [c[:3] for c in calls] == expected
    for row in out.tolist():
        _check_greedy(model, row, prompt_len)


def test_packed_call_runs_on_the_varlen_op(calls: list[Call]) -> None:
    """Three sequences packed in one row with cu_seq_lens (as a padding-free collator makes them):
    each sequence's logits equal its own SDPA forward."""
    model = qwen2()
    lens = [5, 11, 8]
    gen = torch.Generator().manual_seed(4)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lens]
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    position_ids = torch.cat([torch.arange(n) for n in lens])[None]
    packed = logits_of(
        model,
        tpt.NAME,
        torch.cat(seqs, dim=1),
        position_ids=position_ids,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(lens),
        max_length_k=max(lens),
    )
    for b, seq in enumerate(seqs):
        assert_close_at_every_position(packed[:, cu[b] : cu[b + 1]], logits_of(model, "sdpa", seq))
    ours = [c for c in calls if c.op == "GQAVarlenPrefill"]
    assert [c[:3] for c in ours] == [
        ("GQAVarlenPrefill", (24, HEADS, HEAD_DIM), (24, KV_HEADS, HEAD_DIM))
    ] * 2


def _generate_batch(model: Model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Continuous batching on tileprefill, by the route each transformers line accepts (see the README)."""
    from transformers import ContinuousBatchingConfig

    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    if "paged|sdpa" in transformers.AttentionInterface._global_mapping:
        # transformers with "paged|" implementations (5.17): generate_batch runs "paged|tileprefill".
        model.set_attn_implementation(tpt.PAGED_NAME)
        out = model.generate_batch(
            prompts,
            generation_config=config,
            continuous_batching_config=ContinuousBatchingConfig(use_cuda_graph=False),
        )
        return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    # Later versions refuse any name without "flash" in generate_batch: make the manager under "sdpa",
    # then switch the model to tileprefill before it runs a step.
    model.set_attn_implementation("sdpa")
    manager = model.init_continuous_batching(
        generation_config=config,
        continuous_batching_config=ContinuousBatchingConfig(auto_switch_to_flash=False, use_cuda_graph=False),
    )
    model.set_attn_implementation(tpt.NAME)
    manager.start()
    try:
        ids = [manager.add_request(p, max_new_tokens=new) for p in prompts]
        results = [manager.get_result(request_id=i, timeout=120) for i in ids]
    finally:
        manager.stop(block=True)
    assert all(r is not None for r in results), "a request timed out"
    return [r.generated_tokens for r in results if r is not None]


def test_generate_batch_runs_on_the_varlen_op(calls: list[Call]) -> None:
    model = llama()
    gen = torch.Generator().manual_seed(5)
    lens, new = [7, 13, 20], 4
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lens]
    generated = _generate_batch(model, prompts, new)
    assert [len(g) for g in generated] == [new] * 3
    # One packed prefill of all prompts, then decode steps of one query per request over its cache.
    ours = [c[:3] for c in calls if c.op == "GQAVarlenPrefill"]
    expected = [("GQAVarlenPrefill", (sum(lens), HEADS, HEAD_DIM), (sum(lens), KV_HEADS, HEAD_DIM))] * LAYERS
    for step in range(1, new):
        expected += [
            ("GQAVarlenPrefill", (3, HEADS, HEAD_DIM), (sum(lens) + 3 * step, KV_HEADS, HEAD_DIM))
        ] * LAYERS
    assert ours == expected
    assert not [c for c in calls if c.op == "GQAPrefill"]
    for prompt, tokens in zip(prompts, generated, strict=True):
        _check_greedy(model, prompt + tokens, len(prompt))


# --- what it refuses, with the reason --------------------------------------------------------------


def test_padding_is_refused() -> None:
    tpt.register()
    model = llama()
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    with pytest.raises(tpt.UnsupportedAttentionCall, match=r"batch rows \[1\] \(padding\)"):
        logits_of(model, tpt.NAME, ids, attention_mask=mask)


def test_sliding_window_layers_match_sdpa(calls: list[Call]) -> None:
    """Qwen2 with a window of 8 keys over 40 tokens: the window changes the result (against the same
    model without it), and ours matches SDPA on the windowed mask at every position."""
    model = qwen2(sliding_window=8)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(7))
    windowed = logits_of(model, tpt.NAME, ids)
    assert_close_at_every_position(windowed, logits_of(model, "sdpa", ids))
    assert {c.op_id for c in calls} == {id(tpt.dense_op(True, 0.125, tpt.Features(8, None)))}
    full = logits_of(qwen2(), tpt.NAME, ids)
    err = (windowed - full).abs().amax(dim=-1)[0]
    assert float(err[:8].max()) < 0.03 * float(full.abs().max()), "the first 8 positions see no further"
    assert float(err[12:].min()) > 0.03 * float(full.abs().max()), "the window changed nothing"


def test_sliding_window_generate_on_tileprefill(calls: list[Call]) -> None:
    """Greedy decoding past the window: every step runs on the windowed Op."""
    model = qwen2(sliding_window=8)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(12))
    model.set_attn_implementation(tpt.NAME)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, 17) and calls
    assert {c.op_id for c in calls} == {id(tpt.dense_op(True, 0.125, tpt.Features(8, None)))}
    _check_greedy(model, out[0].tolist(), 12)


def test_gemma2_softcap_and_alternating_windows_match_eager(calls: list[Call]) -> None:
    """Gemma 2 (softcap 50, window 8 on every other layer, query_pre_attn_scalar 48) against its own
    eager attention (SDPA takes no softcap); a softcap of 0.5 changes the result, so it is applied."""
    ids = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(13))
    model = gemma2()
    assert_close_at_every_position(logits_of(model, tpt.NAME, ids), logits_of(model, "eager", ids))
    scale = 48**-0.5
    assert {c.op_id for c in calls} == {
        id(tpt.dense_op(True, scale, tpt.Features(8, 50.0))),
        id(tpt.dense_op(True, scale, tpt.Features(None, 50.0))),
    }
    tight = gemma2(softcap=0.5)
    ours = logits_of(tight, tpt.NAME, ids)
    assert_close_at_every_position(ours, logits_of(tight, "eager", ids))
    assert float((ours - logits_of(model, tpt.NAME, ids)).abs().max()) > 0.03 * float(ours.abs().max())
    model.set_attn_implementation(tpt.NAME)
    with torch.no_grad():
        out = model.generate(
            ids[:1, :12], attention_mask=torch.ones_like(ids[:1, :12]), max_new_tokens=5, do_sample=False
        )
    _check_greedy(model, out[0].tolist(), 12, reference="eager")


def test_packed_windowed_calls_need_the_window_stated(calls: list[Call]) -> None:
    """A packed windowed call runs windowed on the varlen Op (each sequence equals its own SDPA
    forward). A mask with a local pattern that is not a plain window (a window under position_ids
    packing, chunks) cannot be checked against cu_seq_lens: a packed call with one is served only
    when its sliding_window states that size; and a layer that leaves its window to the mask takes
    it from a plain-window mask."""
    model = qwen2(sliding_window=4)
    lens = [5, 11, 8]
    gen = torch.Generator().manual_seed(14)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in lens]
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)
    packing = dict(
        position_ids=torch.cat([torch.arange(n) for n in lens])[None],
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=max(lens),
        max_length_k=max(lens),
    )
    packed = logits_of(model, tpt.NAME, torch.cat(seqs, dim=1), **packing)
    for b, seq in enumerate(seqs):
        assert_close_at_every_position(packed[:, cu[b] : cu[b + 1]], logits_of(model, "sdpa", seq))
    assert id(tpt.varlen_op(True, 0.125, tpt.Features(4, None))) in {c.op_id for c in calls}
    module = model.model.layers[0].self_attn
    q = torch.randn(1, HEADS, 24, HEAD_DIM, dtype=torch.bfloat16)
    k = v = torch.randn(1, KV_HEADS, 24, HEAD_DIM, dtype=torch.bfloat16)
    forward: Callable[..., tuple[torch.Tensor, None]] = tpt.attention_forward
    local = tpt.BEYOND_LOCAL.of(4)
    with torch.no_grad():
        with pytest.raises(tpt.UnsupportedAttentionCall, match="local pattern of 4 keys"):
            forward(module, q, k, v, local, scaling=0.125, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        out, _ = forward(
            module, q, k, v, local, scaling=0.125, sliding_window=4, cu_seq_lens_q=cu, cu_seq_lens_k=cu
        )
        assert out.shape == (1, 24, HEADS, HEAD_DIM)
        with pytest.raises(tpt.UnsupportedAttentionCall, match="beyond plain causal"):
            forward(module, q, k, v, local, scaling=0.125, sliding_window=4)  # not packed: refused
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None  # a layer that leaves its window to the mask
    assert_close_at_every_position(logits_of(model, tpt.NAME, seqs[1]), logits_of(model, "sdpa", seqs[1]))


def test_the_mask_function_tells_a_window_from_chunks() -> None:
    """transformers passes the window (or chunk) size as local_size; the mask function is checked
    itself, so chunked attention of the same size is not taken for a window."""
    from transformers.masking_utils import chunked_causal_mask_function, sliding_window_causal_mask_function

    sliding = sliding_window_causal_mask_function(4)
    assert tpt.mask(1, 10, 10, mask_function=sliding, local_size=4) is tpt.SLIDING.of(4)
    assert tpt.SLIDING.size_of(tpt.SLIDING.of(4)) == 4 and tpt.SLIDING.size_of(None) is None
    assert tpt.mask(1, 10, 10, mask_function=sliding, local_size=5) is tpt.BEYOND_LOCAL.of(5)
    assert tpt.mask(1, 10, 10, mask_function=sliding) is tpt.BEYOND_CAUSAL  # no size: not recognised
    # a decode step over a cache: query at absolute 20 over keys 11..20
    assert tpt.mask(1, 1, 10, q_offset=20, kv_offset=11, mask_function=sliding, local_size=4) is (
        tpt.SLIDING.of(4)
    )
    chunked = chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long))
    assert tpt.mask(1, 10, 10, mask_function=chunked, local_size=4) is tpt.BEYOND_LOCAL.of(4)


def test_packed_position_ids_without_cu_seq_lens_are_refused() -> None:
    """transformers reads packing from restarting position_ids; without cu_seq_lens the call cannot say
    where sequences start, and attending across them would be wrong."""
    tpt.register()
    model = llama()
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(8))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with pytest.raises(tpt.UnsupportedAttentionCall, match="packed sequences only with cu_seq_lens"):
        # No cache: transformers reads packing from position_ids only when there is none.
        logits_of(model, tpt.NAME, ids, position_ids=position_ids, use_cache=False)


def test_custom_4d_mask_is_refused() -> None:
    tpt.register()
    model = llama()
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(9))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(tpt.UnsupportedAttentionCall, match=r"attention_mask of shape \(1, 1, 6, 6\)"):
        logits_of(model, tpt.NAME, ids, attention_mask=mask)


def test_training_is_refused() -> None:
    tpt.register()
    model = llama()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.set_attn_implementation(tpt.NAME)
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(10))
    model.train()
    with pytest.raises(tpt.UnsupportedAttentionCall, match=r"dropout=0\.1"):
        model(ids)
    torch.nn.Module.eval(model)
    with pytest.raises(tpt.UnsupportedAttentionCall, match="no backward"):
        model(ids)  # grad mode on and trainable weights: the inputs require grad


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"softcap": -1.0}, r"softcap: expected a number > 0, got -1\.0"),
        ({"sliding_window": 0}, "sliding_window: expected an int >= 1, got 0"),
        ({"s_aux": torch.zeros(HEADS)}, "s_aux=.*; tileprefill has no attention sinks"),
        ({"output_attentions": True}, "never forms the attention weights"),
    ],
)
def test_unserved_arguments_are_refused(kwargs: dict[str, object], match: str) -> None:
    model = llama()
    module = model.model.layers[0].self_attn
    q = torch.randn(1, HEADS, 4, HEAD_DIM, dtype=torch.bfloat16)
    k = v = torch.randn(1, KV_HEADS, 4, HEAD_DIM, dtype=torch.bfloat16)
    forward: Callable[..., object] = tpt.attention_forward  # the kwargs are what models pass by name
    with torch.no_grad(), pytest.raises(tpt.UnsupportedAttentionCall, match=match):
        forward(module, q, k, v, None, scaling=0.125, **kwargs)


def test_direct_call_layout_scale_and_gqa_against_the_oracle(oracle: Oracle) -> None:
    """The function on its own: transformers' (B, H, S, D) in, (B, S, H, D) out, `scaling` applied,
    queries over a longer cache bottom-right causal; checked against the float64 oracle."""
    model = llama()
    module = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, HEADS, 3, HEAD_DIM, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, KV_HEADS, 9, HEAD_DIM, generator=gen).to(torch.bfloat16)
    v = torch.randn(2, KV_HEADS, 9, HEAD_DIM, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        out, weights = tpt.attention_forward(module, q, k, v, None, scaling=0.3, is_causal=False)
    assert weights is None and out.shape == (2, 3, HEADS, HEAD_DIM) and out.dtype == torch.bfloat16
    for b in range(2):
        want = oracle.attention(
            q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1), causal=True, scale=0.3
        )
        torch.testing.assert_close(out[b].double(), want, atol=oracle.atol(torch.bfloat16), rtol=0)


def test_register_adds_both_names_and_caches_ops() -> None:
    tpt.register()
    tpt.register()  # idempotent
    for name in (tpt.NAME, tpt.PAGED_NAME):
        assert transformers.AttentionInterface._global_mapping[name] is tpt.attention_forward
        assert transformers.masking_utils.AttentionMaskInterface._global_mapping[name] is tpt.mask
    assert tpt.dense_op(True, 0.125) is tpt.dense_op(True, 0.125)
    assert tpt.varlen_op(True, 0.125) is not tpt.varlen_op(False, 0.125)
