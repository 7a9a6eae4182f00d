"""What a call costs on the host, per Op: `plan` (once per batch) and `run` (once per layer).

    python3 benchmarks/call_costs.py --out costs.json

In one process, after compiling every program side by side (`recording_builds` +
`prebuild`), for every public Op on tiny inputs (GPU work of a few microseconds, so
the wall time of back-to-back calls is host time):

- `run` of a plan made once (the per-layer cost an engine pays 30-80 times a step);
- `plan` with `validate=False` (no host sync) and `validate=True` (one copy of the
  metadata to the host);
- the one-shot `op(...)`;
- torch SDPA on the same tiny input, for scale.

Then, on the chunked-prefill batches of the plan/run issue (32 x (512 cached + 128 new),
page 32; 2 x (2048 + 256), page 1), the full paged RoPE + append Op against attention
alone over the same cache (CUDA-event medians of `triton.testing.do_bench`), eager,
as one-shot calls and as `run` of a plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import tileprefill as tp
from tileprefill.cli import rope_tables
from tileprefill.kernels.compile import prebuild, recording_builds

DEV = torch.device("cuda")
HQ, HKV, D = 32, 8, 128
N_CALLS = 2000


def per_call_us(fn: Callable[[], object], calls: int = N_CALLS) -> float:
    """Wall time per call of `calls` back-to-back calls (after a warm-up), synchronised at the end."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def cumulative(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0, *[sum(lens[: i + 1]) for i in range(len(lens))]], dtype=torch.int32, device=DEV)


class Tiny:
    """Tiny inputs of every layout: 2 sequences of 5 and 11 new tokens, 20 and 3 cached, page 16."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.q_lens, self.cached = [5, 11], [20, 3]
        tokens = sum(self.q_lens)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, dtype=dtype, device=DEV)

        self.cos, self.sin = (t.to(DEV) for t in rope_tables(256, 64))
        self.dense = (randn(1, 16, HQ, D), randn(1, 16, HKV, D), randn(1, 16, HKV, D))
        self.packed = (randn(tokens, HQ, D), randn(tokens, HKV, D), randn(tokens, HKV, D))
        self.cu = cumulative(self.q_lens)
        self.cache = (randn(2, 64, HKV, D), randn(2, 64, HKV, D))
        self.cache_seqlens = torch.tensor(self.cached, dtype=torch.int32, device=DEV)
        self.kv_seqlens = torch.tensor(
            [c + n for c, n in zip(self.cached, self.q_lens, strict=True)], dtype=torch.int32, device=DEV
        )
        self.pages = (randn(8, 16, HKV, D), randn(8, 16, HKV, D))
        self.block_table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32, device=DEV)
        self.contiguous_new = (randn(2, 11, HQ, D), randn(2, 11, HKV, D), randn(2, 11, HKV, D))
        self.contiguous_lens = torch.tensor([20, 3], dtype=torch.int32, device=DEV)

    def paged_shape(self) -> tp.PagedShape:
        return tp.PagedShape(sum(self.q_lens), 16, HQ, HKV, D, self.dtype, DEV)

    def calls(
        self, validate: bool
    ) -> dict[str, tuple[Callable[[], object], Callable[[], object], Callable[[], object]]]:
        """Op name -> (one-shot call, plan, run of one plan)."""
        rope = {"rope": tp.RopeMode.NEOX, "rotary_dim": 64, "validate": validate}
        plain = {"validate": validate}
        q, k, v = self.dense
        pq, pk, pv = self.packed
        cq, ck, cv = self.contiguous_new
        kc, vc = self.cache
        kp, vp = self.pages
        dense_shape = tp.DenseShape(1, 16, 16, HQ, HKV, D, self.dtype, DEV)
        varlen_shape = tp.VarlenShape(pq.shape[0], pk.shape[0], HQ, HKV, D, self.dtype, DEV)
        contiguous_shape = tp.ContiguousShape(11, 64, HQ, HKV, D, self.dtype, DEV)
        paged = self.paged_shape()
        table: dict[str, Any] = {}

        def entry(
            name: str,
            op: Any,
            call: tuple[torch.Tensor, ...],
            plan: Callable[[], Any],
            run: tuple[torch.Tensor, ...],
        ) -> None:
            made = plan()
            table[name] = (lambda: op(*call), plan, lambda: made.run(*run))

        op: Any = tp.GQAPrefill(**plain)
        entry("GQAPrefill", op, (q, k, v), lambda op=op: op.plan(shape=dense_shape), (q, k, v))
        op = tp.GQAVarlenPrefill(**plain)
        entry(
            "GQAVarlenPrefill",
            op,
            (pq, pk, pv, self.cu, self.cu),
            lambda op=op: op.plan(self.cu, self.cu, shape=varlen_shape),
            (pq, pk, pv),
        )
        op = tp.GQARopePrefill(**rope)
        entry(
            "GQARopePrefill",
            op,
            (q, k, v, self.cos, self.sin),
            lambda op=op: op.plan(shape=dense_shape),
            (q, k, v, self.cos, self.sin),
        )
        op = tp.GQAVarlenRopePrefill(**rope)
        entry(
            "GQAVarlenRopePrefill",
            op,
            (pq, pk, pv, self.cu, self.cu, self.cos, self.sin),
            lambda op=op: op.plan(self.cu, self.cu, shape=varlen_shape),
            (pq, pk, pv, self.cos, self.sin),
        )
        op = tp.GQAContiguousCachePrefill(**plain)
        lens = self.contiguous_lens + 11
        entry(
            "GQAContiguousCachePrefill",
            op,
            (cq, kc, vc, lens),
            lambda op=op: op.plan(lens, shape=contiguous_shape),
            (cq, kc, vc),
        )
        op = tp.GQAContiguousCacheAppendPrefill(**plain)
        entry(
            "GQAContiguousCacheAppendPrefill",
            op,
            (cq, ck, cv, kc, vc, self.contiguous_lens),
            lambda op=op: op.plan(self.contiguous_lens, shape=contiguous_shape),
            (cq, ck, cv, kc, vc),
        )
        op = tp.GQAContiguousCacheRopeAppendPrefill(**rope)
        entry(
            "GQAContiguousCacheRopeAppendPrefill",
            op,
            (cq, ck, cv, kc, vc, self.contiguous_lens, self.cos, self.sin),
            lambda op=op: op.plan(self.contiguous_lens, shape=contiguous_shape),
            (cq, ck, cv, kc, vc, self.cos, self.sin),
        )
        op = tp.GQAPagedCachePrefill(**plain)
        entry(
            "GQAPagedCachePrefill",
            op,
            (pq, kp, vp, self.block_table, self.kv_seqlens, self.cu),
            lambda op=op: op.plan(self.block_table, self.kv_seqlens, self.cu, shape=paged),
            (pq, kp, vp),
        )
        op = tp.GQAPagedCacheAppendPrefill(**plain)
        entry(
            "GQAPagedCacheAppendPrefill",
            op,
            (pq, pk, pv, kp, vp, self.block_table, self.cache_seqlens, self.cu),
            lambda op=op: op.plan(self.block_table, self.cache_seqlens, self.cu, shape=paged),
            (pq, pk, pv, kp, vp),
        )
        op = tp.GQAPagedCacheRopeAppendPrefill(**rope)
        entry(
            "GQAPagedCacheRopeAppendPrefill",
            op,
            (pq, pk, pv, kp, vp, self.block_table, self.cache_seqlens, self.cu, self.cos, self.sin),
            lambda op=op: op.plan(self.block_table, self.cache_seqlens, self.cu, shape=paged),
            (pq, pk, pv, kp, vp, self.cos, self.sin),
        )
        return table


def sdpa_call(dtype: torch.dtype) -> Callable[[], object]:
    from torch.nn.functional import scaled_dot_product_attention as attend

    q = torch.randn(1, HQ, 16, D, dtype=dtype, device=DEV)
    k = torch.randn(1, HKV, 16, D, dtype=dtype, device=DEV)
    return lambda: attend(q, k, k, is_causal=True, enable_gqa=True)


def chunked(requests: int, cached: int, new: int, page: int, dtype: torch.dtype) -> dict[str, Any]:
    """Full paged RoPE + append Op vs attention alone on `requests` x (cached + new), page `page`."""
    from triton.testing import do_bench  # type: ignore[import-not-found, unused-ignore]

    pages_each = math.ceil((cached + new) / page)
    num_pages = requests * pages_each
    perm = torch.randperm(num_pages, device=DEV).to(torch.int32)
    block_table = perm.view(requests, pages_each).contiguous()
    k_pages = torch.randn(num_pages, page, HKV, D, dtype=dtype, device=DEV)
    v_pages = torch.randn_like(k_pages)
    tokens = requests * new
    q, k_new, v_new = (torch.randn(tokens, h, D, dtype=dtype, device=DEV) for h in (HQ, HKV, HKV))
    cache_seqlens = torch.full((requests,), cached, dtype=torch.int32, device=DEV)
    kv_seqlens = cache_seqlens + new
    cu = cumulative([new] * requests)
    cos, sin = (t.to(DEV) for t in rope_tables(cached + new, D))
    full = tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, validate=False)
    alone = tp.GQAPagedCachePrefill(validate=False)
    shape = tp.PagedShape(tokens, page, HQ, HKV, D, dtype, DEV, rotary_dim=D)
    plan = full.plan(block_table, cache_seqlens, cu, shape=shape)
    alone_plan = alone.plan(block_table, kv_seqlens, cu, shape=shape._replace(rotary_dim=0))
    pairs = requests * sum(min(cached + new, cached + i + 1) for i in range(new))
    flops = 4.0 * D * HQ * pairs
    times = {
        "full_op_one_shot": do_bench(
            lambda: full(q, k_new, v_new, k_pages, v_pages, block_table, cache_seqlens, cu, cos, sin),
            warmup=50,
            rep=300,
            return_mode="median",
        ),
        "full_op_run": do_bench(
            lambda: plan.run(q, k_new, v_new, k_pages, v_pages, cos, sin),
            warmup=50,
            rep=300,
            return_mode="median",
        ),
        "attention_alone_one_shot": do_bench(
            lambda: alone(q, k_pages, v_pages, block_table, kv_seqlens, cu),
            warmup=50,
            rep=300,
            return_mode="median",
        ),
        "attention_alone_run": do_bench(
            lambda: alone_plan.run(q, k_pages, v_pages), warmup=50, rep=300, return_mode="median"
        ),
    }
    result: dict[str, Any] = {
        "case": f"{requests} x ({cached} cached + {new} new), page {page}",
        "plan": str(plan.plan),
        "ms": times,
        "tflops": {name: flops / ms / 1e9 for name, ms in times.items()},
        "full_over_alone_one_shot": times["attention_alone_one_shot"] / times["full_op_one_shot"],
        "full_over_alone_run": times["attention_alone_run"] / times["full_op_run"],
    }
    if PROFILE_LINES is not None:
        PROFILE_LINES.append(f"== kernels of one run of the full Op, {result['case']}")
        PROFILE_LINES.append(kernel_table(lambda: plan.run(q, k_new, v_new, k_pages, v_pages, cos, sin)))
    print(json.dumps(result), flush=True)
    return result


#: With --profile: the text of each profile, written at the end.
PROFILE_LINES: list[str] | None = None


def kernel_table(fn: Callable[[], object]) -> str:
    """GPU time per kernel of 20 calls of `fn` (torch.profiler), after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    return str(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))


def host_profile(name: str, fn: Callable[[], object], calls: int = 300, order: str = "cumulative") -> str:
    """Where the host time of `fn` goes (cProfile, sorted by `order`), after a warm-up."""
    import cProfile
    import io
    import pstats

    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(30)
    return f"== host profile of {calls} calls of {name}, by {order} time\n{text.getvalue()}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16"])
    parser.add_argument(
        "--profile", help="also write host profiles of the paged plans and the chunked runs' kernels here"
    )
    args = parser.parse_args()
    global PROFILE_LINES
    PROFILE_LINES = [] if args.profile else None
    import tilelang

    dtype = getattr(torch, args.dtype)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tilelang": tilelang.__version__,
        "cpus": len(os.sched_getaffinity(0)),
        "command": " ".join([sys.executable, *sys.argv]),
        "dtype": args.dtype,
        "per_call_us": {},
        "chunked": [],
    }
    tiny = Tiny(dtype)
    start = time.perf_counter()
    with recording_builds() as requests:
        for validate in (False, True):
            for call, _, _ in tiny.calls(validate).values():
                call()
    # The chunked batches use the same programs as the tiny paged calls, but for page sizes 32 and 1.
    with recording_builds() as more:
        for page in (32, 1):
            for op in (
                tp.GQAPagedCacheRopeAppendPrefill(rope=tp.RopeMode.NEOX, validate=False),
                tp.GQAPagedCachePrefill(validate=False),
            ):
                shape = tp.PagedShape(16, page, HQ, HKV, D, dtype, DEV, rotary_dim=D if op.rotates else 0)
                lens = torch.tensor([3, 5], dtype=torch.int32, device=DEV)
                op.plan(
                    torch.zeros(2, 8, dtype=torch.int32, device=DEV), lens, cumulative([6, 10]), shape=shape
                )
    prebuild([*requests, *more])
    report["compile_s"] = time.perf_counter() - start
    print(f"compiled {len(set(requests) | set(more))} programs in {report['compile_s']:.0f} s", flush=True)

    report["per_call_us"]["sdpa"] = per_call_us(sdpa_call(dtype))
    for validate in (False, True):
        for name, (call, plan, run) in tiny.calls(validate).items():
            row = report["per_call_us"].setdefault(name, {})
            if not validate:
                row["run"] = per_call_us(run)
                row["plan_validate_false"] = per_call_us(plan, 500)
                row["one_shot_validate_false"] = per_call_us(call, 500)
            else:
                row["plan_validate_true"] = per_call_us(plan, 500)
                row["one_shot_validate_true"] = per_call_us(call, 500)
            print(name, row, flush=True)
    if PROFILE_LINES is not None:
        for validate in (False, True):
            _, plan, _ = tiny.calls(validate)["GQAPagedCacheRopeAppendPrefill"]
            PROFILE_LINES.append(
                host_profile(f"GQAPagedCacheRopeAppendPrefill.plan validate={validate}", plan)
            )
        # `run`, by own time: the launches' TVM-FFI entries (C) against the Python and torch around them.
        for name in ("GQAPrefill", "GQAPagedCachePrefill", "GQAPagedCacheRopeAppendPrefill"):
            _, _, run = tiny.calls(False)[name]
            PROFILE_LINES.append(host_profile(f"{name}.run", run, 2000, order="tottime"))
    for requests_, cached, new, page in ((32, 512, 128, 32), (2, 2048, 256, 1)):
        report["chunked"].append(chunked(requests_, cached, new, page, dtype))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    if args.profile and PROFILE_LINES is not None:
        with open(args.profile, "w") as f:
            f.write("\n\n".join(PROFILE_LINES))
    sdpa = report["per_call_us"]["sdpa"]
    print(f"\nper call, us (SDPA {sdpa:.1f}):")
    print(f"{'op':<38}{'run':>8}{'plan':>8}{'plan+v':>8}{'once':>8}{'once+v':>8}  run/SDPA")
    for name, row in report["per_call_us"].items():
        if name == "sdpa":
            continue
        print(
            f"{name:<38}{row['run']:8.1f}{row['plan_validate_false']:8.1f}{row['plan_validate_true']:8.1f}"
            f"{row['one_shot_validate_false']:8.1f}{row['one_shot_validate_true']:8.1f}"
            f"  {row['run'] / sdpa:.2f}"
        )
    for c in report["chunked"]:
        print(
            f"{c['case']}: full/alone one-shot {c['full_over_alone_one_shot']:.3f}, "
            f"run {c['full_over_alone_run']:.3f}; {c['tflops']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
