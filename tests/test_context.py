"""PrefillContext validators and the enum helpers: bad input names the field, expected and actual."""

from __future__ import annotations

import attrs
import pytest
import torch

from tileprefill.context import Arch, DType, KVLayout, KVOrder, PrefillContext, RopeMode


def _valid(**changes: object) -> PrefillContext:
    """A paged RoPE-append context (every field in play), with `changes` applied."""
    fields: dict[str, object] = {
        "kv_layout": KVLayout.PAGED,
        "rope": RopeMode.NEOX,
        "append": True,
        "q_dtype": DType.BF16,
        "kv_dtype": DType.BF16,
        "arch": Arch.SM90,
        "head_dim": 128,
        "group_size": 4,
        "causal": True,
        "page_size": 16,
        "ragged": True,
    }
    fields.update(changes)
    return PrefillContext(**fields)  # type: ignore[arg-type]


# (changes to the valid context, the field the message must name, text the message must hold)
IMPOSSIBLE = [
    ({"kv_dtype": DType.FP16}, "kv_dtype", "got float16"),
    ({"kv_layout": KVLayout.NONE, "page_size": 0, "ragged": False}, "append", "expected False"),
    ({"append": False}, "rope", "expected none"),
    ({"append": False, "rope": RopeMode.INTERLEAVED}, "rope", "expected none"),
    ({"page_size": 0}, "page_size", "got 0"),
    ({"page_size": -3}, "page_size", "got -3"),
    ({"ragged": False}, "ragged", "expected True"),
    ({"kv_layout": KVLayout.CONTIGUOUS, "page_size": 16, "ragged": False}, "page_size", "got 16"),
    ({"kv_layout": KVLayout.NONE, "append": False, "page_size": 1}, "page_size", "got 1"),
    ({"kv_layout": KVLayout.CONTIGUOUS, "page_size": 0, "ragged": True}, "ragged", "expected False"),
    ({"head_dim": 127}, "head_dim", "got 127"),
    ({"head_dim": 0}, "head_dim", "got 0"),
    ({"group_size": 0}, "group_size", "got 0"),
    (
        {
            "kv_layout": KVLayout.NONE,
            "rope": RopeMode.NONE,
            "append": False,
            "page_size": 0,
            "kv_order": KVOrder.HND,
        },
        "kv_order",
        "got HND",
    ),
]


def test_the_base_context_is_valid() -> None:
    assert _valid().kv_layout is KVLayout.PAGED


@pytest.mark.parametrize(("changes", "field", "detail"), IMPOSSIBLE)
def test_impossible_context_names_the_field(changes: dict[str, object], field: str, detail: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{field}: expected") as raised:
        _valid(**changes)
    assert detail in str(raised.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError) as raised:
        _valid(kv_dtype=DType.FP16, ragged=False, head_dim=65)
    for field in ("kv_dtype:", "ragged:", "head_dim:"):
        assert field in str(raised.value)


def test_odd_head_dim_without_rope_is_fine() -> None:
    ctx = _valid(kv_layout=KVLayout.NONE, rope=RopeMode.NONE, append=False, page_size=0, head_dim=97)
    assert ctx.head_dim == 97


def test_context_is_frozen() -> None:
    ctx = _valid()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        ctx.head_dim = 64  # type: ignore[misc]
    with pytest.raises(ValueError, match="page_size"):
        attrs.evolve(ctx, page_size=0)


@pytest.mark.parametrize(
    ("torch_dtype", "member"), [(torch.float16, DType.FP16), (torch.bfloat16, DType.BF16)]
)
def test_dtype_round_trip(torch_dtype: torch.dtype, member: DType) -> None:
    assert DType.of(torch_dtype, argument="q") is member
    assert member.torch_dtype == torch_dtype


@pytest.mark.parametrize("torch_dtype", [torch.float32, torch.float64, torch.int32, torch.float8_e4m3fn])
def test_dtype_of_names_the_argument(torch_dtype: torch.dtype) -> None:
    with pytest.raises(TypeError) as raised:
        DType.of(torch_dtype, argument="k_cache")
    message = str(raised.value)
    assert message.startswith("k_cache:")
    assert "float16 or bfloat16" in message
    assert str(torch_dtype) in message


def test_cpu_device_is_arch_cpu() -> None:
    assert Arch.of_device(torch.device("cpu")) is Arch.CPU


@pytest.mark.parametrize(
    ("major", "minor", "arch"), [(8, 0, Arch.SM80), (8, 6, Arch.SM80), (8, 9, Arch.SM80), (9, 0, Arch.SM90)]
)
def test_arch_of_capability(major: int, minor: int, arch: Arch) -> None:
    assert Arch.of_capability(major, minor) is arch


@pytest.mark.parametrize(("major", "minor"), [(7, 5), (9, 1), (10, 0), (12, 0)])
def test_arch_of_capability_names_the_unserved(major: int, minor: int) -> None:
    with pytest.raises(ValueError, match=rf"8\.x or 9\.0, got {major}\.{minor}$"):
        Arch.of_capability(major, minor)
