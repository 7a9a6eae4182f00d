"""What a call costs on the host: the first call's compile, and every later call's launch.

    python3 benchmarks/call_costs.py --out costs.json

Runs the engine-style Op `GQAPagedCacheRopeAppendPrefill` (RoPE of q and keys,
append into a paged cache, attention: four kernel launches) and the plain dense
`GQAPrefill` on tiny inputs, each in two fresh processes sharing one new,
empty TileLang cache directory:

- process 1 pays the whole build: import, lowering, nvcc (empty disk cache);
- process 2 finds TileLang's disk cache warm and only loads the programs.

In each process the first call is timed, then 2000 back-to-back calls with no
synchronisation: on inputs this small the GPU work is a few microseconds, so
the loop's wall time per call is what the host spends in Python, dispatch and
launches. `validate=False` is the engine setting (no device-value checks, no
host syncs); `validate=True` reads lengths and page tables back to check them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

N_CALLS = 2000


def _paged_rope_append_call(validate: bool) -> Callable[[], Any]:
    import torch

    import tileprefill as tp
    from tileprefill.cli import rope_tables

    dev, dtype = torch.device("cuda"), torch.bfloat16
    hq, hkv, d, page = 8, 2, 128, 16
    q_lens, cached = [5, 11], [20, 3]
    tokens = sum(q_lens)
    cos, sin = (t.to(dev) for t in rope_tables(256, 64))
    k_pages = torch.zeros(8, page, hkv, d, dtype=dtype, device=dev)
    inputs = (
        torch.randn(tokens, hq, d, dtype=dtype, device=dev),
        torch.randn(tokens, hkv, d, dtype=dtype, device=dev),
        torch.randn(tokens, hkv, d, dtype=dtype, device=dev),
        k_pages,
        torch.zeros_like(k_pages),
        torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=dev),
        torch.tensor(cached, dtype=torch.int32, device=dev),
        torch.tensor([0, q_lens[0], tokens], dtype=torch.int32, device=dev),
        cos,
        sin,
    )
    op = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, rotary_dim=64, validate=validate)
    return lambda: op(*inputs)


def _dense_call(validate: bool) -> Callable[[], Any]:
    import torch

    import tileprefill as tp

    dev, dtype = torch.device("cuda"), torch.float16
    q = torch.randn(1, 16, 32, 128, dtype=dtype, device=dev)
    k = torch.randn(1, 16, 8, 128, dtype=dtype, device=dev)
    op = tp.GQAPrefill(causal=True, validate=validate)
    return lambda: op(q, k, k)


CALLS = {"paged_rope_append": _paged_rope_append_call, "dense": _dense_call}


def child(name: str) -> dict[str, Any]:
    """Time one Op's first call and its steady calls in this (fresh) process."""
    start = time.perf_counter()
    import torch

    results: dict[str, Any] = {}
    for validate in (False, True):
        call = CALLS[name](validate)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(50):
            call()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(N_CALLS):
            call()
        torch.cuda.synchronize()
        per_call = (time.perf_counter() - t0) / N_CALLS
        results[f"validate={validate}"] = {"first_call_s": first, "per_call_us": per_call * 1e6}
    results["process_s"] = time.perf_counter() - start
    return results


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--child", choices=sorted(CALLS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return 0

    import tilelang
    import torch

    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tilelang": tilelang.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "command": " ".join([sys.executable, *sys.argv]),
        "calls": {},
    }
    for name in CALLS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TILELANG_CACHE_DIR": cache}
            runs = []
            for label in ("empty disk cache", "warm disk cache"):
                done = subprocess.run(
                    [sys.executable, __file__, "--out", "-", "--child", name],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                runs.append({"process": label, **json.loads(done.stdout.strip().splitlines()[-1])})
                print(name, runs[-1], flush=True)
            report["calls"][name] = runs
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
