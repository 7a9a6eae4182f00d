"""The transformers integration on the GPU (TileLang kernels): the CPU module's models and checks, on CUDA.

Llama and Qwen2 share heads, KV heads, head dim, dtype and scale, so they build two programs: the
dense causal one (prefill and decode steps; token counts are dynamic) and the varlen causal one
(continuous batching). A windowed Qwen2 and Gemma 2 (softcap, alternating windows, its own scale)
add three dense ones.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")
pytest.importorskip("transformers", reason="needs transformers: pip install -e '.[transformers]'")

import tileprefill as tp  # noqa: E402
import tileprefill.integrations.transformers as tpt  # noqa: E402

# The CPU module (tests/ is on sys.path through its conftest) holds the models and the checks.
from test_integrations_transformers import (  # noqa: E402
    HEAD_DIM,
    HEADS,
    KV_HEADS,
    LAYERS,
    MODELS,
    VOCAB,
    Call,
    Model,
    _check_greedy,
    _generate_batch,
    assert_close_at_every_position,
    calls,
    gemma2,
    logits_of,
    qwen2,
)

__all__ = ["calls"]  # the spy fixture, used by name

DEV = torch.device("cuda")
SCALE = HEAD_DIM**-0.5  # the models' `scaling`, a static fact of the compiled programs
GEMMA_SCALE = 48**-0.5  # gemma2()'s query_pre_attn_scalar
WINDOW = 64
#: The windowed and softcapped layers of the models below: (scale, features).
FEATURED = [
    (SCALE, tpt.Features(WINDOW, None)),
    (GEMMA_SCALE, tpt.Features(WINDOW, 50.0)),
    (GEMMA_SCALE, tpt.Features(None, 50.0)),
]


def on_device(model: Model) -> Model:
    torch.nn.Module.to(model, DEV)  # transformers' own `to` override is typed for other uses
    return model


def warm_up() -> None:
    """The programs the tests below build (run under `recording_builds` by `compiled_programs`)."""
    shape = tp.DenseShape(1, 16, 16, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, DEV)
    tpt.dense_op(True, SCALE).plan(shape=shape)
    for scale, features in FEATURED:
        tpt.dense_op(True, scale, features).plan(shape=shape)
    cu = torch.tensor([0, 16], dtype=torch.int32, device=DEV)
    tpt.varlen_op(True, SCALE).plan(
        cu, cu, shape=tp.VarlenShape(16, 16, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, DEV)
    )


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_sdpa_at_every_position_gpu(name: str, calls: list[Call]) -> None:
    model = on_device(MODELS[name]())
    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(1)).to(DEV)
    sdpa = logits_of(model, "sdpa", ids)
    ours = logits_of(model, tpt.NAME, ids)
    assert_close_at_every_position(ours, sdpa)
    assert [c[:3] for c in calls] == [
        ("GQAPrefill", (2, 200, HEADS, HEAD_DIM), (2, 200, KV_HEADS, HEAD_DIM))
    ] * LAYERS


@pytest.mark.parametrize("name", MODELS)
def test_generate_runs_prefill_and_every_decode_step_on_tileprefill_gpu(name: str, calls: list[Call]) -> None:
    model = on_device(MODELS[name]())
    prompt_len, new = 70, 8
    ids = torch.randint(0, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(3)).to(DEV)
    model.set_attn_implementation(tpt.NAME)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=0
        )
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


def test_generate_batch_runs_on_the_varlen_op_gpu(calls: list[Call]) -> None:
    model = on_device(MODELS["llama"]())
    gen = torch.Generator().manual_seed(5)
    lens, new = [9, 70, 33], 5
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lens]
    generated = _generate_batch(model, prompts, new)
    ours = [c[:3] for c in calls if c.op == "GQAVarlenPrefill"]
    assert (
        ours[:LAYERS]
        == [("GQAVarlenPrefill", (sum(lens), HEADS, HEAD_DIM), (sum(lens), KV_HEADS, HEAD_DIM))] * LAYERS
    )
    assert len(ours) == LAYERS * new and not [c for c in calls if c.op == "GQAPrefill"]
    for prompt, tokens in zip(prompts, generated, strict=True):
        assert len(tokens) == new
        _check_greedy(model, prompt + tokens, len(prompt))


def test_windowed_and_softcapped_models_gpu(calls: list[Call]) -> None:
    """Qwen2 with a window of 64 keys over 200 tokens against SDPA, and Gemma 2 (softcap 50, window 64
    on every other layer) against its eager attention, then greedy decoding past the window."""
    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(6)).to(DEV)
    windowed = on_device(qwen2(sliding_window=WINDOW))
    assert_close_at_every_position(logits_of(windowed, tpt.NAME, ids), logits_of(windowed, "sdpa", ids))
    gemma = on_device(gemma2(sliding_window=WINDOW))
    assert_close_at_every_position(logits_of(gemma, tpt.NAME, ids), logits_of(gemma, "eager", ids))
    assert {c.op_id for c in calls} == {id(tpt.dense_op(True, s, f)) for s, f in FEATURED}
    gemma.set_attn_implementation(tpt.NAME)
    with torch.no_grad():
        out = gemma.generate(
            ids[:1, :70], attention_mask=torch.ones_like(ids[:1, :70]), max_new_tokens=8, do_sample=False
        )
    _check_greedy(gemma, out[0].tolist(), 70, reference="eager")
