"""The benchmark cases every runner measures, with their inputs and FLOP counts.

One definition serves our kernels, torch SDPA and the TileOPs peer (which runs in
its own process), so every figure in a result file is over the same work.
FLOPs count 4 * D per (query, visible key) pair and head: two matmuls of 2 flops
per multiply-add. Bottom-right causal counts only the visible keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

HQ, HKV, D = 32, 8, 128
DTYPE = torch.float16


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "dense" | "ragged" | "paged"
    causal: bool
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    page_size: int = 0
    notes: str = field(default="")

    @property
    def flops(self) -> float:
        pairs = 0
        for q_len, kv_len in zip(self.q_lens, self.kv_lens, strict=True):
            if not self.causal:
                pairs += q_len * kv_len
            else:
                offset = kv_len - q_len
                pairs += sum(max(0, min(kv_len, offset + i + 1)) for i in range(q_len))
        return 4.0 * D * HQ * pairs


CASES: tuple[Case, ...] = (
    Case("dense_s4096_noncausal", "dense", False, (4096,) * 4, (4096,) * 4),
    Case("dense_s8192_causal", "dense", True, (8192,) * 2, (8192,) * 2),
    Case("paged_8x4096+512_p64", "paged", True, (512,) * 8, (4608,) * 8, page_size=64),
    Case(
        "ragged_8_256..4096_causal",
        "ragged",
        True,
        (256, 512, 1024, 1536, 2048, 2560, 3072, 4096),
        (256, 512, 1024, 1536, 2048, 2560, 3072, 4096),
    ),
)


@dataclass
class Inputs:
    """Device tensors of one case, in every layout a runner may want."""

    q: torch.Tensor  # dense (B, S, Hq, D) or packed (T, Hq, D)
    k: torch.Tensor  # dense (B, S, Hkv, D), packed (T, Hkv, D) or pages (P, page, Hkv, D)
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_kv: torch.Tensor
    kv_seqlens: torch.Tensor
    block_table: torch.Tensor


def make_inputs(case: Case, device: str = "cuda", seed: int = 0) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE)

    def cumulative(lens: tuple[int, ...]) -> torch.Tensor:
        out = [0]
        for n in lens:
            out.append(out[-1] + n)
        return torch.tensor(out, dtype=torch.int32, device=device)

    batch = len(case.q_lens)
    cu_q, cu_kv = cumulative(case.q_lens), cumulative(case.kv_lens)
    kv_seqlens = torch.tensor(case.kv_lens, dtype=torch.int32, device=device)
    empty_table = torch.zeros(batch, 1, dtype=torch.int32, device=device)
    if case.kind == "dense":
        s_q, s_kv = case.q_lens[0], case.kv_lens[0]
        return Inputs(
            randn(batch, s_q, HQ, D),
            randn(batch, s_kv, HKV, D),
            randn(batch, s_kv, HKV, D),
            cu_q,
            cu_kv,
            kv_seqlens,
            empty_table,
        )
    if case.kind == "ragged":
        tq, tkv = sum(case.q_lens), sum(case.kv_lens)
        return Inputs(
            randn(tq, HQ, D), randn(tkv, HKV, D), randn(tkv, HKV, D), cu_q, cu_kv, kv_seqlens, empty_table
        )
    # paged: every sequence's pages are scattered through one shuffled pool
    page = case.page_size
    pages_per_seq = max(-(-n // page) for n in case.kv_lens)
    num_pages = batch * pages_per_seq
    perm = torch.randperm(num_pages, generator=torch.Generator().manual_seed(seed)).to(device)
    block_table = perm.view(batch, pages_per_seq).to(torch.int32).contiguous()
    tq = sum(case.q_lens)
    return Inputs(
        randn(tq, HQ, D),
        randn(num_pages, page, HKV, D),
        randn(num_pages, page, HKV, D),
        cu_q,
        cu_kv,
        kv_seqlens,
        block_table,
    )
