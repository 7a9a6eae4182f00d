"""The SGLang attention backend "tileprefill" driven through SGLang 0.5.23's own classes on the CPU.

The batches, pools and layers are SGLang's: its attention test kit
(`sglang.test.kits.attention_unittest`) builds a mock model runner with a real `ReqToTokenPool` and
`MHATokenToKVPool`, a `RadixAttention` layer, the prefixes already in the pool and the extend or
decode `ForwardBatch`, with the slots of each request shuffled or interleaved across the pool.
Each output is compared with a dense float reference (the kit's, and one of our own for logit
softcapping, which the kit's does not compute), and the pool with the new keys and values.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.arg_groups import choices
from sglang.srt.layers.attention import attention_registry
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from sglang.srt.model_executor.model_runner_components.attention_backend_setup import (
    build_attention_backends,
    resolve_attention_backend_strs,
)
from sglang.srt.runtime_context import get_exec
from sglang.srt.server_args import ServerArgs
from sglang.test.kits.attention_unittest.attention_methods import dense_attention as kit

import tileprefill as tp
import tileprefill.integrations.sglang as tp_sglang
from tileprefill.aot import WarmUp, warm_up
from tileprefill.aot import models as aot
from tileprefill.kernels import reference as reference_kernels

from .conftest import DEVICE, SPIES_ON_REFERENCE_KERNELS

pytestmark = pytest.mark.engines

NAME = tp_sglang.NAME
HEAD_DIM = 64  # one the GPU kernels serve, so no NoGPUKernelWarning
DTYPE = torch.bfloat16
ATOL = RTOL = 3e-2  # the kit's bf16 tolerance


@pytest.fixture(autouse=True)
def registered() -> None:
    tp_sglang.register()


class _FailOnSkip:
    """The kit's fixture builder skips a case whose backend does not build; here that is a failure."""

    def skipTest(self, reason: str) -> None:
        pytest.fail(f"the {NAME} backend did not build: {reason}")


def _case(
    name: str,
    *,
    heads: int,
    kv_heads: int,
    page_size: int,
    prefix: Sequence[int],
    extend: Sequence[int],
    window: int | None = None,
) -> Any:
    return kit.DenseAttentionCase(
        name=name,
        backend=NAME,
        forward_mode=ForwardMode.EXTEND,
        num_heads=heads,
        num_kv_heads=kv_heads,
        page_size=page_size,
        prefix_lens=tuple(prefix),
        extend_lens=tuple(extend),
        sliding_window_size=window,
    )


#: The kit's own dense cases (extend with and without prefixes at page sizes 1, 16 and 32, decode,
#: GQA, MQA, sliding windows), and page-size-1 GQA extends with prefixes, the pool SGLang's default.
CASES: tuple[Any, ...] = (
    *kit.make_dense_cases(NAME),
    *kit.make_swa_no_prefix_input_config_cases(NAME),
    *kit.make_swa_prefix_input_config_cases(NAME),
    _case(
        "gqa_extend_page_size_1_prefixes",
        heads=8,
        kv_heads=2,
        page_size=1,
        prefix=(0, 7, 19),
        extend=(9, 1, 6),
    ),
    _case(
        "gqa_swa_page_size_1_prefixes",
        heads=8,
        kv_heads=2,
        page_size=1,
        prefix=(3, 9),
        extend=(5, 2),
        window=4,
    ),
)
#: Slots of a request in shuffled order, or pages of the requests interleaved. The kit's
#: non-monotonic layout also scatters the new tokens' slots, which only a page size of 1 allows
#: (with larger pages SGLang allocates whole pages, whose slots are consecutive).
LAYOUTS = ("shuffled_pages", "interleaved_pages")
KIT_PARAMS = [
    pytest.param(case, layout, id=f"{case.name}-{layout}")
    for case in CASES
    for layout in (*LAYOUTS, *(("non_monotonic_extend",) if case.page_size == 1 else ()))
]


def _fixture(case: Any, layout: str = "shuffled_pages", *, validate: bool = False) -> Any:
    with torch.no_grad():  # the kit writes the prefixes' keys, computed by a Linear, into the pool
        fixture = kit.build_dense_attention_fixture(
            _FailOnSkip(), case, head_dim=HEAD_DIM, dtype=DTYPE, device=DEVICE, loc_layout=layout
        )
    assert isinstance(fixture.backend, tp_sglang.TileprefillAttnBackend)
    if validate:
        fixture.backend = tp_sglang.TileprefillAttnBackend(fixture.runner, validate=True)
    return fixture


def _pool_rows(fixture: Any, values: bool) -> torch.Tensor:
    """Layer 0's keys (or values) of the pool, one row per slot, read through the backend's view."""
    backend: tp_sglang.TileprefillAttnBackend = fixture.backend
    k_pages, v_pages = backend._pages(0)
    return (v_pages if values else k_pages).flatten(0, 1)


def _assert_new_kv_written(fixture: Any) -> None:
    with torch.no_grad():
        _, k, v = fixture.actual_module.project_qkv(fixture.input_hidden)
    loc = fixture.forward_batch.out_cache_loc
    shape = (-1, fixture.case.num_kv_heads, HEAD_DIM)
    assert torch.equal(_pool_rows(fixture, values=False)[loc], k.view(shape))
    assert torch.equal(_pool_rows(fixture, values=True)[loc], v.view(shape))


@pytest.mark.parametrize("validate", [False, True], ids=["serving", "validate"])
@pytest.mark.parametrize(("case", "layout"), KIT_PARAMS)
def test_matches_sglang_reference(case: Any, layout: str, validate: bool) -> None:
    fixture = _fixture(case, layout, validate=validate)
    actual = kit.run_dense_fixture_eager(fixture)
    expected = kit.expected_dense_fixture_output(fixture)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)
    _assert_new_kv_written(fixture)


@pytest.mark.parametrize("page_size", [1, 16])
def test_hnd_pool(monkeypatch: pytest.MonkeyPatch, page_size: int) -> None:
    monkeypatch.setenv("SGLANG_USE_HND_KVCACHE", "1")  # read when the pool is built
    case = _case(f"hnd_{page_size}", heads=8, kv_heads=2, page_size=page_size, prefix=(5, 17), extend=(6, 3))
    fixture = _fixture(case)
    assert fixture.runner.token_to_kv_pool.kv_cache_layout == "hnd"
    torch.testing.assert_close(
        kit.run_dense_fixture_eager(fixture), kit.expected_dense_fixture_output(fixture), atol=ATOL, rtol=RTOL
    )
    _assert_new_kv_written(fixture)


# --- sliding window and softcap against a reference of our own -----------------------------------


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """One request's attention in float64: q (Tq, H, D) at the last Tq positions of k, v (Tk, Hkv, D).

    SGLang's window: the query at position p sees keys p - window .. p.
    """
    tq, heads, _ = q.shape
    tk, kv_heads, _ = k.shape
    group = heads // kv_heads
    kv_of_head = [h // group for h in range(heads)]
    qf, kf, vf = (t.double() for t in (q, k, v))
    scores = torch.einsum("qhd,khd->hqk", qf, kf[:, kv_of_head]) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    p = torch.arange(tk - tq, tk, device=q.device)[:, None]
    j = torch.arange(tk, device=q.device)[None, :]
    visible = (j <= p) & ((j >= p - window) if window is not None else True)
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), vf[:, kv_of_head])


def _expected(fixture: Any, *, window: int | None, softcap: float | None) -> torch.Tensor:
    """The fixture's extend batch through our reference, then the layer's output projection."""
    module, case = fixture.reference_module, fixture.case
    outputs = []
    with torch.no_grad():
        q, k, v = module.project_qkv(fixture.input_hidden)
        starts = [sum(case.input_lens[:b]) for b in range(case.batch_size + 1)]
        for b, prefix in enumerate(fixture.prefix_hidden):
            _, prefix_k, prefix_v = module.project_qkv(prefix)
            rows = slice(starts[b], starts[b + 1])
            kv_shape = (-1, case.num_kv_heads, HEAD_DIM)
            outputs.append(
                _reference(
                    q[rows].view(-1, case.num_heads, HEAD_DIM),
                    torch.cat([prefix_k, k[rows]]).view(kv_shape),
                    torch.cat([prefix_v, v[rows]]).view(kv_shape),
                    scale=module.scaling,
                    window=window,
                    softcap=softcap,
                )
            )
        out = torch.cat(outputs).flatten(1).to(DTYPE)
        result: torch.Tensor = module.reconstruct_output(out)
    return result


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("window", [None, 5], ids=["full", "window5"])
@pytest.mark.parametrize("softcap", [None, 0.5], ids=["nocap", "softcap"])
def test_window_and_softcap(page_size: int, window: int | None, softcap: float | None) -> None:
    case = _case(
        "features",
        heads=8,
        kv_heads=2,
        page_size=page_size,
        prefix=(0, 11, 20),
        extend=(12, 4, 7),
        window=window,
    )
    fixture = _fixture(case, validate=True)
    fixture.actual_module.attn.logit_cap = 0.0 if softcap is None else softcap
    actual = kit.run_dense_fixture_eager(fixture)
    torch.testing.assert_close(
        actual, _expected(fixture, window=window, softcap=softcap), atol=ATOL, rtol=RTOL
    )
    if softcap is not None:  # the cap changes the result: the check above could not pass without it
        uncapped = _expected(fixture, window=window, softcap=None)
        assert not torch.allclose(actual, uncapped, atol=ATOL, rtol=RTOL)
    if softcap is None:  # our reference agrees with SGLang's on the window convention
        torch.testing.assert_close(actual, kit.expected_dense_fixture_output(fixture), atol=ATOL, rtol=RTOL)


# --- chunked prefill, a mixed batch and decode, on what the backend itself wrote ---------------------


def _batch(
    runner: Any, mode: ForwardMode, prefix: Sequence[int], new: Sequence[int], slots: list[list[int]]
) -> ForwardBatch:
    """An extend (or decode) ForwardBatch of requests 0..B-1 whose positions live at `slots[b]`."""
    seq_lens = [p + n for p, n in zip(prefix, new, strict=True)]
    for b, seq_len in enumerate(seq_lens):
        runner.req_to_token_pool.req_to_token[b, :seq_len] = torch.tensor(slots[b][:seq_len])
    out_cache_loc = [
        slots[b][p + i] for b, (p, n) in enumerate(zip(prefix, new, strict=True)) for i in range(n)
    ]
    batch = ForwardBatch(
        forward_mode=mode,
        batch_size=len(prefix),
        input_ids=torch.zeros(sum(new), dtype=torch.int64, device=DEVICE),
        req_pool_indices=torch.arange(len(prefix), dtype=torch.int64, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=DEVICE),
        seq_lens_cpu=torch.tensor(seq_lens, dtype=torch.int64),
        out_cache_loc=torch.tensor(out_cache_loc, dtype=torch.int64, device=DEVICE),
        seq_lens_sum=sum(seq_lens),
        positions=torch.tensor(
            [p + i for p, n in zip(prefix, new, strict=True) for i in range(n)], device=DEVICE
        ),
    )
    if mode is not ForwardMode.DECODE:
        batch.extend_prefix_lens = torch.tensor(prefix, dtype=torch.int32, device=DEVICE)
        batch.extend_prefix_lens_cpu = list(prefix)
        batch.extend_seq_lens = torch.tensor(new, dtype=torch.int32, device=DEVICE)
        batch.extend_seq_lens_cpu = list(new)
        batch.extend_num_tokens = sum(new)
    return batch


@pytest.mark.parametrize("window", [None, 4], ids=["full", "window4"])
def test_chunked_prefill_mixed_and_decode(window: int | None) -> None:
    """Three forward passes, each reading the keys and values the passes before it wrote."""
    torch.manual_seed(0)
    heads, kv_heads, hidden, context = 8, 2, 64, 64
    case = _case(
        "steps", heads=heads, kv_heads=kv_heads, page_size=1, prefix=(0, 0), extend=(1, 1), window=window
    )
    config = kit.TinyModelConfig(
        num_heads=heads, num_kv_heads=kv_heads, head_dim=HEAD_DIM, hidden_size=hidden, context_len=context
    )
    runner = kit.MockModelRunner(
        case=case, model_config=config, dtype=DTYPE, device=DEVICE, max_context_len=context, head_dim=HEAD_DIM
    )
    backend = tp_sglang.TileprefillAttnBackend(runner, validate=True)
    module = kit.ProjectedDenseAttention(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=HEAD_DIM,
        dtype=DTYPE,
        device=DEVICE,
        sliding_window_size=window,
    )
    # A prefill, a chunk of request 0 mixed with a decode step of request 1 (SGLang's MIXED), a decode.
    steps = [(ForwardMode.EXTEND, (5, 4)), (ForwardMode.MIXED, (7, 1)), (ForwardMode.DECODE, (1, 1))]
    lengths = [sum(n[b] for _, n in steps) for b in range(2)]
    hidden_states = [torch.randn(n, hidden, dtype=DTYPE).to(DEVICE) for n in lengths]
    free = torch.randperm(runner.token_to_kv_pool.size)[: sum(lengths)] + 1  # slot 0 is the padding slot
    slots = [free[: lengths[0]].tolist(), free[lengths[0] :].tolist()]
    outputs: list[list[torch.Tensor]] = [[], []]
    done = [0, 0]
    with torch.no_grad(), forward_context(ForwardContext(attn_backend=backend)):
        for mode, new in steps:
            batch = _batch(runner, mode, done, new, slots)
            backend.init_forward_metadata(batch)
            rows = torch.cat([hidden_states[b][done[b] : done[b] + new[b]] for b in range(2)])
            out = module(rows, batch)
            outputs[0].append(out[: new[0]])
            outputs[1].append(out[new[0] :])
            done = [d + n for d, n in zip(done, new, strict=True)]
        for b in range(2):
            q, k, v = module.project_qkv(hidden_states[b])
            expected = _reference(
                q.view(-1, heads, HEAD_DIM),
                k.view(-1, kv_heads, HEAD_DIM),
                v.view(-1, kv_heads, HEAD_DIM),
                scale=module.attn.scaling,
                window=window,
                softcap=None,
            )
            expected_out = module.o_proj(expected.flatten(1).to(DTYPE))
            torch.testing.assert_close(torch.cat(outputs[b]), expected_out, atol=ATOL, rtol=RTOL)


# --- SGLang's --prefill-attention-backend path ------------------------------------------------------


def test_prefill_backend_beside_another_decode_backend() -> None:
    """SGLang's own backend builder, configured as `--prefill-attention-backend tileprefill
    --decode-attention-backend torch_native`, runs extend batches on tileprefill."""
    case = _case("hybrid", heads=8, kv_heads=2, page_size=1, prefix=(6, 0), extend=(5, 9))
    case = dataclasses.replace(case, backend="torch_native")
    with torch.no_grad():
        fixture = kit.build_dense_attention_fixture(
            _FailOnSkip(), case, head_dim=HEAD_DIM, dtype=DTYPE, device=DEVICE
        )
    runner = fixture.runner
    with get_exec().kernel.override(prefill_attention_backend=NAME, decode_attention_backend="torch_native"):
        resolved = resolve_attention_backend_strs(model_runner=runner)
        assert (resolved.prefill, resolved.decode) == (NAME, "torch_native")
        runner.prefill_attention_backend_str = resolved.prefill
        runner.decode_attention_backend_str = resolved.decode
        backends = build_attention_backends(model_runner=runner)
    hybrid = backends.attn_backend
    assert isinstance(hybrid.prefill_backend, tp_sglang.TileprefillAttnBackend)
    assert not isinstance(hybrid.decode_backend, tp_sglang.TileprefillAttnBackend)
    fixture.backend = hybrid
    actual = kit.run_dense_fixture_eager(fixture)
    torch.testing.assert_close(actual, kit.expected_dense_fixture_output(fixture), atol=ATOL, rtol=RTOL)
    metadata = hybrid.prefill_backend.forward_metadata
    assert isinstance(metadata, tp_sglang.BatchMetadata) and len(metadata.attention_plans) == 1


@pytest.fixture
def unregistered(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """SGLang's backend registry and command-line choices without "tileprefill", restored after."""
    backend_choices = choices.ATTENTION_BACKEND_CHOICES
    saved = list(backend_choices)
    backend_choices[:] = [c for c in saved if c != NAME]
    monkeypatch.delitem(attention_registry.ATTENTION_BACKENDS, NAME, raising=False)
    yield backend_choices
    backend_choices[:] = saved


def test_register_adds_the_command_line_choice(
    unregistered: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    argv = ["--model-path", "any", "--prefill-attention-backend", NAME]
    with pytest.raises(SystemExit):
        parser.parse_args(argv)
    assert "invalid choice: 'tileprefill'" in capsys.readouterr().err

    tp_sglang.register()
    tp_sglang.register()  # idempotent
    assert unregistered.count(NAME) == 1
    assert attention_registry.ATTENTION_BACKENDS[NAME] is tp_sglang.create_backend
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(argv)
    assert args.prefill_attention_backend == NAME
    args = parser.parse_args(["--model-path", "any", "--attention-backend", NAME, "--disable-cuda-graph"])
    assert args.attention_backend == NAME


def test_entry_point_is_an_sglang_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """SGLang calls the functions of its plugin group in each process it starts; ours is register()."""
    from sglang.srt.plugins import GENERAL_PLUGINS_GROUP, load_plugins_by_group

    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    plugins = load_plugins_by_group(GENERAL_PLUGINS_GROUP)
    assert NAME in plugins, (
        f"no {GENERAL_PLUGINS_GROUP} entry point: reinstall tileprefill (pip install -e .)"
    )
    function, distribution = plugins[NAME]
    assert function is tp_sglang.register and distribution == "tileprefill"


def test_importing_tileprefill_imports_no_sglang() -> None:
    code = (
        "import sys, tileprefill, tileprefill.integrations; "
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'sglang']; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- what the backend refuses -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode", [ForwardMode.TARGET_VERIFY, ForwardMode.DRAFT_EXTEND_V2, ForwardMode.DLLM_EXTEND]
)
def test_refuses_speculative_and_diffusion_batches(mode: ForwardMode) -> None:
    fixture = _fixture(_case("modes", heads=4, kv_heads=2, page_size=1, prefix=(2,), extend=(3,)))
    fixture.forward_batch.forward_mode = mode
    with pytest.raises(tp_sglang.UnsupportedAttentionCall, match=mode.name):
        fixture.backend.init_forward_metadata(fixture.forward_batch)


def test_refuses_cuda_graphs() -> None:
    fixture = _fixture(_case("graphs", heads=4, kv_heads=2, page_size=1, prefix=(2,), extend=(3,)))
    with pytest.raises(tp_sglang.UnsupportedAttentionCall, match="--disable-cuda-graph"):
        fixture.backend.init_forward_metadata_out_graph(fixture.forward_batch, in_capture=True)
    with pytest.raises(tp_sglang.UnsupportedAttentionCall, match="--prefill-attention-backend tileprefill"):
        fixture.backend.init_cuda_graph_state(8, 64)


@pytest.mark.parametrize(
    ("change", "kwargs", "match"),
    [
        ({}, {"sinks": torch.zeros(4)}, "sinks"),
        ({}, {"return_lse": True}, "return_lse"),
        ({"attn_type": AttentionType.ENCODER_ONLY}, {}, "ENCODER_ONLY"),
        ({"is_cross_attention": True}, {}, "cross attention True"),
        ({"logit_cap": 30.0, "logit_capping_method": "other"}, {}, "logit_capping_method"),
        ({"v_head_dim": 32}, {}, "value head dim 32"),
    ],
    ids=["sinks", "return_lse", "encoder_only", "cross_attention", "capping_method", "v_head_dim"],
)
def test_refused_layer_call_changes_nothing(
    change: dict[str, object], kwargs: dict[str, object], match: str
) -> None:
    fixture = _fixture(_case("layers", heads=4, kv_heads=2, page_size=1, prefix=(2, 4), extend=(3, 1)))
    backend, batch, layer = fixture.backend, fixture.forward_batch, fixture.actual_module.attn
    backend.init_forward_metadata(batch)
    for name, value in change.items():
        setattr(layer, name, value)
    pool_before = (_pool_rows(fixture, values=False).clone(), _pool_rows(fixture, values=True).clone())
    with torch.no_grad():
        q, k, v = fixture.actual_module.project_qkv(fixture.input_hidden)
        with pytest.raises(tp_sglang.UnsupportedAttentionCall, match=match):
            backend.forward_extend(q, k, v, layer, batch, save_kv_cache=True, **kwargs)
    assert torch.equal(_pool_rows(fixture, values=False), pool_before[0])
    assert torch.equal(_pool_rows(fixture, values=True), pool_before[1])


class _OtherPool(MHATokenToKVPool):
    """A pool class other than the plain one (as SGLang's quantised and page-major pools are)."""


def _pool(cls: type[MHATokenToKVPool], dtype: torch.dtype) -> MHATokenToKVPool:
    return cls(
        size=64,
        page_size=1,
        dtype=dtype,
        head_num=2,
        head_dim=HEAD_DIM,
        layer_num=1,
        device=DEVICE,
        enable_memory_saver=False,
        enable_alt_stream=False,
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"use_mla_backend": True}, "multi-head latent attention"),
        ({"attention_chunk_size": 128}, "chunked local attention"),
        ({"token_to_kv_pool": "fp8"}, "KV cache dtype torch.float8_e4m3fn"),
        ({"token_to_kv_pool": "other"}, "got _OtherPool"),
    ],
    ids=["mla", "chunked", "fp8", "pool_class"],
)
def test_refuses_configurations(change: dict[str, object], match: str) -> None:
    fixture = _fixture(_case("config", heads=4, kv_heads=2, page_size=1, prefix=(2,), extend=(3,)))
    runner = fixture.runner
    for name, value in change.items():
        if value == "fp8":
            value = _pool(MHATokenToKVPool, torch.float8_e4m3fn)
        elif value == "other":
            value = _pool(_OtherPool, DTYPE)
        setattr(runner, name, value)
    with pytest.raises(tp_sglang.UnsupportedAttentionCall, match=match):
        tp_sglang.TileprefillAttnBackend(runner)


def test_pool_pages_are_views() -> None:
    """The paged cache tileprefill reads is the pool's own storage, for both of SGLang's layouts."""
    slots = torch.zeros(65, 2, HEAD_DIM, dtype=DTYPE)  # 4 pages of 16 and the pool's padding row
    pages = tp_sglang.pool_pages(slots, 16, tp.KVOrder.NHD)
    assert pages.shape == (4, 16, 2, HEAD_DIM) and pages.data_ptr() == slots.data_ptr()
    pages[1, 3] = 1.0
    assert bool((slots[19] == 1.0).all())
    hnd = torch.zeros(4, 2, 16, HEAD_DIM, dtype=DTYPE)
    pages = tp_sglang.pool_pages(hnd, 16, tp.KVOrder.HND)
    assert pages.shape == (4, 16, 2, HEAD_DIM)
    pages[2, 5, 1] = 1.0
    assert bool((hnd[2, 1, 5] == 1.0).all())


@SPIES_ON_REFERENCE_KERNELS
def test_query_key_and_value_reach_the_kernels_as_sglang_holds_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """No copy of q, k or v: with the layer's q, k and v slices of one fused QKV output (as SGLang's
    models split it), the attention and slot-write kernels receive views of that output's storage,
    and the output and the pool still match the reference."""
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
    fixture = _fixture(_case("fused_qkv", heads=8, kv_heads=2, page_size=16, prefix=(5, 17), extend=(6, 3)))
    module = fixture.actual_module
    separate = module.project_qkv
    projections: list[torch.Tensor] = []

    def fused(hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = separate(hidden)
        qkv = torch.cat(parts, dim=-1)
        projections.append(qkv)
        return tuple(torch.split(qkv, [p.shape[-1] for p in parts], dim=-1))

    monkeypatch.setattr(module, "project_qkv", fused)
    actual = kit.run_dense_fixture_eager(fixture)
    storages = {qkv.untyped_storage().data_ptr() for qkv in projections}
    assert {name for name, _ in received} == {"q", "k_new", "v_new"}
    for name, tensor in received:
        assert not tensor.is_contiguous(), f"{name}: a copy reached the kernel"
        assert tensor.untyped_storage().data_ptr() in storages, f"{name}: not the QKV output's storage"
    torch.testing.assert_close(actual, kit.expected_dense_fixture_output(fixture), atol=ATOL, rtol=RTOL)
    _assert_new_kv_written(fixture)


def test_setup_warms_up_the_programs_of_the_models_attention_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    # SGLang builds its attention backends once the model is loaded: the backend warms up one model
    # per kind of attention layer (here windowed GQA), at the pool's page size, on its device.
    fixture = _fixture(_case("warm_up", heads=8, kv_heads=2, page_size=1, prefix=(3,), extend=(5,), window=4))
    calls: list[tuple[tuple[aot.ModelConfig, ...], str | torch.device, aot.BuildOptions]] = []

    def recorded(
        models: Sequence[aot.ModelConfig], device: str | torch.device, options: aot.BuildOptions
    ) -> WarmUp:
        calls.append((tuple(models), device, options))
        return warm_up(models, device, options)

    monkeypatch.setattr("tileprefill.integrations.sglang.warm_up", recorded)
    assert tp_sglang.TileprefillAttnBackend(fixture.runner).warmed is None  # the kit's model is empty
    assert calls == []
    fixture.runner.model = torch.nn.ModuleList([fixture.actual_module, fixture.actual_module])
    backend = tp_sglang.TileprefillAttnBackend(fixture.runner)
    [(models, device, options)] = calls  # both layers are of one kind
    assert models == (
        aot.ModelConfig(
            heads=8,
            kv_heads=2,
            head_dim=HEAD_DIM,
            dtypes=(tp.DType.BF16,),
            windows=(5,),  # SGLang's 4 keys before the query, and the query's own
            sm_scale=HEAD_DIM**-0.5,
            rope=tp.RopeMode.NONE,
        ),
    )
    assert torch.device(device) == torch.device(DEVICE)
    assert options.ops == tp_sglang.PASS_OPS and options.page_sizes == (1,)
    assert backend.warmed is not None
