"""Shared test helpers: a float64 oracle written independently of the kernels, and input builders.

The oracle attends one sequence at a time with a materialised boolean mask and
`torch.softmax` in float64, maps query heads to KV heads with an explicit index
list, and rotates with the RoPE formula written out per mode. Tests get it as
the session fixture `oracle`; type annotations import `Oracle` under TYPE_CHECKING.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol, cast

import attrs
import pytest
import torch

import tileprefill as tp
from tileprefill.context import Arch, RopeMode
from tileprefill.kernels.base import Kernel
from tileprefill.kernels.compile import prebuild, recording_builds
from tileprefill.keys import KernelKey
from tileprefill.ops import OpClass, decision, slots
from tileprefill.ops import op as op_module


class Plannable(Protocol):
    """An Op of any class, as `Oracle.plan_of` plans its calls."""

    def _plan_call(self, tensors: Mapping[str, torch.Tensor]) -> tp.BatchPlan[Any]: ...


class AnyOp(Plannable, Protocol):
    """What tests call on an Op of any class (each Op's real signature names its inputs)."""

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...

    @property
    def kernel_map(self) -> Mapping[KernelKey, type[Kernel]]: ...


@attrs.frozen
class PagedLayout:
    """A block table over a shuffled page pool; entries past a sequence's pages are `filler`."""

    block_table: torch.Tensor
    num_pages: int
    pages: tuple[tuple[int, ...], ...]  # the pages of each sequence, in order


class Oracle:
    """Float64 references of one sequence's attention and of RoPE, and input builders."""

    @staticmethod
    def attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float
    ) -> torch.Tensor:
        """q (Sq, Hq, D) over k, v (Skv, Hkv, D) -> float64 (Sq, Hq, D); bottom-right causal, 0 rows."""
        s_q, hq, _ = q.shape
        s_kv, hkv, _ = k.shape
        kv_head = torch.tensor([h // (hq // hkv) for h in range(hq)], dtype=torch.long)
        k64 = k.double()[:, kv_head]  # (Skv, Hq, D)
        v64 = v.double()[:, kv_head]
        scores = torch.einsum("qhd,khd->hqk", q.double(), k64) * scale
        visible = torch.ones(s_q, s_kv, dtype=torch.bool)
        if causal:
            rows = torch.arange(s_q)[:, None]
            cols = torch.arange(s_kv)[None, :]
            visible = cols <= s_kv - s_q + rows
        scores = scores.masked_fill(~visible, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: all -inf -> 0
        return torch.einsum("hqk,khd->qhd", weights, v64)

    @staticmethod
    def rope(
        x: torch.Tensor, positions: Sequence[int], cos: torch.Tensor, sin: torch.Tensor, mode: RopeMode
    ) -> torch.Tensor:
        """x (T, H, D) rotated at `positions` in float64; dims >= rotary_dim unchanged."""
        half = cos.shape[1]
        pairs = torch.arange(half)
        if mode is RopeMode.NEOX:
            first, second = pairs, pairs + half
        else:
            first, second = 2 * pairs, 2 * pairs + 1
        index = torch.tensor(list(positions), dtype=torch.long)
        c = cos.double()[index][:, None, :]  # (T, 1, R/2)
        s = sin.double()[index][:, None, :]
        x64 = x.double()
        x1, x2 = x64[:, :, first], x64[:, :, second]
        out = x64.clone()
        out[:, :, first] = x1 * c - x2 * s
        out[:, :, second] = x2 * c + x1 * s
        return out

    @staticmethod
    def atol(dtype: torch.dtype) -> float:
        """Max abs error against the float64 oracle for outputs of magnitude ~1."""
        return {torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]

    @staticmethod
    def bits(t: torch.Tensor) -> torch.Tensor:
        """The raw bits of a 16-bit tensor: equal bits means byte-for-byte equal (NaN included)."""
        return t.contiguous().view(torch.int16)

    @staticmethod
    def cumulative(lens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)

    @staticmethod
    def paged_layout(
        capacities: Sequence[int], page_size: int, rng: random.Random, spare_pages: int = 2, filler: int = -1
    ) -> PagedLayout:
        needed = [math.ceil(n / page_size) for n in capacities]
        num_pages = sum(needed) + spare_pages
        pool = list(range(num_pages))
        rng.shuffle(pool)
        width = max([1, *needed]) + 1  # one column more than any sequence uses
        table = torch.full((len(capacities), width), filler, dtype=torch.int32)
        pages: list[tuple[int, ...]] = []
        cursor = 0
        for b, n in enumerate(needed):
            own = tuple(pool[cursor : cursor + n])
            cursor += n
            table[b, :n] = torch.tensor(own, dtype=torch.int32)
            pages.append(own)
        return PagedLayout(table, num_pages, tuple(pages))

    @staticmethod
    def rope_tables(max_position: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
        angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
        return torch.cos(angles).float(), torch.sin(angles).float()

    @staticmethod
    def make_op(op_cls: OpClass, **kwargs: object) -> AnyOp:
        """An Op of any class; RoPE Ops get NEOX unless `rope` is given."""
        if op_cls.rotates:
            kwargs.setdefault("rope", tp.RopeMode.NEOX)
        return cast(AnyOp, op_cls(**kwargs))  # type: ignore[arg-type]

    @staticmethod
    def named_inputs(op_cls: OpClass, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """Valid inputs of any public Op by name: fp16, D=64, Hq=4, Hkv=2, 2 sequences, page size 8.

        Ragged: q lens (2, 3); kv_seqlens and cache_seqlens (3, 7); caches hold 16 keys a sequence.
        """
        b, s, d, hq, hkv, ps = 2, 5, 64, 4, 2, 8

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(torch.float16)

        tensors: dict[str, torch.Tensor] = {
            "cu_seqlens_q": torch.tensor([0, 2, 5], dtype=torch.int32),
            "cu_seqlens_kv": torch.tensor([0, 2, 5], dtype=torch.int32),
            "kv_seqlens": torch.tensor([3, 7], dtype=torch.int32),
            "cache_seqlens": torch.tensor([3, 7], dtype=torch.int32),
            "block_table": torch.tensor([[2, 0], [1, 3]], dtype=torch.int32),
            "cos": torch.rand(32, 16, generator=gen),
            "sin": torch.rand(32, 16, generator=gen),
        }
        if op_cls.kv_layout is tp.KVLayout.PAGED or op_cls.ragged:
            tensors |= {
                "q": randn(s, hq, d),
                "k": randn(s, hkv, d),
                "v": randn(s, hkv, d),
                "k_new": randn(s, hkv, d),
                "v_new": randn(s, hkv, d),
                "k_pages": randn(4, ps, hkv, d),
                "v_pages": randn(4, ps, hkv, d),
            }
        else:
            tensors |= {
                "q": randn(b, s, hq, d),
                "k": randn(b, s, hkv, d),
                "v": randn(b, s, hkv, d),
                "k_new": randn(b, s, hkv, d),
                "v_new": randn(b, s, hkv, d),
                "k_cache": randn(b, 16, hkv, d),
                "v_cache": randn(b, 16, hkv, d),
            }
        return {spec.name: tensors[spec.name] for spec in op_cls.input_specs}

    @staticmethod
    def inputs(op_cls: OpClass, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
        """`named_inputs` in call order."""
        return tuple(Oracle.named_inputs(op_cls, gen).values())

    @staticmethod
    def plan_of(op: Plannable, op_cls: OpClass, inputs: Sequence[torch.Tensor]) -> tp.BatchPlan[Any]:
        """The plan `op(*inputs)` makes (the Op's `plan` with the shape read off the inputs)."""
        return op._plan_call({s.name: t for s, t in zip(op_cls.input_specs, inputs, strict=True)})


@pytest.fixture(scope="session")
def oracle() -> Oracle:
    return Oracle()


@pytest.fixture
def gen() -> torch.Generator:
    """A generator with a fresh seed; the seed is printed (pytest shows it on failure)."""
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Make the Ops plan as on a GPU of the arch (and SM count) a test sets, on CPU tensors."""
    device = {"arch": Arch.SM90, "sm_count": 132}
    monkeypatch.setattr(decision, "arch_of", lambda _: device["arch"])
    monkeypatch.setattr(slots, "arch_of", lambda _: device["arch"])
    monkeypatch.setattr(op_module, "sm_count_of", lambda _: device["sm_count"])
    decision.decided.cache_clear()
    slots._decided.cache_clear()
    yield device
    decision.decided.cache_clear()
    slots._decided.cache_clear()


@pytest.fixture(scope="session")
def compiled_programs(request: pytest.FixtureRequest) -> None:
    """Compile every program the session's GPU tests will build, side by side, before the first one.

    A GPU test module that uses this fixture (`pytest.mark.usefixtures`) defines
    `warm_up() -> None`: one pass over its workload. The fixture runs the
    `warm_up` of every collected module under `recording_builds()` (nothing
    compiles or launches; each build is written down) and compiles them all in
    one pool of worker processes (`prebuild`): a few minutes for the whole GPU
    suite on a 16-CPU host, where compiling on first use, one program at a
    time, took over ten. A program a warm-up misses still compiles on first
    use: slower, never wrong.
    """
    modules = {getattr(item, "module", None) for item in request.session.items}
    with recording_builds() as requests:
        for module in sorted((m for m in modules if m is not None), key=lambda m: m.__name__):
            warm_up = getattr(module, "warm_up", None)
            if warm_up is not None:
                warm_up()
    # Through pytest's terminal writer, not print: the line shows under output capture, so a run cut
    # off while compiling says so (seen: a GPU call's log stayed empty for the whole 400 s prebuild
    # of six modules on a machine with an empty TileLang cache).
    report = request.config.pluginmanager.get_plugin("terminalreporter")
    say = print if report is None else report.write_line
    say(f"\ncompiling {len(set(requests))} programs side by side")
    start = time.perf_counter()
    prebuild(requests)
    say(f"compiled in {time.perf_counter() - start:.0f} s")
