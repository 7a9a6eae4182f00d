"""The benchmark cases, their FLOP counts and their input tensors: one definition for every process.

This module imports only the standard library and torch, never the rest of
tileprefill: the TileOPs peer runs in its own process with an older TileLang
and loads this file by path (see `benchmarks/bench_peer.py`), so both
processes time exactly the same work.

FLOPs count 4 * D per (query, visible key) pair and query head (two matmuls,
2 flops per multiply-add). Causal masks are bottom-right aligned per sequence
(query i of q_len over kv_len keys sees keys j <= kv_len - q_len + i; with a
sliding window W only the last W of those), and only visible keys count.
RoPE and append work is not counted: a rope-append case reports the attention
FLOPs over its total time.

The default set (`default_cases()`): every suite, fp16 and bf16, plus the
reference cases whose figures the README and issue 7 quote (`labels` names
them; a reference case equal to a grid case is that case). `quick_cases()` is a
small subset of it.
"""

from __future__ import annotations

import enum
import itertools
import math
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

import torch


class Suite(enum.Enum):
    DENSE = "dense"
    RAGGED = "ragged"
    CONTIGUOUS = "contiguous"
    PAGED = "paged"
    ROPE_APPEND = "rope-append"
    WINDOW = "window"  # Gemma-like dense calls: sliding window and logit softcap against plain
    HEAD_DIMS = "head-dims"  # one dense shape at every served head dim


class Layout(enum.Enum):
    """Where a case's keys live (a rope-append case is CONTIGUOUS or PAGED)."""

    DENSE = "dense"  # q (B, S, Hq, D), k/v (B, S, Hkv, D)
    RAGGED = "ragged"  # packed (T, H, D) with cu_seqlens
    CONTIGUOUS = "contiguous"  # q (B, Sq, Hq, D), cache (B, S_max, Hkv, D)
    PAGED = "paged"  # packed q (T, Hq, D), pages (num_pages, page_size, Hkv, D)


#: The dtypes a case may have, by the name the CLI and the JSON use.
DTYPES: Final[Mapping[str, torch.dtype]] = {"fp16": torch.float16, "bf16": torch.bfloat16}

#: Heads of every case that does not say otherwise (Llama-3-8B-like: group 4).
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


@dataclass(frozen=True)
class Case:
    """One timed problem. `series` names its plot panel ("" for a case outside the grids)."""

    name: str
    suite: Suite
    layout: Layout
    dtype: str
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    page_size: int = 0  # PAGED only
    capacity: int = 0  # CONTIGUOUS only: S_max of the cache
    series: str = ""
    labels: tuple[str, ...] = ()  # the README / issue figures this case reproduces
    quick: bool = False
    window: int = 0  # causal sliding window in keys (0: none)
    softcap: float = 0.0  # logit softcap (0: none)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"{self.name}: dtype: expected one of {sorted(DTYPES)}, got {self.dtype!r}")
        if len(self.q_lens) != len(self.kv_lens) or not self.q_lens:
            raise ValueError(f"{self.name}: expected q_lens and kv_lens of one nonzero length")
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.layout is Layout.DENSE and (len(set(self.q_lens)) > 1 or len(set(self.kv_lens)) > 1):
            raise ValueError(f"{self.name}: a dense case has one q length and one kv length")
        if self.layout is Layout.CONTIGUOUS and (
            len(set(self.q_lens)) > 1 or self.capacity < max(self.kv_lens)
        ):
            raise ValueError(f"{self.name}: a contiguous case has one q length and capacity >= kv lengths")
        if self.window < 0 or (self.window and not self.causal):
            raise ValueError(f"{self.name}: window: expected 0, or > 0 with causal, got {self.window}")
        if self.softcap < 0:
            raise ValueError(f"{self.name}: softcap: expected >= 0, got {self.softcap}")
        if (self.window or self.softcap) and self.layout is not Layout.DENSE:
            raise ValueError(f"{self.name}: the harness times windows and softcaps on dense calls only")
        if (self.layout is Layout.PAGED) != (self.page_size > 0):
            raise ValueError(f"{self.name}: page_size > 0 exactly for paged cases, got {self.page_size}")
        if self.suite is Suite.ROPE_APPEND and self.layout not in (Layout.CONTIGUOUS, Layout.PAGED):
            raise ValueError(f"{self.name}: a rope-append case appends to a contiguous or paged cache")
        if any(q > kv for q, kv in zip(self.q_lens, self.kv_lens, strict=True)) and self.suite in (
            Suite.CONTIGUOUS,
            Suite.PAGED,
            Suite.ROPE_APPEND,
        ):
            raise ValueError(f"{self.name}: a cache case holds at least its own new keys (q_len <= kv_len)")

    @property
    def batch(self) -> int:
        return len(self.q_lens)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @property
    def kind(self) -> str:
        """The layout's name ("dense", "ragged", "contiguous", "paged")."""
        return self.layout.value

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def cached_lens(self) -> tuple[int, ...]:
        """Keys in the cache before the call (rope-append: cache_seqlens)."""
        return tuple(kv - q for q, kv in zip(self.q_lens, self.kv_lens, strict=True))

    @property
    def seq_len(self) -> int:
        """The plots' x coordinate: the longest key sequence."""
        return max(self.kv_lens)

    @property
    def plot_x(self) -> tuple[str, int]:
        """The plots' x axis and this case's coordinate on it."""
        if self.suite is Suite.HEAD_DIMS:
            return "head dim", self.head_dim
        return "sequence length (longest kv)", self.seq_len

    @property
    def pairs(self) -> int:
        """(query, visible key) pairs over the batch, per head."""
        return sum(
            visible_pairs(q, kv, self.causal, self.window)
            for q, kv in zip(self.q_lens, self.kv_lens, strict=True)
        )

    @property
    def flops(self) -> float:
        return 4.0 * self.head_dim * self.heads * self.pairs

    @property
    def transforms(self) -> str:
        """The score transforms in words ("window 4096 softcap 50"; "" for none)."""
        window = f"window {self.window}" if self.window else ""
        softcap = f"softcap {self.softcap:g}" if self.softcap else ""
        return f"{window} {softcap}".strip()

    def describe(self) -> str:
        """The problem in a few words (tables)."""
        mask = " ".join(filter(None, ("causal" if self.causal else "non-causal", self.transforms)))
        heads = f"Hq{self.heads}/Hkv{self.kv_heads} D{self.head_dim} {self.dtype} {mask}"
        if self.layout is Layout.DENSE:
            return f"B{self.batch} S{self.q_lens[0]} {heads}"
        if self.layout is Layout.RAGGED:
            return (
                f"{self.batch} seqs {min(self.q_lens)}..{max(self.q_lens)} ({sum(self.q_lens)} tok) {heads}"
            )
        new, cached = _span(self.q_lens), _span(self.cached_lens)
        where = f"page {self.page_size}" if self.layout is Layout.PAGED else f"S_max {self.capacity}"
        return f"{self.batch} x ({cached} cached + {new} new) {where} {heads}"

    def key(self) -> tuple[object, ...]:
        """What makes two cases the same work (not their names, labels or flags)."""
        return (
            self.suite,
            self.layout,
            self.dtype,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.causal,
            self.q_lens,
            self.kv_lens,
            self.page_size,
            self.capacity,
            self.window,
            self.softcap,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "suite": self.suite.value,
            "layout": self.layout.value,
            "dtype": self.dtype,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "causal": self.causal,
            "q_lens": list(self.q_lens),
            "kv_lens": list(self.kv_lens),
            "page_size": self.page_size,
            "capacity": self.capacity,
            "series": self.series,
            "labels": list(self.labels),
            "quick": self.quick,
            "window": self.window,
            "softcap": self.softcap,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Case:
        def ints(name: str) -> tuple[int, ...]:
            value = data[name]
            assert isinstance(value, list)
            return tuple(int(v) for v in value)

        labels = data.get("labels", [])
        assert isinstance(labels, list)
        return cls(
            name=str(data["name"]),
            suite=Suite(data["suite"]),
            layout=Layout(data["layout"]),
            dtype=str(data["dtype"]),
            heads=_int(data["heads"]),
            kv_heads=_int(data["kv_heads"]),
            head_dim=_int(data["head_dim"]),
            causal=bool(data["causal"]),
            q_lens=ints("q_lens"),
            kv_lens=ints("kv_lens"),
            page_size=_int(data.get("page_size", 0)),
            capacity=_int(data.get("capacity", 0)),
            series=str(data.get("series", "")),
            labels=tuple(str(s) for s in labels),
            quick=bool(data.get("quick", False)),
            window=_int(data.get("window", 0)),
            softcap=float(_number(data.get("softcap", 0.0))),
        )


def _int(value: object) -> int:
    return int(_number(value))


def _number(value: object) -> int | str | float:
    assert isinstance(value, int | str | float)
    return value


def _span(lens: Sequence[int]) -> str:
    low, high = min(lens), max(lens)
    return str(low) if low == high else f"{low}..{high}"


def visible_pairs(q_len: int, kv_len: int, causal: bool, window: int = 0) -> int:
    """(query, key) pairs one sequence attends over; causal is bottom-right aligned.

    Query i sits at key position p = kv_len - q_len + i and sees the keys
    max(0, p - window + 1)..p (window 0: every key up to p), none when p < 0.
    """
    if not causal:
        return q_len * kv_len
    offset = kv_len - q_len
    if window:

        def seen_up_to(n: int) -> int:  # sum over positions 0..n-1 of the keys each sees
            return n * (n + 1) // 2 if n <= window else window * (window + 1) // 2 + (n - window) * window

        return seen_up_to(kv_len) - seen_up_to(max(0, offset))
    if offset >= 0:  # every query sees offset + i + 1 keys
        return q_len * offset + q_len * (q_len + 1) // 2
    return kv_len * (kv_len + 1) // 2  # the first -offset queries see nothing


# --- the default set ---------------------------------------------------------------------------------

DENSE_SEQ_LENS: Final = (1024, 2048, 4096, 8192, 16384)
DENSE_TOKENS: Final = 16384  # B * S of every dense grid case
HEAD_DIMS: Final = (64, 128, 256)
GROUP_SIZES: Final = (1, 4, 8, 16)  # Hq = 32, Hkv = 32 // group
RAGGED_LONG_LENS: Final = (1024, 2048, 4096, 8192, 16384)
CONTIGUOUS_CACHED: Final = (1024, 2048, 4096, 8192)
PAGE_SIZES: Final = (1, 16, 32, 64, 128)
#: (batch, cached, new) of the paged workloads: many small requests to a few long ones.
PAGED_WORKLOADS: Final = ((32, 512, 128), (2, 2048, 256), (8, 3000, 700), (8, 4096, 512), (4, 8000, 2000))
ROPE_PAGE_SIZES: Final = (1, 16, 64)
ROPE_PAGED_WORKLOADS: Final = ((32, 512, 128), (8, 4096, 512), (4, 8000, 2000))
ROPE_CONTIGUOUS_WORKLOADS: Final = ((32, 512, 128), (8, 4096, 512))
#: The window suite: Gemma-2-like layers (Hq 16 / Hkv 8, D 256, window 4096, softcap 50), B = 1.
WINDOW_HEADS, WINDOW_KV_HEADS, WINDOW_HEAD_DIM = 16, 8, 256
WINDOW: Final = 4096
WINDOW_SOFTCAP: Final = 50.0
WINDOW_SEQ_LENS: Final = (4096, 8192, 16384, 32768)
#: The head-dim sweep: every head dim the kernels serve (multiples of 16), dense B4 S4096 Hq32/Hkv8.
SWEEP_HEAD_DIMS: Final = tuple(range(64, 257, 16))
SWEEP_BATCH, SWEEP_SEQ = 4, 4096


def _mask(causal: bool) -> str:
    return "causal" if causal else "noncausal"


def dense_case(
    dtype: str,
    batch: int,
    seq: int,
    causal: bool,
    *,
    heads: int = HEADS,
    kv_heads: int = KV_HEADS,
    head_dim: int = HEAD_DIM,
    series: str = "",
    suite: Suite = Suite.DENSE,
    window: int = 0,
    softcap: float = 0.0,
) -> Case:
    extras = (f"_w{window}" if window else "") + (f"_cap{softcap:g}" if softcap else "")
    prefix = "sweep" if suite is Suite.HEAD_DIMS else "dense"  # sweep cases repeat some grid shapes
    return Case(
        name=f"{prefix}_{dtype}_d{head_dim}_h{heads}-{kv_heads}_b{batch}_s{seq}_{_mask(causal)}{extras}",
        suite=suite,
        layout=Layout.DENSE,
        dtype=dtype,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        causal=causal,
        q_lens=(seq,) * batch,
        kv_lens=(seq,) * batch,
        series=series,
        window=window,
        softcap=softcap,
    )


def window_case(dtype: str, seq: int, window: int, softcap: float, *, causal: bool = True) -> Case:
    """One Gemma-like layer call of the window suite (window 0: plain)."""
    case = dense_case(
        dtype,
        1,
        seq,
        causal,
        heads=WINDOW_HEADS,
        kv_heads=WINDOW_KV_HEADS,
        head_dim=WINDOW_HEAD_DIM,
        suite=Suite.WINDOW,
        window=window,
        softcap=softcap,
    )
    return replace(case, series=f"{dtype} D{WINDOW_HEAD_DIM} {_mask(causal)} {case.transforms or 'plain'}")


def ragged_mix(long_len: int, *, seed: int = 0) -> tuple[int, ...]:
    """A batch mixing 32 short sequences (1..127 tokens) with long ones of about `long_len` tokens.

    About 12k tokens sit in the long sequences (at least one), unaligned to any tile;
    the order is shuffled, as a scheduler hands them over.
    """
    rng = random.Random(f"ragged-{long_len}-{seed}")
    count = max(1, 12288 // long_len)
    longs = [long_len - 37 * j for j in range(count)]
    shorts = [rng.randrange(1, 128) for _ in range(32)]
    lens = longs + shorts
    rng.shuffle(lens)
    return tuple(lens)


def ragged_case(
    dtype: str, lens: tuple[int, ...], causal: bool, *, head_dim: int = HEAD_DIM, name: str, series: str = ""
) -> Case:
    return Case(
        name=name,
        suite=Suite.RAGGED,
        layout=Layout.RAGGED,
        dtype=dtype,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=head_dim,
        causal=causal,
        q_lens=lens,
        kv_lens=lens,
        series=series,
    )


def contiguous_case(
    dtype: str, batch: int, cached: int, new: int, *, suite: Suite = Suite.CONTIGUOUS, series: str = ""
) -> Case:
    kv = cached + new
    prefix = "contiguous" if suite is Suite.CONTIGUOUS else "rope_contiguous"
    return Case(
        name=f"{prefix}_{dtype}_{batch}x{cached}+{new}",
        suite=suite,
        layout=Layout.CONTIGUOUS,
        dtype=dtype,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        causal=True,
        q_lens=(new,) * batch,
        kv_lens=(kv,) * batch,
        capacity=-(-kv // 1024) * 1024,  # the cache is allocated in whole 1k blocks, past the last key
        series=series,
    )


def paged_case(
    dtype: str,
    batch: int,
    cached: int,
    new: int,
    page_size: int,
    *,
    suite: Suite = Suite.PAGED,
    series: str = "",
) -> Case:
    prefix = "paged" if suite is Suite.PAGED else "rope_paged"
    return Case(
        name=f"{prefix}_{dtype}_{batch}x{cached}+{new}_p{page_size}",
        suite=suite,
        layout=Layout.PAGED,
        dtype=dtype,
        heads=HEADS,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        causal=True,
        q_lens=(new,) * batch,
        kv_lens=(cached + new,) * batch,
        page_size=page_size,
        series=series,
    )


def grid_cases() -> list[Case]:
    """Every suite's grid, fp16 and bf16 (the plots' series)."""
    cases: list[Case] = []
    for dtype, head_dim, group, causal in itertools.product(DTYPES, HEAD_DIMS, GROUP_SIZES, (False, True)):
        kv_heads = HEADS // group
        series = f"{dtype} D{head_dim} Hq{HEADS}/Hkv{kv_heads} {_mask(causal)}"
        for seq in DENSE_SEQ_LENS:
            cases.append(
                dense_case(
                    dtype,
                    DENSE_TOKENS // seq,
                    seq,
                    causal,
                    kv_heads=kv_heads,
                    head_dim=head_dim,
                    series=series,
                )
            )
    for dtype, head_dim, causal in itertools.product(DTYPES, HEAD_DIMS, (False, True)):
        series = f"{dtype} D{head_dim} {_mask(causal)}: 32 short + long"
        for long_len in RAGGED_LONG_LENS:
            lens = ragged_mix(long_len)
            name = f"ragged_{dtype}_d{head_dim}_32short+{len(lens) - 32}x{long_len}_{_mask(causal)}"
            cases.append(ragged_case(dtype, lens, causal, head_dim=head_dim, name=name, series=series))
    for dtype in DTYPES:
        for cached in CONTIGUOUS_CACHED:
            cases.append(contiguous_case(dtype, 8, cached, 512, series=f"{dtype} 8 x (cached + 512)"))
    for dtype, page_size in itertools.product(DTYPES, PAGE_SIZES):
        for batch, cached, new in PAGED_WORKLOADS:
            series = f"{dtype} page {page_size}"
            cases.append(paged_case(dtype, batch, cached, new, page_size, series=series))
    for dtype in DTYPES:
        for page_size in ROPE_PAGE_SIZES:
            for batch, cached, new in ROPE_PAGED_WORKLOADS:
                series = f"{dtype} paged, page {page_size}"
                cases.append(
                    paged_case(dtype, batch, cached, new, page_size, suite=Suite.ROPE_APPEND, series=series)
                )
        for batch, cached, new in ROPE_CONTIGUOUS_WORKLOADS:
            series = f"{dtype} contiguous"
            cases.append(contiguous_case(dtype, batch, cached, new, suite=Suite.ROPE_APPEND, series=series))
    for dtype, seq, window, softcap in itertools.product(
        DTYPES, WINDOW_SEQ_LENS, (0, WINDOW), (0.0, WINDOW_SOFTCAP)
    ):
        cases.append(window_case(dtype, seq, window, softcap))
    for dtype in DTYPES:  # every query sees `WINDOW` keys, as in a windowed call past its first window
        cases.append(window_case(dtype, WINDOW, 0, 0.0, causal=False))
    for dtype, causal, head_dim in itertools.product(DTYPES, (False, True), SWEEP_HEAD_DIMS):
        series = f"{dtype} B{SWEEP_BATCH} S{SWEEP_SEQ} Hq{HEADS}/Hkv{KV_HEADS} {_mask(causal)}"
        cases.append(
            dense_case(
                dtype, SWEEP_BATCH, SWEEP_SEQ, causal, head_dim=head_dim, series=series, suite=Suite.HEAD_DIMS
            )
        )
    return cases


#: The lengths of issue 7's "ragged, 8 mixed lengths 17..4096" case (the issue does not list them).
ISSUE_RAGGED_LENS: Final = (1024, 17, 4096, 300, 2048, 96, 3000, 517)
README_RAGGED_LENS: Final = (256, 512, 1024, 1536, 2048, 2560, 3072, 4096)


def reference_cases() -> list[Case]:
    """The cases whose figures the README (fp16) and issue 7 (bf16 unless said) quote.

    The four README cases keep the names earlier result files use, so runs compare by name.
    """
    readme, issue = "README", "issue 7"

    def label(case: Case, source: str, text: str, name: str | None = None) -> Case:
        return replace(case, labels=(f"{source}: {text}",), name=name or case.name)

    return [
        label(
            dense_case("fp16", 4, 4096, False),
            readme,
            "dense S=4096 non-causal (B=4)",
            "dense_s4096_noncausal",
        ),
        label(dense_case("fp16", 2, 8192, True), readme, "dense S=8192 causal (B=2)", "dense_s8192_causal"),
        label(
            paged_case("fp16", 8, 4096, 512, 64),
            readme,
            "paged, 8 x (4096 cached + 512 new), page 64",
            "paged_8x4096+512_p64",
        ),
        label(
            ragged_case("fp16", README_RAGGED_LENS, True, name="ragged_8_256..4096_causal"),
            readme,
            "ragged, 8 seqs of 256..4096, causal",
        ),
        label(dense_case("bf16", 1, 8192, False), issue, "dense B1 S8192 Hq32/Hkv8 D128 non-causal"),
        label(dense_case("bf16", 1, 8192, True), issue, "dense B1 S8192 D128 causal"),
        label(dense_case("fp16", 4, 4096, False), issue, "dense B4 S4096 D128 non-causal fp16"),
        label(
            dense_case("fp16", 2, 4096, True, heads=64, kv_heads=4),
            issue,
            "dense B2 S4096 Hq64/Hkv4 (group 16) causal fp16",
        ),
        label(dense_case("bf16", 4, 2048, True, head_dim=64), issue, "dense B4 S2048 D64 causal"),
        label(dense_case("bf16", 8, 1024, True, heads=40), issue, "dense B8 S1024 Hq40/Hkv8 causal"),
        label(
            ragged_case("bf16", ISSUE_RAGGED_LENS, True, name="ragged_bf16_8_17..4096_causal"),
            issue,
            "ragged, 8 mixed lengths 17..4096, causal",
        ),
        label(paged_case("bf16", 8, 3000, 700, 16), issue, "paged 8 x (3000 cached + 700 new), page 16"),
        label(paged_case("bf16", 32, 512, 128, 32), issue, "paged 32 x (512 cached + 128 new), page 32"),
        label(paged_case("bf16", 2, 2048, 256, 1), issue, "paged 2 x (2048 + 256), page 1"),
    ]


#: Grid cases in the quick subset besides every reference case (names as `grid_cases` makes them).
QUICK_GRID: Final = (
    "dense_bf16_d128_h32-8_b16_s1024_causal",
    "dense_bf16_d128_h32-8_b1_s16384_causal",
    "dense_bf16_d256_h32-8_b4_s4096_causal",
    "dense_bf16_d64_h32-4_b2_s8192_noncausal",
    "ragged_bf16_d128_32short+3x4096_causal",
    "contiguous_bf16_8x4096+512",
    "paged_bf16_8x3000+700_p64",
    "paged_bf16_4x8000+2000_p16",
    "rope_paged_bf16_8x4096+512_p16",
    "rope_contiguous_bf16_8x4096+512",
    # issue 10's targets: windowed S=32k against plain S=4096 per query token; softcap overhead
    "dense_bf16_d256_h16-8_b1_s4096_causal",
    "dense_bf16_d256_h16-8_b1_s32768_causal_w4096",
    "dense_bf16_d256_h16-8_b1_s32768_causal_w4096_cap50",
    "dense_bf16_d256_h16-8_b1_s8192_causal",
    "dense_bf16_d256_h16-8_b1_s8192_causal_cap50",
    "sweep_bf16_d96_h32-8_b4_s4096_causal",
    "sweep_bf16_d192_h32-8_b4_s4096_noncausal",
)


def merge(cases: Iterable[Case]) -> list[Case]:
    """Cases with equal work made one: the first name that came from a reference case, every label,
    the first series, quick if any was. Order of first appearance."""
    merged: dict[tuple[object, ...], Case] = {}
    for case in cases:
        seen = merged.get(case.key())
        if seen is None:
            merged[case.key()] = case
            continue
        labels = seen.labels + tuple(s for s in case.labels if s not in seen.labels)
        name = seen.name if seen.labels or not case.labels else case.name
        merged[case.key()] = replace(
            seen, name=name, labels=labels, series=seen.series or case.series, quick=seen.quick or case.quick
        )
    return list(merged.values())


SUITE_ORDER: Final = tuple(Suite)


def default_cases() -> list[Case]:
    """The whole default set: reference cases first within each suite, then the grids."""
    references = [replace(c, quick=True) for c in reference_cases()]
    grid = [replace(c, quick=c.name in QUICK_GRID) for c in grid_cases()]
    cases = merge([*references, *grid])
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise AssertionError("case names must be unique")
    if missing := sorted(set(QUICK_GRID) - set(names)):
        raise AssertionError(f"QUICK_GRID names no grid case: {missing}")
    return sorted(cases, key=lambda c: (SUITE_ORDER.index(c.suite), not c.labels))


def quick_cases() -> list[Case]:
    return [c for c in default_cases() if c.quick]


def tiny_cases() -> list[Case]:
    """One or two small cases per suite, for a run of the whole pipeline on a CPU (`--dry-run`)."""
    return [
        dense_case("fp16", 2, 48, True, heads=4, kv_heads=2, head_dim=64, series="tiny dense"),
        dense_case("fp16", 1, 96, False, heads=4, kv_heads=2, head_dim=64, series="tiny dense"),
        *(
            dense_case(
                "bf16",
                1,
                96,
                True,
                heads=4,
                kv_heads=2,
                head_dim=64,
                series="tiny window",
                suite=Suite.WINDOW,
                window=window,
                softcap=softcap,
            )
            for window, softcap in ((0, 0.0), (40, 0.0), (40, 20.0))
        ),
        *(
            dense_case(
                "fp16",
                1,
                48,
                True,
                heads=4,
                kv_heads=2,
                head_dim=d,
                series="tiny sweep",
                suite=Suite.HEAD_DIMS,
            )
            for d in (64, 80)
        ),
        replace(
            ragged_case("bf16", (5, 40, 17), True, head_dim=64, name="ragged_tiny", series="tiny ragged"),
            heads=4,
            kv_heads=2,
        ),
        replace(
            contiguous_case("fp16", 2, 40, 9, series="tiny contiguous"), heads=4, kv_heads=2, head_dim=64
        ),
        replace(paged_case("fp16", 2, 30, 7, 16, series="tiny paged"), heads=4, kv_heads=2, head_dim=64),
        replace(paged_case("bf16", 3, 20, 5, 1, series="tiny paged"), heads=4, kv_heads=2, head_dim=64),
        replace(
            paged_case("fp16", 2, 24, 6, 8, suite=Suite.ROPE_APPEND, series="tiny rope"),
            heads=4,
            kv_heads=2,
            head_dim=64,
        ),
        replace(
            contiguous_case("fp16", 2, 20, 6, suite=Suite.ROPE_APPEND, series="tiny rope"),
            heads=4,
            kv_heads=2,
            head_dim=64,
        ),
    ]


def select(
    cases: Iterable[Case],
    *,
    suites: Sequence[Suite] = (),
    dtypes: Sequence[str] = (),
    max_cases: int | None = None,
) -> list[Case]:
    """`cases` of the given suites and dtypes (all when empty), at most `max_cases` of each suite."""
    chosen = [c for c in cases if (not suites or c.suite in suites) and (not dtypes or c.dtype in dtypes)]
    if max_cases is None:
        return chosen
    per_suite: dict[Suite, int] = {}
    kept: list[Case] = []
    for case in chosen:
        per_suite[case.suite] = per_suite.get(case.suite, 0) + 1
        if per_suite[case.suite] <= max_cases:
            kept.append(case)
    return kept


# --- inputs ------------------------------------------------------------------------------------------


def rope_tables(max_position: int, rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float32 (max_position, rotary_dim // 2), base 10000."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def cumulative(lens: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """int32 (len + 1,) offsets 0, lens[0], lens[0] + lens[1], ..."""
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


#: How long `warm_up_gpu` keeps the tensor cores busy before a process times its first case.
WARM_UP_S: Final = 1.0


def warm_up_gpu(device: torch.device | str = "cuda", seconds: float = WARM_UP_S) -> None:
    """Keep the GPU busy with bf16 matmuls for about `seconds`, so that the first timed case does
    not run at idle clocks. Both timing processes (ours and the peer's) call it before their first
    case. Seen without it (H100, 2026-12-05): the first case of a run (fp16 D256 S4096 causal)
    measured 407 TFLOP/s, below the same call with a softcap timed right after it (477), which
    does more work."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(8):  # ~10 ms of work between host checks
            a @ a
        torch.cuda.synchronize(device)


def make_inputs(case: Case, device: torch.device | str = "cuda", seed: int = 0) -> dict[str, torch.Tensor]:
    """The case's tensors on `device`, named as the Ops name their inputs.

    dense: q, k, v. ragged: q, k, v, cu_seqlens_q, cu_seqlens_kv. contiguous: q,
    k_cache, v_cache, kv_seqlens. paged: q, k_pages, v_pages, block_table,
    kv_seqlens, cu_seqlens_q (every sequence's pages scattered through one
    shuffled pool). rope-append cases also get k_new, v_new, cache_seqlens (keys
    cached before the call: kv_seqlens - q lens), cos and sin (full rotary).
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    hq, hkv, d = case.heads, case.kv_heads, case.head_dim

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=case.torch_dtype)

    def ints(values: Sequence[int]) -> torch.Tensor:
        return torch.tensor(list(values), dtype=torch.int32, device=device)

    batch, tq, tkv = case.batch, sum(case.q_lens), sum(case.kv_lens)
    out: dict[str, torch.Tensor] = {}
    if case.layout is Layout.DENSE:
        s_q, s_kv = case.q_lens[0], case.kv_lens[0]
        out = {
            "q": randn(batch, s_q, hq, d),
            "k": randn(batch, s_kv, hkv, d),
            "v": randn(batch, s_kv, hkv, d),
        }
    elif case.layout is Layout.RAGGED:
        out = {
            "q": randn(tq, hq, d),
            "k": randn(tkv, hkv, d),
            "v": randn(tkv, hkv, d),
            "cu_seqlens_q": cumulative(case.q_lens, device),
            "cu_seqlens_kv": cumulative(case.kv_lens, device),
        }
    elif case.layout is Layout.CONTIGUOUS:
        s_q = case.q_lens[0]
        out = {
            "q": randn(batch, s_q, hq, d),
            "k_cache": randn(batch, case.capacity, hkv, d),
            "v_cache": randn(batch, case.capacity, hkv, d),
            "kv_seqlens": ints(case.kv_lens),
        }
        if case.suite is Suite.ROPE_APPEND:
            out |= {"k_new": randn(batch, s_q, hkv, d), "v_new": randn(batch, s_q, hkv, d)}
    else:
        page = case.page_size
        pages_of = [math.ceil(n / page) for n in case.kv_lens]
        num_pages = sum(pages_of)
        pool = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).tolist()
        table = torch.zeros(batch, max(pages_of), dtype=torch.int32)
        cursor = 0
        for b, n in enumerate(pages_of):
            table[b, :n] = torch.tensor(pool[cursor : cursor + n], dtype=torch.int32)
            cursor += n
        out = {
            "q": randn(tq, hq, d),
            "k_pages": randn(num_pages, page, hkv, d),
            "v_pages": randn(num_pages, page, hkv, d),
            "block_table": table.to(device),
            "kv_seqlens": ints(case.kv_lens),
            "cu_seqlens_q": cumulative(case.q_lens, device),
        }
        if case.suite is Suite.ROPE_APPEND:
            out |= {"k_new": randn(tq, hkv, d), "v_new": randn(tq, hkv, d)}
    if case.suite is Suite.ROPE_APPEND:
        cos, sin = rope_tables(case.seq_len, d)
        out |= {"cache_seqlens": ints(case.cached_lens), "cos": cos.to(device), "sin": sin.to(device)}
    return out
