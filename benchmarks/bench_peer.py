"""TileOPs 0.1.0, the peer, timed on `cases.CASES`, in its own process.

TileOPs needs an older TileLang than ours, so it runs separately:
    PYTHONPATH=/tmp/peer:/tmp/tl:benchmarks python3 benchmarks/bench_peer.py --out peer.json
and `bench_attention.py --peer peer.json` folds its figures into the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch
from cases import CASES, Case, Inputs, make_inputs
from triton.testing import do_bench


def peer_call(case: Case, x: Inputs):  # type: ignore[no-untyped-def]
    from tileops.attention import GQADenseFwdOp, GQAPagedFwdOp, GQAVarlenFwdOp

    if case.kind == "dense":
        op = GQADenseFwdOp(is_causal=case.causal)
        return lambda: op(x.q, x.k, x.v)
    if case.kind == "ragged":
        op = GQAVarlenFwdOp(is_causal=case.causal)
        return lambda: op(x.q, x.k, x.v, x.cu_seqlens_q, x.cu_seqlens_kv)
    op = GQAPagedFwdOp(is_causal=case.causal)
    return lambda: op(x.q, x.k, x.v, x.block_table, x.kv_seqlens, x.cu_seqlens_q)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import tileops

    results = {"peer": f"tileops {getattr(tileops, '__version__', '0.1.0')}", "cases": {}}
    for case in CASES:
        try:
            fn = peer_call(case, make_inputs(case))
            fn()
            torch.cuda.synchronize()
            ms = do_bench(fn, warmup=100, rep=400, return_mode="median")
            results["cases"][case.name] = {"ms": ms, "tflops": case.flops / ms / 1e9}
            print(f"tileops {case.name}: {ms:.3f} ms {case.flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        except Exception as exc:  # a peer failure is a result to report, not a crash
            traceback.print_exc(file=sys.stdout)
            results["cases"][case.name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
