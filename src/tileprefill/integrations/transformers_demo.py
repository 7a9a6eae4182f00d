"""`python -m tileprefill demo --engine transformers`: a random-weight model's `generate()` on tileprefill.

A GQA Llama (2 layers, 16 query heads over 4 KV heads; head dim 128 on a GPU, 64 on the CPU, where
the reference kernels are slow) is built with random weights (nothing is downloaded), the
attention implementation "tileprefill" is registered, and the demo checks two things against the
same model on torch SDPA:

- the logits of a 2 x 48-token prompt, at every position, within bf16 tolerance (3% of the
  largest logit: both models round every layer's activations to bf16);
- greedy `generate()` of 8 new tokens on tileprefill (its prefill and every decode step): each
  token is SDPA's greedy choice at its position up to bf16 near-ties (its SDPA logit, teacher-forced
  on the generated sequence, is within that tolerance of the maximum).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import tileprefill as tp

#: The logits tolerance, as a fraction of the largest logit.
TOLERANCE = 0.03
PROMPT, NEW = 48, 8


def run(device: torch.device, dtype: torch.dtype) -> int:
    """The demo on `device`; 0 when both checks hold, 1 when one fails, 2 without transformers."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        import tileprefill.integrations.transformers as tp_transformers
    except ImportError as missing:
        print(f"tileprefill demo --engine transformers: {missing}", file=sys.stderr)
        return 2
    head_dim = 128 if device.type == "cuda" else 64
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=16 * head_dim,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.08,  # spreads the logits, so greedy choices are not bf16 near-ties
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)  # transformers is untyped here (mypy does not follow it)
    model.to(device=device, dtype=dtype)
    torch.nn.Module.eval(model)
    tp_transformers.register()
    ready = tp_transformers.warm_up(model)  # at set-up, so that no request compiles (nothing on a CPU)
    if ready.programs:
        print(
            f"warm-up: {ready.programs} programs ready on {ready.device} ({ready.loaded} precompiled, "
            f"{ready.compiled} compiled) in {ready.seconds:.1f}s"
        )
    ids = torch.randint(0, config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    print(
        f"model: random-weight Llama, 2 layers, Hq 16 / Hkv 4, D {head_dim}, {dtype}, on {device}; "
        f"prompt 2 x {PROMPT} tokens"
    )

    def logits(implementation: str, tokens: torch.Tensor) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            out: torch.Tensor = model(tokens).logits.float()
        return out

    sdpa, ours = logits("sdpa", ids), logits(tp_transformers.NAME, ids)
    tol = TOLERANCE * float(sdpa.abs().max())
    worst = float((ours - sdpa).abs().max())
    logits_match = worst <= tol
    print(f"logits at every position: max |tileprefill - SDPA| {worst:.4f} (tolerance {tol:.4f})")

    model.set_attn_implementation(tp_transformers.NAME)
    with torch.no_grad():
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    reference = logits("sdpa", generated)
    choices = [
        float(reference[b, pos - 1].max() - reference[b, pos - 1, generated[b, pos]]) <= tol
        for b in range(generated.shape[0])
        for pos in range(PROMPT, generated.shape[1])
    ]
    print(
        f"generate: {NEW} new tokens a row on tileprefill; {sum(choices)} of {len(choices)} are SDPA's "
        "greedy choice"
    )
    if not (logits_match and all(choices)):
        print("tileprefill demo --engine transformers: FAILED (did not match SDPA)", file=sys.stderr)
        return 1
    plan = tp_transformers.dense_op(True, head_dim**-0.5).plan(
        shape=tp.DenseShape(2, PROMPT, PROMPT, 16, 4, head_dim, dtype, device)
    )
    print(f"kernels: {plan.plan}")
    print("matched SDPA")
    return 0
