"""CI compile check: every TileLang compile case of an arch lowers and compiles to a cubin.

`python -m tileprefill.compile_check --arch sm_90a [--out-dir DIR]` (or `main`)
collects `compile_cases(arch)` from the TileLang kernel modules (attention,
RoPE, append, slot append), compiles each with `kernels.compile.build_to` (no GPU needed),
checks that a non-empty .cubin (or .fatbin) was written and that the CUDA source fences no more
registers than a thread has (`source_errors`), prints one row per case and fails
unless every case compiled and every TileLang key serving the arch has a case.
For sm_90a it also reports whether the CUDA source uses wgmma (informational). Each row
carries the SHA-256 of the case's CUDA source.

`--sources-only` lowers each case with TileLang and stops before nvcc (well under a
second a case instead of seconds to minutes): it prints `key label sha256` a case, so
that a change meant to leave every program as it was can be checked by comparing the
lists before and after.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import itertools
import multiprocessing
import os
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import ModuleType

import attrs

from tileprefill.context import Arch
from tileprefill.kernels import append_tl, attention_tl, batch_tl, rope_append_tl, rope_tl, slot_append_tl
from tileprefill.kernels.compile import CompileCase, build_to, lower_source
from tileprefill.keys import ALL_KEYS, Code, KernelKey, code_of

#: The modules whose `compile_cases(arch)` CI compiles.
CASE_MODULES: tuple[ModuleType, ...] = (
    attention_tl,
    rope_tl,
    append_tl,
    rope_append_tl,
    batch_tl,
    slot_append_tl,
)

_ARCHS: dict[str, Arch] = {"sm_80": Arch.SM80, "sm_90a": Arch.SM90}

#: Device binaries nvcc may write for a case.
BINARY_SUFFIXES: tuple[str, ...] = (".cubin", ".fatbin")

#: The most 32-bit registers a CUDA thread has.
MAX_THREAD_REGISTERS = 255
#: A register fence of TileLang's CUDA, `tl::warpgroup_fence_operand(<registers>, <count>)`.
_FENCE = re.compile(r"warpgroup_fence_operand\((?:[^()]|\([^()]*\))*,\s*(\d+)\)")


def source_errors(source: str) -> str | None:
    """What is wrong in a program's generated CUDA that still compiles, or None.

    `T.warpgroup_fence_operand(fragment)` without `num_regs` counts the fragment's elements
    across the warpgroup, not a thread's registers: the fence then loops over thousands of
    registers of a small array (undefined behaviour, and a PTX ten times larger; seen in
    the SM90 attention programs; docs/design.md)."""
    counts = [int(count) for count in _FENCE.findall(source)]
    too_many = [count for count in counts if count > MAX_THREAD_REGISTERS]
    if too_many:
        return (
            f"warpgroup_fence_operand: expected at most {MAX_THREAD_REGISTERS} registers a fence "
            f"(a thread's), got {max(too_many)}"
        )
    return None


@attrs.frozen
class Outcome:
    key: KernelKey
    label: str
    seconds: float
    cubin_bytes: int
    uses_wgmma: bool
    error: str | None
    #: The SHA-256 of the program's CUDA source ("" where it did not lower).
    sha256: str = ""


def parse_arch(arch: str) -> Arch:
    try:
        return _ARCHS[arch]
    except KeyError:
        raise ValueError(f"arch: expected one of {sorted(_ARCHS)}, got {arch!r}") from None


def serves(code: Code, arch: Arch) -> bool:
    """Whether a TileLang kernel built as `code` runs on `arch` (so CI must compile it for that arch)."""
    return code is not Code.REF and arch in code.serves


def tilelang_keys(arch: Arch) -> tuple[KernelKey, ...]:
    """Every key whose TileLang kernel serves `arch`."""
    return tuple(key for key in ALL_KEYS if serves(code_of(key), arch))


def collect_cases(arch: Arch, modules: Sequence[ModuleType] = CASE_MODULES) -> tuple[CompileCase, ...]:
    """The compile cases of `arch` from `modules`; a module without `compile_cases` has none."""
    cases: list[CompileCase] = []
    for module in modules:
        compile_cases: Callable[[Arch], tuple[CompileCase, ...]] | None = getattr(
            module, "compile_cases", None
        )
        if compile_cases is not None:
            cases.extend(compile_cases(arch))
    return tuple(cases)


def uncovered_keys(arch: Arch, cases: Sequence[CompileCase]) -> tuple[KernelKey, ...]:
    covered = {case.key for case in cases}
    return tuple(key for key in tilelang_keys(arch) if key not in covered)


def compile_case(case: CompileCase, arch: Arch, case_dir: str) -> Outcome:
    """Compile one case into `case_dir` and check its cubin."""
    started = time.perf_counter()
    try:
        kernel = build_to(case, arch, case_dir)
        # nvcc writes a .cubin for sm_90a and a .fatbin (sm_80 SASS plus compute_80 PTX,
        # which later archs JIT-compile) for sm_80.
        binaries = [p for suffix in BINARY_SUFFIXES for p in pathlib.Path(case_dir).rglob(f"*{suffix}")]
        cubin_bytes = sum(path.stat().st_size for path in binaries)
        source = kernel.get_kernel_source()
        error = None if cubin_bytes > 0 else f"no non-empty .cubin/.fatbin written under {case_dir}"
        error = error or source_errors(source)
        uses_wgmma = "wgmma" in source
    except Exception as exc:  # reported per case; the check fails below
        return Outcome(case.key, case.label, time.perf_counter() - started, 0, False, _first_line(exc))
    seconds = time.perf_counter() - started
    return Outcome(case.key, case.label, seconds, cubin_bytes, uses_wgmma, error, source_hash(source))


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]


@attrs.frozen
class Lowered:
    """One case lowered to CUDA without nvcc: its source's hash, or why it did not lower."""

    key: KernelKey
    label: str
    sha256: str
    error: str | None


def lower_case(case: CompileCase, arch: Arch) -> Lowered:
    try:
        return Lowered(case.key, case.label, source_hash(lower_source(case, arch)), None)
    except Exception as exc:  # reported per case; the check fails below
        return Lowered(case.key, case.label, "", _first_line(exc))


def lower_all(cases: Sequence[CompileCase], arch: Arch, *, jobs: int) -> tuple[Lowered, ...]:
    """Lower `cases` with up to `jobs` worker processes; results stay in case order."""
    if jobs <= 1 or len(cases) <= 1:
        return tuple(lower_case(case, arch) for case in cases)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        return tuple(pool.map(lower_case, cases, [arch] * len(cases)))


def format_hashes(lowered: Sequence[Lowered]) -> str:
    """One line a case: key, label and the SHA-256 of its CUDA source (or the error)."""
    return "\n".join(
        f"{o.key.value:<28} {o.label:<48} {o.sha256 if o.error is None else 'error: ' + o.error}"
        for o in lowered
    )


def _case_dir(root: str, index: int, case: CompileCase) -> str:
    label = "".join(ch if ch.isalnum() else "_" for ch in case.label)
    return os.path.join(root, f"{index:02d}_{case.key.value}_{label}")


def compile_all(
    cases: Sequence[CompileCase],
    arch: Arch,
    out_dir: str,
    *,
    jobs: int,
    progress: Callable[[Outcome], None] | None = None,
) -> tuple[Outcome, ...]:
    """Compile `cases` with up to `jobs` worker processes (TileLang and nvcc are single-threaded);
    `progress` sees each outcome as it completes."""
    dirs = [_case_dir(out_dir, i, case) for i, case in enumerate(cases)]
    done: dict[int, Outcome] = {}

    def finish(index: int, outcome: Outcome) -> None:
        done[index] = outcome
        if progress is not None:
            progress(outcome)

    if jobs <= 1 or len(cases) <= 1:
        for i, case in enumerate(cases):
            finish(i, compile_case(case, arch, dirs[i]))
    else:
        # Fresh interpreters: no inherited compiler state, and nothing here touches CUDA.
        context = multiprocessing.get_context("spawn")
        # Longest first (by weight); outcomes stay in case order.
        longest_first = sorted(range(len(cases)), key=lambda i: -cases[i].weight)
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            futures = {pool.submit(compile_case, cases[i], arch, dirs[i]): i for i in longest_first}
            for future in concurrent.futures.as_completed(futures):
                finish(futures[future], future.result())
    return tuple(done[i] for i in range(len(cases)))


def progress_printer(total: int) -> Callable[[Outcome], None]:
    """Prints a line per outcome as it completes, "[n/total] seconds key label: result", at once
    (a CI log shows it while the rest compile)."""
    finished = itertools.count(1)
    width = len(str(total))

    def show(o: Outcome) -> None:
        result = "ok" if o.error is None else f"error: {o.error}"
        print(
            f"[{next(finished):>{width}}/{total}] {o.seconds:6.1f}s {o.key.value} {o.label}: {result}",
            flush=True,
        )

    return show


def default_jobs() -> int:
    return max(1, min(len(os.sched_getaffinity(0)), 8))


def format_table(outcomes: Sequence[Outcome], arch: Arch) -> str:
    wgmma = arch is Arch.SM90
    header = (
        f"{'key':<24} {'label':<28} {'seconds':>8} {'cubin bytes':>12} {'wgmma':>6}  {'sha256':<64}  result"
    )
    lines = [header, "-" * len(header)]
    for o in outcomes:
        uses = ("yes" if o.uses_wgmma else "no") if wgmma and o.error is None else "-"
        result = "ok" if o.error is None else f"error: {o.error}"
        lines.append(
            f"{o.key.value:<24} {o.label:<28} {o.seconds:>8.1f} {o.cubin_bytes:>12} {uses:>6}  "
            f"{o.sha256 or '-':<64}  {result}"
        )
    return "\n".join(lines)


def main(*, arch: str, out_dir: str | None, jobs: int | None = None, sources_only: bool = False) -> int:
    """Compile every case of `arch` ("sm_80" or "sm_90a"); 0 iff all compiled and every key is covered.
    With `sources_only`, lower each case and print its source's hash instead (no nvcc)."""
    target = parse_arch(arch)
    cases = collect_cases(target)
    workers = default_jobs() if jobs is None else jobs
    if sources_only:
        return _print_hashes(cases, target, arch, workers)
    missing = uncovered_keys(target, cases)
    started = time.perf_counter()
    print(
        f"compiling {len(cases)} cases for {target.value} (nvcc target {arch}) in {workers} jobs", flush=True
    )
    with tempfile.TemporaryDirectory(prefix=f"tileprefill-{arch}-") as scratch:
        outcomes = compile_all(
            cases,
            target,
            out_dir if out_dir is not None else scratch,
            jobs=workers,
            progress=progress_printer(len(cases)),
        )
    elapsed = time.perf_counter() - started
    print(f"compile check {arch}: {len(cases)} cases, {workers} jobs, {elapsed:.1f}s")
    print(format_table(outcomes, target))
    failed = [o for o in outcomes if o.error is not None]
    for key in missing:
        print(f"uncovered: {key.value} serves {arch} but no module has a compile case for it")
    if failed:
        print(f"FAILED: {len(failed)} of {len(outcomes)} cases did not compile")
    return 0 if not failed and not missing else 1


def _print_hashes(cases: Sequence[CompileCase], target: Arch, arch: str, workers: int) -> int:
    lowered = lower_all(cases, target, jobs=workers)
    print(format_hashes(lowered))
    failed = [o for o in lowered if o.error is not None]
    if failed:
        print(f"FAILED: {len(failed)} of {len(lowered)} cases did not lower for {arch}")
    return 0 if not failed else 1


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tileprefill.compile_check", description=__doc__)
    parser.add_argument("--arch", required=True, choices=sorted(_ARCHS))
    parser.add_argument("--out-dir", default=None, help="keep each case's .cu and .cubin here")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: CPUs, at most 8)")
    parser.add_argument(
        "--sources-only",
        action="store_true",
        help="lower each case without nvcc and print `key label sha256` of its CUDA source",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    sys.exit(main(arch=args.arch, out_dir=args.out_dir, jobs=args.jobs, sources_only=args.sources_only))
