"""The TileLang attention kernels on a GPU, against the reference kernels.

Every SM80 and SM90 attention kernel class runs on fresh random inputs (the
seed is printed; replay with TILEPREFILL_SEED) and is compared with the
reference kernel of its family (fp32 torch): relative Frobenius error and max
absolute error per dtype. Every call here is made so that a mistake cannot hide:

- the output buffer the kernel receives is filled with NaN first (the
  `_allocate_output` seam), so an element the kernel does not write fails;
- cache rows past `kv_seqlens[b]`, unused pages and the block-table entries past
  a sequence's pages are NaN / -1, so a kernel that reads what the call does not
  own produces NaN (masked scores must not let 0 * NaN through P @ V);
- query rows that see no key (causal with q_len > kv_len, or kv_len = 0) must be
  exactly 0, and inputs must be bit-for-bit unchanged.

The matrix: q_len < kv_len and q_len > kv_len, unaligned lengths (1, 37, 129,
1000), zero-length sequences inside ragged batches, GQA groups 1/2/4/8/16, head
dims 64/80/96/112/128/160/192/256, page sizes 1/5/48 (gathered) and 16/64/256
(tiled), fp16 and bf16, causal and non-causal, sliding windows and logit softcaps.
Plus empty inputs, long sequences, strided inputs,
opcheck of the custom ops (`tileprefill::attn_*`: they write a caller-allocated
output in place and take the static facts as scalars), torch.compile(fullgraph=True)
of the allocating call and of a bound launch writing its output, and CUDA-graph
replay with new lengths.

Every call is made twice: the allocating `kernel(...)` and the launch `kernel.bind(facts)`
returns, writing a NaN-filled buffer the test allocates; both must agree bit for bit
(one program, one launch path).

SM90 kernels run on compute capability 9.0 only. SM80 kernels run on 8.x and
also here on Hopper (their build carries sm_90 code of the same sm_80 program).
All static configurations are compiled up front, side by side (`warm_up`, run
by the `compiled_programs` fixture); lengths and token counts are dynamic and
never recompile.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, cast

import attrs
import pytest
import torch

from tileprefill.context import Arch, DType, sm_count_of
from tileprefill.kernels import attention_tl, launch
from tileprefill.kernels import compile as compile_module
from tileprefill.kernels.base import (
    NO_LSE,
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    PagedAttentionKernel,
    RaggedAttentionKernel,
    StaticFacts,
)
from tileprefill.kernels.launch import Launcher
from tileprefill.kernels.reference import (
    AttentionContiguousRefKernel,
    AttentionDenseRefKernel,
    AttentionPagedRefKernel,
    AttentionRaggedRefKernel,
)
from tileprefill.kernels.registry import ALL_KERNELS
from tileprefill.keys import AttentionKey, attention_traits
from tileprefill.tiles import KVSource as Source
from tileprefill.tiles import pages_tile_evenly

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

DEV = torch.device("cuda")
try:
    DEVICE_ARCH = Arch.of_device(DEV)
except ValueError as exc:
    pytest.skip(f"no TileLang attention code for this device: {exc}", allow_module_level=True)

# ‖out - ref‖ / ‖ref‖ and max |out - ref| against the fp32 reference. The kernels round
# the probabilities to the input dtype before P @ V (as FlashAttention does); outputs are
# averages of N(0, 1) values.
REL_ERR = {torch.float16: 1e-2, torch.bfloat16: 2e-2}
ABS_ERR = {torch.float16: 1e-2, torch.bfloat16: 5e-2}

ARCHS = [Arch.SM90, Arch.SM80]


def runnable(arch: Arch) -> str | None:
    """Why kernels built for `arch` cannot run on this device (None when they can)."""
    if arch is Arch.SM90 and DEVICE_ARCH is not Arch.SM90:
        return f"SM90 kernels need compute capability 9.0; this device runs {DEVICE_ARCH.value} code"
    return None


KEYS: dict[tuple[Source, Arch], AttentionKey] = {
    (source, arch): key
    for key in AttentionKey
    for source, code in [attention_traits(key)]
    for arch in ARCHS
    if code.name == arch.name
}


def facts(
    head_dim: int,
    dtype: torch.dtype,
    causal: bool,
    heads: int,
    kv_heads: int,
    page_size: int = 0,
    window: int = 0,
    softcap: float = 0.0,
) -> StaticFacts:
    """A static configuration of the matrix, for every arch (`on(f, arch)` gives the facts of one)."""
    return StaticFacts(
        arch=Arch.CPU,  # replaced by the test's arch: see `on`
        dtype=DType.of(dtype, argument="dtype"),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=causal,
        sm_scale=head_dim**-0.5,
        page_size=page_size,
        window=window,
        softcap=softcap,
    )


def on(f: StaticFacts, arch: Arch) -> StaticFacts:
    """The facts of configuration `f` for the programs of `arch` (what `facts_of` gives a call on this
    GPU: SM90 programs also take its SM count, one CTA per SM where the grid is persistent)."""
    device = torch.device("cuda", torch.cuda.current_device())
    return f._replace(arch=arch, sm_count=sm_count_of(device) if arch is Arch.SM90 else 0)


F16, BF16 = torch.float16, torch.bfloat16

# The static configurations (one compiled program per arch each): every source, every
# head dim (64 to 256 in steps of 16: 16-, 32- and 64-column swizzle panels, block_N 128
# and 64, persistent and not) and GQA group 1/2/4/8/16, both dtypes and causal modes, six page
# sizes, sliding windows (shorter than a tile, several tiles, longer than most sequences) and
# softcaps.
DENSE_CONFIGS = [
    facts(128, F16, True, 32, 8),  # group 4
    facts(128, BF16, False, 32, 2),  # group 16
    facts(64, F16, True, 8, 8),  # group 1; SM90: three consumers
    facts(64, BF16, False, 16, 4),  # SM90: three consumers, KV-head sections
    facts(256, BF16, True, 16, 2),  # group 8
    facts(96, BF16, True, 16, 4, window=200),
    facts(80, F16, True, 8, 1, softcap=30.0),
    facts(112, F16, True, 16, 2, window=77, softcap=20.0),
    facts(160, BF16, False, 8, 8),
    facts(192, F16, True, 8, 2, window=33),
    facts(144, BF16, True, 16, 4, softcap=50.0),
    facts(176, F16, False, 8, 2),
    facts(208, BF16, True, 8, 8, window=130),
    facts(224, F16, True, 16, 2),
    facts(240, BF16, False, 8, 4),
]
RAGGED_CONFIGS = [
    facts(128, BF16, True, 16, 8),  # group 2
    facts(64, F16, False, 16, 1),  # group 16
    facts(96, F16, True, 16, 4, window=100, softcap=50.0),
    facts(176, BF16, True, 8, 2),
]
CONTIGUOUS_CONFIGS = [
    facts(128, F16, True, 32, 4),  # group 8
    facts(256, F16, False, 8, 8),  # group 1
    facts(192, BF16, True, 8, 2, window=300),
    facts(64, BF16, True, 16, 2),  # SM90: three consumers, one CTA a 192-row tile
]
PAGED_CONFIGS = [  # rows gathered through the block table
    facts(128, F16, True, 32, 8, page_size=1),
    facts(64, BF16, False, 8, 2, page_size=5),
    facts(256, F16, True, 4, 2, page_size=48),
    facts(80, F16, True, 8, 2, page_size=1, window=64, softcap=10.0),
]
PAGED_TILED_CONFIGS = [  # whole pages per key tile, or a key tile inside one page
    facts(128, F16, True, 32, 8, page_size=16),
    facts(64, BF16, True, 16, 8, page_size=64),
    facts(128, F16, False, 16, 2, page_size=256),
    facts(96, BF16, True, 16, 4, page_size=16, window=150),
    facts(160, F16, True, 8, 8, page_size=64, softcap=25.0),
    facts(224, BF16, True, 8, 2, page_size=32),
]
CONFIGS: dict[Source, list[StaticFacts]] = {
    Source.DENSE: DENSE_CONFIGS,
    Source.RAGGED: RAGGED_CONFIGS,
    Source.CONTIGUOUS: CONTIGUOUS_CONFIGS,
    Source.PAGED: PAGED_CONFIGS,
    Source.PAGED_TILED: PAGED_TILED_CONFIGS,
}


#: The programs with the LSE output (`facts.lse`) under test: per source its first configuration and
#: one with a window and/or a softcap.
LSE_CONFIGS: list[tuple[Source, StaticFacts]] = [
    (source, f._replace(lse=True))
    for source, configs in CONFIGS.items()
    for f in (configs[0], next(c for c in configs if c.window or c.softcap))
]
#: The split-KV merge test's program: contiguous cache, non-causal.
MERGE_CONFIG = CONTIGUOUS_CONFIGS[1]._replace(lse=True)
assert not MERGE_CONFIG.causal


#: Persistent SM90 programs built for fewer SMs than this GPU has (an H20 has 78, an H100 PCIe 114;
#: one CTA: every tile in one CTA's loop): their static schedules must cover every tile, each once.
FEWER_SMS: list[tuple[Source, StaticFacts, int]] = [
    (Source.DENSE, DENSE_CONFIGS[0], 78),  # causal: heads fastest, longest first, round-robin
    (Source.DENSE, DENSE_CONFIGS[1], 78),  # non-causal: KV-head sections, snake dealing
    (Source.RAGGED, RAGGED_CONFIGS[0], 78),
    (Source.RAGGED, RAGGED_CONFIGS[0], 1),
    (Source.PAGED_TILED, PAGED_TILED_CONFIGS[0], 78),
]


def config_id(f: StaticFacts) -> str:
    page = f"-page{f.page_size}" if f.page_size else ""
    mode = "causal" if f.causal else "full"
    extra = (f"-w{f.window}" if f.window else "") + (f"-cap{f.softcap:g}" if f.softcap else "")
    return f"d{f.head_dim}-{f.dtype.value}-{mode}-g{f.heads // f.kv_heads}{page}{extra}"


def warm_up() -> None:
    """Build every static configuration of this module (the `compiled_programs` fixture runs this
    under `recording_builds`, then compiles them side by side)."""
    for source, configs in CONFIGS.items():
        for f in configs:
            for arch in ARCHS:
                if runnable(arch) is None:
                    Launcher(attention_tl.RECORDS[KEYS[source, arch]], on(f, arch))
    for source, f in [*LSE_CONFIGS, (Source.CONTIGUOUS, MERGE_CONFIG)]:
        for arch in ARCHS:
            if runnable(arch) is None:
                Launcher(attention_tl.LSE_RECORDS[KEYS[source, arch]], on(f, arch))
    if runnable(Arch.SM90) is None:
        for source, f, sm_count in FEWER_SMS:
            Launcher(
                attention_tl.RECORDS[KEYS[source, Arch.SM90]], on(f, Arch.SM90)._replace(sm_count=sm_count)
            )


@pytest.fixture(autouse=True)
def fresh_seed() -> Iterator[int]:
    seed = int(os.environ.get("TILEPREFILL_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed {seed} (replay with TILEPREFILL_SEED={seed})")
    random.seed(seed)
    torch.manual_seed(seed)
    yield seed


class AttentionKernel(Protocol):
    """What the tests call on an attention kernel of any family (each names its own tensors)."""

    def __call__(
        self, *tensors: torch.Tensor, causal: bool, sm_scale: float, window: int, softcap: float
    ) -> torch.Tensor: ...
    def with_lse(
        self, *tensors: torch.Tensor, causal: bool, sm_scale: float, window: int, softcap: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def bind(self, facts: StaticFacts) -> Callable[..., None]: ...


def kernel_of(source: Source, arch: Arch) -> AttentionKernel:
    reason = runnable(arch)
    if reason is not None:
        pytest.skip(reason)
    kernel = ALL_KERNELS[KEYS[source, arch]]()
    family = {
        Source.DENSE: DenseAttentionKernel,
        Source.RAGGED: RaggedAttentionKernel,
        Source.CONTIGUOUS: ContiguousAttentionKernel,
        Source.PAGED: PagedAttentionKernel,
        Source.PAGED_TILED: PagedAttentionKernel,
    }[source]
    assert isinstance(kernel, family)
    return cast(AttentionKernel, kernel)


# ---------------------------------------------------------------------------------------- inputs


@attrs.frozen
class Case:
    """One call: its tensors in call order, and the output rows that see no key (must be 0)."""

    tensors: tuple[torch.Tensor, ...]
    blind_rows: torch.Tensor  # bool over the output's leading dims ((B, Sq) or (Tq,))


def randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, device=DEV)


def cumulative(lens: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEV)


def blind(q_len: int, kv_len: int, causal: bool) -> torch.Tensor:
    """bool (q_len,): query rows of one sequence that see no key (bottom-right causal)."""
    rows = torch.arange(q_len, device=DEV)
    if kv_len == 0:
        return torch.ones(q_len, dtype=torch.bool, device=DEV)
    return kv_len - q_len + rows < 0 if causal else torch.zeros(q_len, dtype=torch.bool, device=DEV)


def dtype_of(f: StaticFacts) -> torch.dtype:
    return f.dtype.torch_dtype


def dense_case(f: StaticFacts, batch: int, q_len: int, kv_len: int) -> Case:
    dt = dtype_of(f)
    q = randn(batch, q_len, f.heads, f.head_dim, dtype=dt)
    k = randn(batch, kv_len, f.kv_heads, f.head_dim, dtype=dt)
    v = randn(batch, kv_len, f.kv_heads, f.head_dim, dtype=dt)
    return Case((q, k, v), blind(q_len, kv_len, f.causal).expand(batch, q_len))


def ragged_case(f: StaticFacts, q_lens: Sequence[int], kv_lens: Sequence[int]) -> Case:
    dt = dtype_of(f)
    q = randn(sum(q_lens), f.heads, f.head_dim, dtype=dt)
    k = randn(sum(kv_lens), f.kv_heads, f.head_dim, dtype=dt)
    v = randn(sum(kv_lens), f.kv_heads, f.head_dim, dtype=dt)
    rows = [blind(n, m, f.causal) for n, m in zip(q_lens, kv_lens, strict=True)]
    return Case((q, k, v, cumulative(q_lens), cumulative(kv_lens)), torch.cat(rows))


def contiguous_case(f: StaticFacts, q_len: int, kv_lens: Sequence[int], max_len: int) -> Case:
    """Cache rows past each kv_len are NaN."""
    dt = dtype_of(f)
    batch = len(kv_lens)
    q = randn(batch, q_len, f.heads, f.head_dim, dtype=dt)
    caches = []
    for _ in range(2):
        cache = torch.full((batch, max_len, f.kv_heads, f.head_dim), float("nan"), dtype=dt, device=DEV)
        for b, n in enumerate(kv_lens):
            cache[b, :n] = randn(n, f.kv_heads, f.head_dim, dtype=dt)
        caches.append(cache)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    rows = torch.stack([blind(q_len, n, f.causal) for n in kv_lens])
    return Case((q, caches[0], caches[1], lens), rows)


def paged_case(
    f: StaticFacts,
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    *,
    num_pages: int | None = None,
    table_width: int | None = None,
) -> Case:
    """Pages of every sequence from a shuffled pool with spare pages; unused slots and spare pages
    are NaN, block-table entries past a sequence's pages are -1."""
    dt = dtype_of(f)
    ps = f.page_size
    need = [math.ceil(n / ps) for n in kv_lens]
    num_pages = sum(need) + 3 if num_pages is None else num_pages
    table_width = max([1, *need]) + 2 if table_width is None else table_width
    assert sum(need) <= num_pages and max([0, *need]) <= table_width, "test setup: too few pages"
    pool = random.sample(range(num_pages), num_pages)
    table = torch.full((len(kv_lens), table_width), -1, dtype=torch.int32)
    caches = [
        torch.full((num_pages, ps, f.kv_heads, f.head_dim), float("nan"), dtype=dt, device=DEV)
        for _ in range(2)
    ]
    cursor = 0
    for b, (n_pages, n_keys) in enumerate(zip(need, kv_lens, strict=True)):
        pages = torch.tensor(pool[cursor : cursor + n_pages], dtype=torch.long)
        cursor += n_pages
        table[b, :n_pages] = pages.to(torch.int32)
        positions = torch.arange(n_keys)
        for cache in caches:
            cache[pages[positions // ps].to(DEV), (positions % ps).to(DEV)] = randn(
                n_keys, f.kv_heads, f.head_dim, dtype=dt
            )
    q = randn(sum(q_lens), f.heads, f.head_dim, dtype=dt)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    rows = [blind(n, m, f.causal) for n, m in zip(q_lens, kv_lens, strict=True)]
    return Case((q, caches[0], caches[1], table.to(DEV), lens, cumulative(q_lens)), torch.cat(rows))


REFERENCES: dict[Source, Callable[..., torch.Tensor]] = {
    Source.DENSE: AttentionDenseRefKernel(),
    Source.RAGGED: AttentionRaggedRefKernel(),
    Source.CONTIGUOUS: AttentionContiguousRefKernel(),
    Source.PAGED: AttentionPagedRefKernel(),
    Source.PAGED_TILED: AttentionPagedRefKernel(),
}


# ---------------------------------------------------------------------------------------- checks


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits: equal bits is byte-for-byte equality, NaN included."""
    return t.contiguous().view(torch.uint8)


def nan_filled(q: torch.Tensor) -> torch.Tensor:
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def check(source: Source, arch: Arch, f: StaticFacts, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = kernel_of(source, arch)
    q = case.tensors[0]
    # The allocating call builds the program warm_up built (same key, same static facts).
    called = attention_tl.facts_of(
        KEYS[source, arch],
        q,
        case.tensors[1],
        causal=f.causal,
        sm_scale=f.sm_scale,
        window=f.window,
        softcap=f.softcap,
    )
    assert called == on(f, arch), f"test setup: the call's facts {called} are not the config's"
    before = [bits(t).clone() for t in case.tensors]
    expected = REFERENCES[source](
        *case.tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap
    )
    with monkeypatch.context() as patch:
        patch.setattr(attention_tl, "_allocate_output", nan_filled)
        out = kernel(*case.tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap)
    bound = nan_filled(q)
    kernel.bind(on(f, arch))(*case.tensors, bound, NO_LSE)
    torch.cuda.synchronize()
    assert (out.shape, out.dtype, out.device) == (q.shape, q.dtype, q.device)
    assert torch.equal(bits(bound), bits(out)), "the bound launch and the allocating call differ"
    for i, (tensor, old) in enumerate(zip(case.tensors, before, strict=True)):
        assert torch.equal(bits(tensor), old), f"input {i} changed"
    assert_matches(out, expected, case)


def assert_matches(out: torch.Tensor, expected: torch.Tensor, case: Case) -> None:
    """Every element written and finite, rows that see no key exactly 0, errors within bounds."""
    q = case.tensors[0]
    assert not out.isnan().any(), "NaN in the output: an element was not written, or garbage leaked in"
    assert not out.isinf().any()
    if case.blind_rows.any():
        assert torch.equal(out[case.blind_rows], torch.zeros_like(out[case.blind_rows])), (
            "a row that sees no key is not exactly 0"
        )
    if out.numel() == 0:
        return
    diff = (out.float() - expected.float()).abs()
    rel = (diff.norm() / expected.float().norm().clamp_min(1e-6)).item()
    print(f"relative error {rel:.2e}, max abs error {diff.max().item():.2e}")
    assert rel < REL_ERR[q.dtype], f"relative error {rel:.2e}"
    assert diff.max().item() < ABS_ERR[q.dtype], f"max abs error {diff.max().item():.2e}"


@pytest.mark.parametrize(
    ("source", "f", "sm_count"),
    FEWER_SMS,
    ids=[f"{s.name.lower()}-{config_id(f)}-{n}sms" for s, f, n in FEWER_SMS],
)
def test_persistent_programs_built_for_fewer_sms(source: Source, f: StaticFacts, sm_count: int) -> None:
    """A plan on a GPU of `sm_count` SMs binds the program of that many persistent CTAs. Run here, on
    more SMs, it must still compute every tile (a tile left out stays NaN)."""
    kernel = kernel_of(source, Arch.SM90)
    fewer = on(f, Arch.SM90)._replace(sm_count=sm_count)
    match source:
        case Source.DENSE:
            cases = [dense_case(f, 2, 300, 300), dense_case(f, 3, 1000, 37), dense_case(f, 1, 1, 1)]
        case Source.RAGGED:
            cases = [ragged_case(f, q_lens, kv_lens) for q_lens, kv_lens in ragged_lengths()]
        case _:
            cases = [paged_case(f, q_lens, kv_lens) for q_lens, kv_lens in paged_lengths()]
    for case in cases:
        expected = REFERENCES[source](
            *case.tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap
        )
        out = nan_filled(case.tensors[0])
        kernel.bind(fewer)(*case.tensors, out, NO_LSE)
        torch.cuda.synchronize()
        assert_matches(out, expected, case)


# ----------------------------------------------------------------------------------------- dense

DENSE_SHAPES = [  # batch, q_len, kv_len
    (2, 300, 300),
    (1, 129, 1000),  # q_len < kv_len
    (3, 1000, 37),  # q_len > kv_len: causal rows with no key
    (1, 1, 1),
    (2, 37, 129),
    (1, 128, 256),  # whole tiles
]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("f", DENSE_CONFIGS, ids=config_id)
@pytest.mark.parametrize(("batch", "q_len", "kv_len"), DENSE_SHAPES)
def test_dense(
    arch: Arch, f: StaticFacts, batch: int, q_len: int, kv_len: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    check(Source.DENSE, arch, f, dense_case(f, batch, q_len, kv_len), monkeypatch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_dense_long_sequences(arch: Arch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many key tiles: the running max and sum over ~30 rescales; the causal diagonal mid-sequence."""
    f = DENSE_CONFIGS[0]
    check(Source.DENSE, arch, f, dense_case(f, 1, random.randint(2900, 3100), 4001), monkeypatch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_dense_causal_group_one_beyond_the_l2_bound(arch: Arch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group 1 whose batch's K/V exceeds what the persistent order keeps resident: SM90 runs the
    query tiles in bands of 6 lengths, two tiles of a band per unit (`kernels/tl/dense_order.py`);
    q_len < kv_len, a partial last query tile."""
    f = DENSE_CONFIGS[2]
    check(Source.DENSE, arch, f, dense_case(f, 9, 2113, 2200), monkeypatch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("f", [f for f in DENSE_CONFIGS if f.window], ids=config_id)
def test_dense_windowed_long_sequences(arch: Arch, f: StaticFacts, monkeypatch: pytest.MonkeyPatch) -> None:
    """A window far shorter than the context: each query tile reads only the few key tiles its
    window touches (first tiles partly outside the window, for some rows of a warpgroup wholly)."""
    check(Source.DENSE, arch, f, dense_case(f, 1, random.randint(1900, 2100), 3001), monkeypatch)


#: Configurations with a window and a cap, and calls that share each one's program: another scale,
#: cap and window (launch values), and other head counts (read from the tensors), of the same group
#: and of another.
SHARED_PROGRAM_CONFIGS: list[tuple[Source, StaticFacts]] = [
    (Source.DENSE, DENSE_CONFIGS[7]),  # D 112, 16 / 2 heads, window 77, softcap 20
    (Source.PAGED, PAGED_CONFIGS[3]),  # D 80, 8 / 2 heads, page 1, window 64, softcap 10
]


def launch_variants(f: StaticFacts) -> list[StaticFacts]:
    return [
        f,
        f._replace(sm_scale=0.05, softcap=3.0, window=500),
        f._replace(heads=2 * f.heads, kv_heads=2 * f.kv_heads, window=9),
        f._replace(heads=3 * f.kv_heads, sm_scale=0.2),
    ]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize(
    ("source", "f"),
    SHARED_PROGRAM_CONFIGS,
    ids=[f"{s.name.lower()}-{config_id(f)}" for s, f in SHARED_PROGRAM_CONFIGS],
)
def test_one_program_serves_other_scales_caps_windows_and_heads(
    arch: Arch, source: Source, f: StaticFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scale, the cap and the window's length are launch values and the head counts are read
    from the tensors: calls that differ only in those run one compiled program (built once, by
    `warm_up`), and each matches the reference with its own values."""
    key = KEYS[source, arch]
    kernel_of(source, arch)  # skips an arch this device cannot run
    variants = launch_variants(f)
    programs = {attention_tl.program(key, on(v, arch)) for v in variants}
    assert len(programs) == 1, programs
    (program,) = programs
    kernel = compile_module.build(program.factory, program.args, program.arch)
    for v in variants:
        match source:
            case Source.DENSE:
                case = dense_case(v, 2, 300, 700)
            case _:
                case = paged_case(v, [37, 300], [400, 300])
        check(source, arch, v, case, monkeypatch)
        assert compile_module.build(program.factory, program.args, program.arch) is kernel


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_dense_strided_and_misaligned_inputs(arch: Arch, monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k, v as slices of one fused qkv tensor (not contiguous), then shifted by one element."""
    f = DENSE_CONFIGS[0]
    qkv = randn(2, 77, f.heads + 2 * f.kv_heads, f.head_dim, dtype=F16)
    q, k, v = torch.split(qkv, [f.heads, f.kv_heads, f.kv_heads], dim=2)
    check(Source.DENSE, arch, f, Case((q, k, v), blind(77, 77, True).expand(2, 77)), monkeypatch)
    flat = randn(q.numel() + 1, dtype=F16)
    shifted = flat[1:].view(q.shape)
    check(Source.DENSE, arch, f, Case((shifted, k, v), blind(77, 77, True).expand(2, 77)), monkeypatch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_dense_without_queries_or_keys(arch: Arch, monkeypatch: pytest.MonkeyPatch) -> None:
    f = DENSE_CONFIGS[0]
    check(Source.DENSE, arch, f, dense_case(f, 2, 0, 50), monkeypatch)
    check(Source.DENSE, arch, f, dense_case(f, 2, 50, 0), monkeypatch)


# ---------------------------------------------------------------------------------------- ragged


def ragged_lengths() -> list[tuple[list[int], list[int]]]:
    """Zero-length sequences first, middle and last; q_len above and below kv_len; random lengths."""
    n = random.randint(3, 7)
    return [
        ([0, 1, 37, 129, 0, 1000, 5, 0], [3, 1, 100, 129, 0, 1000, 0, 17]),
        ([257], [129]),
        ([random.randint(0, 300) for _ in range(n)], [random.randint(0, 600) for _ in range(n)]),
    ]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("f", RAGGED_CONFIGS, ids=config_id)
def test_ragged(arch: Arch, f: StaticFacts, monkeypatch: pytest.MonkeyPatch) -> None:
    for q_lens, kv_lens in ragged_lengths():
        print(f"q_lens {q_lens} kv_lens {kv_lens}")
        check(Source.RAGGED, arch, f, ragged_case(f, q_lens, kv_lens), monkeypatch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_ragged_long_and_empty(arch: Arch, monkeypatch: pytest.MonkeyPatch) -> None:
    f = RAGGED_CONFIGS[0]
    check(Source.RAGGED, arch, f, ragged_case(f, [2500, 3, 1100], [4000, 3, 1100]), monkeypatch)
    check(Source.RAGGED, arch, f, ragged_case(f, [0, 0], [5, 0]), monkeypatch)  # no queries
    check(Source.RAGGED, arch, f, ragged_case(f, [4, 9], [0, 0]), monkeypatch)  # no keys


# ------------------------------------------------------------------------------------ contiguous


def contiguous_shapes() -> list[tuple[int, list[int], int]]:
    """q_len, kv_lens, S_max: empty and full caches, q_len above and below kv_len."""
    return [
        (37, [100, 37, 0], 130),
        (129, [1000, 5], 1024),
        (1, [1, 9], 9),
        (random.randint(1, 200), [random.randint(0, 700) for _ in range(3)], 700),
    ]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("f", CONTIGUOUS_CONFIGS, ids=config_id)
def test_contiguous(arch: Arch, f: StaticFacts, monkeypatch: pytest.MonkeyPatch) -> None:
    for q_len, kv_lens, max_len in contiguous_shapes():
        print(f"q_len {q_len} kv_lens {kv_lens} max_len {max_len}")
        check(Source.CONTIGUOUS, arch, f, contiguous_case(f, q_len, kv_lens, max_len), monkeypatch)


# ----------------------------------------------------------------------------------------- paged


def paged_lengths() -> list[tuple[list[int], list[int]]]:
    n = random.randint(3, 7)
    kv = [random.randint(0, 800) for _ in range(n)]
    return [
        ([0, 1, 37, 129, 0, 300, 5], [5, 1, 100, 129, 7, 1000, 3]),
        ([random.randint(0, min(300, m + 20)) for m in kv], kv),
    ]


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("f", PAGED_CONFIGS, ids=config_id)
def test_paged(arch: Arch, f: StaticFacts, monkeypatch: pytest.MonkeyPatch) -> None:
    for q_lens, kv_lens in paged_lengths():
        print(f"q_lens {q_lens} kv_lens {kv_lens}")
        check(Source.PAGED, arch, f, paged_case(f, q_lens, kv_lens), monkeypatch)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("f", PAGED_TILED_CONFIGS, ids=config_id)
def test_paged_tiled(arch: Arch, f: StaticFacts, monkeypatch: pytest.MonkeyPatch) -> None:
    assert pages_tile_evenly(f.page_size)
    for q_lens, kv_lens in paged_lengths():
        print(f"q_lens {q_lens} kv_lens {kv_lens}")
        check(Source.PAGED_TILED, arch, f, paged_case(f, q_lens, kv_lens), monkeypatch)


# --------------------------------------------------------------------- custom ops, compile, graphs


def small_case(source: Source) -> tuple[StaticFacts, Case]:
    f = CONFIGS[source][0]
    match source:
        case Source.DENSE:
            return f, dense_case(f, 2, 70, 90)
        case Source.RAGGED:
            return f, ragged_case(f, [3, 0, 60], [50, 4, 60])
        case Source.CONTIGUOUS:
            return f, contiguous_case(f, 20, [45, 100], 128)
        case Source.PAGED | Source.PAGED_TILED:
            return f, paged_case(f, [3, 0, 60], [50, 4, 70])


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("source", list(Source), ids=lambda s: s.name.lower())
def test_opcheck(arch: Arch, source: Source) -> None:
    """Schema (the output is the one tensor written), fake (meta) implementation and dispatch of each
    custom op: its tensors, a NaN-filled output, then the static facts as scalars."""
    if runnable(arch) is not None:
        pytest.skip(str(runnable(arch)))
    f, case = small_case(source)
    key = KEYS[source, arch]
    assert attention_tl.RECORDS[key].mutates == ("out",)
    op = launch.OPS[key]
    q = case.tensors[0]
    torch.library.opcheck(op, (*case.tensors, nan_filled(q), *launch.scalars(on(f, arch))))
    # The op launches the program of its scalars: what the allocating call computes, bit for bit.
    out = nan_filled(q)
    op(*case.tensors, out, *launch.scalars(on(f, arch)))
    want = kernel_of(source, arch)(
        *case.tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap
    )
    torch.cuda.synchronize()
    assert torch.equal(bits(out), bits(want))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("source", [Source.DENSE, Source.PAGED_TILED], ids=lambda s: s.name.lower())
def test_torch_compile_fullgraph(arch: Arch, source: Source) -> None:
    """The kernel is one opaque op in a fullgraph-compiled function (no graph break)."""
    kernel = kernel_of(source, arch)
    f, case = small_case(source)

    def attend_twice(*tensors: torch.Tensor) -> torch.Tensor:
        return 2.0 * kernel(
            *tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap
        )

    torch._dynamo.reset()
    compiled = torch.compile(attend_twice, fullgraph=True)
    got = compiled(*case.tensors)
    want = 2.0 * REFERENCES[source](
        *case.tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap
    )
    torch.testing.assert_close(got, want, rtol=0, atol=2 * ABS_ERR[got.dtype])


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize("source", [Source.RAGGED, Source.PAGED], ids=lambda s: s.name.lower())
def test_torch_compile_fullgraph_sees_the_output_written_by_a_bound_launch(
    arch: Arch, source: Source
) -> None:
    """A launch bound outside the compiled function (what a plan holds) writes a buffer the function
    allocates: the compiler must order the reads of that buffer after the custom op writes it."""
    kernel = kernel_of(source, arch)
    f, case = small_case(source)
    attend = kernel.bind(on(f, arch))

    def attend_into_nan_then_read(*tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.full_like(tensors[0], float("nan"))
        attend(*tensors, out, NO_LSE)
        return out * 2.0, out.isnan().any()

    torch._dynamo.reset()
    compiled = torch.compile(attend_into_nan_then_read, fullgraph=True)
    for _ in range(2):  # new data, same shapes: the second call must not see the first's values
        f, case = small_case(source)
        doubled, any_nan = compiled(*case.tensors)
        want = kernel(*case.tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap)
        torch.cuda.synchronize()
        assert not bool(any_nan), "the read of the output ran before the write"
        assert torch.equal(bits(doubled), bits(want * 2.0))


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_cuda_graph_replay_with_new_lengths(arch: Arch) -> None:
    """Lengths are read on the device: one captured paged call serves new q, cache contents and
    lengths of the same shapes."""
    kernel = kernel_of(Source.PAGED_TILED, arch)
    f = PAGED_TILED_CONFIGS[0]
    shapes = {"num_pages": 64, "table_width": 40}
    first = paged_case(f, [40, 7, 80], [300, 7, 500], **shapes)
    static = [t.clone() for t in first.tensors]
    kernel(
        *static, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap
    )  # compile and warm up outside the graph
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(*static, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap)
    for q_lens, kv_lens in (
        ([40, 7, 80], [300, 7, 500]),
        ([0, 120, 7], [13, 400, 7]),
        ([127, 0, 0], [127, 0, 3]),
    ):
        # Same shapes (127 query tokens, 64 pages, 40 table columns); new contents and lengths.
        case = paged_case(f, q_lens, kv_lens, **shapes)
        for target, source_tensor in zip(static, case.tensors, strict=True):
            assert target.shape == source_tensor.shape, "test setup: the replay needs the captured shapes"
            target.copy_(source_tensor)
        graph.replay()
        torch.cuda.synchronize()
        want = REFERENCES[Source.PAGED_TILED](
            *case.tensors, causal=f.causal, sm_scale=f.sm_scale, window=f.window, softcap=f.softcap
        )
        assert not out.isnan().any()
        torch.testing.assert_close(out, want, rtol=0, atol=ABS_ERR[out.dtype])


# ------------------------------------------------------------------------------------- the LSE


def nan_lse(q: torch.Tensor) -> torch.Tensor:
    return torch.full(q.shape[:-1], float("nan"), dtype=torch.float32, device=q.device)


def lse_case(source: Source, f: StaticFacts) -> Case:
    """Unaligned lengths with rows that see no key (q_len > kv_len, causal; an empty sequence)."""
    match source:
        case Source.DENSE:
            return dense_case(f, 2, 300, 137)
        case Source.RAGGED:
            return ragged_case(f, [3, 0, 260, 129], [50, 4, 60, 500])
        case Source.CONTIGUOUS:
            return contiguous_case(f, 150, [45, 300, 0], 320)
        case Source.PAGED | Source.PAGED_TILED:
            return paged_case(f, [3, 0, 260, 129], [50, 4, 70, 700])


LSE_ABS_ERR = 2e-2  # natural-log units; the scores are fp16/bf16 products accumulated in fp32


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
@pytest.mark.parametrize(
    ("source", "f"), LSE_CONFIGS, ids=[f"{s.name.lower()}-{config_id(f)}" for s, f in LSE_CONFIGS]
)
def test_lse_matches_the_reference(
    arch: Arch, source: Source, f: StaticFacts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The program with the LSE output writes every (token, head) of a NaN-filled LSE buffer: the
    reference's log-sum-exp where a row sees keys, exactly -inf where it sees none; its output is
    the reference's too, and what the bound launch writes bit for bit."""
    kernel = kernel_of(source, arch)
    case = lse_case(source, f)
    q = case.tensors[0]
    reference = cast(AttentionKernel, REFERENCES[source])
    c, scale, window, cap = f.causal, f.sm_scale, f.window, f.softcap
    want_out, want_lse = reference.with_lse(
        *case.tensors, causal=c, sm_scale=scale, window=window, softcap=cap
    )
    with monkeypatch.context() as patch:
        patch.setattr(attention_tl, "_allocate_output", nan_filled)
        patch.setattr(attention_tl, "_allocate_lse", nan_lse)
        out, lse = kernel.with_lse(*case.tensors, causal=c, sm_scale=scale, window=window, softcap=cap)
    bound_out, bound_lse = nan_filled(q), nan_lse(q)
    kernel.bind(on(f, arch))(*case.tensors, bound_out, bound_lse)
    torch.cuda.synchronize()
    assert (lse.shape, lse.dtype) == (q.shape[:-1], torch.float32)
    assert torch.equal(bits(bound_out), bits(out)) and torch.equal(bits(bound_lse), bits(lse))
    assert not lse.isnan().any(), "NaN in the LSE: an element was not written"
    blind = case.blind_rows
    assert blind.any(), "test setup: the case should have rows that see no key"
    assert bool((lse[blind] == float("-inf")).all()), "a row that sees no key has an LSE other than -inf"
    assert torch.equal(torch.isinf(want_lse), torch.isinf(lse))
    seen = torch.isfinite(want_lse)
    err = (lse[seen] - want_lse[seen]).abs().max().item()
    print(f"max abs LSE error {err:.2e}")
    assert err < LSE_ABS_ERR
    diff = (out.float() - want_out.float()).abs().max().item()
    assert diff < ABS_ERR[q.dtype], f"max abs error {diff:.2e}"


def merge(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two partial attentions over disjoint key ranges, merged by their LSEs (flash-decoding's
    combine): lse = logaddexp(lse1, lse2), out = sum exp(lse_i - lse) out_i; -inf parts weigh 0."""
    (o1, l1), (o2, l2) = first, second
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w1, w2 = torch.exp(l1 - safe).unsqueeze(-1), torch.exp(l2 - safe).unsqueeze(-1)
    return (w1 * o1.float() + w2 * o2.float()), lse


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.value)
def test_split_kv_merge_matches_the_whole(arch: Arch) -> None:
    """Two calls of the contiguous-cache program over the first and the second part of each
    sequence's keys (non-causal), merged with their LSEs, give the call over all keys. A sequence
    whose second part is empty (LSE -inf there) takes its first part whole."""
    f = MERGE_CONFIG
    kernel = kernel_of(Source.CONTIGUOUS, arch)
    kv_lens, split, max_len = [200, 150, 90], 96, 256
    q, k_cache, v_cache, kv_seqlens = contiguous_case(f, 20, kv_lens, max_len).tensors

    def attend(k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return kernel.with_lse(q, k, v, lens, causal=False, sm_scale=f.sm_scale, window=0, softcap=0.0)

    whole = attend(k_cache, v_cache, kv_seqlens)
    first = attend(k_cache, v_cache, kv_seqlens.clamp(max=split))
    rest = (kv_seqlens - split).clamp(min=0).to(torch.int32)
    second = attend(k_cache[:, split:].contiguous(), v_cache[:, split:].contiguous(), rest)
    merged_out, merged_lse = merge(first, second)
    torch.cuda.synchronize()
    assert bool(torch.isinf(second[1][2]).all()), "test setup: sequence 2 has no key past the split"
    torch.testing.assert_close(merged_lse, whole[1], rtol=0, atol=1e-3)
    torch.testing.assert_close(merged_out, whole[0].float(), rtol=0, atol=ABS_ERR[q.dtype])
