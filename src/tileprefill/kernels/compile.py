"""The one way TileLang programs become launchable kernels, on a GPU host and in CPU CI.

Program factories in `kernels/tl/` return `T.prim_func`s and know nothing of
torch or dispatch. `build()` lowers and compiles one for an arch, once per
(factory, static arguments, arch), with an explicit target so that it works
without a GPU (CI compiles every case of `compile_cases()` to cubins).
tilelang is imported here lazily: `import tileprefill` never loads it.

Warming up: compiling is single-threaded (TileLang, then nvcc), so a workload
that needs many programs compiles them faster side by side. Run it once under
`recording_builds()` (nothing is compiled or launched: every build is written
down and answered with a kernel that does nothing), then `prebuild()` what was
recorded in worker processes.

Ahead of time: `build()` first looks for the program in the precompiled directories
(`tileprefill.aot.store`, `TILEPREFILL_PRECOMPILED`) and loads it from there when it is
fresh; it compiles only what they do not hold (and in strict mode refuses to).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import multiprocessing
import os
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, assert_never

import attrs

from tileprefill.context import Arch
from tileprefill.kernels import precompiled
from tileprefill.kernels.tilelang_compat import backport
from tileprefill.keys import KernelKey

if TYPE_CHECKING:
    from tilelang import JITKernel

#: TileLang's pass configurations of every program, by their names (`tilelang.PassConfigKey`
#: values): what `_build` compiles with and what a precompiled program's identity records.
PASS_CONFIGS: dict[str, object] = {"tl.enable_fast_math": True}
#: TileLang's execution backend of every program (the one that compiles without a GPU).
EXECUTION_BACKEND = "tvm_ffi"


def target_arch(arch: Arch) -> str:
    """The nvcc arch a TileLang kernel for `arch` is compiled for."""
    match arch:
        case Arch.SM80:
            return "sm_80"
        case Arch.SM90:
            return "sm_90a"
        case Arch.CPU:
            raise ValueError("arch: expected sm80 or sm90 for a TileLang kernel, got cpu")
        case _:
            assert_never(arch)


def compile_identity(nvcc_arch: str) -> dict[str, object]:
    """How every program is compiled for `nvcc_arch`, beyond its factory and arguments, as JSON
    values: part of a precompiled program's identity, so that a change here is a different program."""
    return {"target": _target_spec(nvcc_arch), "pass_configs": PASS_CONFIGS, "backend": EXECUTION_BACKEND}


def _target_spec(nvcc_arch: str) -> dict[str, Any]:
    """sm_80 code also carries sm_90 machine code compiled from the same compute_80 PTX, so the
    SM80 kernels (no wgmma, no TMA) load on Hopper too: GPU tests on an H100 exercise both.
    A plain sm_80 cubin does not load there (CUDA_ERROR_NO_BINARY_FOR_GPU, seen on an H100)."""
    if nvcc_arch == "sm_80":
        return {"kind": "cuda", "arch": "sm_80", "code": ["sm_80", "sm_90"]}
    return {"kind": "cuda", "arch": nvcc_arch}


@attrs.frozen
class CompileCase:
    """One representative static configuration of one kernel key, compiled in CI."""

    key: KernelKey
    label: str
    factory: Callable[..., Any]
    args: tuple[Hashable, ...]
    #: Its compile time relative to a small program's (about 6 s of nvcc on a CI core): CI starts the
    #: longest first, so that no worker is left with a long one at the end.
    weight: int = 1


@attrs.frozen
class BuildRequest:
    """One program `build()` was asked for: what a warm-up records and `prebuild()` compiles."""

    factory: Callable[..., Any]
    args: tuple[Hashable, ...]
    arch: Arch


class _RecordedKernel:
    """What `build()` returns while recording: launching it does nothing."""

    def __call__(self, *tensors: object) -> None:
        return None


#: The requests of the innermost `recording_builds()` in progress, or None.
_recorded: list[BuildRequest] | None = None


def is_recording() -> bool:
    """Whether a `recording_builds()` is in progress (builds are recorded, nothing launches)."""
    return _recorded is not None


def is_recorded(kernel: object) -> bool:
    """Whether `kernel` is what `build()` returned while recording (its launch does nothing)."""
    return isinstance(kernel, _RecordedKernel)


def build(
    factory: Callable[..., Any], args: tuple[Hashable, ...], arch: Arch
) -> JITKernel | precompiled.PrecompiledKernel:
    """The kernel of `factory(*args)` for `arch`: loaded from a precompiled directory that holds it,
    else compiled on first use; then cached."""
    if _recorded is not None:
        _recorded.append(BuildRequest(factory, args, arch))
        return _RecordedKernel()  # type: ignore[return-value]
    return _load_or_build(factory, args, target_arch(arch))


@functools.cache
def _load_or_build(
    factory: Callable[..., Any], args: tuple[Hashable, ...], nvcc_arch: str
) -> JITKernel | precompiled.PrecompiledKernel:
    loaded = precompiled.load(factory, args, compile_identity(nvcc_arch))
    if loaded is not None:
        return loaded
    precompiled.check_may_compile(factory, args, nvcc_arch)  # strict mode refuses to compile
    return _build(factory, args, nvcc_arch, None)


@contextlib.contextmanager
def recording_builds() -> Iterator[list[BuildRequest]]:
    """Within, `build()` compiles nothing: it appends each request to the list this yields and
    returns a kernel whose launch does nothing (outputs stay unwritten, caches unchanged).

    For a warm-up pass over a known workload; not thread-safe, not for real calls.
    """
    global _recorded
    outer, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = outer


@attrs.frozen
class Prebuilt:
    """What `prebuild` did: the programs it loaded from precompiled directories and those it compiled."""

    loaded: int
    compiled: int


def prebuild(requests: Iterable[BuildRequest], *, jobs: int | None = None) -> Prebuilt:
    """Compile `requests` ahead of the calls that need them, side by side.

    Programs a precompiled directory holds are loaded from it. Up to `jobs`
    worker processes (default: one per CPU, at most 16) compile the others
    into TileLang's on-disk kernel cache; this process then loads each program
    into `build()`'s cache. Calls work without it, compiling on first use, one
    at a time.
    """
    todo = list(dict.fromkeys(requests))
    held = [precompiled.holds(r.factory, r.args, compile_identity(target_arch(r.arch))) for r in todo]
    missing = [request for request, found in zip(todo, held, strict=True) if not found]
    workers = min(len(missing), jobs if jobs is not None else min(16, len(os.sched_getaffinity(0))))
    if workers > 1 and not precompiled.strict():
        context = multiprocessing.get_context("spawn")  # no inherited CUDA or compiler state
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for done in [pool.submit(_compile_only, request) for request in missing]:
                done.result()
    for request in todo:
        _load_or_build(request.factory, request.args, target_arch(request.arch))
    return Prebuilt(loaded=sum(held), compiled=len(missing))


def _compile_only(request: BuildRequest) -> None:
    _build(request.factory, request.args, target_arch(request.arch), None)


def build_to(case: CompileCase, arch: Arch, output_dir: str) -> JITKernel:
    """Compile `case` for `arch` and keep its .cu and .cubin (.fatbin for sm_80) under `output_dir` (CI)."""
    return _build(case.factory, case.args, target_arch(arch), output_dir)


def lower_source(case: CompileCase, arch: Arch) -> str:
    """The CUDA source TileLang generates for `case` on `arch`, lowered only (no nvcc, no cache):
    the source `build_to` compiles, for checking that a change leaves every program as it was."""
    import tilelang

    _quiet(tilelang)
    backport()  # before `case.factory` traces the program, as `_build` does
    target = tilelang.tvm.target.Target(_target_spec(target_arch(arch)))
    program = case.factory(*case.args)
    with tilelang.tvm.transform.PassContext(opt_level=3, config=_pass_configs(tilelang)), target:
        return str(tilelang.lower(program, target=target).kernel_source)


def _pass_configs(tilelang: Any) -> dict[str, Any]:
    return {tilelang.PassConfigKey(name): value for name, value in PASS_CONFIGS.items()}


@functools.cache
def _build(
    factory: Callable[..., Any],
    args: tuple[Hashable, ...],
    nvcc_arch: str,
    output_dir: str | None,
) -> JITKernel:
    import tilelang

    _quiet(tilelang)
    backport()  # before `factory(*args)` traces the program
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    target = tilelang.tvm.target.Target(_target_spec(nvcc_arch))
    pass_configs = _pass_configs(tilelang)
    if output_dir is not None:
        pass_configs["cuda.kernels_output_dir"] = output_dir
    program = factory(*args)
    # With an output directory, skip TileLang's kernel and cubin caches: a cache hit
    # writes no .cu/.cubin there, and CI checks those files. (The caches are
    # process-global state; restore it.)
    cached = tilelang.is_cache_enabled()
    if output_dir is not None and cached:
        tilelang.disable_cache()
    try:
        with target:
            return tilelang.compile(
                program,
                out_idx=None,  # every output is a parameter the caller allocates
                target=target,
                execution_backend=EXECUTION_BACKEND,
                pass_configs=pass_configs,
            )
    finally:
        if output_dir is not None and cached:
            tilelang.enable_cache()


@functools.cache
def _quiet(tilelang: Any) -> None:
    """TileLang prints INFO lines of its own (through a handler that writes to stdout) whenever it
    compiles. Route them through `logging` like any library's: silent unless the application turns
    the `tilelang` logger (or the root logger) up to INFO."""
    logger = logging.getLogger(tilelang.__name__)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
