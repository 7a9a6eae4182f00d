"""Time our attention kernels against torch SDPA (flash and cuDNN) on `cases.CASES`; write JSON.

    python3 benchmarks/bench_attention.py --out bench.json [--peer peer.json] [--also-sm80]

Our figure is the public kernel class of the device's arch (SM90 on compute
capability 9.0, SM80 on 8.x), called like an Op calls it: a custom op that
allocates its output. SDPA runs on the same tensors in (B, H, S, D) views with
`enable_gqa`; the ragged case has no varlen SDPA, so SDPA runs once per
sequence; the paged case hands SDPA the keys already gathered into a dense
cache (the gather is not timed) with a bottom-right causal mask. `--peer` folds
in TileOPs figures written by `bench_peer.py` (same cases, its own process).
Times are `triton.testing.do_bench` medians; TFLOP/s count only visible keys.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch
from cases import CASES, DTYPE, HKV, HQ, Case, D, Inputs, make_inputs
from triton.testing import do_bench  # type: ignore[import-not-found, unused-ignore]

from tileprefill.context import Arch
from tileprefill.kernels.attention_tl import (
    AttentionDenseSM80Kernel,
    AttentionDenseSM90Kernel,
    AttentionPagedSM80Kernel,
    AttentionPagedSM90Kernel,
    AttentionPagedTiledSM80Kernel,
    AttentionPagedTiledSM90Kernel,
    AttentionRaggedSM80Kernel,
    AttentionRaggedSM90Kernel,
    StaticFacts,
    prebuild,
)
from tileprefill.kernels.base import Kernel
from tileprefill.selection import pages_tile_evenly

Timed = Callable[[], torch.Tensor]


def our_kernel(case: Case, arch: Arch) -> Kernel:
    sm90 = arch is Arch.SM90
    if case.kind == "dense":
        return AttentionDenseSM90Kernel() if sm90 else AttentionDenseSM80Kernel()
    if case.kind == "ragged":
        return AttentionRaggedSM90Kernel() if sm90 else AttentionRaggedSM80Kernel()
    if pages_tile_evenly(case.page_size):
        return AttentionPagedTiledSM90Kernel() if sm90 else AttentionPagedTiledSM80Kernel()
    return AttentionPagedSM90Kernel() if sm90 else AttentionPagedSM80Kernel()


def static_facts(case: Case) -> StaticFacts:
    """What our program for `case` is compiled for (to compile every case's program up front)."""
    return StaticFacts(
        heads=HQ,
        kv_heads=HKV,
        head_dim=D,
        dtype=str(DTYPE).removeprefix("torch."),
        causal=case.causal,
        sm_scale=D**-0.5,
        page_size=case.page_size,
    )


def ours(case: Case, x: Inputs, kernel: Any) -> Timed:
    scale = x.q.shape[-1] ** -0.5
    if case.kind == "dense":
        return lambda: kernel(x.q, x.k, x.v, causal=case.causal, sm_scale=scale)
    if case.kind == "ragged":
        return lambda: kernel(
            x.q, x.k, x.v, x.cu_seqlens_q, x.cu_seqlens_kv, causal=case.causal, sm_scale=scale
        )
    return lambda: kernel(
        x.q, x.k, x.v, x.block_table, x.kv_seqlens, x.cu_seqlens_q, causal=case.causal, sm_scale=scale
    )


def sdpa(case: Case, x: Inputs, backend: Any) -> Timed:
    """SDPA on the same work, in the given backend; output in our layout (for a sanity check)."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.functional import scaled_dot_product_attention as attend

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
        """q (B, Sq, Hq, D), k/v (B, Skv, Hkv, D) -> (B, Sq, Hq, D), bottom-right causal."""
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        if case.causal and q_len != kv_len:
            mask = causal_lower_right(q_len, kv_len)
            out = attend(qt, kt, vt, attn_mask=mask, enable_gqa=True)
        else:
            out = attend(qt, kt, vt, is_causal=case.causal, enable_gqa=True)
        return out.transpose(1, 2)

    if case.kind == "dense":
        s_q, s_kv = case.q_lens[0], case.kv_lens[0]

        def dense() -> torch.Tensor:
            with sdpa_kernel(backend):
                return run(x.q, x.k, x.v, s_q, s_kv)

        return dense
    if case.kind == "ragged":
        q_off, kv_off = x.cu_seqlens_q.tolist(), x.cu_seqlens_kv.tolist()
        spans = list(zip(case.q_lens, case.kv_lens, q_off, kv_off, strict=False))

        def per_sequence() -> torch.Tensor:
            with sdpa_kernel(backend):
                outs = [
                    run(x.q[None, qo : qo + n], x.k[None, ko : ko + m], x.v[None, ko : ko + m], n, m)[0]
                    for n, m, qo, ko in spans
                ]
            return torch.cat(outs)

        return per_sequence
    # paged: gather every sequence's keys into a dense (B, kv_len, Hkv, D) cache first (untimed)
    page = case.page_size
    kv_len = case.kv_lens[0]
    assert all(n == kv_len for n in case.kv_lens) and all(n == case.q_lens[0] for n in case.q_lens)
    pages = x.block_table[:, : math.ceil(kv_len / page)].long()
    batch = len(case.kv_lens)
    k = x.k[pages].reshape(batch, -1, *x.k.shape[2:])[:, :kv_len].contiguous()
    v = x.v[pages].reshape(batch, -1, *x.v.shape[2:])[:, :kv_len].contiguous()
    q = x.q.reshape(batch, case.q_lens[0], *x.q.shape[1:])

    def gathered() -> torch.Tensor:
        with sdpa_kernel(backend):
            return run(q, k, v, case.q_lens[0], kv_len).reshape(x.q.shape)

    return gathered


def timed(name: str, fn: Timed, flops: float) -> dict[str, Any]:
    try:
        fn()
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=100, rep=400, return_mode="median")
    except Exception as exc:  # a backend that cannot run this case is a result, not a crash
        print(f"  {name:<28} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}", flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"[:500]}
    tflops = flops / ms / 1e9
    print(f"  {name:<28} {ms:8.3f} ms {tflops:7.0f} TFLOP/s", flush=True)
    return {"ms": ms, "tflops": tflops}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got.float() - want.float()).norm() / want.float().norm()).item())


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="JSON results file")
    parser.add_argument("--peer", default=None, help="TileOPs results from bench_peer.py (optional)")
    parser.add_argument("--also-sm80", action="store_true", help="on Hopper, also time the SM80 kernels")
    args = parser.parse_args()

    import tilelang
    from torch.nn.attention import SDPBackend

    device = torch.device("cuda")
    arch = Arch.of_device(device)
    peer: dict[str, Any] = {}
    if args.peer:
        try:
            with open(args.peer) as f:
                peer = json.load(f).get("cases", {})
        except OSError as exc:
            print(f"no peer results: {exc}")
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device),
        "capability": list(torch.cuda.get_device_capability(device)),
        "arch": arch.value,
        "torch": torch.__version__,
        "tilelang": tilelang.__version__,
        "command": " ".join([sys.executable, *sys.argv]),
        "cases": {},
    }
    print(f"{results['device']} ({arch.value}), torch {torch.__version__}, tilelang {tilelang.__version__}")
    archs = [arch, Arch.SM80] if args.also_sm80 and arch is Arch.SM90 else [arch]
    prebuild([(our_kernel(case, a).key, static_facts(case)) for case in CASES for a in archs])  # type: ignore[misc]
    for case in CASES:
        print(f"{case.name}: {case.flops / 1e12:.2f} TFLOP", flush=True)
        x = make_inputs(case)
        kernel = our_kernel(case, arch)
        entry: dict[str, Any] = {"flops": case.flops, "kernel": type(kernel).__name__}
        entry["ours"] = timed(f"ours ({kernel.key.value})", ours(case, x, kernel), case.flops)
        if args.also_sm80 and arch is Arch.SM90:
            sm80 = our_kernel(case, Arch.SM80)
            entry["ours_sm80"] = timed(f"ours ({sm80.key.value})", ours(case, x, sm80), case.flops)
        for label, backend in (
            ("sdpa_flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
        ):
            fn = sdpa(case, x, backend)
            entry[label] = timed(label, fn, case.flops)
            if "ms" in entry[label]:
                entry[label]["relative_error_vs_ours"] = relative_error(ours(case, x, kernel)(), fn())
        if case.name in peer:
            entry["tileops"] = peer[case.name]
            theirs = peer[case.name]
            if "ms" in theirs:
                print(f"  {'tileops (peer)':<28} {theirs['ms']:8.3f} ms {theirs['tflops']:7.0f} TFLOP/s")
        if "ms" in entry["ours"]:
            entry["speedup"] = {
                other: entry[other]["ms"] / entry["ours"]["ms"]
                for other in ("sdpa_flash", "sdpa_cudnn", "tileops", "ours_sm80")
                if other in entry and "ms" in entry[other]
            }
            print("  speedup of ours: " + ", ".join(f"{k} x{v:.2f}" for k, v in entry["speedup"].items()))
        results["cases"][case.name] = entry
        del x
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
