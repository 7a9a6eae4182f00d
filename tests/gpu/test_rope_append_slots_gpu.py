"""The slot-addressed RoPE + append program of kernels/tl/rope_append.py on a GPU, against a torch
reference (the Ops run it through `rope_append_<mode>_tl`; tests/gpu/test_ops_gpu.py covers that).

Fresh random inputs every run (the seed is printed; replay with TILEPREFILL_SEED).
q_out starts as NaN, so an element the program forgets to write shows up. The
caches start random and are compared whole: bit-exact at the written slots,
byte-for-byte unchanged everywhere else. Slots are shuffled and include -1,
S and other values outside [0, S), which must write nothing. q_out and the
written keys must equal, bit for bit, what the existing RoPE program
(kernels/tl/rope.py) makes of the same inputs; all three outputs are also
checked against a float32 torch reference written here.

The program is called directly through `kernels.compile.build`, for this GPU's
arch and for the SM80 build (its binary carries
sm_90 code of the same PTX, so it runs on a Hopper GPU too).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
import torch

from tileprefill.context import Arch, DType
from tileprefill.kernels.compile import build

if TYPE_CHECKING:
    from tilelang import JITKernel

    from tileprefill.kernels.precompiled import PrecompiledKernel

    #: A program as `build` returns it: compiled here, or loaded from a precompiled directory.
    Program = JITKernel | PrecompiledKernel

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang programs")

DEV = torch.device("cuda")
HERE = Arch.of_device(DEV)
DTYPES = [torch.float16, torch.bfloat16]
MODES = ["neox", "interleaved"]
# The program and this reference both compute in fp32 and round once; they may differ by
# an fp32 rounding step (fused multiply-add), one unit in the last place stored. Allow two.
RTOL = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6}
ATOL = {torch.float16: 2.0**-14, torch.bfloat16: 2.0**-10}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@pytest.fixture(autouse=True)
def fresh_seed() -> Iterator[int]:
    seed = int(os.environ.get("TILEPREFILL_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed {seed} (replay with TILEPREFILL_SEED={seed})")
    random.seed(seed)
    torch.manual_seed(seed)
    yield seed


def dtype_name(dtype: torch.dtype) -> str:
    return DType.of(dtype, argument="q").value


# ----------------------------------------------------------------------------- programs and reference


def rope_append_kernel(
    heads: int, kv_heads: int, head_dim: int, rotary_dim: int, dtype: torch.dtype, mode: str, arch: Arch
) -> Program:
    from tileprefill.kernels.tl.rope_append import rope_append_program

    args = (heads, kv_heads, head_dim, rotary_dim, dtype_name(dtype), mode == "interleaved")
    return build(rope_append_program, args, arch)


def rope_kernel(head_dim: int, rotary_dim: int, dtype: torch.dtype, mode: str, arch: Arch) -> Program:
    """The existing RoPE program (x, positions, cos, sin, out) built for the same arch: the bits
    q_out and the keys must have (one program for both: it reads the head count from x)."""
    from tileprefill.kernels.tl.rope import rope_program

    args = (head_dim, rotary_dim, dtype_name(dtype), mode == "interleaved")
    return build(rope_program, args, arch)


def rope_reference(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: str
) -> torch.Tensor:
    """x (T, H, D) rotated in float32: out1 = x1*cos - x2*sin, out2 = x2*cos + x1*sin; dims >= R as is."""
    half = cos.shape[1]
    pairs = torch.arange(half, device=x.device)
    first, second = (pairs, pairs + half) if mode == "neox" else (2 * pairs, 2 * pairs + 1)
    c = cos[positions.long()][:, None, :]  # (T, 1, R/2)
    s = sin[positions.long()][:, None, :]
    x32 = x.float()
    x1, x2 = x32[:, :, first], x32[:, :, second]
    out = x32.clone()
    out[:, :, first] = x1 * c - x2 * s
    out[:, :, second] = x2 * c + x1 * s
    return out.to(x.dtype)


def rope_tables(max_position: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).float().to(DEV), torch.sin(angles).float().to(DEV)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def random_slots(num_tokens: int, num_slots: int, skipped: int) -> torch.Tensor:
    """Distinct shuffled slots in [0, num_slots), `skipped` tokens (at random) given slots outside it."""
    assert num_tokens - skipped <= num_slots, "test setup: not enough slots"
    chosen = random.sample(range(num_slots), num_tokens - skipped)
    bad = [-1, num_slots, num_slots + 1, -2, INT32_MIN, INT32_MAX, -num_slots]
    values = chosen + [random.choice(bad) for _ in range(skipped)]
    random.shuffle(values)
    return torch.tensor(values, dtype=torch.int32, device=DEV)


def expected_cache(
    cache: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache with rows[t] at slots[t] for each valid slot, bool (S,) of the written slots)."""
    valid = (slots >= 0) & (slots < cache.shape[0])
    out = cache.clone()
    out[slots[valid].long()] = rows[valid]
    written = torch.zeros(cache.shape[0], dtype=torch.bool, device=DEV)
    written[slots[valid].long()] = True
    return out, written


def check_cache(
    name: str, got: torch.Tensor, before: torch.Tensor, want: torch.Tensor, written: torch.Tensor
) -> None:
    assert torch.equal(bits(got[~written]), bits(before[~written])), f"{name}: a slot not written changed"
    assert torch.equal(bits(got[written]), bits(want[written])), f"{name}: written slots differ"


# ------------------------------------------------------------------------------------ RoPE + append


def check_rope_append(
    heads: int,
    kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    dtype: torch.dtype,
    mode: str,
    num_tokens: int,
    *,
    arch: Arch = HERE,
    skipped: int | None = None,
    max_position: int = 4096,
) -> None:
    num_slots = num_tokens + random.randint(0, 50)
    skipped = min(num_tokens, random.randint(0, 3)) if skipped is None else skipped
    cos, sin = rope_tables(max_position, rotary_dim)
    positions = torch.randint(0, max_position, (num_tokens,), dtype=torch.int32, device=DEV)
    positions[-1] = max_position - 1  # the last table row
    slots = random_slots(num_tokens, num_slots, skipped)
    q = torch.randn(num_tokens, heads, head_dim, dtype=dtype, device=DEV)
    k_new = torch.randn(num_tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
    v_new = torch.randn(num_tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
    k_cache = torch.randn(num_slots, kv_heads, head_dim, dtype=dtype, device=DEV)
    v_cache = torch.randn(num_slots, kv_heads, head_dim, dtype=dtype, device=DEV)
    q_out = torch.full_like(q, float("nan"))
    inputs_before = [t.clone() for t in (q, k_new, v_new, positions, slots, cos, sin)]
    k_before, v_before = k_cache.clone(), v_cache.clone()

    kernel = rope_append_kernel(heads, kv_heads, head_dim, rotary_dim, dtype, mode, arch)
    # The program takes 4-D caches (blocks, rows, Hkv, D): slot s is block s of one row here.
    kernel(q, k_new, v_new, positions, slots, cos, sin, k_cache.unsqueeze(1), v_cache.unsqueeze(1), q_out)
    # The existing RoPE program on the same inputs: the bits q_out and the keys must have.
    q_rope = torch.full_like(q, float("nan"))
    k_rope = torch.full_like(k_new, float("nan"))
    rope_kernel(head_dim, rotary_dim, dtype, mode, arch)(q, positions, cos, sin, q_rope)
    rope_kernel(head_dim, rotary_dim, dtype, mode, arch)(k_new, positions, cos, sin, k_rope)
    torch.cuda.synchronize()

    for before, after in zip(inputs_before, (q, k_new, v_new, positions, slots, cos, sin), strict=True):
        assert torch.equal(before, after), "the program changed an input"
    assert not q_out.isnan().any(), "NaN in q_out: an element was not written"
    assert torch.equal(bits(q_out), bits(q_rope)), "q_out differs from the RoPE program's output"
    assert torch.equal(bits(q_out[..., rotary_dim:]), bits(q[..., rotary_dim:])), (
        "dims >= R must pass through"
    )
    torch.testing.assert_close(
        q_out, rope_reference(q, positions, cos, sin, mode), rtol=RTOL[dtype], atol=ATOL[dtype]
    )
    k_want, written = expected_cache(k_before, k_rope, slots)
    check_cache("k_cache", k_cache, k_before, k_want, written)
    k_ref, _ = expected_cache(k_before, rope_reference(k_new, positions, cos, sin, mode), slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=RTOL[dtype], atol=ATOL[dtype])
    v_want, _ = expected_cache(v_before, v_new, slots)
    check_cache("v_cache", v_cache, v_before, v_want, written)
    assert int(written.sum()) == num_tokens - skipped


ROPE_APPEND_SHAPES = [  # heads, kv_heads, head_dim, rotary_dim, dtype
    (8, 8, 64, 64, torch.float16),  # group 1
    (32, 8, 128, 128, torch.bfloat16),  # group 4
    (32, 2, 128, 64, torch.float16),  # group 16, partial rotary
    (16, 1, 256, 256, torch.bfloat16),  # group 16
    (4, 1, 256, 128, torch.float16),  # group 4, partial
    (5, 5, 80, 32, torch.bfloat16),  # rows not a multiple of 16 bytes per half
    (12, 2, 96, 96, torch.float16),
    (8, 1, 64, 32, torch.bfloat16),  # group 8, partial
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rotary_dim", "dtype"), ROPE_APPEND_SHAPES, ids=str
)
def test_rope_append_matches_reference(
    mode: str, heads: int, kv_heads: int, head_dim: int, rotary_dim: int, dtype: torch.dtype
) -> None:
    for num_tokens in (1, 7, random.randint(100, 400)):  # one token, then sizes no block divides
        check_rope_append(heads, kv_heads, head_dim, rotary_dim, dtype, mode, num_tokens)


@pytest.mark.parametrize("mode", MODES)
def test_rope_append_many_tokens(mode: str) -> None:
    check_rope_append(32, 8, 128, 128, torch.bfloat16, mode, 20011, skipped=100, max_position=8192)


@pytest.mark.parametrize("mode", MODES)
def test_rope_append_with_every_slot_skipped_writes_only_q_out(mode: str) -> None:
    check_rope_append(8, 2, 128, 64, torch.float16, mode, 37, skipped=37)


@pytest.mark.parametrize("mode", MODES)
def test_rope_append_sm80_build(mode: str) -> None:
    check_rope_append(32, 8, 128, 64, torch.float16, mode, 333, arch=Arch.SM80)


def test_rope_append_into_a_paged_cache_viewed_as_slots() -> None:
    """Page size 1 and 16: slots from a shuffled block table; the program splits slot s into page
    s // page_size and row s % page_size of the (pages, page_size, Hkv, D) caches."""
    heads, kv_heads, head_dim, dtype = 16, 4, 128, torch.bfloat16
    for page_size in (1, 16):
        num_pages, num_tokens = 64 // page_size + 8, 50
        pages = random.sample(range(num_pages), num_pages)
        slots_list = [pages[p // page_size] * page_size + p % page_size for p in range(num_tokens)]
        slots = torch.tensor(slots_list, dtype=torch.int32, device=DEV)
        k_pages = torch.randn(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=DEV)
        v_pages = torch.randn_like(k_pages)
        k_before, v_before = k_pages.clone(), v_pages.clone()
        cos, sin = rope_tables(256, head_dim)
        positions = torch.arange(num_tokens, dtype=torch.int32, device=DEV)
        q = torch.randn(num_tokens, heads, head_dim, dtype=dtype, device=DEV)
        k_new = torch.randn(num_tokens, kv_heads, head_dim, dtype=dtype, device=DEV)
        v_new = torch.randn_like(k_new)
        q_out = torch.full_like(q, float("nan"))
        kernel = rope_append_kernel(heads, kv_heads, head_dim, head_dim, dtype, "neox", HERE)
        kernel(q, k_new, v_new, positions, slots, cos, sin, k_pages, v_pages, q_out)
        torch.cuda.synchronize()
        k_ref = rope_reference(k_new, positions, cos, sin, "neox")
        for p in range(num_tokens):
            page, row = pages[p // page_size], p % page_size
            torch.testing.assert_close(k_pages[page, row], k_ref[p], rtol=RTOL[dtype], atol=ATOL[dtype])
            assert torch.equal(bits(v_pages[page, row]), bits(v_new[p]))
        k_before.view(-1, kv_heads, head_dim)[slots.long()] = k_pages.view(-1, kv_heads, head_dim)[
            slots.long()
        ]
        v_before.view(-1, kv_heads, head_dim)[slots.long()] = v_new
        assert torch.equal(bits(k_pages), bits(k_before)), "a slot outside the new tokens' changed"
        assert torch.equal(bits(v_pages), bits(v_before)), "a slot outside the new tokens' changed"


# --------------------------------------------------------------------------------------- warm-up


def warm_up() -> None:
    """Build every program this module runs (the `compiled_programs` fixture runs this under
    `recording_builds`, then compiles them side by side)."""
    rope_configs: set[tuple[int, int, int, int, torch.dtype, str, Arch]] = set()
    for heads, kv_heads, head_dim, rotary_dim, dtype in ROPE_APPEND_SHAPES:
        for mode in MODES:
            rope_configs.add((heads, kv_heads, head_dim, rotary_dim, dtype, mode, HERE))
    for mode in MODES:
        rope_configs.add((32, 8, 128, 128, torch.bfloat16, mode, HERE))
        rope_configs.add((8, 2, 128, 64, torch.float16, mode, HERE))
        rope_configs.add((32, 8, 128, 64, torch.float16, mode, Arch.SM80))
    rope_configs.add((16, 4, 128, 128, torch.bfloat16, "neox", HERE))
    for heads, kv_heads, head_dim, rotary_dim, dtype, mode, arch in sorted(rope_configs, key=str):
        rope_append_kernel(heads, kv_heads, head_dim, rotary_dim, dtype, mode, arch)
        rope_kernel(head_dim, rotary_dim, dtype, mode, arch)
