"""The precompiled directories a process loads programs from before it compiles them.

A directory is used from `use_precompiled(path)` on, or from the first build when the
environment names it:

- `TILEPREFILL_PRECOMPILED`: precompiled directories, separated by the path separator (":"),
  searched in order (read once, at the first program a process builds);
- `TILEPREFILL_PRECOMPILED_STRICT=1`: strict mode (below), as `use_precompiled(..., strict=True)`.

Each directory is checked when it is taken into use (`kernels/artifact.py`): its toolchain
against this process's (TileLang, apache-tvm-ffi, CUDA major release, platform) and each program's
source files against the installed tileprefill. What does not match is refused with a
`PrecompiledWarning` naming every difference, and those programs compile on first use as they
would without the directory. A program's library is checked against its recorded SHA-256 when it
is loaded.

Strict mode is for a deployment that must never compile while it serves: a stale directory, a
refused library, or a program that no directory holds raises `PrecompiledError` (naming what
differs, or the program) instead of compiling. It stays on for the process once set.

`build()` (`kernels/compile.py`) calls `load` first; loading imports tilelang (its TVM runtime
loads the library) but traces and compiles nothing.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final

import attrs

from tileprefill.kernels import artifact

ENV_DIRECTORIES: Final = "TILEPREFILL_PRECOMPILED"
ENV_STRICT: Final = "TILEPREFILL_PRECOMPILED_STRICT"


class PrecompiledError(RuntimeError):
    """Strict mode: a program would compile, because no precompiled directory holds it fresh."""


class PrecompiledWarning(UserWarning):
    """Precompiled programs not used (the message says what differs); they compile on first use."""


@attrs.frozen
class Directory:
    """A precompiled directory as this process uses it (what `use_precompiled` returns)."""

    path: str
    built_with: artifact.Toolchain
    #: The programs this process loads from it.
    usable: int
    #: The programs it holds.
    programs: int
    #: Why the others are not used, one line each (empty when all are).
    refused: tuple[str, ...]


class PrecompiledKernel:
    """A program loaded from a precompiled directory: `entry` is the TVM-FFI function the launch
    path calls (what `kernels/launch._entry_function` finds in a compiled TileLang kernel)."""

    __slots__ = ("entry", "module", "path", "program")

    def __init__(self, program: artifact.ProgramEntry, path: str, module: Any) -> None:
        self.program = program
        self.path = path
        self.module = module  # keeps the library loaded
        self.entry: Callable[..., object] = module.main

    def __call__(self, *arguments: object) -> object:
        return self.entry(*arguments)

    def __repr__(self) -> str:
        return f"PrecompiledKernel({self.program.key} {self.program.arch}: {self.path})"


@attrs.frozen
class _Opened:
    directory: Directory
    #: Its fresh programs, by id.
    fresh: Mapping[str, artifact.ProgramEntry]


_opened: list[_Opened] = []
_strict = False
_environment_read = False


def use_precompiled(path: str | os.PathLike[str], *, strict: bool = False) -> Directory:
    """Load programs from the precompiled directory `path` (written by `tileprefill precompile` or
    `tileprefill.precompile`) before compiling them, from now on in this process.

    The directory is checked now: what does not match this process is refused with a
    `PrecompiledWarning` (its programs then compile on first use), or with `strict=True` raises
    `PrecompiledError`. `strict=True` also makes every later build of a program that no directory
    holds raise instead of compiling. A directory already in use is not added twice. Raises
    `PrecompiledFormatError` (a ValueError) when `path` holds no readable index.
    """
    _read_environment()
    return _use(os.fspath(path), strict=strict)


def _use(path: str, *, strict: bool) -> Directory:
    global _strict
    resolved = os.path.abspath(path)
    index = artifact.read_index(resolved)
    for opened in _opened:
        if opened.directory.path == resolved:
            if strict:
                _refuse_in_strict_mode(opened.directory)
                _strict = True
            return opened.directory
    cuda, cuda_from = artifact.loading_cuda()
    here = artifact.current_toolchain(cuda=cuda, cuda_from=cuda_from)
    refused = list(artifact.toolchain_differences(index.built_with, here))
    fresh: dict[str, artifact.ProgramEntry] = {}
    stale: dict[str, int] = {}
    if not refused:
        for entry in index.programs:
            changed = artifact.stale_sources(index, entry)
            for name in changed:
                stale[name] = stale.get(name, 0) + 1
            if not changed:
                fresh[entry.id] = entry
    if stale:
        refused.append(
            f"{len(index.programs) - len(fresh)} of {len(index.programs)} programs: their source files "
            "differ from the build's ("
            + ", ".join(f"{name}, read by {count}" for name, count in sorted(stale.items()))
            + ")"
        )
    directory = Directory(resolved, index.built_with, len(fresh), len(index.programs), tuple(refused))
    if strict:
        _refuse_in_strict_mode(directory)
        _strict = True
    if refused:
        warnings.warn(
            _refusal(directory, "not used") + "; they compile on first use instead",
            PrecompiledWarning,
            stacklevel=3,
        )
    _opened.append(_Opened(directory, fresh))
    return directory


def _refuse_in_strict_mode(directory: Directory) -> None:
    if directory.refused:
        raise PrecompiledError(_refusal(directory, "refused (strict mode)"))


def _refusal(directory: Directory, verdict: str) -> str:
    return (
        f"precompiled programs in {directory.path} {verdict}: "
        + "; ".join(directory.refused)
        + ". Rebuild them with `tileprefill precompile` (with this process's TileLang, apache-tvm-ffi "
        "and CUDA major release, from the installed tileprefill)"
    )


def _read_environment() -> None:
    """Take the directories and strict mode the environment names into use, once a process."""
    global _environment_read, _strict
    if _environment_read:
        return
    _environment_read = True
    strict = os.environ.get(ENV_STRICT, "").strip().lower() in ("1", "true", "yes", "on")
    if strict:
        _strict = True
    for path in filter(None, os.environ.get(ENV_DIRECTORIES, "").split(os.pathsep)):
        try:
            _use(path, strict=strict)
        except artifact.PrecompiledFormatError as error:
            if strict:
                raise PrecompiledError(f"{ENV_DIRECTORIES}: {error}") from None
            warnings.warn(f"{ENV_DIRECTORIES}: {error}; not used", PrecompiledWarning, stacklevel=4)


def directories() -> tuple[Directory, ...]:
    """The precompiled directories in use, in the order they are searched."""
    _read_environment()
    return tuple(opened.directory for opened in _opened)


def strict() -> bool:
    """Whether strict mode is on (a program no directory holds raises instead of compiling)."""
    _read_environment()
    return _strict


def forget() -> None:
    """Use no precompiled directory and leave strict mode, as a fresh process that reads the
    environment again (programs loaded already stay loaded)."""
    global _environment_read, _strict
    _opened.clear()
    _strict = False
    _environment_read = False
    _loaded.cache_clear()


def find(
    factory: Callable[..., Any], args: tuple[Hashable, ...], identity: Mapping[str, object]
) -> tuple[str, artifact.ProgramEntry] | None:
    """The directory and entry of the fresh program `factory(*args)` compiled as `identity`, or None."""
    _read_environment()
    if not _opened:
        return None
    program = artifact.program_id(factory, args, identity)
    for opened in _opened:
        entry = opened.fresh.get(program)
        if entry is not None:
            return opened.directory.path, entry
    return None


def holds(factory: Callable[..., Any], args: tuple[Hashable, ...], identity: Mapping[str, object]) -> bool:
    """Whether a directory in use holds the program fresh (`load` will load it)."""
    return find(factory, args, identity) is not None


def load(
    factory: Callable[..., Any], args: tuple[Hashable, ...], identity: Mapping[str, object]
) -> PrecompiledKernel | None:
    """The program `factory(*args)` compiled as `identity`, loaded from the first directory in use
    that holds it fresh; None when none does (or, outside strict mode, when its library does not hash
    as recorded: warned)."""
    found = find(factory, args, identity)
    if found is None:
        return None
    directory, entry = found
    return _loaded(directory, entry)


@functools.cache
def _loaded(directory: str, entry: artifact.ProgramEntry) -> PrecompiledKernel | None:
    path = artifact.library_path(directory, entry)
    try:
        digest = artifact.sha256_of(path)
    except OSError as error:
        digest = f"unreadable ({error.strerror})"
    if digest != entry.library_sha256:
        problem = (
            f"precompiled program {entry.key} {entry.arch} ({entry.description}) in {directory}: its "
            f"library {path} has SHA-256 {digest}, the index records {entry.library_sha256}"
        )
        if strict():
            raise PrecompiledError(problem + " (strict mode)")
        warnings.warn(problem + "; it compiles on first use instead", PrecompiledWarning, stacklevel=5)
        return None
    return PrecompiledKernel(entry, str(path), load_module(str(path)))


def load_module(path: str) -> Any:
    """The TVM-FFI module of a program's library (as TileLang's own disk cache loads one); nothing
    touches the GPU until its function is called."""
    import tilelang  # its TVM runtime registers the loader of the CUDA module inside the library

    return tilelang.tvm.runtime.load_module(path)


def check_may_compile(factory: Callable[..., Any], args: tuple[Hashable, ...], nvcc_arch: str) -> None:
    """Raise `PrecompiledError` in strict mode: the program `factory(*args)` for `nvcc_arch` is about
    to compile because no directory in use holds it fresh."""
    if not strict():
        return
    searched = (
        ", ".join(d.path for d in directories()) or f"none (set {ENV_DIRECTORIES} or call use_precompiled)"
    )
    raise PrecompiledError(
        f"strict mode: program {artifact.factory_name(factory)}{args!r} for {nvcc_arch} is in no "
        f"precompiled directory in use (searched: {searched}); it would compile now. Add it with "
        "`tileprefill precompile` (the model's shapes, Op families, page sizes and arches)"
    )
