"""TileOPs 0.1.0, the peer, timed in its own process on the benchmark cases.

TileOPs needs an older TileLang than ours, so it runs separately, with its own PYTHONPATH:

    PYTHONPATH=/tmp/peer:/tmp/tl python3 benchmarks/bench_peer.py --out peer.json [--cases cases.json]

`python -m tileprefill bench --peer-path /tmp/peer:/tmp/tl` starts it with the cases it
selected (--cases, written by the harness) and folds its JSON in. Without --cases it times
the README's four cases.

The case definitions come from `src/tileprefill/bench/cases.py`, loaded by path: that
module needs only torch, so this process never imports tileprefill (nor our TileLang).
torch is imported after TileOPs (a missing TileOPs is reported at once).
The JSON is rewritten after every case, so a run stopped at its deadline keeps what it
measured.

TileOPs compiles each kernel on its first call, one at a time, through TileLang's disk cache.
`--compile-only --shard I/N` makes only those first calls, for every N-th case from the I-th, and
times nothing: the harness runs N of them side by side first (`--peer-compile-jobs N`), so the
timing process then loads every kernel from the cache.

If TileOPs does not import, the JSON says so (`available: false`) and the exit status is 0: that
is a result, not a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

DEFAULT_CASES_MODULE = Path(__file__).resolve().parents[1] / "src" / "tileprefill" / "bench" / "cases.py"
README_CASES = (
    "dense_s4096_noncausal",
    "dense_s8192_causal",
    "paged_8x4096+512_p64",
    "ragged_8_256..4096_causal",
)


def load_cases_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("tileprefill_bench_cases", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the cases module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


class Unsupported(Exception):
    """A case this peer has no Op for."""


class Peer:
    """TileOPs' Ops, one instance per (layout, causal): they infer every dimension from the tensors."""

    def __init__(self, cases: ModuleType) -> None:
        self.cases = cases
        self.ops: dict[tuple[str, bool], Any] = {}

    def op(self, kind: str, causal: bool) -> Any:
        if (kind, causal) not in self.ops:
            from tileops.attention import GQADenseFwdOp, GQAPagedFwdOp, GQAVarlenFwdOp

            cls = {"dense": GQADenseFwdOp, "ragged": GQAVarlenFwdOp, "paged": GQAPagedFwdOp}[kind]
            self.ops[kind, causal] = cls(is_causal=causal)
        return self.ops[kind, causal]

    def call(self, case: Any, x: dict[str, Any]) -> tuple[Any, str]:
        """The timed callable of `case` and a note on how it maps onto TileOPs."""
        import torch

        layout = case.layout.value
        if case.suite.value == "rope-append":
            raise Unsupported("unavailable: no RoPE + append prefill Op of TileOPs 0.1.0 is timed here")
        if getattr(case, "window", 0) or getattr(case, "softcap", 0.0):
            raise Unsupported("unavailable: TileOPs 0.1.0's GQA Ops take no sliding window or softcap")
        if layout == "dense":
            op = self.op("dense", case.causal)
            return (lambda: op(x["q"], x["k"], x["v"])), ""
        if layout == "ragged":
            op = self.op("ragged", case.causal)
            return (lambda: op(x["q"], x["k"], x["v"], x["cu_seqlens_q"], x["cu_seqlens_kv"])), ""
        op = self.op("paged", case.causal)
        if layout == "paged":
            args = (x["q"], x["k_pages"], x["v_pages"], x["block_table"], x["kv_seqlens"], x["cu_seqlens_q"])
            return (lambda: op(*args)), ""
        # contiguous: the (B, S_max, Hkv, D) cache is B pages of S_max tokens, one per sequence
        batch, s_q = x["q"].shape[:2]
        device = x["q"].device
        table = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * s_q
        q = x["q"].reshape(batch * s_q, *x["q"].shape[2:])
        args = (q, x["k_cache"], x["v_cache"], table, x["kv_seqlens"], cu_q)
        return (lambda: op(*args)), "TileOPs paged Op over the contiguous cache, one page per sequence"


def write(path: Path, results: dict[str, Any]) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(part, path)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON results file")
    parser.add_argument("--cases", type=Path, help="JSON list of cases (the harness writes it)")
    parser.add_argument("--cases-module", type=Path, default=DEFAULT_CASES_MODULE)
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="start no case after this many seconds"
    )
    parser.add_argument(
        "--compile-only", action="store_true", help="call each case once (compiling it) and time nothing"
    )
    parser.add_argument("--shard", default="0/1", help="I/N: take cases I, I + N, I + 2N, ...")
    parser.add_argument("--warmup-ms", type=int, default=100)
    parser.add_argument("--rep-ms", type=int, default=400)
    args = parser.parse_args()
    start = time.perf_counter()
    results: dict[str, Any] = {"peer": "TileOPs 0.1.0", "available": False, "reason": "", "cases": {}}
    try:  # TileOPs first: when it is missing, nothing else needs importing
        import tileops
        from tileops.attention import GQADenseFwdOp  # noqa: F401  (the Ops this script calls)
    except Exception as exc:  # not importable here: say so, and that is the whole result
        results["reason"] = f"not importable in its process: {type(exc).__name__}: {exc}"[:500]
        write(args.out, results)
        print(results["reason"])
        return 0
    import tilelang
    import torch
    from triton.testing import do_bench

    cases_module = load_cases_module(args.cases_module)
    if args.cases is not None:
        cases = [cases_module.Case.from_json(c) for c in json.loads(args.cases.read_text())]
    else:
        by_name = {c.name: c for c in cases_module.default_cases()}
        cases = [by_name[n] for n in README_CASES]
    index, _, count = args.shard.partition("/")
    cases = cases[int(index) :: int(count)]
    version = getattr(tileops, "__version__", "0.1.0")
    results |= {
        "peer": f"TileOPs {version}",
        "available": True,
        "versions": {"tileops": version, "tilelang": tilelang.__version__, "torch": torch.__version__},
        "device": torch.cuda.get_device_name(),
    }
    write(args.out, results)
    peer = Peer(cases_module)
    if not args.compile_only:
        cases_module.warm_up_gpu("cuda")  # as our process does: no case is timed at idle clocks
    for case in cases:
        if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
            results["reason"] = f"stopped at its deadline ({args.deadline_s:.0f} s)"
            break
        entry: dict[str, Any] = {}
        try:
            fn, note = peer.call(case, cases_module.make_inputs(case, "cuda"))
            first = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            entry["first_call_s"] = time.perf_counter() - first
            if args.compile_only:
                print(f"tileops {case.name}: compiled in {entry['first_call_s']:.1f} s", flush=True)
                results["cases"][case.name] = entry
                write(args.out, results)
                continue
            ms = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
            entry |= {"ms": ms, "tflops": case.flops / ms / 1e9}
            if note:
                entry["note"] = note
            print(f"tileops {case.name}: {ms:.3f} ms {case.flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        except Unsupported as exc:
            entry["error"] = str(exc)
        except Exception as exc:  # a peer failure is a result to report, not a crash
            traceback.print_exc(file=sys.stdout)
            entry["error"] = f"unavailable: {type(exc).__name__}: {exc}"[:500]
        results["cases"][case.name] = entry
        write(args.out, results)
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
