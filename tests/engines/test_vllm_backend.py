"""The vLLM attention backend TILEPREFILL, driven by vLLM's own code on the CPU (vLLM 0.34).

vLLM builds the layers (`Attention` with the backend), the KV-cache groups and config
(`get_kv_cache_groups`, `get_kv_cache_config_from_groups`), the metadata builders
(`init_attn_backend`), the caches (`allocate_kv_cache`: one int8 buffer viewed per layer as
`(blocks, Hkv, block_size, 2 * D)` in the resolved layout), each step's metadata
(`build_attn_metadata`, which makes the `CommonAttentionMetadata` and calls the builder) and runs
every layer as a model does: `Attention.forward` under `set_forward_context`, which calls the
backend's `do_kv_cache_update` and then its `forward`. The test plays vLLM's scheduler and block
manager: it picks each step's chunks, allocates blocks, writes the block tables and slot mappings
and pads the step's rows. q, k and v are slices of one fused QKV tensor, as a model's projection
gives them. Each layer's output is compared with a float64 dense attention over the keys and values
the test kept itself, and each cache, read through vLLM's own view, with those keys and values.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import pytest
import torch

pytest.importorskip("vllm", reason="needs vLLM: pip install --no-deps -r tests/engines/requirements-vllm.txt")

from vllm.config import AttentionConfig, CacheConfig, DeviceConfig, VllmConfig, set_current_vllm_config
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.platforms.interface import DeviceCapability
from vllm.v1.attention.backend import AttentionCGSupport, AttentionType
from vllm.v1.attention.selector import AttentionSelectorConfig
from vllm.v1.core.kv_cache_planning import get_kv_cache_config_from_groups, get_kv_cache_groups
from vllm.v1.kv_cache_interface import SlidingWindowSpec
from vllm.v1.kv_cache_layout import KVCacheLayout
from vllm.v1.worker.gpu.attn_utils import (
    bind_kv_caches,
    build_attn_metadata,
    build_slot_mappings_by_layer,
    get_kv_cache_spec,
    init_attn_backend,
)
from vllm.v1.worker.utils import allocate_kv_cache

import tileprefill as tp
import tileprefill.integrations.vllm as tpv
from tileprefill.aot import WarmUp, warm_up
from tileprefill.aot.models import BuildOptions, ModelConfig
from tileprefill.aot.programs import programs_for
from tileprefill.context import Arch, KVOrder
from tileprefill.kernels import reference as reference_kernels
from tileprefill.kernels.compile import recording_builds
from tileprefill.validation import kv_order_of

from .conftest import DEVICE, SPIES_ON_REFERENCE_KERNELS, SUBPROCESS_PRELUDE

if TYPE_CHECKING:
    from conftest import Oracle

pytestmark = pytest.mark.engines

ENGINE_DEVICE = torch.device(DEVICE)
HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 64


@pytest.fixture(autouse=True)
def validated_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every plan checks its batch's metadata values on the host (serving leaves this off)."""
    monkeypatch.setattr(tpv.TilePrefillBackend, "validate_plans", True)


@dataclasses.dataclass(frozen=True)
class LayerArgs:
    """What the model gives one attention layer beyond the shared shape."""

    sliding_window: int | None = None
    softcap: float | None = None
    scale: float = HEAD_SIZE**-0.5


PLAIN = LayerArgs()
WINDOW = LayerArgs(sliding_window=4)
SOFTCAP = LayerArgs(softcap=2.0)  # scores of these inputs are ~N(0, 1): a cap of 2 changes them
BOTH = LayerArgs(sliding_window=4, softcap=2.0)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, args: LayerArgs) -> torch.Tensor:
    """float64 attention of one request's new rows q (n, Hq, D), at positions start..start+n-1,
    over its keys and values k, v (start + n, Hkv, D): causal, a query at position p seeing keys
    j in (p - W, p] with a window of W, scores capped to c * tanh(s / c) with a softcap c."""
    n, heads, _ = q.shape
    kv_head = torch.arange(heads, device=q.device) // (heads // k.shape[1])
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()[:, kv_head]) * args.scale
    if args.softcap is not None:
        scores = args.softcap * torch.tanh(scores / args.softcap)
    p = start + torch.arange(n, device=q.device)[:, None]
    j = torch.arange(k.shape[0], device=q.device)[None, :]
    visible = j <= p
    if args.sliding_window is not None:
        visible &= j > p - args.sliding_window
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v.double()[:, kv_head])


class VllmHarness:
    """vLLM's worker-side pieces around real `Attention` layers on our backend; the test is the
    scheduler and block manager (the module docstring)."""

    def __init__(
        self,
        layers: Sequence[LayerArgs],
        *,
        block_size: int,
        layout: KVCacheLayout,
        dtype: torch.dtype,
        hybrid: bool,
        atol: float,
        seed: int,
    ) -> None:
        tpv.register()  # what vLLM's plugin loader does through the entry point
        self.args = list(layers)
        self.dtype, self.atol = dtype, atol
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.projections: list[torch.Tensor] = []  # each layer's fused QKV output, step by step
        # Without a model config vLLM reads the cache dtype "auto" as float16: name bfloat16.
        cache = CacheConfig(
            block_size=block_size, cache_dtype="auto" if dtype is torch.float16 else "bfloat16"
        )
        config = VllmConfig(device_config=DeviceConfig(device=DEVICE), cache_config=cache)
        config.cache_config.kv_cache_layout = layout.name  # what the engine core resolves
        # With the hybrid manager a sliding-window layer gets a KV-cache group of its own; without
        # it, its window is recorded on the full-attention group's spec.
        config.scheduler_config.disable_hybrid_kv_cache_manager = not hybrid
        self.config = config
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the model's dtype while vLLM builds its layers
        try:
            with set_current_vllm_config(config):
                self.layers = [
                    Attention(
                        HEADS,
                        HEAD_SIZE,
                        a.scale,
                        KV_HEADS,
                        cache_config=config.cache_config,
                        logits_soft_cap=a.softcap,
                        per_layer_sliding_window=a.sliding_window,
                        prefix=f"model.layers.{i}.self_attn.attn",
                        attn_backend=tpv.TilePrefillBackend,
                    )
                    for i, a in enumerate(layers)
                ]
                specs = get_kv_cache_spec(config)
                groups = get_kv_cache_groups(config, specs)
                memory = 160 * sum(spec.page_size_bytes for spec in specs.values())
                self.kv_cache_config = get_kv_cache_config_from_groups(config, groups, memory)
                self.attn_groups, self.cudagraph_support, kernel_block_sizes = init_attn_backend(
                    self.kv_cache_config, config, ENGINE_DEVICE
                )
                caches = allocate_kv_cache(self.kv_cache_config, ENGINE_DEVICE, layout, kernel_block_sizes)
                attn_groups = [g for groups_ in self.attn_groups for g in groups_]
                bind_kv_caches(
                    caches,
                    config.compilation_config.static_forward_context,
                    self.kv_cache_config,
                    config,
                    attn_groups,
                )
        finally:
            torch.set_default_dtype(default)
        self.groups = self.kv_cache_config.kv_cache_groups
        self.group_of = {name: g for g, group in enumerate(self.groups) for name in group.layer_names}
        # Block 0 is vLLM's null block: never allocated, the entry of a table slot with no block.
        self.free = list(range(1, self.kv_cache_config.num_blocks))
        self.rng.shuffle(self.free)
        self.blocks: list[dict[str, list[int]]] = [{} for _ in self.groups]
        self.length: dict[str, int] = {}
        # What each layer's cache should hold: the keys and values the test gave it, per request.
        self.keys: list[dict[str, torch.Tensor]] = [{} for _ in layers]
        self.values: list[dict[str, torch.Tensor]] = [{} for _ in layers]

    def block_size(self, group: int) -> int:
        return int(self.groups[group].kv_cache_spec.block_size)

    def step(self, chunks: Sequence[tuple[str, int]], rows: int) -> None:
        """One engine step: `chunks` (request, new tokens) in batch order, the step's tokens padded
        to `rows`. Runs every layer and checks its output rows and its cache."""
        starts = [self.length.get(r, 0) for r, _ in chunks]
        news = [n for _, n in chunks]
        tokens = sum(news)
        assert rows >= tokens
        requests = len(chunks)
        query_start_loc = torch.tensor([0, *itertools.accumulate(news)], dtype=torch.int32)
        seq_lens = torch.tensor(
            [s + n for s, n in zip(starts, news, strict=True)], dtype=torch.int32, device=DEVICE
        )
        tables = [self._block_table(g, chunks, starts).to(DEVICE) for g in range(len(self.groups))]
        slots = torch.full((len(self.groups), rows), -1, dtype=torch.int64)  # -1: vLLM's padding slot
        for g in range(len(self.groups)):
            size = self.block_size(g)
            token = 0
            for (request, n), start in zip(chunks, starts, strict=True):
                for p in range(start, start + n):
                    slots[g, token] = self.blocks[g][request][p // size] * size + p % size
                    token += 1
        slots = slots.to(DEVICE)
        metadata = build_attn_metadata(
            attn_groups=self.attn_groups,
            num_reqs=requests,
            # In eager and piecewise steps vLLM counts the real tokens; q, k, v and the slots have `rows`.
            num_tokens=tokens,
            query_start_loc_gpu=query_start_loc.to(DEVICE),
            query_start_loc_cpu=query_start_loc.clone(),
            max_query_len=max(news),
            seq_lens=seq_lens,
            max_seq_len=int(seq_lens.max()),
            block_tables=tables,
            slot_mappings=slots,
            kv_cache_config=self.kv_cache_config,
        )
        slot_mapping = build_slot_mappings_by_layer(slots, self.kv_cache_config)
        width = (HEADS + 2 * KV_HEADS) * HEAD_SIZE
        with set_forward_context(metadata, self.config, slot_mapping=slot_mapping):
            for i, (layer, args) in enumerate(zip(self.layers, self.args, strict=True)):
                qkv = torch.randn(rows, width, generator=self.gen).to(DEVICE, self.dtype)
                self.projections.append(qkv)
                before = qkv.clone()
                # Strided row views of the fused projection, as a model splits it.
                q, k, v = torch.split(
                    qkv, [HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE, KV_HEADS * HEAD_SIZE], -1
                )
                out = layer(q, k, v)
                assert torch.equal(qkv.view(torch.int16), before.view(torch.int16)), "q, k or v was written"
                self._check_output(i, args, chunks, starts, q, k, v, out)
        for (request, n), start in zip(chunks, starts, strict=True):
            self.length[request] = start + n
        self.check_caches()

    def _block_table(self, g: int, chunks: Sequence[tuple[str, int]], starts: Sequence[int]) -> torch.Tensor:
        """Group g's block table of the step (vLLM's persistent table, its first rows): blocks
        allocated as the requests grow, 0 (the null block) where a request has none, and, in a
        sliding-window group, 0 for the blocks wholly below what the step's first query can see
        (vLLM nulls those entries; their blocks may hold another request's keys by now)."""
        size = self.block_size(g)
        spec = self.groups[g].kv_cache_spec
        table = torch.zeros(8, 64, dtype=torch.int32)
        for row, ((request, n), start) in enumerate(zip(chunks, starts, strict=True)):
            owned = self.blocks[g].setdefault(request, [])
            while len(owned) * size < start + n:
                owned.append(self.free.pop())
            table[row, : len(owned)] = torch.tensor(owned, dtype=torch.int32)
            if isinstance(spec, SlidingWindowSpec):
                below = max(0, start - spec.num_retained_tokens) // size
                table[row, :below] = 0
        return table[: len(chunks)]

    def _check_output(
        self,
        i: int,
        args: LayerArgs,
        chunks: Sequence[tuple[str, int]],
        starts: Sequence[int],
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        token = 0
        for (request, n), start in zip(chunks, starts, strict=True):
            new = slice(token, token + n)
            token += n
            keys = torch.cat(
                [
                    self.keys[i].get(request, k[:0].reshape(0, KV_HEADS, HEAD_SIZE)),
                    k[new].reshape(n, KV_HEADS, HEAD_SIZE),
                ]
            )
            values = torch.cat(
                [
                    self.values[i].get(request, v[:0].reshape(0, KV_HEADS, HEAD_SIZE)),
                    v[new].reshape(n, KV_HEADS, HEAD_SIZE),
                ]
            )
            self.keys[i][request], self.values[i][request] = keys, values
            want = reference(q[new].reshape(n, HEADS, HEAD_SIZE), keys, values, start, args)
            got = out[new].reshape(n, HEADS, HEAD_SIZE)
            torch.testing.assert_close(got.double(), want, atol=self.atol, rtol=0, msg=located(i, request))

    def check_caches(self) -> None:
        """Each layer's cache, read through vLLM's `(blocks, Hkv, block_size, 2 * D)` view, holds
        each request's keys (first D of a row) and values (the rest) at its blocks' rows; blocks no
        request owns (the null block among them) hold the zeros vLLM allocated."""
        owned_anywhere = {b for group in self.blocks for blocks in group.values() for b in blocks}
        for i, layer in enumerate(self.layers):
            g = self.group_of[layer.layer_name]
            size = self.block_size(g)
            cache = layer.kv_cache
            for request, length in self.length.items():
                blocks = self.blocks[g][request]
                for p in range(length):
                    block, row = blocks[p // size], p % size
                    stored = cache[block, :, row]
                    assert torch.equal(stored[:, :HEAD_SIZE], self.keys[i][request][p]), (i, request, p)
                    assert torch.equal(stored[:, HEAD_SIZE:], self.values[i][request][p]), (i, request, p)
            unowned = [b for b in range(cache.shape[0]) if b not in owned_anywhere]
            assert not cache[unowned].any(), f"layer {i}: a block no request owns was written"


def located(layer: int, request: str) -> Callable[[str], str]:
    """A message of torch.testing.assert_close that names where the mismatch is."""
    return lambda message: f"layer {layer}, request {request}: {message}"


#: Mixed batches, as vLLM's scheduler makes them: (request, new tokens) in batch order, and the
#: rows vLLM pads the step to.
STEPS: tuple[tuple[tuple[tuple[str, int], ...], int], ...] = (
    ((("a", 13), ("b", 6)), 24),  # two fresh prefills, the first a chunk of a longer prompt
    ((("a", 9), ("b", 1), ("c", 5)), 16),  # a chunked prefill over its cache, a decode, a fresh prefill
    ((("b", 1), ("a", 1), ("c", 7), ("d", 1)), 16),  # decodes around a chunk, a one-token prompt
    ((("c", 1), ("d", 3)), 4),  # a decode and a chunk, no padding
)


def run_steps(harness: VllmHarness) -> None:
    for chunks, rows in STEPS:
        harness.step(chunks, rows)


@pytest.fixture
def seed() -> int:
    value = random.SystemRandom().randrange(2**31)
    print(f"seed={value}")
    return value


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize(
    "features", [PLAIN, WINDOW, SOFTCAP, BOTH], ids=["plain", "window", "softcap", "both"]
)
def test_steps_match_dense_attention(block_size: int, features: LayerArgs, oracle: Oracle, seed: int) -> None:
    # A layer of each kind between plain ones: one KV-cache group, a plan per kind per step.
    harness = VllmHarness(
        [features, PLAIN, features],
        block_size=block_size,
        layout=KVCacheLayout.LBNHC,
        dtype=torch.float16,
        hybrid=False,
        atol=oracle.atol(torch.float16),
        seed=seed,
    )
    run_steps(harness)


@SPIES_ON_REFERENCE_KERNELS
def test_query_key_and_value_reach_the_kernels_as_vllm_holds_them(
    monkeypatch: pytest.MonkeyPatch, oracle: Oracle, seed: int
) -> None:
    """No copy of q, k or v: the attention and slot-write kernels receive views of the fused QKV
    output's own storage."""
    received: list[tuple[str, torch.Tensor]] = []
    attend = reference_kernels.AttentionPagedRefKernel.with_lse
    write = reference_kernels.SlotAppendRefKernel.__call__

    def attend_spy(self: Any, q: torch.Tensor, *args: Any, **options: Any) -> Any:
        received.append(("q", q))
        return attend(self, q, *args, **options)

    def write_spy(self: Any, k_new: torch.Tensor, v_new: torch.Tensor, *args: Any) -> None:
        received.extend((("k_new", k_new), ("v_new", v_new)))
        write(self, k_new, v_new, *args)

    monkeypatch.setattr(reference_kernels.AttentionPagedRefKernel, "with_lse", attend_spy)
    monkeypatch.setattr(reference_kernels.SlotAppendRefKernel, "__call__", write_spy)
    harness = VllmHarness(
        [PLAIN, WINDOW],
        block_size=16,
        layout=KVCacheLayout.LBNHC,
        dtype=torch.float16,
        hybrid=False,
        atol=oracle.atol(torch.float16),
        seed=seed,
    )
    run_steps(harness)
    storages = {qkv.untyped_storage().data_ptr() for qkv in harness.projections}
    assert {name for name, _ in received} == {"q", "k_new", "v_new"}
    for name, tensor in received:
        assert not tensor.is_contiguous(), f"{name}: a copy reached the kernel"
        assert tensor.untyped_storage().data_ptr() in storages, f"{name}: not the QKV output's storage"


@pytest.mark.parametrize(
    "layout", [KVCacheLayout.LBHNC, KVCacheLayout.BLNHC, KVCacheLayout.BHLNC, KVCacheLayout.LHBNC]
)
def test_every_cache_layout(layout: KVCacheLayout, oracle: Oracle, seed: int) -> None:
    # The hybrid manager: the windowed layers get a KV-cache group (and block tables) of their own.
    harness = VllmHarness(
        [BOTH, SOFTCAP, BOTH],
        block_size=5,
        layout=layout,
        dtype=torch.bfloat16,
        hybrid=True,
        atol=oracle.atol(torch.bfloat16),
        seed=seed,
    )
    assert any(isinstance(group.kv_cache_spec, SlidingWindowSpec) for group in harness.groups)
    for layer in harness.layers:
        order = tpv.kv_order_of_layout(layout)
        assert kv_order_of(tpv.cache_views(layer.kv_cache, HEAD_SIZE)[0]) is order
    run_steps(harness)


def test_serving_plans_read_no_metadata_values(
    monkeypatch: pytest.MonkeyPatch, oracle: Oracle, seed: int
) -> None:
    monkeypatch.setattr(tpv.TilePrefillBackend, "validate_plans", False)
    harness = VllmHarness(
        [BOTH, PLAIN],
        block_size=16,
        layout=KVCacheLayout.LBNHC,
        dtype=torch.float16,
        hybrid=False,
        atol=oracle.atol(torch.float16),
        seed=seed,
    )
    run_steps(harness)


def test_setup_warms_up_the_programs_of_each_groups_layers(
    monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # The hybrid manager gives the windowed layers a KV-cache group of their own: each group's
    # builder warms up its own kinds of layer, at its page size, on the worker's device.
    calls: list[tuple[tuple[ModelConfig, ...], torch.device, BuildOptions]] = []

    def recorded(models: Sequence[ModelConfig], device: torch.device, options: BuildOptions) -> WarmUp:
        calls.append((tuple(models), torch.device(device), options))
        return warm_up(models, device, options)

    monkeypatch.setattr("tileprefill.integrations.vllm.warm_up", recorded)
    harness = VllmHarness(
        [WINDOW, PLAIN, SOFTCAP, WINDOW],
        block_size=5,
        layout=KVCacheLayout.LBNHC,
        dtype=torch.bfloat16,
        hybrid=True,
        atol=0.0,
        seed=seed,
    )
    warmed_kinds = {(m.windows, m.softcap, m.sm_scale) for models, _, _ in calls for m in models}
    assert warmed_kinds == {((a.sliding_window or 0,), a.softcap or 0.0, a.scale) for a in harness.args}
    assert len(calls) == len(harness.groups)
    for models, device, options in calls:
        assert device == ENGINE_DEVICE
        assert options.ops == tpv.STEP_OPS and options.page_sizes == (5,)
        assert all(
            (m.heads, m.kv_heads, m.head_dim) == (HEADS, KV_HEADS, HEAD_SIZE) and m.dtypes == (tp.DType.BF16,)
            for m in models
        )
    builders = [g.get_metadata_builder() for groups in harness.attn_groups for g in groups]
    assert all(
        b.warmed is not None and b.warmed.compiled + b.warmed.loaded == b.warmed.programs for b in builders
    )


@pytest.mark.parametrize("order", list(KVOrder), ids=lambda o: o.name)
@pytest.mark.parametrize("page_size", [1, 5, 16])
def test_the_warmed_up_programs_are_the_ones_a_step_runs(on_gpu: Any, order: KVOrder, page_size: int) -> None:
    # Planned as on an H100 (arch patched, nothing compiles): a step's plans, a full and a windowed
    # softcapped kind of layer and the K/V write, bind exactly the programs set-up makes ready.
    cpu, i32 = torch.device("cpu"), torch.int32
    group = tpv.GroupShape(page_size, KV_HEADS, HEAD_SIZE, torch.bfloat16, cpu, order)
    kinds = [tpv.LayerKind(HEADS, 0.125, None, None), tpv.LayerKind(HEADS, 0.125, 4, 2.0)]
    with recording_builds() as requests:
        metadata = tpv.TilePrefillMetadata(
            tokens=5,
            block_table=torch.tensor([[0, 1], [2, 3]], dtype=i32),
            seq_lens=torch.tensor([4, 3], dtype=i32),
            query_start_loc=torch.tensor([0, 3, 5], dtype=i32),
            group=group,
            validate=False,
        )
        for kind in kinds:
            metadata.plan(kind)
        slots = torch.arange(5, dtype=torch.int64)
        shape = tp.SlotAppendShape(5, page_size, KV_HEADS, HEAD_SIZE, torch.bfloat16, cpu)
        tpv.SlotPlans().plan(slots, shape, False)
    models, options = tpv.step_programs(group, kinds)
    on_h100 = attrs.evolve(options, archs=(Arch.SM90,), sm_counts=(on_gpu["sm_count"],))
    assert {spec.request for model in models for spec in programs_for(model, on_h100)} == set(requests)


class Counted:
    """Counts the calls of a method patched onto a class, passing them through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> None:
        self.calls = 0
        original = getattr(cls, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, counted)


@pytest.mark.parametrize("hybrid", [False, True])
def test_one_plan_per_kind_and_group_and_step(
    monkeypatch: pytest.MonkeyPatch, oracle: Oracle, seed: int, hybrid: bool
) -> None:
    # Layers of two kinds, interleaved as in a model that alternates windowed and full layers.
    # Without the hybrid manager they share one KV-cache group; with it the windowed layers have
    # groups of their own. Each group plans once per kind of its layers, and writes with one plan
    # (its layers get one slot-mapping tensor).
    harness = VllmHarness(
        [WINDOW, PLAIN, WINDOW, PLAIN],
        block_size=5,
        layout=KVCacheLayout.LBNHC,
        dtype=torch.float16,
        hybrid=hybrid,
        atol=oracle.atol(torch.float16),
        seed=seed,
    )
    assert harness.cudagraph_support.min_cg_support is AttentionCGSupport.NEVER
    kinds = [
        {harness.layers[int(name.split(".")[2])].impl.kind for name in g.layer_names} for g in harness.groups
    ]
    assert sum(map(len, kinds)) == (2 if not hybrid else len(harness.groups)), kinds
    for chunks, rows in STEPS:
        attention = Counted(monkeypatch, tp.GQAPagedCachePrefill, "plan")
        write = Counted(monkeypatch, tp.PagedCacheSlotAppend, "plan")
        harness.step(chunks, rows)
        assert (attention.calls, write.calls) == (sum(map(len, kinds)), len(harness.groups))


# --- what is refused ---------------------------------------------------------------------------------


#: The capability of an H100 or H200.
SM90 = DeviceCapability(9, 0)


def refusals(capability: DeviceCapability | None = SM90, **changes: Any) -> list[str]:
    """The backend's reasons for a configuration, asked as vLLM's CUDA platform asks a backend the
    user selected (`platforms/cuda.py`: the selector's config as keywords, and the device's
    capability)."""
    config = AttentionSelectorConfig(
        head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16
    )._replace(**changes)
    reasons: list[str] = tpv.TilePrefillBackend.validate_configuration(
        device_capability=capability, **config._asdict()
    )
    return reasons


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"has_sliding_window": True},
        {"block_size": 5},
        {"block_size": None},
        {"dtype": torch.float16, "kv_cache_dtype": "float16"},
        {"head_size": 64},
        {"use_kv_connector": True},
    ],
)
def test_served_configurations(changes: dict[str, Any]) -> None:
    assert refusals(**changes) == []
    assert refusals(DeviceCapability(8, 0), **changes) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype 'fp8': tileprefill reads caches of the model's dtype"),
        ({"kv_cache_dtype": "fp8_e4m3"}, "fp8 and other quantised caches are not served"),
        (
            {"kv_cache_dtype": "float16"},
            "kv_cache_dtype 'float16': tileprefill reads a cache of the model's dtype, torch.bfloat16",
        ),
        (
            {"dtype": torch.float32},
            "dtype torch.float32: tileprefill computes in torch.float16 or torch.bfloat16",
        ),
        ({"has_sink": True}, "has_sink=True: tileprefill has no attention sinks"),
        (
            {"attn_type": AttentionType.ENCODER_ONLY},
            "attn_type encoder_only: tileprefill serves decoder self-attention",
        ),
        ({"attn_type": AttentionType.ENCODER_DECODER}, "attn_type encoder_decoder:"),
        ({"attn_type": AttentionType.ENCODER}, "attn_type encoder:"),
        ({"use_mla": True}, "use_mla=True"),
        ({"use_non_causal": True}, "use_non_causal=True"),
        ({"use_dcp": True}, "use_dcp=True"),
        (
            {"head_size": 72},
            "no sm90 kernel serves the attention of head_size 72: head_dim 72 is not compiled for TileLang",
        ),
        ({"head_size": 512}, "head_dim 512 is not compiled for TileLang sm90"),
    ],
)
def test_refused_configurations_say_why(changes: dict[str, Any], reason: str) -> None:
    reasons = refusals(**changes)
    assert len(reasons) == 1 and reason in reasons[0], reasons


def test_refusals_name_the_arch_and_collect_every_reason() -> None:
    assert refusals(DeviceCapability(8, 6), head_size=72) == [
        "no sm80 kernel serves the attention of head_size 72: head_dim 72 is not compiled for TileLang sm80 "
        f"(compiled: {', '.join(map(str, tp.selection.TL_ATTENTION_HEAD_DIMS))})"
    ]
    assert refusals(DeviceCapability(10, 0)) == [
        "device_capability: expected a CUDA device of compute capability 8.x or 9.0, got 10.0"
    ]
    # vLLM's CPU platform names no capability: the reference kernels serve every head dim there.
    assert refusals(None, head_size=72) == []
    assert len(refusals(kv_cache_dtype="fp8", has_sink=True, head_size=72)) == 3


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]}, "alibi_slopes: expected None, got 4 slopes"),
        ({"sinks": torch.zeros(HEADS)}, "sinks: expected None, got a tensor of shape (4,)"),
        ({"attn_type": AttentionType.ENCODER_ONLY}, "attn_type: expected 'decoder', got 'encoder_only'"),
    ],
)
def test_refused_layers_say_why(extra: dict[str, Any], reason: str) -> None:
    tpv.register()
    config = VllmConfig(device_config=DeviceConfig(device=DEVICE))
    with set_current_vllm_config(config), pytest.raises(NotImplementedError, match="cannot serve") as raised:
        Attention(
            HEADS,
            HEAD_SIZE,
            0.125,
            KV_HEADS,
            prefix="model.layers.0.attn",
            attn_backend=tpv.TilePrefillBackend,
            **extra,
        )
    assert reason in str(raised.value)


def test_profiling_run_writes_zeros() -> None:
    # vLLM's memory profiling runs the model with no attention metadata.
    impl = tpv.TilePrefillImpl(HEADS, HEAD_SIZE, 0.125, KV_HEADS)
    output = torch.full((3, HEADS, HEAD_SIZE), 7.0, dtype=torch.float16, device=DEVICE)
    q = torch.randn(3, HEADS, HEAD_SIZE, dtype=torch.float16, device=DEVICE)
    result = impl.forward(None, q, q, q, torch.empty(0, device=DEVICE), None, output)
    assert result is output and not output.any()


# --- registration ------------------------------------------------------------------------------------


def python(code: str) -> str:
    """Run `code` in a fresh interpreter of this environment (so nothing this process registered or
    imported counts) and return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_PRELUDE + code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_entry_point_registers_the_backend_for_attention_backend_tileprefill() -> None:
    out = python(
        "from importlib.metadata import entry_points\n"
        "from vllm.v1.attention.backends.registry import AttentionBackendEnum\n"
        "print([e.value for e in entry_points(group='vllm.general_plugins') if e.name == 'tileprefill'])\n"
        "print('TILEPREFILL' in AttentionBackendEnum.__members__)\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "from vllm.config import AttentionConfig\n"
        # `--attention-backend tileprefill`: EngineArgs hands the string to this validator.
        "backend = AttentionConfig.validate_backend_before('tileprefill')\n"
        "print(backend.name, backend.get_path())\n"
        "print(AttentionConfig(backend='tileprefill').backend is backend)\n"
        "print(backend.get_class().get_name())\n"
    )
    assert out.splitlines() == [
        "['tileprefill.integrations.vllm:register']",
        "False",
        "TILEPREFILL tileprefill.integrations.vllm.TilePrefillBackend",
        "True",
        "TILEPREFILL",
    ]


def test_register_is_idempotent() -> None:
    tpv.register()
    tpv.register()
    assert AttentionConfig(backend="TilePrefill").backend.get_class() is tpv.TilePrefillBackend


def test_importing_tileprefill_imports_no_vllm() -> None:
    out = python("import sys, tileprefill, tileprefill.integrations; print('vllm' in sys.modules)")
    assert out.strip() == "False"
