"""`precompile`: build every program a model needs into a precompiled directory, side by side.

Needs tilelang and nvcc, not a GPU: each program is lowered by TileLang and compiled by nvcc for
its arch (sm_80, sm_90a) in a worker process, as CI's compile check does, and its library exported
into DIR/programs (`kernels/artifact.py` describes the directory). TileLang's own kernel cache is
neither read nor written: every library is what this build's nvcc made.

A directory grows: building into one that already holds fresh programs of the same toolchain keeps
them (and builds only what is missing), so several models can share one directory. A directory of
another toolchain, or programs whose sources changed, are built again.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import itertools
import multiprocessing
import os
import pathlib
import tempfile
import time
from collections.abc import Callable

import attrs

from tileprefill.aot.models import BuildOptions, ModelConfig
from tileprefill.aot.programs import ProgramSpec, programs_for
from tileprefill.kernels import artifact
from tileprefill.kernels.compile import CompileCase, build_to, compile_identity, target_arch
from tileprefill.keys import AttentionKey


@attrs.frozen
class Outcome:
    """One program of a build: its entry in the index, or why it did not build."""

    spec: ProgramSpec
    entry: artifact.ProgramEntry | None
    #: It was in the directory already, fresh: nothing was compiled.
    kept: bool = False
    error: str | None = None


@attrs.frozen
class PrecompileReport:
    directory: str
    outcomes: tuple[Outcome, ...]
    seconds: float
    built_with: artifact.Toolchain

    @property
    def failed(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if o.error is not None)

    @property
    def compiled(self) -> int:
        return sum(1 for o in self.outcomes if o.error is None and not o.kept)


def default_jobs() -> int:
    """One worker per CPU, at most 16 (TileLang and nvcc compile on one core each)."""
    return max(1, min(16, len(os.sched_getaffinity(0))))


def precompile(
    model: str | ModelConfig,
    directory: str | os.PathLike[str],
    options: BuildOptions | None = None,
    *,
    jobs: int | None = None,
    rebuild: bool = False,
    progress: Callable[[str], None] | None = print,
) -> PrecompileReport:
    """Build every program of `model` (a `ModelConfig` or a preset's name) served as `options` says
    into `directory`, in up to `jobs` worker processes, calling `progress` with a line per program as
    it completes. Programs the directory holds fresh are kept unless `rebuild`. The index is written
    once at the end, with every program that built (a failed one is reported, not indexed).

    Load the directory with `tileprefill.use_precompiled(directory)` or `TILEPREFILL_PRECOMPILED`.
    """
    started = time.perf_counter()
    specs = programs_for(model, options)
    root = pathlib.Path(directory).resolve()
    (root / artifact.PROGRAMS_DIR).mkdir(parents=True, exist_ok=True)
    toolchain = build_toolchain()
    previous = _previous(root, toolchain)
    kept: dict[str, artifact.ProgramEntry] = {} if rebuild else dict(previous)
    ids = {spec: program_id(spec) for spec in specs}
    todo = [spec for spec in specs if ids[spec] not in kept]
    # Attention programs first: they take minutes where the others take seconds, so that no
    # worker is left with a long one at the end.
    todo.sort(key=lambda spec: not isinstance(spec.key, AttentionKey))
    say = progress if progress is not None else _silent
    workers = max(1, min(len(todo), default_jobs() if jobs is None else jobs))
    say(
        f"precompiling {len(specs)} programs into {root} ({len(specs) - len(todo)} there already, "
        f"{len(todo)} to build in {workers} processes; TileLang {toolchain.tilelang}, CUDA {toolchain.cuda})"
    )
    count = itertools.count(1)
    outcomes: dict[ProgramSpec, Outcome] = {}

    def finish(outcome: Outcome, seconds: float) -> None:
        outcomes[outcome.spec] = outcome
        spec = outcome.spec
        result = "kept" if outcome.kept else "ok" if outcome.error is None else f"error: {outcome.error}"
        width = len(str(len(specs)))
        say(
            f"[{next(count):>{width}}/{len(specs)}] {seconds:6.1f}s {spec.arch.value} {spec.key.value} "
            f"{spec.description}: {result}"
        )

    for spec in specs:
        if spec not in todo:
            finish(Outcome(spec, kept[ids[spec]], kept=True), 0.0)
    if workers > 1:
        # Fresh interpreters: no inherited compiler state, and nothing here touches CUDA.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            futures = {pool.submit(build_program, spec, str(root)): spec for spec in todo}
            for future in concurrent.futures.as_completed(futures):
                outcome = _outcome(futures[future], future)
                finish(outcome, outcome.entry.compile_s if outcome.entry is not None else 0.0)
    else:
        for spec in todo:
            outcome = _run(spec, str(root))
            finish(outcome, outcome.entry.compile_s if outcome.entry is not None else 0.0)
    entries = {**previous, **{o.entry.id: o.entry for o in outcomes.values() if o.entry is not None}}
    sources = {name: artifact.file_sha256(name) for entry in entries.values() for name in entry.sources}
    artifact.write_index(root, artifact.Index(toolchain, sources, tuple(entries.values())))
    _remove_unindexed(root, entries)
    ordered = tuple(outcomes[spec] for spec in specs)
    report = PrecompileReport(str(root), ordered, time.perf_counter() - started, toolchain)
    say(
        f"precompiled {len(specs) - len(report.failed)} of {len(specs)} programs into {root} in "
        f"{report.seconds:.0f}s ({report.compiled} compiled)"
        + (f"; {len(report.failed)} FAILED" if report.failed else "")
    )
    return report


def _silent(line: str) -> None:
    return None


def program_id(spec: ProgramSpec) -> str:
    """The id of `spec`'s program compiled for its arch with this process's toolchain."""
    request = spec.request
    return artifact.program_id(request.factory, request.args, compile_identity(target_arch(request.arch)))


def program_entry(
    spec: ProgramSpec, directory: str | os.PathLike[str], *, cuda_sha256: str, compile_s: float
) -> artifact.ProgramEntry:
    """The index entry of `spec`'s program, whose library `directory` holds already (it is hashed)."""
    request = spec.request
    program = program_id(spec)
    library = artifact.library_name(program)
    return artifact.ProgramEntry(
        id=program,
        key=spec.key.value,
        arch=request.arch.value,
        target=target_arch(request.arch),
        factory=artifact.factory_name(request.factory),
        args=repr(request.args),
        description=spec.description,
        sources=artifact.source_files(request.factory.__module__),
        library=library,
        library_sha256=artifact.sha256_of(pathlib.Path(directory) / library),
        cuda_sha256=cuda_sha256,
        compile_s=compile_s,
    )


def build_toolchain() -> artifact.Toolchain:
    """This process's toolchain, with the CUDA of the nvcc TileLang compiles with."""
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")  # as `kernels.compile` sets it
    nvcc = str(importlib.import_module("tilelang.contrib.nvcc").get_nvcc_compiler())
    version = artifact.nvcc_version(nvcc)
    if not version:
        raise RuntimeError(f"nvcc: expected a CUDA compiler at {nvcc} (set CUDA_HOME), got none that runs")
    return artifact.current_toolchain(cuda=version, cuda_from=nvcc)


def _previous(root: pathlib.Path, toolchain: artifact.Toolchain) -> dict[str, artifact.ProgramEntry]:
    """The programs `root` holds fresh for `toolchain` (whose library is there and hashes as
    recorded), by id; none when it has no index or one of another toolchain."""
    try:
        index = artifact.read_index(root)
    except artifact.PrecompiledFormatError:
        return {}
    if artifact.toolchain_differences(index.built_with, toolchain):
        return {}
    fresh: dict[str, artifact.ProgramEntry] = {}
    for entry in index.programs:
        path = artifact.library_path(root, entry)
        if (
            not artifact.stale_sources(index, entry)
            and path.exists()
            and artifact.sha256_of(path) == entry.library_sha256
        ):
            fresh[entry.id] = entry
    return fresh


def _remove_unindexed(root: pathlib.Path, entries: dict[str, artifact.ProgramEntry]) -> None:
    """Delete the program files of DIR/programs that the index no longer names (programs of another
    toolchain, or of sources since changed)."""
    for path in (root / artifact.PROGRAMS_DIR).iterdir():
        if path.suffix in (".so", ".cu") and path.stem not in entries and not path.name.startswith("."):
            path.unlink()


def _outcome(spec: ProgramSpec, future: concurrent.futures.Future[artifact.ProgramEntry]) -> Outcome:
    try:
        return Outcome(spec, future.result())
    except Exception as error:  # reported per program; the build goes on
        return Outcome(spec, None, error=_first_line(error))


def _run(spec: ProgramSpec, directory: str) -> Outcome:
    try:
        return Outcome(spec, build_program(spec, directory))
    except Exception as error:  # reported per program; the build goes on
        return Outcome(spec, None, error=_first_line(error))


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]


def build_program(spec: ProgramSpec, directory: str) -> artifact.ProgramEntry:
    """Compile one program and put its library and CUDA source into `directory` (a worker's task)."""
    started = time.perf_counter()
    request = spec.request
    program = program_id(spec)
    programs = pathlib.Path(directory) / artifact.PROGRAMS_DIR
    library = pathlib.Path(directory) / artifact.library_name(program)
    with tempfile.TemporaryDirectory(prefix="tileprefill-precompile-") as scratch:
        case = CompileCase(key=spec.key, label=spec.description, factory=request.factory, args=request.args)
        kernel = build_to(case, request.arch, scratch)  # TileLang's kernel cache is left out
        partial = programs / f".{program}.{os.getpid()}.so"
        kernel.export_library(str(partial))
        os.replace(partial, library)
        source = kernel.get_kernel_source()
    (programs / f"{program}.cu").write_text(source, encoding="utf-8")
    compile_s = round(time.perf_counter() - started, 1)
    return program_entry(spec, directory, cuda_sha256=artifact.text_sha256(source), compile_s=compile_s)
