"""The transformers integration's set-up: `model_configs` reads a model's kinds of attention layer,
and `warm_up` makes ready the programs its calls build (checked on the CPU: a forward planned as on
an SM90 GPU records what it would build; nothing compiles or launches)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import tileprefill as tp
from tileprefill.aot.models import BuildOptions
from tileprefill.context import Arch
from tileprefill.kernels.compile import recording_builds
from tileprefill.ops import decision
from tileprefill.ops import op as op_module

try:
    import tileprefill.integrations.transformers as tpt
    from test_integrations_transformers import gemma2, llama, qwen2
except ImportError:
    if os.environ.get("CI"):  # CI installs the extra: a missing transformers there is a failure
        raise
    pytest.skip("transformers is not installed: pip install -e '.[transformers]'", allow_module_level=True)

MODELS: dict[str, Callable[[], Any]] = {
    "llama": llama,
    "qwen2 windowed": lambda: qwen2(sliding_window=16),
    "gemma2": gemma2,
}


@pytest.fixture
def as_on_sm90(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The Ops plan as on an H100 (SM90, 132 SMs) while their tensors stay on the CPU."""
    monkeypatch.setattr(decision, "arch_of", lambda _: Arch.SM90)
    monkeypatch.setattr(op_module, "sm_count_of", lambda _: 132)
    decision.decided.cache_clear()
    yield
    decision.decided.cache_clear()


@pytest.mark.parametrize("name", list(MODELS))
def test_model_configs_cover_exactly_what_the_attention_calls_hand_the_ops(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = MODELS[name]()
    seen: set[tuple[bool, float | None, tpt.Features]] = set()
    for function in ("dense_op", "varlen_op"):
        original = getattr(tpt, function)

        def spy(causal: bool, scale: float | None, features: tpt.Features, _original: Any = original) -> Any:
            seen.add((causal, scale, features))
            return _original(causal, scale, features)

        monkeypatch.setattr(tpt, function, spy)
    tpt.register()
    model.set_attn_implementation(tpt.NAME)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 24)))
    configs = tpt.model_configs(model)
    covered = {
        (c.causal, c.sm_scale, tpt.Features(w or None, c.softcap or None)) for c in configs for w in c.windows
    }
    assert covered == seen
    assert all(c.heads == model.config.num_attention_heads for c in configs)
    assert all(c.dtypes == (tp.DType.BF16,) for c in configs)


@pytest.mark.parametrize("name", list(MODELS))
def test_warm_up_makes_ready_the_programs_a_forward_builds(name: str, as_on_sm90: None) -> None:
    model = MODELS[name]()
    tpt.register()
    model.set_attn_implementation(tpt.NAME)
    with recording_builds() as requests, torch.no_grad():
        model(torch.randint(0, 64, (1, 24)))  # every launch does nothing: the logits are not read
    options = BuildOptions(ops=tpt.OPS, archs=(Arch.SM90,))
    ready = {spec.request for config in tpt.model_configs(model) for spec in tp.programs_for(config, options)}
    assert requests and set(requests) <= ready


def test_warm_up_on_the_cpu_has_nothing_to_do() -> None:
    ready = tpt.warm_up(llama())
    assert (ready.programs, ready.loaded, ready.compiled) == (0, 0, 0)
