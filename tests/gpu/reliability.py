"""What the reliability checks share: one pool of static configurations, random calls of every public
Op built from it, and the comparison of a GPU call with the reference Op on CPU.

Used by `fuzz.py` (seeded, time-boxed fuzzing), `sanitize_workload.py` (the workload that runs under
compute-sanitizer), `test_determinism_gpu.py` and `test_nan_policy_gpu.py`. Not a test module.

Why a fixed pool: every distinct set of static facts (heads, kv heads, head dim, dtype, causal, page
size, and for RoPE the mode and rotary dim) is a TileLang compile of its own, about a minute of nvcc
for an SM90 attention program. So the static facts come from `POOL`, compiled side by side up front
(`warm_up_requests` + `prebuild`), and everything dynamic (batch, lengths, page tables, shared pages,
values) is drawn freely per call. The attention facts are those of `test_attention_gpu.py`'s
configurations, so in the whole GPU suite these checks compile no attention program of their own.

A call (`Call`) is built on the CPU from a `random.Random`: the same seed gives the same call. Memory a
call does not own is poisoned with NaN (cache rows past a sequence's keys, pages no sequence reads),
so a kernel that reads it shows up as NaN in the output.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import attrs
import torch

from tileprefill.context import KVLayout, RopeMode
from tileprefill.kernels.compile import BuildRequest
from tileprefill.ops import PUBLIC_OPS, OpClass

F16, BF16 = torch.float16, torch.bfloat16
CPU = torch.device("cpu")

#: |out - ref| <= ATOL + RTOL * |ref| per element, against the reference Op (fp32 math, one rounding).
#: The kernels round probabilities to the input dtype before P @ V, as FlashAttention does.
ATOL = {F16: 1e-2, BF16: 5e-2}
RTOL = {F16: 1e-2, BF16: 2e-2}
#: Rotated keys written to a cache: the RoPE kernels and the reference differ by at most an
#: ulp or two (fp32 math, one rounding to the dtype; contraction may differ).
ROPE_ATOL = {F16: 2e-3, BF16: 1.6e-2}
ROPE_RTOL = {F16: 2e-3, BF16: 1.6e-2}


@attrs.frozen
class Config:
    """One set of static facts: every call built from it shares its compiled programs."""

    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    page_size: int = 0  # paged Ops only
    rope: RopeMode = RopeMode.NEOX  # RoPE Ops only
    rotary_dim: int = 0  # RoPE Ops only (0: head_dim)

    @property
    def rotary(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def name(self) -> str:
        page = f"-page{self.page_size}" if self.page_size else ""
        mode = "causal" if self.causal else "full"
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"d{self.head_dim}-{dtype}-{mode}-h{self.heads}/{self.kv_heads}{page}"
            f"-{self.rope.value}{self.rotary}"
        )

    @property
    def key_tile(self) -> int:
        """Keys per tile of the SM90 attention programs (their tile table)."""
        return 64 if self.head_dim == 256 else 128


# The attention facts of test_attention_gpu.py's configurations (one program each); each carries one
# RoPE variant, chosen so that every layout sees both modes and partial rotary.
_DENSE = (
    Config(8, 8, 64, F16, True, rope=RopeMode.NEOX, rotary_dim=32),
    Config(32, 2, 128, BF16, False, rope=RopeMode.INTERLEAVED),
    Config(16, 2, 256, BF16, True, rope=RopeMode.INTERLEAVED, rotary_dim=96),
)
_RAGGED = (
    Config(16, 8, 128, BF16, True, rope=RopeMode.NEOX),
    Config(16, 1, 64, F16, False, rope=RopeMode.INTERLEAVED, rotary_dim=32),
)
_CONTIGUOUS = (
    Config(32, 4, 128, F16, True, rope=RopeMode.NEOX, rotary_dim=64),
    Config(8, 8, 256, F16, False, rope=RopeMode.INTERLEAVED),
)
_PAGED = (  # rows gathered through the block table (page sizes 1 and not powers of two)
    Config(32, 8, 128, F16, True, page_size=1, rope=RopeMode.INTERLEAVED, rotary_dim=64),
    Config(8, 2, 64, BF16, False, page_size=5, rope=RopeMode.NEOX),
    Config(4, 2, 256, F16, True, page_size=48, rope=RopeMode.NEOX, rotary_dim=128),
    # whole pages per key tile (16, 64), a key tile inside one page (256)
    Config(32, 8, 128, F16, True, page_size=16, rope=RopeMode.NEOX, rotary_dim=96),
    Config(16, 8, 64, BF16, True, page_size=64, rope=RopeMode.INTERLEAVED),
    Config(16, 2, 128, F16, False, page_size=256, rope=RopeMode.INTERLEAVED, rotary_dim=32),
)


def configs_of(op_cls: OpClass) -> tuple[Config, ...]:
    """The pool's configurations an Op class draws from."""
    if op_cls.kv_layout is KVLayout.PAGED:
        return _PAGED
    if op_cls.kv_layout is KVLayout.CONTIGUOUS:
        return _CONTIGUOUS
    return _RAGGED if op_cls.ragged else _DENSE


#: Every (Op class, configuration) pair a call can be built for.
POOL: tuple[tuple[OpClass, Config], ...] = tuple((c, f) for c in PUBLIC_OPS for f in configs_of(c))


def make_op(op_cls: OpClass, cfg: Config, *, validate: bool = True) -> Any:
    """An Op of `op_cls` for `cfg` (its RoPE mode and rotary dim for RoPE Ops)."""
    kwargs: dict[str, object] = {"causal": cfg.causal, "validate": validate}
    if op_cls.rotates:
        kwargs |= {"rope": cfg.rope, "rotary_dim": cfg.rotary}
    return cast(Any, op_cls)(**kwargs)


# ------------------------------------------------------------------------------------------ calls


@attrs.frozen
class Call:
    """One call of a public Op: CPU inputs by name (call order), and where an append writes."""

    op_cls: OpClass
    cfg: Config
    inputs: dict[str, torch.Tensor]
    #: For append Ops: bool over the cache's rows (contiguous (B, S_max), paged (NP, PS)), the
    #: rows this call writes; None for read-only Ops.
    written: torch.Tensor | None
    #: The cache's name pairs a call writes (empty for read-only Ops).
    caches: tuple[str, ...]
    describe: str

    def op(self, *, validate: bool = True) -> Any:
        return make_op(self.op_cls, self.cfg, validate=validate)

    def cpu_inputs(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.inputs.items()}

    def gpu_inputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {n: t.to(device, copy=True) for n, t in self.inputs.items()}  # a copy on the CPU too


def cumulative(lens: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def rope_tables(rows: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(rows, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


class Draw:
    """Random sizes and tensors of one call, all from one `random.Random` (reproducible)."""

    def __init__(self, rng: random.Random, cfg: Config, *, small: bool = False) -> None:
        self.rng = rng
        self.cfg = cfg
        #: Small calls (the sanitizer's): short sequences, two or three of them, the first empty.
        self.small = small
        self.gen = torch.Generator().manual_seed(rng.getrandbits(62))

    def length(self, most: int = 300) -> int:
        """0, 1, a tile boundary +-1 (query tile 128, key tile, page), or a random length."""
        tile = self.cfg.key_tile
        page = self.cfg.page_size or tile
        special = [0, 1, tile - 1, tile, tile + 1, 127, 128, 129, page - 1, page, page + 1]
        if self.small:
            most = min(most, 140)
        pick = self.rng.choice(special) if self.rng.random() < 0.5 else self.rng.randint(0, most)
        return max(0, min(pick, most))

    def lengths(self, batch: int, most: int = 300) -> list[int]:
        drawn = [self.length(most) for _ in range(batch)]
        return [0, *drawn[1:]] if self.small else drawn

    def batch(self, most: int = 4) -> int:
        return self.rng.randint(2, 3) if self.small else self.rng.randint(1, most)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen).to(self.cfg.dtype)


#: Multiply-adds of attention one call may cost (sum over sequences of q_len * kv_len * Hq * D): keeps
#: the CPU reference at a few milliseconds a call, so a fuzzing budget holds thousands of calls.
WORK = 20_000_000


def _fit(q_lens: list[int], kv_lens: list[int], cfg: Config) -> tuple[list[int], list[int]]:
    """Halve the longest sequences until the call's attention fits WORK."""
    q, kv = list(q_lens), list(kv_lens)
    while sum(a * max(b, 1) for a, b in zip(q, kv, strict=True)) * cfg.heads * cfg.head_dim > WORK:
        i = max(range(len(q)), key=lambda j: q[j] * max(kv[j], 1))
        q[i], kv[i] = q[i] // 2, kv[i] // 2
    return q, kv


def build_call(op_cls: OpClass, cfg: Config, rng: random.Random, *, small: bool = False) -> Call:
    """A random valid call of `op_cls` with the static facts of `cfg`."""
    d = Draw(rng, cfg, small=small)
    if op_cls.kv_layout is KVLayout.NONE:
        return _no_cache_call(op_cls, cfg, d)
    if op_cls.kv_layout is KVLayout.CONTIGUOUS:
        return _contiguous_call(op_cls, cfg, d)
    return _paged_call(op_cls, cfg, d)


def _tables(d: Draw, rows: int) -> dict[str, torch.Tensor]:
    cos, sin = rope_tables(max(1, rows), d.cfg.rotary)
    return {"cos": cos, "sin": sin}


def _no_cache_call(op_cls: OpClass, cfg: Config, d: Draw) -> Call:
    hq, hkv, dim = cfg.heads, cfg.kv_heads, cfg.head_dim
    tensors: dict[str, torch.Tensor]
    if op_cls.ragged:
        batch = d.batch(5)
        q_lens, kv_lens = _fit(d.lengths(batch), d.lengths(batch), cfg)
        tq, tkv = sum(q_lens), sum(kv_lens)
        tensors = {
            "q": d.randn(tq, hq, dim),
            "k": d.randn(tkv, hkv, dim),
            "v": d.randn(tkv, hkv, dim),
            "cu_seqlens_q": cumulative(q_lens),
            "cu_seqlens_kv": cumulative(kv_lens),
        }
        describe = f"q_lens={q_lens} kv_lens={kv_lens}"
        longest = max([*q_lens, *kv_lens, 1])
    else:
        batch = d.batch(3)
        s_q, s_kv = d.length(), d.length()
        while batch * s_q * max(s_kv, 1) * hq * dim > WORK:
            s_q, s_kv = s_q // 2, s_kv // 2
        tensors = {
            "q": d.randn(batch, s_q, hq, dim),
            "k": d.randn(batch, s_kv, hkv, dim),
            "v": d.randn(batch, s_kv, hkv, dim),
        }
        describe = f"batch={batch} seq_q={s_q} seq_kv={s_kv}"
        longest = max(s_q, s_kv, 1)
    if op_cls.rotates:
        tensors |= _tables(d, longest + d.rng.randint(0, 3))
    return Call(op_cls, cfg, _ordered(op_cls, tensors), None, (), describe)


def _contiguous_call(op_cls: OpClass, cfg: Config, d: Draw) -> Call:
    hq, hkv, dim = cfg.heads, cfg.kv_heads, cfg.head_dim
    batch = d.batch(4)
    s_q = d.length(200)
    tensors: dict[str, torch.Tensor]
    if op_cls.appends:
        cached = d.lengths(batch, 300)
        q_lens, kv = _fit([s_q] * batch, [c + s_q for c in cached], cfg)
        s_q = min(q_lens)
        cached = [max(0, k - s_q) for k in kv]
        s_max = max(c + s_q for c in cached) + d.rng.choice([0, 0, 1, 7])
        s_max = max(s_max, 1)
        k_cache, v_cache = d.randn(batch, s_max, hkv, dim), d.randn(batch, s_max, hkv, dim)
        written = torch.zeros(batch, s_max, dtype=torch.bool)
        for b, c in enumerate(cached):
            k_cache[b, c + s_q :] = float("nan")  # past the keys this call attends: not its own
            v_cache[b, c + s_q :] = float("nan")
            written[b, c : c + s_q] = True
        tensors = {
            "q": d.randn(batch, s_q, hq, dim),
            "k_new": d.randn(batch, s_q, hkv, dim),
            "v_new": d.randn(batch, s_q, hkv, dim),
            "k_cache": k_cache,
            "v_cache": v_cache,
            "cache_seqlens": torch.tensor(cached, dtype=torch.int32),
        }
        if op_cls.rotates:
            tensors |= _tables(d, max(c + s_q for c in cached) + d.rng.randint(0, 3))
        describe = f"batch={batch} seq_q={s_q} s_max={s_max} cache_seqlens={cached}"
        return Call(op_cls, cfg, _ordered(op_cls, tensors), written, ("k_cache", "v_cache"), describe)
    kv_lens = d.lengths(batch, 300)
    q_lens, kv_lens = _fit([s_q] * batch, kv_lens, cfg)
    s_q = min(q_lens)
    s_max = max([*kv_lens, 1]) + d.rng.choice([0, 0, 1, 9])
    k_cache, v_cache = d.randn(batch, s_max, hkv, dim), d.randn(batch, s_max, hkv, dim)
    for b, n in enumerate(kv_lens):
        k_cache[b, n:] = float("nan")
        v_cache[b, n:] = float("nan")
    tensors = {
        "q": d.randn(batch, s_q, hq, dim),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "kv_seqlens": torch.tensor(kv_lens, dtype=torch.int32),
    }
    describe = f"batch={batch} seq_q={s_q} s_max={s_max} kv_seqlens={kv_lens}"
    return Call(op_cls, cfg, _ordered(op_cls, tensors), None, (), describe)


def _paged_call(op_cls: OpClass, cfg: Config, d: Draw) -> Call:
    hq, hkv, dim, ps = cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.page_size
    rng = d.rng
    batch = d.batch(5)
    q_lens = d.lengths(batch, 200)
    if op_cls.appends:
        cached = d.lengths(batch, 300)
        q_lens, kv = _fit(q_lens, [c + n for c, n in zip(cached, q_lens, strict=True)], cfg)
        cached = [max(0, k - n) for k, n in zip(kv, q_lens, strict=True)]
        kv_lens = [c + n for c, n in zip(cached, q_lens, strict=True)]
    else:
        q_lens, kv_lens = _fit(q_lens, d.lengths(batch, 400), cfg)
    # Pages: a shuffled pool with spares; read-only Ops may share a prefix of the previous
    # sequence's pages (prefix caching), appends own theirs.
    needed = [math.ceil(n / ps) for n in kv_lens]
    shared = [0] * batch
    if not op_cls.appends:
        for b in range(1, batch):
            if rng.random() < 0.4:
                shared[b] = min(needed[b], needed[b - 1], rng.randint(1, 4))
    fresh = [n - s for n, s in zip(needed, shared, strict=True)]
    num_pages = sum(fresh) + rng.randint(0, 3)
    num_pages = max(num_pages, 1)
    pool = list(range(num_pages))
    rng.shuffle(pool)
    width = max([1, *needed]) + rng.choice([0, 0, 1, 3])  # columns past a sequence's pages
    filler = rng.choice([-1, 0, num_pages, 2**31 - 1])  # never read: any value
    table = torch.full((batch, width), filler, dtype=torch.int32)
    pages: list[list[int]] = []
    cursor = 0
    for b in range(batch):
        own = (pages[b - 1][: shared[b]] if shared[b] else []) + pool[cursor : cursor + fresh[b]]
        cursor += fresh[b]
        pages.append(own)
        if own:
            table[b, : len(own)] = torch.tensor(own, dtype=torch.int32)
    k_pages, v_pages = d.randn(num_pages, ps, hkv, dim), d.randn(num_pages, ps, hkv, dim)
    owned = torch.zeros(num_pages, ps, dtype=torch.bool)  # rows some sequence attends
    written = torch.zeros(num_pages, ps, dtype=torch.bool)
    for b in range(batch):
        for p in range(kv_lens[b]):
            owned[pages[b][p // ps], p % ps] = True
        if op_cls.appends:
            for p in range(cached[b], kv_lens[b]):
                written[pages[b][p // ps], p % ps] = True
    k_pages[~owned] = float("nan")
    v_pages[~owned] = float("nan")
    tq = sum(q_lens)
    tensors = {
        "q": d.randn(tq, hq, dim),
        "k_pages": k_pages,
        "v_pages": v_pages,
        "block_table": table,
        "cu_seqlens_q": cumulative(q_lens),
    }
    if op_cls.appends:
        tensors |= {
            "k_new": d.randn(tq, hkv, dim),
            "v_new": d.randn(tq, hkv, dim),
            "cache_seqlens": torch.tensor(cached, dtype=torch.int32),
        }
        if op_cls.rotates:
            tensors |= _tables(d, max([*kv_lens, 1]) + rng.randint(0, 3))
        describe = f"q_lens={q_lens} cache_seqlens={cached} pages={num_pages} width={width}"
        return Call(op_cls, cfg, _ordered(op_cls, tensors), written, ("k_pages", "v_pages"), describe)
    tensors["kv_seqlens"] = torch.tensor(kv_lens, dtype=torch.int32)
    describe = f"q_lens={q_lens} kv_seqlens={kv_lens} pages={num_pages} width={width} shared={shared}"
    return Call(op_cls, cfg, _ordered(op_cls, tensors), None, (), describe)


def _ordered(op_cls: OpClass, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {s.name: tensors[s.name] for s in op_cls.input_specs}


# ------------------------------------------------------------------------------------ checking


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes: equal bytes is bit-for-bit equality, NaN included."""
    return t.detach().contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bits(a.cpu()), bits(b.cpu()))


def poison_allocator(device: torch.device) -> None:
    """Fill recently freed device memory with NaN, so an output element a kernel forgets is NaN."""
    if device.type == "cuda":
        blob = torch.full((32 << 20,), float("nan"), dtype=torch.float16, device=device)
        del blob


def close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> str | None:
    """None if every element is within atol + rtol * |want| (NaN nowhere), else what differs."""
    g, w = got.double().cpu(), want.double().cpu()
    if g.shape != w.shape:
        return f"shape {tuple(g.shape)} != {tuple(w.shape)}"
    nan = torch.isnan(g) & ~torch.isnan(w)
    if nan.any():
        where = nan.nonzero()[0].tolist()
        return f"NaN at {where} ({int(nan.sum())} elements): unwritten, or read memory it does not own"
    err = (g - w).abs()
    bad = err > atol + rtol * w.abs()
    if bad.any():
        where = bad.nonzero()[0].tolist()
        return f"max |err| {err.max().item():.3g} at {where}, {int(bad.sum())} elements out of tolerance"
    return None


def check_against_reference(
    call: Call, device: torch.device, *, validate: bool = True, device_op: Any = None
) -> str | None:
    """Run `call` on `device` and the reference Op on CPU copies; None if they agree, else why not.

    Output: within per-dtype tolerance, no NaN. Inputs an Op only reads: bit for bit unchanged.
    Caches of append Ops: bit for bit unchanged outside the written rows; written rows equal the
    reference's (bit for bit, rotated keys within an ulp or two). `device_op` replaces the Op run
    on `device` (the harness's own tests plant faults with it).
    """
    dtype = call.cfg.dtype
    ref_inputs = call.cpu_inputs()
    want = call.op()(*ref_inputs.values())
    gpu = call.gpu_inputs(device)
    poison_allocator(device)
    op = call.op(validate=validate) if device_op is None else device_op
    got = op(*gpu.values())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    problem = close(got, want, ATOL[dtype], RTOL[dtype])
    if problem:
        return f"output: {problem}"
    for name, original in call.inputs.items():
        after = gpu[name].cpu()
        if name not in call.caches:
            if not same_bits(after, original):
                return f"{name}: an input the Op only reads changed"
            continue
        assert call.written is not None
        mask = call.written
        if not same_bits(after[~mask], original[~mask]):
            return f"{name}: a row outside the written slots changed"
        ref_rows, got_rows = ref_inputs[name][mask], after[mask]
        if name.startswith("k") and call.op_cls.rotates:
            problem = close(got_rows, ref_rows, ROPE_ATOL[dtype], ROPE_RTOL[dtype])
            if problem:
                return f"{name}: written rows: {problem}"
        elif not same_bits(got_rows, ref_rows):
            return f"{name}: written rows differ from the reference append"
    return None


# ------------------------------------------------------------------------------------ warming up


def warm_up_calls() -> list[Call]:
    """One small call of every (Op class, configuration) pair of the pool."""
    return [build_call(c, f, random.Random(i), small=True) for i, (c, f) in enumerate(POOL)]


def run_calls(calls: Sequence[Call], device: torch.device) -> None:
    """Each call once on `device` (under `recording_builds` this records its programs)."""
    for call in calls:
        call.op()(*call.gpu_inputs(device).values())


def heavy_first(requests: Sequence[BuildRequest]) -> list[BuildRequest]:
    """Unique requests, attention programs first: the pool compiles side by side, longest first."""

    def weight(r: BuildRequest) -> int:
        module = getattr(r.factory, "__module__", "")
        return 0 if "attention_sm90" in module else 1 if "attention" in module else 2

    return sorted(dict.fromkeys(requests), key=weight)


Check = Callable[[], str | None]
