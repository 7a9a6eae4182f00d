"""SDPA on the equivalent dense problem: torch's flash and cuDNN backends on the same work as a case.

Ragged and packed batches run one SDPA call per sequence (one batched call where every sequence
has the same lengths); caches are gathered to dense first, untimed. Rope-append cases attend with
q rotated as our Op rotates it, over the cache as our Op left it (so ours runs first).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Final

import attrs
import torch

from tileprefill.bench.cases import Case, Layout, Suite
from tileprefill.bench.results import SDPA_CUDNN, SDPA_FLASH, Measurement
from tileprefill.bench.timing import Timer, synchronize

Tensors = Mapping[str, torch.Tensor]
#: The SDPA backends a run may time, by implementation name.
BACKENDS: Final = (SDPA_FLASH, SDPA_CUDNN)


@attrs.frozen
class DenseProblem:
    """q (B, Sq, Hq, D) over k, v (B, Skv, Hkv, D): one SDPA call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def rotate_neox(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x (T, H, D) rotated by NeoX RoPE at `positions` (T,), computed in float32."""
    half = cos.shape[1]
    c = cos[positions.long()][:, None, :]
    s = sin[positions.long()][:, None, :]
    x32 = x.float()
    x1, x2 = x32[..., :half], x32[..., half : 2 * half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, x32[..., 2 * half :]], dim=-1).to(x.dtype)


def dense_problems(case: Case, x: Tensors) -> list[DenseProblem]:
    """The case as SDPA calls: one batched call where every sequence has the same lengths, else one
    call per sequence. Caches are gathered to dense (copies; the caller does not time this).

    Rope-append: q rotated as our Op rotates it, over the cache as our Op left it (call ours first).
    """
    q_lens, kv_lens = case.q_lens, case.kv_lens
    q = x["q"]
    if case.suite is Suite.ROPE_APPEND:
        cached = torch.tensor(case.cached_lens, dtype=torch.int64, device=q.device)
        steps = torch.arange(max(q_lens), device=q.device)
        if case.layout is Layout.CONTIGUOUS:
            pos = (cached[:, None] + steps[None, : q_lens[0]]).reshape(-1)
            flat = q.reshape(-1, *q.shape[2:])
            q = rotate_neox(flat, pos, x["cos"], x["sin"]).reshape(q.shape)
        else:
            pos = torch.cat(
                [c + torch.arange(n, device=q.device) for c, n in zip(cached, q_lens, strict=True)]
            )
            q = rotate_neox(q, pos, x["cos"], x["sin"])
    if case.layout in (Layout.DENSE, Layout.CONTIGUOUS):
        if case.layout is Layout.DENSE:
            k, v = x["k"], x["v"]
        else:
            k, v = (x[n][:, : kv_lens[0]].contiguous() for n in ("k_cache", "v_cache"))
        return [DenseProblem(q, k, v)]
    q_starts = [0, *_accumulate(q_lens)]
    if case.layout is Layout.RAGGED:
        kv_starts = [0, *_accumulate(kv_lens)]
        keys = [(x["k"][a : a + n], x["v"][a : a + n]) for a, n in zip(kv_starts, kv_lens, strict=False)]
    else:
        page, table = case.page_size, x["block_table"]
        keys = []
        for b, n in enumerate(kv_lens):
            pages = table[b, : math.ceil(n / page)].long()
            k = x["k_pages"][pages].reshape(-1, *x["k_pages"].shape[2:])[:n]
            v = x["v_pages"][pages].reshape(-1, *x["v_pages"].shape[2:])[:n]
            keys.append((k, v))
    queries = [q[a : a + n] for a, n in zip(q_starts, q_lens, strict=False)]
    if len(set(q_lens)) == 1 and len(set(kv_lens)) == 1:
        return [
            DenseProblem(
                torch.stack(queries), torch.stack([k for k, _ in keys]), torch.stack([v for _, v in keys])
            )
        ]
    return [
        DenseProblem(qs[None], k[None].contiguous(), v[None].contiguous())
        for qs, (k, v), n in zip(queries, keys, q_lens, strict=True)
        if n > 0
    ]


def _accumulate(lens: Sequence[int]) -> list[int]:
    out, total = [], 0
    for n in lens:
        total += n
        out.append(total)
    return out


def sdpa_call(
    problems: Sequence[DenseProblem], causal: bool, backend: object, *, expand_heads: bool = False
) -> Callable[[], list[torch.Tensor]]:
    """A callable running every problem through SDPA in `backend`; outputs (B, Sq, Hq, D) each.

    Bottom-right causal (`causal_lower_right`) where q and kv lengths differ. With `expand_heads`
    the KV heads are repeated to Hq beforehand (for a backend without `enable_gqa`).
    """
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as attend

    prepared = []
    for p in problems:
        q, k, v = (t.transpose(1, 2) for t in (p.q, p.k, p.v))  # (B, H, S, D)
        if expand_heads:
            group = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        s_q, s_kv = q.shape[2], k.shape[2]
        mask = causal_lower_right(s_q, s_kv) if causal and s_q != s_kv else None
        prepared.append((q, k, v, mask, causal and s_q == s_kv))

    def run() -> list[torch.Tensor]:
        with sdpa_kernel(backend):  # type: ignore[arg-type]
            return [
                attend(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=not expand_heads)
                for q, k, v, mask, is_causal in prepared
            ]

    return run


def sdpa_output(case: Case, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """SDPA's (B, H, S, D) outputs in our output layout."""
    ours = [o.transpose(1, 2) for o in outputs]  # (B, Sq, Hq, D)
    if case.layout in (Layout.DENSE, Layout.CONTIGUOUS):
        return ours[0]
    return torch.cat([o.reshape(-1, *o.shape[2:]) for o in ours])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item())


def _backend(name: str) -> object:
    from torch.nn.attention import SDPBackend

    return {SDPA_FLASH: SDPBackend.FLASH_ATTENTION, SDPA_CUDNN: SDPBackend.CUDNN_ATTENTION}[name]


def time_sdpa(
    case: Case, x: Tensors, backends: Sequence[str], timer: Timer, ours: torch.Tensor | None
) -> tuple[dict[str, Measurement], dict[str, float]]:
    """Each of `backends` timed on `case`, and the relative error of our output `ours` (if any)
    against each backend's output."""
    if case.window or case.softcap:
        why = Measurement.unavailable("SDPA's flash and cuDNN backends take no sliding window or softcap")
        return dict.fromkeys(backends, why), {}
    try:
        problems = dense_problems(case, x)
    except Exception as error:
        return dict.fromkeys(backends, Measurement.failed(error)), {}
    results, errors = {}, {}
    for name in backends:
        results[name], output = _time_backend(case, problems, _backend(name), timer)
        if output is not None and ours is not None:
            errors[name] = relative_error(ours, sdpa_output(case, output))
    return results, errors


def _time_backend(
    case: Case, problems: Sequence[DenseProblem], backend: object, timer: Timer
) -> tuple[Measurement, list[torch.Tensor] | None]:
    note = "" if len(problems) == 1 else f"{len(problems)} SDPA calls, one per sequence"
    if case.layout in (Layout.CONTIGUOUS, Layout.PAGED):
        note = "; ".join(s for s in ("on the cache gathered to dense (gather not timed)", note) if s)
    first_error: Exception | None = None
    for expand in (False, True):
        try:
            fn = sdpa_call(problems, case.causal, backend, expand_heads=expand)
            with warnings.catch_warnings(record=True) as caught:  # torch says why a backend declines
                warnings.simplefilter("always")
                try:
                    output = fn()
                except RuntimeError as error:
                    why = "; ".join(dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught))
                    raise RuntimeError(f"{str(error).strip()} {why}".strip()[:600]) from error
            synchronize()
            ms = timer(fn)
        except Exception as error:
            first_error = first_error or error
            continue
        if expand:
            assert first_error is not None
            note = "; ".join(
                s
                for s in (
                    note,
                    f"KV heads repeated to Hq (enable_gqa: {Measurement.failed(first_error).error})",
                )
                if s
            )
        return Measurement(ms=ms, note=note), output
    assert first_error is not None
    return Measurement.failed(first_error), None
