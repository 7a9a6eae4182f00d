"""The workload `test_sanitize_gpu.py` runs under compute-sanitizer: one process, every case in turn.

    python tests/gpu/sanitize_workload.py --prebuild     # compile every program it needs (warm cache)
    python tests/gpu/sanitize_workload.py --run          # run every case (what each tool runs)
    python tests/gpu/sanitize_workload.py --list

Cases, all small (a sanitizer makes every launch orders of magnitude slower):

- `op/...`: every (public Op, configuration) pair of the pool in `reliability.py`, checked against
  the reference Op on CPU. Together they launch every TileLang kernel key an SM90 device plans: all
  five attention sources (dense, ragged, contiguous, paged with page sizes 1, 5 and 48, paged-tiled
  with 16, 64 and 256), both RoPE modes with partial rotary, both fused RoPE + append keys, both
  append keys and the batch key; head dims 64/128/256, fp16 and bf16, causal and not, a zero-length
  sequence in every batch of two or more.
- `sm80/...`: the SM80 attention kernel of every source, called directly (an SM90 device never plans
  them; their build carries sm_90 code, so they run here too).
- `validate-off/<group>/...`: Ops built with `validate=False` fed out-of-range block-table entries
  and lengths. What must hold: no write outside the caches (guard rows around them keep a
  sentinel), a cache row changes only where a valid destination says (position >= 0, inside the
  block table, entry in [0, num_pages)), and, under memcheck, no access outside any allocation (the
  test disables torch's caching allocator, so every tensor is an allocation of its own). Groups:
  `entries` (entries -1 and past the pool, negative lengths, every length within capacity);
  `past-capacity` (lengths past max_pages * page_size or S_max) and `int32-slot` (entries whose slot
  overflows int32) failed on 2026-12-01 before their fixes; they stay out of `--run`
  unless `--only` names them (`SEPARATE`), so that a regression there, which ends the process's CUDA
  context, cannot hide the other cases' results: each has a test of its own.

Each case prints `CASE <id>` before it runs and `ok`/`FAIL` after it (the sanitizer's reports fall
between), then `workload: <n> cases, <f> failures`; the exit code is 1 if any case failed.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from typing import Any

import reliability as rel
import torch

import tileprefill as tp
from tileprefill.kernels import attention_tl, reference
from tileprefill.kernels.compile import prebuild, recording_builds
from tileprefill.ops import OpClass

DEV = torch.device("cuda")
SENTINEL = 7.0  # guard rows around a cache hold this; no kernel output or input row does


def op_cases() -> list[tuple[str, rel.Check]]:
    cases: list[tuple[str, rel.Check]] = []
    for i, (op_cls, cfg) in enumerate(rel.POOL):
        call = rel.build_call(op_cls, cfg, random.Random(1000 + i), small=True)
        cases.append((f"op/{op_cls.__name__}/{cfg.name}", _check(call)))
    return cases


def _check(call: rel.Call) -> rel.Check:
    return lambda: rel.check_against_reference(call, DEV)


# ------------------------------------------------------------------------------------ SM80 kernels

_SM80: dict[str, tuple[OpClass, int, type[Any], type[Any]]] = {
    # source: (a read-only Op of the layout, its pool configuration index, the SM80 kernel, the reference)
    "dense": (tp.GQAPrefill, 0, attention_tl.AttentionDenseSM80Kernel, reference.AttentionDenseRefKernel),
    "ragged": (
        tp.GQAVarlenPrefill,
        1,
        attention_tl.AttentionRaggedSM80Kernel,
        reference.AttentionRaggedRefKernel,
    ),
    "contiguous": (
        tp.GQAContiguousCachePrefill,
        0,
        attention_tl.AttentionContiguousSM80Kernel,
        reference.AttentionContiguousRefKernel,
    ),
    "paged": (
        tp.GQAPagedCachePrefill,
        1,
        attention_tl.AttentionPagedSM80Kernel,
        reference.AttentionPagedRefKernel,
    ),
    "paged_tiled": (
        tp.GQAPagedCachePrefill,
        3,
        attention_tl.AttentionPagedTiledSM80Kernel,
        reference.AttentionPagedRefKernel,
    ),
}


def sm80_calls() -> list[tuple[str, rel.Call, Any, Any]]:
    out = []
    for n, (source, (op_cls, index, kernel, ref)) in enumerate(_SM80.items()):
        cfg = rel.configs_of(op_cls)[index]
        call = rel.build_call(op_cls, cfg, random.Random(2000 + n), small=True)
        out.append((f"sm80/{source}/{cfg.name}", call, kernel(), ref()))
    return out


def sm80_cases() -> list[tuple[str, rel.Check]]:
    def check(
        call: rel.Call, kernel: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor]
    ) -> rel.Check:
        def run() -> str | None:
            scale = call.cfg.head_dim**-0.5
            want = ref(*call.cpu_inputs().values(), causal=call.cfg.causal, sm_scale=scale)
            rel.poison_allocator(DEV)
            got = kernel(*call.gpu_inputs(DEV).values(), causal=call.cfg.causal, sm_scale=scale)
            torch.cuda.synchronize()
            return rel.close(got, want, rel.ATOL[call.cfg.dtype], rel.RTOL[call.cfg.dtype])

        return run

    return [(name, check(call, kernel, ref)) for name, call, kernel, ref in sm80_calls()]


# -------------------------------------------------------------------------------- validate=False


def guarded(
    shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, cache): a random cache of `shape` in the middle of a buffer with one guard block of
    SENTINEL rows before it and one after it (the cache is a contiguous, aligned view)."""
    lead, *rest = shape
    buffer = torch.full((lead + 2, *rest), SENTINEL, dtype=dtype)
    buffer[1 : lead + 1] = torch.randn(shape, generator=gen).to(dtype)
    return buffer, buffer[1 : lead + 1]


def _guards_intact(buffer: torch.Tensor) -> bool:
    return bool((buffer[0] == SENTINEL).all()) and bool((buffer[-1] == SENTINEL).all())


def paged_append_off(op_cls: OpClass, cfg: rel.Config, group: str) -> rel.Check:
    """Paged append with validate=False. `group` "entries": entries -1 and past the pool, a negative
    cache length, every sequence within the table's capacity; "past-capacity": the last sequence's
    new keys run past the table (attention then sees kv_seqlens past the capacity); "int32-slot":
    entries 2**30 and 2**28 + 1, whose slot (entry * page_size + row) overflows int32 for page size 16.
    """

    def run() -> str | None:
        ps, hkv, dim, dtype = cfg.page_size, cfg.kv_heads, cfg.head_dim, cfg.dtype
        gen = torch.Generator().manual_seed(5)
        width, num_pages = 4, 8
        capacity = width * ps
        if group == "int32-slot":
            # Sequences 0 and 1 name no page of the pool; sequence 2 owns pages 0 and 1, where the
            # wrapped slots of 2**30 * 16 (row 0) and (2**28 + 1) * 16 (row 16) would land.
            q_lens, cache_seqlens = [ps, ps, 3], [0, 0, 2]
            table = [[2**30, -1, -1, -1], [2**28 + 1, -1, -1, -1], [0, 1, 2, 3]]
        else:
            # seq 0 from position 5 over entries 0, 5, -1 and one past the pool; seq 1 from -3 (its
            # first page is past the pool); seq 2 fills its table to the end ("entries") or runs 5
            # keys past it ("past-capacity").
            q_lens = [2 * ps, 9, ps + (5 if group == "past-capacity" else 0)]
            cache_seqlens = [5, -3, capacity - ps]
            table = [[0, 5, -1, num_pages + 7], [num_pages, 1, 2, 3], [3, 4, 6, num_pages + 2]]
        tq = sum(q_lens)
        k_buf, k_pages = guarded((num_pages, ps, hkv, dim), dtype, gen)
        v_buf, v_pages = guarded((num_pages, ps, hkv, dim), dtype, gen)
        k_new = torch.randn(tq, hkv, dim, generator=gen).to(dtype)
        v_new = torch.randn(tq, hkv, dim, generator=gen).to(dtype)
        q = torch.randn(tq, cfg.heads, dim, generator=gen).to(dtype)
        # Where the contract lets a token land: position >= 0, inside the table, entry in the pool.
        k_want, v_want = k_pages.clone(), v_pages.clone()
        dest = torch.zeros(num_pages, ps, dtype=torch.bool)
        token = 0
        for b, n in enumerate(q_lens):
            for i in range(n):
                pos = cache_seqlens[b] + i
                col = pos // ps
                if pos >= 0 and col < width and 0 <= table[b][col] < num_pages:
                    page, row = table[b][col], pos % ps
                    dest[page, row] = True
                    k_want[page, row], v_want[page, row] = k_new[token], v_new[token]
                token += 1
        inputs: dict[str, torch.Tensor] = {
            "q": q,
            "k_new": k_new,
            "v_new": v_new,
            "k_pages": k_pages,
            "v_pages": v_pages,
            "block_table": torch.tensor(table, dtype=torch.int32),
            "cache_seqlens": torch.tensor(cache_seqlens, dtype=torch.int32),
            "cu_seqlens_q": rel.cumulative(q_lens),
        }
        if op_cls.rotates:
            # 8 rows: most positions are past the table too.
            inputs |= dict(zip(("cos", "sin"), rel.rope_tables(8, cfg.rotary), strict=True))
        bufs = {"k_pages": k_buf.to(DEV), "v_pages": v_buf.to(DEV)}
        gpu = {n: t.to(DEV) for n, t in inputs.items()}
        gpu["k_pages"], gpu["v_pages"] = bufs["k_pages"][1:-1], bufs["v_pages"][1:-1]
        rel.make_op(op_cls, cfg, validate=False)(*gpu.values())
        torch.cuda.synchronize()
        for name, buf in bufs.items():
            if not _guards_intact(buf.cpu()):
                return f"{name}: a guard page around the cache changed: a write outside the cache"
        k_got, v_got = gpu["k_pages"].cpu(), gpu["v_pages"].cpu()
        if not rel.same_bits(v_got, v_want):
            changed = (rel.bits(v_got) != rel.bits(v_want)).reshape(num_pages, ps, -1).any(-1)
            rows = changed.nonzero().tolist()
            return f"v_pages: (page, row)s {rows} differ from the contract ({int(dest.sum())} valid rows)"
        if not rel.same_bits(k_got[~dest], k_want[~dest]):
            return "k_pages: a row that is no valid destination changed"
        if not op_cls.rotates and not rel.same_bits(k_got, k_want):
            return "k_pages: a valid destination row differs from k_new"
        return None

    return run


def contiguous_append_off(op_cls: OpClass, cfg: rel.Config, group: str) -> rel.Check:
    """Contiguous append with validate=False: a negative cache length, and ("past-capacity") new keys
    past S_max."""

    def run() -> str | None:
        hkv, dim, dtype = cfg.kv_heads, cfg.head_dim, cfg.dtype
        gen = torch.Generator().manual_seed(6)
        batch, s_q, s_max = 3, 12, 40
        cache_seqlens = [-5, 34 if group == "past-capacity" else 28, 10]
        k_buf, k_cache = guarded((batch, s_max, hkv, dim), dtype, gen)
        v_buf, v_cache = guarded((batch, s_max, hkv, dim), dtype, gen)
        k_new = torch.randn(batch, s_q, hkv, dim, generator=gen).to(dtype)
        v_new = torch.randn(batch, s_q, hkv, dim, generator=gen).to(dtype)
        k_want, v_want = k_cache.clone(), v_cache.clone()
        dest = torch.zeros(batch, s_max, dtype=torch.bool)
        for b, c in enumerate(cache_seqlens):
            for i in range(s_q):
                if 0 <= c + i < s_max:
                    dest[b, c + i] = True
                    k_want[b, c + i], v_want[b, c + i] = k_new[b, i], v_new[b, i]
        inputs: dict[str, torch.Tensor] = {
            "q": torch.randn(batch, s_q, cfg.heads, dim, generator=gen).to(dtype),
            "k_new": k_new,
            "v_new": v_new,
            "k_cache": k_cache,
            "v_cache": v_cache,
            "cache_seqlens": torch.tensor(cache_seqlens, dtype=torch.int32),
        }
        if op_cls.rotates:
            inputs |= dict(zip(("cos", "sin"), rel.rope_tables(16, cfg.rotary), strict=True))
        bufs = {"k_cache": k_buf.to(DEV), "v_cache": v_buf.to(DEV)}
        gpu = {n: t.to(DEV) for n, t in inputs.items()}
        gpu["k_cache"], gpu["v_cache"] = bufs["k_cache"][1:-1], bufs["v_cache"][1:-1]
        rel.make_op(op_cls, cfg, validate=False)(*gpu.values())
        torch.cuda.synchronize()
        for name, buf in bufs.items():
            if not _guards_intact(buf.cpu()):
                return f"{name}: a guard row around the cache changed: a write outside the cache"
        k_got, v_got = gpu["k_cache"].cpu(), gpu["v_cache"].cpu()
        if not rel.same_bits(v_got, v_want):
            return "v_cache: differs from the contract (valid destinations only)"
        if not rel.same_bits(k_got[~dest], k_want[~dest]):
            return "k_cache: a row that is no valid destination changed"
        if not op_cls.rotates and not rel.same_bits(k_got, k_want):
            return "k_cache: a valid destination row differs from k_new"
        return None

    return run


def read_only_off(op_cls: OpClass, cfg: rel.Config) -> rel.Check:
    """Read-only cache Ops with validate=False: lengths past the capacity (the last sequence's too,
    so a read past the block table's or cache's end leaves the allocation), negative lengths, bad
    page entries. Only memory safety is asked of these calls (memcheck); inputs stay unchanged."""

    def run() -> str | None:
        dtype, dim = cfg.dtype, cfg.head_dim
        gen = torch.Generator().manual_seed(7)
        q_lens = [7, 0, 5]
        inputs: dict[str, torch.Tensor]
        if op_cls.kv_layout is tp.KVLayout.PAGED:
            ps, width, num_pages = cfg.page_size, 2, 6
            inputs = {
                "q": torch.randn(sum(q_lens), cfg.heads, dim, generator=gen).to(dtype),
                "k_pages": torch.randn(num_pages, ps, cfg.kv_heads, dim, generator=gen).to(dtype),
                "v_pages": torch.randn(num_pages, ps, cfg.kv_heads, dim, generator=gen).to(dtype),
                "block_table": torch.tensor([[0, -1], [2**30, 1], [num_pages, 3]], dtype=torch.int32),
                "kv_seqlens": torch.tensor([ps + 2, -4, width * ps + 37], dtype=torch.int32),
                "cu_seqlens_q": rel.cumulative(q_lens),
            }
        else:
            batch, s_q, s_max = 3, 6, 20
            inputs = {
                "q": torch.randn(batch, s_q, cfg.heads, dim, generator=gen).to(dtype),
                "k_cache": torch.randn(batch, s_max, cfg.kv_heads, dim, generator=gen).to(dtype),
                "v_cache": torch.randn(batch, s_max, cfg.kv_heads, dim, generator=gen).to(dtype),
                "kv_seqlens": torch.tensor([3, -7, s_max + 50], dtype=torch.int32),
            }
        gpu = {n: t.to(DEV) for n, t in inputs.items()}
        rel.make_op(op_cls, cfg, validate=False)(*gpu.values())
        torch.cuda.synchronize()
        for name, t in inputs.items():
            if not rel.same_bits(gpu[name], t):
                return f"{name}: an input the Op only reads changed"
        return None

    return run


def validate_off_cases() -> list[tuple[str, rel.Check]]:
    """The validate=False cases, by group (see `paged_append_off`); contiguous ones first in each
    group, so that a paged case's memcheck report (which ends the process's CUDA context) does not
    hide them."""
    paged = rel.configs_of(tp.GQAPagedCachePrefill)
    contiguous = rel.configs_of(tp.GQAContiguousCachePrefill)[0]
    paged_appends: tuple[OpClass, ...] = (tp.GQAPagedCacheAppendPrefill, tp.GQAPagedCacheRopeAppendPrefill)
    contiguous_appends: tuple[OpClass, ...] = (
        tp.GQAContiguousCacheAppendPrefill,
        tp.GQAContiguousCacheRopeAppendPrefill,
    )
    cases: list[tuple[str, rel.Check]] = []
    for group in ("entries", "past-capacity"):
        for op_cls in contiguous_appends:
            name = f"validate-off/{group}/{op_cls.__name__}/{contiguous.name}"
            cases.append((name, contiguous_append_off(op_cls, contiguous, group)))
        if group == "past-capacity":
            name = f"validate-off/{group}/GQAContiguousCachePrefill/{contiguous.name}"
            cases.append((name, read_only_off(tp.GQAContiguousCachePrefill, contiguous)))
        for op_cls in paged_appends:
            for cfg in (paged[1], paged[3]):  # page 5 (gathered) and page 16 (tiled)
                name = f"validate-off/{group}/{op_cls.__name__}/{cfg.name}"
                cases.append((name, paged_append_off(op_cls, cfg, group)))
        if group == "past-capacity":
            for cfg in (paged[1], paged[3]):
                name = f"validate-off/{group}/GQAPagedCachePrefill/{cfg.name}"
                cases.append((name, read_only_off(tp.GQAPagedCachePrefill, cfg)))
    for op_cls in paged_appends:
        name = f"validate-off/int32-slot/{op_cls.__name__}/{paged[3].name}"
        cases.append((name, paged_append_off(op_cls, paged[3], "int32-slot")))
    return cases


#: Case groups `--run` leaves out unless `--only` names them: each once failed and ended the CUDA context,
#: each run by a test of its own so that it hides no other result.
SEPARATE = ("validate-off/past-capacity/", "validate-off/int32-slot/")


def all_cases() -> list[tuple[str, rel.Check]]:
    return [*op_cases(), *sm80_cases(), *validate_off_cases()]


def warm_up() -> None:
    """One pass over what the cases build (under `recording_builds` this lists their programs)."""
    rel.run_calls(rel.warm_up_calls(), DEV)
    for _, call, kernel, _ in sm80_calls():
        kernel(*call.gpu_inputs(DEV).values(), causal=call.cfg.causal, sm_scale=call.cfg.head_dim**-0.5)


def run(only: str | None) -> int:
    failures = count = 0
    start = time.perf_counter()
    for name, check in all_cases():
        if (only is None and name.startswith(SEPARATE)) or (only is not None and only not in name):
            continue
        count += 1
        print(f"CASE {name}", flush=True)
        try:
            problem = check()
        except Exception as exc:  # reported like a failed check; the sanitizer's report says more
            problem = f"raised {type(exc).__name__}: {exc}"
        if problem:
            failures += 1
        print(f"{'FAIL' if problem else 'ok'} {name}{': ' + problem if problem else ''}", flush=True)
    print(f"workload: {count} cases, {failures} failures, {time.perf_counter() - start:.0f} s", flush=True)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--prebuild", action="store_true", help="compile every program the cases need")
    parser.add_argument("--run", action="store_true", help="run the cases")
    parser.add_argument("--list", action="store_true")
    parser.add_argument(
        "--only", default=None, help="run the cases whose id contains this (SEPARATE groups too)"
    )
    args = parser.parse_args(argv)
    if args.list:
        for name, _ in all_cases():
            print(name)
    if args.prebuild:
        start = time.perf_counter()
        with recording_builds() as requests:
            warm_up()
        todo = rel.heavy_first(requests)
        prebuild(todo)
        print(f"prebuilt {len(todo)} programs in {time.perf_counter() - start:.0f} s", flush=True)
    return run(args.only) if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
