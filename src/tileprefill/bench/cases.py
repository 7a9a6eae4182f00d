"""What a benchmark case is: its definition, FLOP count, input tensors and reference rows, one
definition for every process.

This module imports only the standard library and torch, never the rest of
tileprefill: the peers (TileOPs, FlashInfer) run in their own processes with
other packages on their path and load this file by path (see
`benchmarks/bench_peer.py`), so every process times exactly the same work.
Which cases a run times is `catalogue.py`'s and `scoreboard.py`'s business.

FLOPs count 4 * D per (query, visible key) pair and query head (two matmuls,
2 flops per multiply-add). Causal masks are bottom-right aligned per sequence
(query i of q_len over kv_len keys sees keys j <= kv_len - q_len + i; with a
sliding window W only the last W of those), and only visible keys count.
RoPE and append work is not counted: a rope-append case reports the attention
FLOPs over its total time.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
    labels: tuple[str, ...] = ()  # the quoted figures this case reproduces ("README: ...")
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


#: How many query rows `reference_rows` recomputes: enough to catch a wrong mask, scale or head
#: mapping, cheap at any sequence length.
REFERENCE_ROWS: Final = 32


def reference_rows(
    case: Case, x: Mapping[str, torch.Tensor], rows: int = REFERENCE_ROWS
) -> tuple[int, torch.Tensor] | None:
    """The case's outputs for the last `rows` queries of its first sequence with queries, in float32:
    (first row, (rows, Hq, D)), where the first row indexes the output flattened to (tokens, Hq, D).

    Softmax scale 1/sqrt(D), the bottom-right causal mask, the window and the softcap as the Ops
    define them; keys read from the case's own layout (pages through the block table). None for a
    rope-append case, whose q and new keys are rotated by the call itself.
    """
    if case.suite is Suite.ROPE_APPEND:
        return None
    seq = next(i for i, n in enumerate(case.q_lens) if n > 0)
    q_len, kv_len = case.q_lens[seq], case.kv_lens[seq]
    start = sum(case.q_lens[:seq])
    count = min(rows, q_len)
    first = start + q_len - count
    if case.layout is Layout.DENSE:
        k, v = x["k"][seq], x["v"][seq]
    elif case.layout is Layout.RAGGED:
        offset = sum(case.kv_lens[:seq])
        k, v = x["k"][offset : offset + kv_len], x["v"][offset : offset + kv_len]
    elif case.layout is Layout.CONTIGUOUS:
        k, v = x["k_cache"][seq, :kv_len], x["v_cache"][seq, :kv_len]
    else:
        pages = x["block_table"][seq, : math.ceil(kv_len / case.page_size)].long()
        k, v = (x[name][pages].flatten(0, 1)[:kv_len] for name in ("k_pages", "v_pages"))
    q = x["q"].flatten(0, -3)[first : first + count].float()  # (rows, Hq, D)
    group = case.group_size
    keys = k.float().repeat_interleave(group, dim=1)  # (kv_len, Hq, D)
    values = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) / math.sqrt(case.head_dim)
    if case.softcap:
        scores = case.softcap * torch.tanh(scores / case.softcap)
    if case.causal:
        position = kv_len - q_len + torch.arange(q_len - count, q_len, device=q.device)[:, None]
        key = torch.arange(kv_len, device=q.device)[None, :]
        visible = key <= position
        if case.window:
            visible &= key > position - case.window
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query that sees no key outputs 0
    return first, torch.einsum("hqk,khd->qhd", weights, values)
