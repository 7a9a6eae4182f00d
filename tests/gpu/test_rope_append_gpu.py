"""The TileLang RoPE and append kernels on a GPU, against the reference kernels.

Fresh random inputs every run (the seed is printed, so a failure can be
replayed with TILEPREFILL_SEED). RoPE outputs come from a NaN-poisoned
allocator, so an element the kernel forgets to write shows up. Append caches
are filled with random data first and compared whole with the reference's:
bit-exact, and exactly the expected slots differ from the cache before the call.
Every RoPE call is also made through the launch `bind(facts)` returns (a NaN-filled
output the test allocates), bit for bit the allocating call's. Also: the SM80
build on this GPU, misaligned and strided inputs, opcheck of the mutating custom
ops (`tileprefill::rope_<mode>_tl`, `append_<layout>_tl`, `rope_append_<mode>_tl`:
tensors, then the static facts as scalars), CUDA-graph replay with new data, and
torch.compile(fullgraph=True) seeing the cache mutation. The fused RoPE + append
program is tested over its matrix in test_rope_append_slots_gpu.py; here only its
custom op is checked.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterator, Sequence

import attrs
import pytest
import torch

from tileprefill.context import Arch, DType, arch_of
from tileprefill.kernels import append_tl, launch, rope_append_tl, rope_tl
from tileprefill.kernels.base import (
    ContiguousAppendKernel,
    PagedAppendKernel,
    RopeAppendKernel,
    RopeKernel,
    StaticFacts,
)
from tileprefill.kernels.launch import Launcher
from tileprefill.kernels.registry import ALL_KERNELS
from tileprefill.keys import AppendKey, KernelKey, RopeAppendKey, RopeKey

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

DEV = torch.device("cuda")
DTYPES = [torch.float16, torch.bfloat16]
# Kernel and reference both compute in fp32 and round once; they may differ by an
# fp32 rounding step (fused multiply-add), i.e. by one unit in the last place of
# the stored value. Allow two.
RTOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
ATOL = {torch.float16: 2.0**-14, torch.bfloat16: 2.0**-10}


@pytest.fixture(autouse=True)
def fresh_seed() -> Iterator[int]:
    seed = int(os.environ.get("TILEPREFILL_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed {seed} (replay with TILEPREFILL_SEED={seed})")
    random.seed(seed)
    torch.manual_seed(seed)
    yield seed


def rope_kernels(mode: str) -> tuple[RopeKernel, RopeKernel]:
    """(TileLang, reference) kernels of a mode, as registered."""
    tl_key, ref_key = (
        (RopeKey.NEOX_TL, RopeKey.NEOX_REF)
        if mode == "neox"
        else (RopeKey.INTERLEAVED_TL, RopeKey.INTERLEAVED_REF)
    )
    tl, ref = ALL_KERNELS[tl_key](), ALL_KERNELS[ref_key]()
    assert isinstance(tl, RopeKernel) and isinstance(ref, RopeKernel)
    return tl, ref


def contiguous_kernels() -> tuple[ContiguousAppendKernel, ContiguousAppendKernel]:
    tl, ref = ALL_KERNELS[AppendKey.CONTIGUOUS_TL](), ALL_KERNELS[AppendKey.CONTIGUOUS_REF]()
    assert isinstance(tl, ContiguousAppendKernel) and isinstance(ref, ContiguousAppendKernel)
    return tl, ref


def paged_kernels() -> tuple[PagedAppendKernel, PagedAppendKernel]:
    tl, ref = ALL_KERNELS[AppendKey.PAGED_TL](), ALL_KERNELS[AppendKey.PAGED_REF]()
    assert isinstance(tl, PagedAppendKernel) and isinstance(ref, PagedAppendKernel)
    return tl, ref


def rope_facts(x: torch.Tensor, rotary_dim: int, arch: Arch | None = None) -> StaticFacts:
    """The static facts `RopeKernel.__call__` builds for x (T, H, D) on this device."""
    _, heads, head_dim = x.shape
    return StaticFacts(
        arch=arch_of(x.device) if arch is None else arch,
        dtype=DType.of(x.dtype, argument="x"),
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
    )


def append_facts(new: torch.Tensor, page_size: int = 0, arch: Arch | None = None) -> StaticFacts:
    """The static facts the append kernels build for new keys (..., Hkv, D) on this device."""
    kv_heads, head_dim = new.shape[-2], new.shape[-1]
    return StaticFacts(
        arch=arch_of(new.device) if arch is None else arch,
        dtype=DType.of(new.dtype, argument="k_new"),
        heads=kv_heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        page_size=page_size,
    )


def poison_allocator(nbytes: int) -> None:
    """Leave NaN in the allocator's free blocks so the next output of this size starts as NaN."""
    for size in (nbytes, 64 << 20):
        blob = torch.full((max(1, size // 2),), float("nan"), dtype=torch.float16, device=DEV)
        del blob


def cumulative(lens: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=DEV)


def rope_tables(max_position: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).float().to(DEV), torch.sin(angles).float().to(DEV)


def positions_after_cache(q_lens: Sequence[int], cache_lens: Sequence[int]) -> torch.Tensor:
    """Token i of sequence b sits at cache_lens[b] + i."""
    parts = [torch.arange(c, c + n, dtype=torch.int32) for n, c in zip(q_lens, cache_lens, strict=True)]
    return torch.cat(parts).to(DEV)


@pytest.fixture
def as_sm80(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the SM80 build (its cubin carries sm_90 code of the same PTX) on this GPU: the kernel
    modules read the device's arch through `arch_of`, imported by name."""
    if arch_of(DEV) is Arch.SM80:
        return
    monkeypatch.setattr(rope_tl, "arch_of", lambda device: Arch.SM80)
    monkeypatch.setattr(append_tl, "arch_of", lambda device: Arch.SM80)


# ------------------------------------------------------------------------------------------------ RoPE


def check_rope(
    mode: str,
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    arch: Arch | None = None,
) -> None:
    """`arch`: the one the kernel builds for (this device's unless `as_sm80` patched it)."""
    tl, ref = rope_kernels(mode)
    x_before = x.clone()
    expected = ref(x, positions, cos, sin)
    poison_allocator(x.numel() * x.element_size())
    out = tl(x, positions, cos, sin)
    # The launch a plan holds, for the facts the call built (arch included: `as_sm80` patches it).
    bound = torch.full(x.shape, float("nan"), dtype=x.dtype, device=DEV)
    tl.bind(rope_facts(x, 2 * cos.shape[1], arch))(x, positions, cos, sin, bound)
    torch.cuda.synchronize()
    assert torch.equal(x, x_before), "the kernel changed its input"
    assert torch.equal(bound.view(torch.int16), out.view(torch.int16)), "bound launch != allocating call"
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert not out.isnan().any(), "NaN in the output: an element was not written"
    rotary_dim = 2 * cos.shape[1]
    assert torch.equal(out[..., rotary_dim:], x[..., rotary_dim:]), "dims >= rotary_dim must pass through"
    torch.testing.assert_close(out, expected, rtol=RTOL[x.dtype], atol=ATOL[x.dtype])
    scale = expected.float().abs().max().clamp_min(1e-6)
    print(f"max relative error {((out.float() - expected.float()).abs().max() / scale).item():.2e}")


ROPE_SHAPES = [  # heads, head_dim, rotary_dim
    (32, 128, 128),
    (8, 128, 64),
    (1, 64, 64),
    (4, 64, 32),
    (16, 256, 256),
    (2, 256, 128),
    (5, 80, 32),  # rows not a multiple of 16 bytes per half
    (3, 96, 96),
    (7, 128, 16),
]


@pytest.mark.parametrize("mode", ["neox", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "head_dim", "rotary_dim"), ROPE_SHAPES)
def test_rope_matches_reference(
    mode: str, dtype: torch.dtype, heads: int, head_dim: int, rotary_dim: int
) -> None:
    q_lens = [0, 1, 37, random.randint(100, 300), 0, random.randint(1, 9)]
    cache_lens = [random.randint(0, 3000) for _ in q_lens]
    cos, sin = rope_tables(4096, rotary_dim)
    positions = positions_after_cache(q_lens, cache_lens)
    x = torch.randn(len(positions), heads, head_dim, dtype=dtype, device=DEV)
    check_rope(mode, x, positions, cos, sin)


@pytest.mark.parametrize("mode", ["neox", "interleaved"])
def test_rope_many_tokens_and_the_last_table_row(mode: str) -> None:
    cos, sin = rope_tables(8192, 128)
    positions = torch.randint(0, 8192, (20011,), dtype=torch.int32, device=DEV)
    positions[-1] = 8191
    x = torch.randn(len(positions), 8, 128, dtype=torch.bfloat16, device=DEV)
    check_rope(mode, x, positions, cos, sin)


@pytest.mark.parametrize("mode", ["neox", "interleaved"])
def test_rope_single_token(mode: str) -> None:
    cos, sin = rope_tables(64, 64)
    positions = torch.tensor([63], dtype=torch.int32, device=DEV)
    check_rope(mode, torch.randn(1, 4, 64, dtype=torch.float16, device=DEV), positions, cos, sin)


def test_rope_of_no_tokens_is_empty() -> None:
    tl, _ = rope_kernels("neox")
    cos, sin = rope_tables(16, 64)
    x = torch.randn(0, 4, 64, dtype=torch.float16, device=DEV)
    out = tl(x, torch.zeros(0, dtype=torch.int32, device=DEV), cos, sin)
    assert out.shape == (0, 4, 64)


@pytest.mark.parametrize("mode", ["neox", "interleaved"])
def test_rope_of_strided_and_misaligned_inputs(mode: str) -> None:
    """x as a slice of a fused qkv tensor, and x / cos starting 2 and 4 bytes past an aligned address."""
    tokens, heads, head_dim = 77, 4, 128
    cos, sin = rope_tables(512, 128)
    positions = torch.randint(0, 512, (tokens,), dtype=torch.int32, device=DEV)
    qkv = torch.randn(tokens, 3 * heads, head_dim, dtype=torch.float16, device=DEV)
    check_rope(mode, qkv[:, heads : 2 * heads], positions, cos, sin)
    flat = torch.randn(tokens * heads * head_dim + 1, dtype=torch.float16, device=DEV)
    shifted = flat[1:].view(tokens, heads, head_dim)
    cos_flat = torch.empty(cos.numel() + 1, device=DEV)
    cos_flat[1:] = cos.flatten()
    check_rope(mode, shifted, positions, cos_flat[1:].view_as(cos), sin)


@pytest.mark.parametrize("mode", ["neox", "interleaved"])
@pytest.mark.usefixtures("as_sm80")
def test_rope_sm80_build(mode: str) -> None:
    cos, sin = rope_tables(2048, 64)
    positions = torch.randint(0, 2048, (333,), dtype=torch.int32, device=DEV)
    x = torch.randn(333, 8, 128, dtype=torch.bfloat16, device=DEV)
    check_rope(mode, x, positions, cos, sin, Arch.SM80)


def written_by(key: KernelKey) -> set[str]:
    """The tensors the schema of `key`'s custom op marks as written."""
    schema = getattr(torch.ops.tileprefill, key.value).default._schema
    return {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}


@pytest.mark.parametrize("key", [RopeKey.NEOX_TL, RopeKey.INTERLEAVED_TL], ids=lambda k: k.value)
def test_rope_opcheck(key: RopeKey) -> None:
    """x, positions, cos, sin, then the output it writes in place, then the static facts."""
    assert written_by(key) == {"out"}
    cos, sin = rope_tables(128, 64)
    x = torch.randn(19, 4, 64, dtype=torch.float16, device=DEV)
    positions = torch.randint(0, 128, (19,), dtype=torch.int32, device=DEV)
    out = torch.full_like(x, float("nan"))
    args = (x, positions, cos, sin, out, *launch.scalars(rope_facts(x, 64)))
    torch.library.opcheck(launch.OPS[key], args)
    launch.OPS[key](*args)
    tl = ALL_KERNELS[key]()
    assert isinstance(tl, RopeKernel)
    want = tl(x, positions, cos, sin)
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), "the op and the kernel differ"


# ------------------------------------------------------------------------------- contiguous append


@attrs.frozen
class ContiguousCase:
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cache_seqlens: torch.Tensor

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return (self.k_new, self.v_new, self.k_cache, self.v_cache, self.cache_seqlens)

    def written(self) -> torch.Tensor:
        """bool (B, S_max): the cache rows this append must write."""
        max_len = self.k_cache.shape[1]
        rows = torch.arange(max_len, device=DEV)[None, :]
        start = self.cache_seqlens.long()[:, None]
        return (rows >= start) & (rows < start + self.k_new.shape[1])


def contiguous_case(
    batch: int, new_len: int, max_len: int, heads: int, head_dim: int, dtype: torch.dtype
) -> ContiguousCase:
    starts = [random.randint(0, max_len - new_len) for _ in range(batch)]
    starts[0] = max_len - new_len  # fills the cache to the last row
    starts[-1] = 0
    return ContiguousCase(
        k_new=torch.randn(batch, new_len, heads, head_dim, dtype=dtype, device=DEV),
        v_new=torch.randn(batch, new_len, heads, head_dim, dtype=dtype, device=DEV),
        k_cache=torch.randn(batch, max_len, heads, head_dim, dtype=dtype, device=DEV),
        v_cache=torch.randn(batch, max_len, heads, head_dim, dtype=dtype, device=DEV),
        cache_seqlens=torch.tensor(starts, dtype=torch.int32, device=DEV),
    )


def check_contiguous(case: ContiguousCase) -> None:
    tl, ref = contiguous_kernels()
    before = (case.k_cache.clone(), case.v_cache.clone())
    expected = (case.k_cache.clone(), case.v_cache.clone())
    ref(case.k_new, case.v_new, *expected, case.cache_seqlens)
    tl(*case.args)
    torch.cuda.synchronize()
    written = case.written()
    for name, got, want, old, new in (
        ("k_cache", case.k_cache, expected[0], before[0], case.k_new),
        ("v_cache", case.v_cache, expected[1], before[1], case.v_new),
    ):
        assert torch.equal(got[~written], old[~written]), f"{name}: a row outside the new ones changed"
        assert torch.equal(got[written], new.flatten(0, 1)), f"{name}: new rows not written as given"
        assert torch.equal(got, want), f"{name}: differs from the reference"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "head_dim"), [(8, 128), (1, 64), (2, 256), (3, 36)])
def test_append_contiguous_matches_reference(dtype: torch.dtype, heads: int, head_dim: int) -> None:
    check_contiguous(contiguous_case(5, 37, 160, heads, head_dim, dtype))
    check_contiguous(contiguous_case(1, 1, 9, heads, head_dim, dtype))


def test_append_contiguous_many_rows() -> None:
    check_contiguous(contiguous_case(3, 3001, 4099, 8, 128, torch.bfloat16))


def test_append_contiguous_of_no_rows_writes_nothing() -> None:
    check_contiguous(contiguous_case(4, 0, 16, 8, 128, torch.float16))


@pytest.mark.usefixtures("as_sm80")
def test_append_contiguous_sm80_build() -> None:
    check_contiguous(contiguous_case(4, 29, 100, 8, 128, torch.float16))


def test_append_contiguous_opcheck() -> None:
    """The two caches are the tensors written; the op writes what the kernel writes."""
    assert written_by(AppendKey.CONTIGUOUS_TL) == {"k_cache", "v_cache"}
    case = contiguous_case(3, 5, 12, 2, 64, torch.float16)
    op = launch.OPS[AppendKey.CONTIGUOUS_TL]
    torch.library.opcheck(op, (*case.args, *launch.scalars(append_facts(case.k_new))))
    _, ref = contiguous_kernels()
    expected = (case.k_cache.clone(), case.v_cache.clone())
    ref(case.k_new, case.v_new, *expected, case.cache_seqlens)
    op(*case.args, *launch.scalars(append_facts(case.k_new)))
    torch.cuda.synchronize()
    assert torch.equal(case.k_cache, expected[0]) and torch.equal(case.v_cache, expected[1])


# ------------------------------------------------------------------------------------ paged append


@attrs.frozen
class PagedCase:
    k_new: torch.Tensor
    v_new: torch.Tensor
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    cu_seqlens_q: torch.Tensor

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return (
            self.k_new,
            self.v_new,
            self.k_pages,
            self.v_pages,
            self.block_table,
            self.cache_seqlens,
            self.cu_seqlens_q,
        )

    def written(self) -> torch.Tensor:
        """bool (num_pages, page_size): the slots this append must write, from a plain host loop."""
        num_pages, page_size = self.k_pages.shape[:2]
        mask = torch.zeros(num_pages, page_size, dtype=torch.bool)
        table, cu = self.block_table.tolist(), self.cu_seqlens_q.tolist()
        for b, start in enumerate(self.cache_seqlens.tolist()):
            for p in range(start, start + cu[b + 1] - cu[b]):
                assert not mask[table[b][p // page_size], p % page_size], "test setup: a slot written twice"
                mask[table[b][p // page_size], p % page_size] = True
        return mask.to(DEV)


def paged_case(
    q_lens: Sequence[int],
    cache_lens: Sequence[int],
    page_size: int,
    heads: int,
    head_dim: int,
    dtype: torch.dtype,
    spare_pages: int = 3,
) -> PagedCase:
    """Pages of every sequence drawn from a shuffled pool; table entries past a sequence's need name
    spare pages (valid pages that must stay untouched)."""
    need = [math.ceil((c + n) / page_size) for n, c in zip(q_lens, cache_lens, strict=True)]
    num_pages = sum(need) + spare_pages
    pool = random.sample(range(num_pages), num_pages)
    fill = pool[sum(need) :] or pool  # with no spare pages, other sequences' pages
    max_pages = max(need, default=0) + 2
    table = [[random.choice(fill) for _ in range(max_pages)] for _ in q_lens]
    cursor = 0
    for b, n in enumerate(need):
        table[b][:n] = pool[cursor : cursor + n]
        cursor += n
    tokens = sum(q_lens)
    return PagedCase(
        k_new=torch.randn(tokens, heads, head_dim, dtype=dtype, device=DEV),
        v_new=torch.randn(tokens, heads, head_dim, dtype=dtype, device=DEV),
        k_pages=torch.randn(num_pages, page_size, heads, head_dim, dtype=dtype, device=DEV),
        v_pages=torch.randn(num_pages, page_size, heads, head_dim, dtype=dtype, device=DEV),
        block_table=torch.tensor(table, dtype=torch.int32, device=DEV).reshape(len(q_lens), max_pages),
        cache_seqlens=torch.tensor(cache_lens, dtype=torch.int32, device=DEV),
        cu_seqlens_q=cumulative(q_lens),
    )


def check_paged(case: PagedCase) -> None:
    tl, ref = paged_kernels()
    before = (case.k_pages.clone(), case.v_pages.clone())
    expected = (case.k_pages.clone(), case.v_pages.clone())
    ref(case.k_new, case.v_new, *expected, case.block_table, case.cache_seqlens, case.cu_seqlens_q)
    tl(*case.args)
    torch.cuda.synchronize()
    written = case.written()
    assert int(written.sum()) == case.k_new.shape[0]
    for name, got, want, old in (
        ("k_pages", case.k_pages, expected[0], before[0]),
        ("v_pages", case.v_pages, expected[1], before[1]),
    ):
        assert torch.equal(got[~written], old[~written]), f"{name}: a slot outside the new ones changed"
        assert torch.equal(got, want), f"{name}: differs from the reference"


def mixed_lengths(page_size: int) -> tuple[list[int], list[int]]:
    """Zero-length sequences (first, middle, last), lengths off every boundary, caches ending mid-page."""
    q_lens = [0, 1, 37, random.randint(1, 300), 0, page_size, 2 * page_size + 1, random.randint(1, 9), 0]
    cache_lens = [random.randint(0, 5 * page_size + 3) for _ in q_lens]
    cache_lens[1] = 0
    cache_lens[2] = page_size - 1 if page_size > 1 else 3  # the first new key ends a page
    return q_lens, cache_lens


PAGED_CONFIGS = [  # dtype, heads, head_dim, page_size
    (torch.float16, 8, 128, 1),
    (torch.float16, 8, 128, 16),
    (torch.float16, 8, 128, 64),
    (torch.float16, 8, 128, 5),
    (torch.bfloat16, 8, 128, 16),
    (torch.bfloat16, 8, 128, 5),
    (torch.float16, 2, 64, 16),
    (torch.bfloat16, 1, 256, 64),
    (torch.float16, 4, 256, 3),
    (torch.bfloat16, 3, 36, 7),
]


@pytest.mark.parametrize(
    ("dtype", "heads", "head_dim", "page_size"), PAGED_CONFIGS, ids=lambda v: str(v).replace("torch.", "")
)
def test_append_paged_matches_reference(
    dtype: torch.dtype, heads: int, head_dim: int, page_size: int
) -> None:
    q_lens, cache_lens = mixed_lengths(page_size)
    check_paged(paged_case(q_lens, cache_lens, page_size, heads, head_dim, dtype))


def test_append_paged_many_sequences_and_tokens() -> None:
    q_lens = [random.choice([0, 1, random.randint(1, 400)]) for _ in range(97)]
    cache_lens = [random.randint(0, 2000) for _ in q_lens]
    check_paged(paged_case(q_lens, cache_lens, 16, 8, 128, torch.bfloat16))


def test_append_paged_single_sequence_single_token() -> None:
    check_paged(paged_case([1], [0], 16, 8, 128, torch.float16))
    check_paged(paged_case([1], [31], 16, 8, 128, torch.float16))


def test_append_paged_of_only_empty_sequences_writes_nothing() -> None:
    check_paged(paged_case([0, 0, 0], [5, 0, 17], 16, 8, 128, torch.float16))


@pytest.mark.usefixtures("as_sm80")
def test_append_paged_sm80_build() -> None:
    q_lens, cache_lens = mixed_lengths(16)
    check_paged(paged_case(q_lens, cache_lens, 16, 8, 128, torch.float16))


def test_append_paged_rejects_caches_of_different_strides_untouched() -> None:
    """A strided K view beside a contiguous V: the program indexes both with one set of strides."""
    tl, _ = paged_kernels()
    case = paged_case([3, 4], [1, 2], 16, 2, 64, torch.float16)
    kv = torch.randn(case.k_pages.shape[0], 2, *case.k_pages.shape[1:], dtype=torch.float16, device=DEV)
    k_strided = kv[:, 0]
    before = kv.clone()
    with pytest.raises(ValueError, match="v_pages: expected the strides of k_pages"):
        tl(
            case.k_new,
            case.v_new,
            k_strided,
            case.v_pages,
            case.block_table,
            case.cache_seqlens,
            case.cu_seqlens_q,
        )
    assert torch.equal(kv, before)


def test_append_paged_opcheck() -> None:
    """The two page pools are the tensors written; the op writes what the reference writes."""
    assert written_by(AppendKey.PAGED_TL) == {"k_pages", "v_pages"}
    case = paged_case([2, 0, 5], [3, 1, 0], 4, 2, 64, torch.float16)
    op = launch.OPS[AppendKey.PAGED_TL]
    facts = append_facts(case.k_new, page_size=4)
    torch.library.opcheck(op, (*case.args, *launch.scalars(facts)))
    _, ref = paged_kernels()
    expected = (case.k_pages.clone(), case.v_pages.clone())
    ref(case.k_new, case.v_new, *expected, case.block_table, case.cache_seqlens, case.cu_seqlens_q)
    op(*case.args, *launch.scalars(facts))
    torch.cuda.synchronize()
    assert torch.equal(case.k_pages, expected[0]) and torch.equal(case.v_pages, expected[1])


ROPE_APPEND_OPCHECK = StaticFacts(  # group 4, partial rotary
    arch=Arch.CPU, dtype=DType.BF16, heads=8, kv_heads=2, head_dim=128, rotary_dim=64
)


@pytest.mark.parametrize("key", list(RopeAppendKey), ids=lambda k: k.value)
def test_rope_append_opcheck(key: RopeAppendKey) -> None:
    """q, k_new, v_new, positions, slots, cos, sin, the caches as pages and q_out: the caches and q_out
    are written. Slots are distinct rows of the caches, one token with slot -1 writes no row."""
    assert written_by(key) == {"k_cache", "v_cache", "q_out"}
    f = ROPE_APPEND_OPCHECK._replace(arch=arch_of(DEV))
    tokens, num_rows, dt = 23, 64, f.dtype.torch_dtype
    cos, sin = rope_tables(256, f.rotary_dim)
    slots = torch.randperm(num_rows, device=DEV)[:tokens].to(torch.int32)
    slots[5] = -1
    args = (
        torch.randn(tokens, f.heads, f.head_dim, dtype=dt, device=DEV),
        torch.randn(tokens, f.kv_heads, f.head_dim, dtype=dt, device=DEV),
        torch.randn(tokens, f.kv_heads, f.head_dim, dtype=dt, device=DEV),
        torch.randint(0, 256, (tokens,), dtype=torch.int32, device=DEV),
        slots,
        cos,
        sin,
        torch.randn(num_rows, 1, f.kv_heads, f.head_dim, dtype=dt, device=DEV),  # pages of one row
        torch.randn(num_rows, 1, f.kv_heads, f.head_dim, dtype=dt, device=DEV),
        torch.full((tokens, f.heads, f.head_dim), float("nan"), dtype=dt, device=DEV),
    )
    torch.library.opcheck(launch.OPS[key], (*args, *launch.scalars(f)))
    # The direct launch a plan holds writes what the custom op writes, bit for bit.
    direct = [t.clone() for t in args]
    kernel = ALL_KERNELS[key]()
    assert isinstance(kernel, RopeAppendKernel)
    kernel.bind(f)(*direct)
    launch.OPS[key](*args, *launch.scalars(f))
    torch.cuda.synchronize()
    for name, got, want in zip(("k_cache", "v_cache", "q_out"), args[7:], direct[7:], strict=True):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{name}: op != launch"
    assert not args[9].isnan().any(), "q_out: a row was not written"


# ------------------------------------------------------------------------- CUDA graphs, torch.compile


def refill(static: PagedCase, fresh: PagedCase) -> None:
    for dst, src in zip(static.args, fresh.args, strict=True):
        dst.copy_(src)


def split_tokens(tokens: int, batch: int) -> list[int]:
    """A random split of `tokens` into `batch` lengths, some of them zero."""
    cuts = sorted(random.randint(0, tokens) for _ in range(batch - 1))
    return [b - a for a, b in zip([0, *cuts], [*cuts, tokens], strict=True)]


def test_append_paged_cuda_graph_replays_with_new_data() -> None:
    """Capture once; each replay reads the new tokens, lengths and table copied into the captured buffers."""
    tl, ref = paged_kernels()
    tokens, batch, page_size = 300, 6, 16

    def scenario() -> PagedCase:
        q_lens = split_tokens(tokens, batch)
        cache_lens = [random.randint(0, 100) for _ in q_lens]
        case = paged_case(q_lens, cache_lens, page_size, 4, 128, torch.float16, spare_pages=0)
        # Same shapes every round: pad the pool and the table to fixed sizes.
        pages = torch.randn(96, page_size, 4, 128, dtype=torch.float16, device=DEV)
        pages[: case.k_pages.shape[0]] = case.k_pages
        v_pages = torch.randn_like(pages)
        v_pages[: case.v_pages.shape[0]] = case.v_pages
        table = torch.randint(0, 96, (batch, 32), dtype=torch.int32, device=DEV)
        table[:, : case.block_table.shape[1]] = case.block_table
        return attrs.evolve(case, k_pages=pages, v_pages=v_pages, block_table=table)

    static = scenario()
    tl(*static.args)  # compile and load the module outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tl(*static.args)
    for _ in range(3):
        fresh = scenario()
        refill(static, fresh)
        expected = (static.k_pages.clone(), static.v_pages.clone())
        ref(
            static.k_new,
            static.v_new,
            *expected,
            static.block_table,
            static.cache_seqlens,
            static.cu_seqlens_q,
        )
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(static.k_pages, expected[0])
        assert torch.equal(static.v_pages, expected[1])


def test_torch_compile_fullgraph_sees_the_paged_mutation() -> None:
    tl, ref = paged_kernels()

    def append_then_read(
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tl(k_new, v_new, k_pages, v_pages, block_table, cache_seqlens, cu_seqlens_q)
        # Read after the write: doubled keys, and the values of each sequence's first page.
        return k_pages * 2, v_pages[block_table[:, 0].long()]

    compiled = torch.compile(append_then_read, fullgraph=True)
    for _ in range(2):  # new data, same shapes: the second call must not reuse the first's values
        case = paged_case([3, 0, 17, 40], [5, 0, 16, 1], 16, 8, 128, torch.bfloat16, spare_pages=2)
        expected = (case.k_pages.clone(), case.v_pages.clone())
        ref(case.k_new, case.v_new, *expected, case.block_table, case.cache_seqlens, case.cu_seqlens_q)
        doubled, first_pages = compiled(*case.args)
        torch.cuda.synchronize()
        assert torch.equal(case.k_pages, expected[0]) and torch.equal(case.v_pages, expected[1])
        assert torch.equal(doubled, expected[0] * 2)
        assert torch.equal(first_pages, expected[1][case.block_table[:, 0].long()])


def test_torch_compile_fullgraph_sees_the_contiguous_mutation() -> None:
    tl, ref = contiguous_kernels()

    def append_then_read(
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        lens: torch.Tensor,
    ) -> torch.Tensor:
        tl(k_new, v_new, k_cache, v_cache, lens)
        return torch.cat([k_cache, v_cache], dim=-1) * 2

    compiled = torch.compile(append_then_read, fullgraph=True)
    for _ in range(2):
        case = contiguous_case(3, 11, 40, 4, 64, torch.float16)
        expected = (case.k_cache.clone(), case.v_cache.clone())
        ref(case.k_new, case.v_new, *expected, case.cache_seqlens)
        out = compiled(*case.args)
        torch.cuda.synchronize()
        assert torch.equal(case.k_cache, expected[0]) and torch.equal(case.v_cache, expected[1])
        assert torch.equal(out, torch.cat(expected, dim=-1) * 2)


# --------------------------------------------------------------------------------------- warm-up


def warm_up() -> None:
    """Build the program of every static configuration this module runs (the `compiled_programs`
    fixture runs this under `recording_builds`, then compiles them side by side)."""
    here = arch_of(DEV)
    rope_configs = [  # heads, head_dim, rotary_dim, dtype, arch
        *((h, d, r, dtype, here) for h, d, r in ROPE_SHAPES for dtype in DTYPES),
        (8, 128, 128, torch.bfloat16, here),  # many tokens
        (4, 64, 64, torch.float16, here),  # single token, opcheck
        (4, 128, 128, torch.float16, here),  # strided and misaligned
        (8, 128, 64, torch.bfloat16, Arch.SM80),
    ]
    for heads, head_dim, rotary_dim, dtype, arch in rope_configs:
        x = torch.empty(0, heads, head_dim, dtype=dtype)
        for rope_key in rope_tl.RECORDS:
            Launcher(rope_tl.RECORDS[rope_key], rope_facts(x, rotary_dim, arch))
    contiguous_configs = [  # heads, head_dim, dtype, arch
        *((h, d, dtype, here) for h, d in [(8, 128), (1, 64), (2, 256), (3, 36)] for dtype in DTYPES),
        (2, 64, torch.float16, here),  # opcheck
        (4, 64, torch.float16, here),  # torch.compile
        (8, 128, torch.float16, Arch.SM80),
    ]
    for heads, head_dim, dtype, arch in contiguous_configs:
        new = torch.empty(0, heads, head_dim, dtype=dtype)
        Launcher(append_tl.RECORDS[AppendKey.CONTIGUOUS_TL], append_facts(new, 0, arch))
    paged_configs = [  # heads, head_dim, page_size, dtype, arch
        *((h, d, p, dtype, here) for dtype, h, d, p in PAGED_CONFIGS),
        (2, 64, 4, torch.float16, here),  # opcheck
        (4, 128, 16, torch.float16, here),  # CUDA graph
        (8, 128, 16, torch.float16, Arch.SM80),
    ]
    for heads, head_dim, page_size, dtype, arch in paged_configs:
        new = torch.empty(0, heads, head_dim, dtype=dtype)
        Launcher(append_tl.RECORDS[AppendKey.PAGED_TL], append_facts(new, page_size, arch))
    for rope_append_key in rope_append_tl.RECORDS:  # opcheck
        Launcher(rope_append_tl.RECORDS[rope_append_key], ROPE_APPEND_OPCHECK._replace(arch=here))
