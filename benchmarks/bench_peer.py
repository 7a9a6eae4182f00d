"""TileOPs 0.1.0, a peer, timed in its own process on the benchmark cases; and the driver every peer
script shares (`bench_flashinfer_peer.py` imports it from beside itself).

TileOPs needs an older TileLang than ours, so it runs separately, with its own PYTHONPATH:

    PYTHONPATH=/tmp/peer:/tmp/tl python3 benchmarks/bench_peer.py --cases cases.json --out peer.json

`python -m tileprefill bench --peer-path /tmp/peer:/tmp/tl` starts it with the cases it selected
(written to JSON) and folds its JSON in.

The case definitions come from `src/tileprefill/bench/cases.py`, loaded by path: that module needs
only torch, so this process never imports tileprefill (nor our TileLang). The peer's package is
imported before torch (a missing one is reported at once). The JSON is rewritten after every case,
so a run stopped at its deadline keeps what it measured:

    {"peer": "TileOPs 0.1.0", "available": true, "reason": "", "versions": {...}, "device": "...",
     "implementations": ["tileops"], "results": {"tileops": {"<case>": {"ms": ..., "tflops": ...}}}}

A case the peer cannot run has {"error": "unavailable: ..."} instead. After its first call each
output is compared with `reference_rows` (float32, the last queries of the first sequence):
`reference_error` in its entry; for a peer that says so (`void_on_mismatch`), an output off by more
than REFERENCE_TOLERANCE is an error, not a figure.

TileOPs compiles each kernel on its first call, one at a time, through TileLang's disk cache.
`--compile-only --shard I/N` makes only those first calls, for every N-th case from the I-th, and
times nothing: the harness runs N of them side by side first (`--peer-compile-jobs N`), so the
timing process then loads every kernel from the cache.

If the peer's package does not import, the JSON says so (`available: false`) and the exit status is
0: that is a result, not a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

DEFAULT_CASES_MODULE = Path(__file__).resolve().parents[1] / "src" / "tileprefill" / "bench" / "cases.py"
#: The largest relative error of a peer's output rows against the float32 reference that still
#: counts as the same answer (bf16 and fp16 outputs of these cases come within about 5e-3).
REFERENCE_TOLERANCE = 2e-2


def load_cases_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("tileprefill_bench_cases", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the cases module {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


class Unsupported(Exception):
    """A case this peer has no Op for; its text is the reason ("unavailable: ...")."""


class Adapter(Protocol):
    """One peer's Ops on the cases."""

    #: The result keys its figures go under, one per backend it times.
    implementations: tuple[str, ...]
    #: Whether an output off the reference voids the figure (else the error is only recorded).
    void_on_mismatch: bool

    def call(self, case: Any, x: dict[str, Any], implementation: str) -> tuple[Callable[[], Any], str]:
        """The timed callable of `case` (returning the output) and a note on how it maps onto the
        peer; raises Unsupported for a case it cannot run."""
        ...


#: Loads the peer's package (raising if it does not import) and returns its adapter for a device,
#: its name with version, and the versions to record.
Loader = Callable[[str], tuple[Adapter, str, dict[str, str]]]


class TileOPs:
    """TileOPs' Ops, one instance per (layout, causal): they infer every dimension from the tensors."""

    implementations = ("tileops",)
    void_on_mismatch = False

    def __init__(self) -> None:
        self.ops: dict[tuple[str, bool], Any] = {}

    def op(self, kind: str, causal: bool) -> Any:
        if (kind, causal) not in self.ops:
            from tileops.attention import GQADenseFwdOp, GQAPagedFwdOp, GQAVarlenFwdOp

            cls = {"dense": GQADenseFwdOp, "ragged": GQAVarlenFwdOp, "paged": GQAPagedFwdOp}[kind]
            self.ops[kind, causal] = cls(is_causal=causal)
        return self.ops[kind, causal]

    def call(self, case: Any, x: dict[str, Any], implementation: str) -> tuple[Callable[[], Any], str]:
        import torch

        layout = case.layout.value
        if case.suite.value == "rope-append":
            raise Unsupported("unavailable: no RoPE + append prefill Op of TileOPs 0.1.0 is timed here")
        if case.window or case.softcap:
            raise Unsupported("unavailable: TileOPs 0.1.0's GQA Ops take no sliding window or softcap")
        if case.head_dim == 256:  # seen on H100: InternalError setting 393216 bytes of shared memory
            raise Unsupported("unavailable: TileOPs 0.1.0's GQA kernels do not launch at D 256 on sm_90")
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


def load_tileops(device: str) -> tuple[Adapter, str, dict[str, str]]:
    import tileops
    from tileops.attention import GQADenseFwdOp  # noqa: F401  (the Ops this script calls)

    tilelang = importlib.import_module("tilelang")  # the one TileOPs imported (its own version)
    version = getattr(tileops, "__version__", "0.1.0")
    return TileOPs(), f"TileOPs {version}", {"tileops": version, "tilelang": tilelang.__version__}


def write(path: Path, results: dict[str, Any]) -> None:
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(part, path)


def parse_args(description: str | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON results file")
    parser.add_argument(
        "--cases", required=True, type=Path, help="JSON list of cases (the harness writes it)"
    )
    parser.add_argument("--cases-module", type=Path, default=DEFAULT_CASES_MODULE)
    parser.add_argument(
        "--deadline-s", type=float, default=None, help="start no case after this many seconds"
    )
    parser.add_argument(
        "--compile-only", action="store_true", help="call each case once (compiling it) and time nothing"
    )
    parser.add_argument("--shard", default="0/1", help="I/N: take cases I, I + N, I + 2N, ...")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument(
        "--device", default="cuda", help="cpu: the harness's dry run (wall-clock median of 3 calls)"
    )
    return parser.parse_args()


def wall_clock(fn: Callable[[], Any], **_: object) -> float:
    """Median milliseconds of 3 calls: the timer of a run on a CPU (no CUDA events there)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def reference_error(cases_module: ModuleType, case: Any, x: dict[str, Any], output: Any) -> float | None:
    """||output rows - reference|| / ||reference|| on the case's reference rows (None: no reference)."""
    reference = cases_module.reference_rows(case, x)
    if reference is None:
        return None
    first, want = reference
    got = output.reshape(-1, case.heads, case.head_dim)[first : first + want.shape[0]].float()
    return float(((got - want).norm() / want.norm().clamp_min(1e-30)).item())


def main(load: Loader, description: str | None = __doc__) -> int:
    args = parse_args(description)
    start = time.perf_counter()
    results: dict[str, Any] = {"peer": "", "available": False, "reason": "", "results": {}}
    try:  # the peer's package first: when it is missing, nothing else needs importing
        adapter, name, versions = load(args.device)
    except Exception as exc:  # not importable here: say so, and that is the whole result
        results["reason"] = f"not importable in its process: {type(exc).__name__}: {exc}"[:500]
        write(args.out, results)
        print(results["reason"])
        return 0
    import torch

    on_gpu = args.device == "cuda"
    if on_gpu:
        from triton.testing import do_bench
    else:
        do_bench = wall_clock
    cases_module = load_cases_module(args.cases_module)
    cases = [cases_module.Case.from_json(c) for c in json.loads(args.cases.read_text())]
    index, _, count = args.shard.partition("/")
    cases = cases[int(index) :: int(count)]
    results |= {
        "peer": name,
        "available": True,
        "versions": versions | {"torch": torch.__version__},
        "device": torch.cuda.get_device_name() if on_gpu else args.device,
        "implementations": list(adapter.implementations),
        "results": {implementation: {} for implementation in adapter.implementations},
    }
    write(args.out, results)
    if not args.compile_only:
        cases_module.warm_up_gpu(args.device)  # as our process does: no case is timed at idle clocks
    for case in cases:
        if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
            results["reason"] = f"stopped at its deadline ({args.deadline_s:.0f} s)"
            break
        try:
            x = cases_module.make_inputs(case, args.device)
        except Exception as exc:
            for implementation in adapter.implementations:
                results["results"][implementation][case.name] = {"error": f"unavailable: {exc!r}"[:500]}
            continue
        for implementation in adapter.implementations:
            entry = measure(adapter, cases_module, case, x, implementation, args, do_bench)
            results["results"][implementation][case.name] = entry
            write(args.out, results)
        del x
        if on_gpu:
            torch.cuda.empty_cache()
    write(args.out, results)
    return 0


def measure(
    adapter: Adapter,
    cases_module: ModuleType,
    case: Any,
    x: dict[str, Any],
    implementation: str,
    args: argparse.Namespace,
    do_bench: Callable[..., float],
) -> dict[str, Any]:
    """One implementation's entry for one case: its figure, or why there is none."""
    import torch

    entry: dict[str, Any] = {}
    label = f"{implementation} {case.name}"
    try:
        fn, note = adapter.call(case, x, implementation)
        first = time.perf_counter()
        output = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        entry["first_call_s"] = time.perf_counter() - first
        if args.compile_only:
            print(f"{label}: compiled in {entry['first_call_s']:.1f} s", flush=True)
            return entry
        try:
            error = reference_error(cases_module, case, x, output)
        except Exception as exc:  # a check that cannot run says so, and voids nothing
            entry["reference_error"] = f"not checked: {type(exc).__name__}: {exc}"[:300]
        else:
            if error is not None:
                entry["reference_error"] = error
                if adapter.void_on_mismatch and not error <= REFERENCE_TOLERANCE:
                    return entry | {
                        "error": f"unavailable: its output is off the float32 reference (relative error "
                        f"{error:.2g} on the last rows of the first sequence)"
                    }
        ms = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="median")
        entry |= {"ms": ms, "tflops": case.flops / ms / 1e9}
        if note:
            entry["note"] = note
        print(f"{label}: {ms:.3f} ms {case.flops / ms / 1e9:.0f} TFLOP/s", flush=True)
    except Unsupported as exc:
        entry["error"] = str(exc)
    except Exception as exc:  # a peer failure is a result to report, not a crash
        traceback.print_exc(file=sys.stdout)
        entry["error"] = f"unavailable: {type(exc).__name__}: {exc}"[:500]
    return entry


if __name__ == "__main__":
    sys.exit(main(load_tileops))
