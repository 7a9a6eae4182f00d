"""Seeded, time-boxed fuzzing of every public Op on the GPU against the reference Op on CPU.

    python tests/gpu/fuzz.py --seed 1 --budget-s 120        # (nox -s gpu_fuzz -- --seed 1 --budget-s 120)
    python tests/gpu/fuzz.py --seed 1 --case 417            # replay one case

Case i of seed S is built from `random.Random(f"{S}:{i}")` alone: an Op (uniformly), one of its
static configurations from the pool of `reliability.py` (prebuilt side by side before the first
case: each static fact set is a TileLang compile of its own, about a minute for an SM90 attention
program), then everything dynamic at random: batch, lengths (0, 1, tile and page boundaries +-1,
random), page tables over a shuffled pool with spare pages and garbage past each sequence's pages,
prefix pages shared between sequences (read-only Ops), cache lengths, values, and whether the GPU
Op validates. Each case is compared with the reference Op on CPU (`check_against_reference`): the
output within per-dtype tolerance and without NaN, read-only inputs bit for bit, caches bit for bit
outside the written rows.

A script, not a pytest module: it runs for a time budget rather than a fixed list, prints every
failure as a command that replays it, and exits 1 if any case failed. It lives beside the GPU tests
(it is test code and reuses their pool), not in the package.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import multiprocessing
import os
import random
import sys
import time
import traceback

import attrs
import reliability as rel
import torch

from tileprefill.kernels.compile import prebuild, recording_builds
from tileprefill.ops import PUBLIC_OPS

#: Stop early after this many failures (a broken CUDA context fails every later case).
MAX_FAILURES = 20


def case(seed: int, index: int) -> tuple[rel.Call, bool]:
    """Case `index` of `seed`: the call, and whether the GPU Op validates."""
    rng = random.Random(f"{seed}:{index}")
    op_cls = rng.choice(PUBLIC_OPS)
    cfg = rng.choice(rel.configs_of(op_cls))
    validate = rng.random() < 0.5
    return rel.build_call(op_cls, cfg, rng), validate


def warm(device: torch.device) -> None:
    """Compile every program of the pool side by side (a cache hit where compiled before)."""
    start = time.perf_counter()
    with recording_builds() as requests:
        rel.run_calls(rel.warm_up_calls(), device)
    todo = rel.heavy_first(requests)
    prebuild(todo)
    print(f"prebuilt {len(todo)} programs in {time.perf_counter() - start:.0f} s", flush=True)


def run_case(seed: int, index: int, device: torch.device) -> tuple[str, str | None]:
    """(label, None) if case `index` passes, else (label, what failed)."""
    call, validate = case(seed, index)
    label = f"{call.op_cls.__name__} {call.cfg.name} validate={validate} {call.describe}"
    try:
        return label, rel.check_against_reference(call, device, validate=validate)
    except Exception as exc:  # a kernel error is a failure of this case, reported like the others
        return label, f"raised {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"


def work(seed: int, worker: int, workers: int, deadline: float, max_cases: int | None, device: str) -> Tally:
    """Cases worker, worker + workers, ... until `deadline` (time.time()) or `max_cases` in all."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, workers)))
    dev = torch.device(device)
    tally = Tally()
    index = worker
    while time.time() < deadline and (max_cases is None or index < max_cases):
        label, problem = run_case(seed, index, dev)
        tally.per_op[label.split(" ", 1)[0]] += 1
        if problem:
            tally.failures.append(index)
            print(f"FAIL seed={seed} case={index}: {label}\n  {problem}", flush=True)
            print(f"  replay: python tests/gpu/fuzz.py --seed {seed} --case {index}", flush=True)
            if len(tally.failures) >= MAX_FAILURES:
                print(f"worker {worker}: stopping after {len(tally.failures)} failures", flush=True)
                break
        index += workers
    return tally


@attrs.define
class Tally:
    per_op: collections.Counter[str] = attrs.field(factory=collections.Counter)
    failures: list[int] = attrs.field(factory=list)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seed", type=int, default=None, help="default: a random seed, printed")
    parser.add_argument("--budget-s", type=float, default=60.0, help="time for cases, compile excluded")
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--case", type=int, default=None, help="replay this case only")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the harness (CPU vs CPU)")
    parser.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)))
    parser.add_argument("--no-prebuild", action="store_true")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    device = torch.device(args.device)
    if device.type == "cuda" and not args.no_prebuild:
        warm(device)
    if args.case is not None:
        label, problem = run_case(seed, args.case, device)
        print(f"{'FAIL' if problem else 'ok'} seed={seed} case={args.case}: {label}")
        if problem:
            print(f"  {problem}")
        return 1 if problem else 0
    # The reference runs on the CPU and costs far more than the GPU call: worker processes (each
    # with its own CUDA context and a share of the cores) take every `workers`-th case.
    print(
        f"fuzzing with seed {seed} for {args.budget_s:.0f} s on {device}, {args.workers} workers", flush=True
    )
    start = time.time()
    deadline = start + args.budget_s
    jobs = (seed, 0, 1, deadline, args.max_cases, args.device)
    if args.workers == 1:
        tallies = [work(*jobs)]
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
            futures = [
                pool.submit(work, seed, w, args.workers, deadline, args.max_cases, args.device)
                for w in range(args.workers)
            ]
            tallies = [f.result() for f in futures]
    elapsed = time.time() - start
    per_op: collections.Counter[str] = collections.Counter()
    for t in tallies:
        per_op.update(t.per_op)
    failures = sorted(i for t in tallies for i in t.failures)
    cases = sum(per_op.values())
    print("cases by Op: " + ", ".join(f"{name} {n}" for name, n in sorted(per_op.items())))
    print(f"fuzz: seed {seed}, {cases} cases in {elapsed:.0f} s, {len(failures)} failures", flush=True)
    if failures:
        print(f"failed cases: {failures[:50]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
