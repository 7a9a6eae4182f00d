"""A directory of precompiled programs: its layout, its index, and how a process checks that it is fresh.

`tileprefill precompile` (`tileprefill.aot.build`) writes one; `kernels/precompiled.py` loads from it.

    DIR/tileprefill-programs.json   the index below (JSON)
    DIR/programs/<id>.so            one program: TileLang's exported TVM-FFI library (host code and
                                    the cubin or fatbin inside), what TileLang's disk cache keeps
    DIR/programs/<id>.cu            its CUDA source, for reading only

The index records what the programs were built with (`Toolchain`: tileprefill, TileLang and
apache-tvm-ffi versions, the CUDA of nvcc, the host platform), the SHA-256 of every source file the
programs were traced from, and one entry per program: its id, kernel key, arch, factory, arguments
and the SHA-256 of its library.

A program's id is the SHA-256 of what makes it that program without tracing it: its factory, the
repr of its static arguments and how it is compiled (`kernels.compile.compile_identity`: target,
pass configurations, backend). What the factory traces is pinned by its source files: the module
of the factory and every tileprefill module it imports, directly or not, read from disk and hashed
(`source_files`). A process uses a program only when its toolchain matches the index's
(`toolchain_differences`) and each of the program's source files hashes as it did at the build.
Nothing here imports tilelang (nor torch, but to read its CUDA release).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Final

import attrs

#: The index file of a precompiled directory.
INDEX_FILE: Final = "tileprefill-programs.json"
#: The folder of the program libraries inside a precompiled directory.
PROGRAMS_DIR: Final = "programs"
#: The layout of the index this code reads and writes.
FORMAT: Final = 1

#: Files every program's trace depends on besides its factory's imports: the TileLang backport is
#: applied before any program is traced (`kernels/tilelang_compat.py`).
TRACE_FILES: Final = ("tileprefill.kernels.tilelang_compat",)


class PrecompiledFormatError(ValueError):
    """A precompiled directory's index is missing or not what this code reads (the message names the
    file and what is wrong)."""


# --- what a process has ----------------------------------------------------------------------------


@attrs.frozen
class Toolchain:
    """What programs are built with, or what a process that loads them has."""

    tileprefill: str
    tilelang: str
    tvm_ffi: str  # the apache-tvm-ffi distribution: the libraries link against its ABI
    cuda: str  # "13.0"; "" where none is found
    platform: str  # "linux-x86_64"
    #: Where `cuda` was read (nvcc's path, or "torch.version.cuda").
    cuda_from: str = ""


def toolchain_differences(built: Toolchain, here: Toolchain) -> tuple[str, ...]:
    """Why programs built with `built` may not run in a process that has `here`, one line per
    difference; empty when they may.

    TileLang and apache-tvm-ffi must be the same releases (the libraries are TileLang's output and
    link against tvm-ffi's ABI); the CUDA major version must be the same (a cubin of one CUDA major
    release loads on every driver of that release); so must the platform. The tileprefill version
    is recorded, not compared: each program's source files are (`stale_sources`).
    """
    reasons: list[str] = []
    if built.tilelang != here.tilelang:
        reasons.append(f"TileLang: built with {built.tilelang}, this process has {here.tilelang}")
    if built.tvm_ffi != here.tvm_ffi:
        reasons.append(f"apache-tvm-ffi: built with {built.tvm_ffi}, this process has {here.tvm_ffi}")
    if _major(built.cuda) != _major(here.cuda):
        found = f"{here.cuda} ({here.cuda_from})" if here.cuda else "none (no CUDA torch, no nvcc)"
        reasons.append(f"CUDA: built with {built.cuda or 'none'}, this process has {found}")
    if built.platform != here.platform:
        reasons.append(f"platform: built on {built.platform}, this process runs on {here.platform}")
    return tuple(reasons)


def _major(version: str) -> str:
    return version.partition(".")[0]


def distribution_version(name: str) -> str:
    """The installed version of a distribution, "" if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def host_platform() -> str:
    return f"{sys.platform}-{platform.machine()}"


def nvcc_path() -> str:
    """The nvcc TileLang compiles with when it has to guess: $CUDA_HOME or $CUDA_PATH, else the nvcc
    on PATH, else /usr/local/cuda (what `kernels.compile` points CUDA_HOME at)."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home:
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


_NVCC_RELEASE = re.compile(r"release (\d+\.\d+)")


@functools.cache
def nvcc_version(nvcc: str) -> str:
    """The CUDA release of an nvcc ("13.0"), "" when it does not run."""
    try:
        done = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    match = _NVCC_RELEASE.search(done.stdout)
    return match.group(1) if done.returncode == 0 and match is not None else ""


def loading_cuda() -> tuple[str, str]:
    """The CUDA a loading process runs programs with, and where it was read: torch's CUDA release
    (what the driver of a GPU host serves it), else that of the nvcc TileLang would compile with (a
    host whose torch has no CUDA); ("", "") with neither."""
    import torch  # only here: the rest of this module is read by processes that need no torch

    if torch.version.cuda:
        return str(torch.version.cuda), "torch.version.cuda"
    nvcc = nvcc_path()
    version = nvcc_version(nvcc)
    return (version, nvcc) if version else ("", "")


def current_toolchain(*, cuda: str, cuda_from: str) -> Toolchain:
    """This process's toolchain, with the CUDA the caller found (the build's nvcc, or `loading_cuda`)."""
    return Toolchain(
        tileprefill=distribution_version("tileprefill") or "unknown",
        tilelang=distribution_version("tilelang"),
        tvm_ffi=distribution_version("apache-tvm-ffi"),
        cuda=cuda,
        platform=host_platform(),
        cuda_from=cuda_from,
    )


# --- what a program is -----------------------------------------------------------------------------


def factory_name(factory: Callable[..., Any]) -> str:
    """`module:qualified name` of a program factory (a module-level function)."""
    return f"{factory.__module__}:{factory.__qualname__}"


def program_id(
    factory: Callable[..., Any], args: tuple[Hashable, ...], identity: Mapping[str, object]
) -> str:
    """The id of the program `factory(*args)` compiled as `identity` says (`compile_identity`): what
    the index and the library's file name know it by."""
    described = {"factory": factory_name(factory), "args": repr(args), "compile": identity}
    text = json.dumps(described, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _package_root() -> pathlib.Path:
    """The folder holding the tileprefill package: source files are named relative to it."""
    return pathlib.Path(__file__).resolve().parents[2]


@functools.cache
def source_files(module: str) -> tuple[str, ...]:
    """The source files a program of `module`'s factory is traced from: the module's and those of every
    tileprefill module it imports, directly or not (a package's `__init__` when it is imported by
    name), and `TRACE_FILES`; relative to the folder holding the package, sorted.

    Imports are read from the files (any `import` statement, TYPE_CHECKING blocks and function
    bodies included), not from a live process, so what is hashed is what a fresh process traces.
    """
    root = _package_root()
    files: dict[str, str] = {}
    todo = [module, *TRACE_FILES]
    while todo:
        name = todo.pop()
        if name in files:
            continue
        origin = _origin(name)
        if origin is None:
            continue
        files[name] = pathlib.Path(origin).resolve().relative_to(root).as_posix()
        todo.extend(_imported(name, pathlib.Path(origin)))
    return tuple(sorted(set(files.values())))


def _origin(name: str) -> str | None:
    """The file of module `name`, None when `name` is not a module (an attribute imported by name)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return spec.origin


def _imported(name: str, path: pathlib.Path) -> list[str]:
    """The tileprefill modules (or names that may be modules) a module's file imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.append(base)
            found.extend(f"{base}.{alias.name}" for alias in node.names)
    return [n for n in found if n == "tileprefill" or n.startswith("tileprefill.")]


@functools.cache
def file_sha256(relative: str) -> str:
    """The SHA-256 of a source file named relative to the folder holding the package ("" if absent)."""
    path = _package_root() / relative
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- the index -------------------------------------------------------------------------------------


@attrs.frozen
class ProgramEntry:
    """One program of a precompiled directory."""

    id: str
    key: str  # its kernel key's value
    arch: str  # the Arch value it serves ("sm80", "sm90")
    target: str  # the nvcc arch it was compiled for ("sm_80", "sm_90a")
    factory: str  # `factory_name`
    args: str  # repr of its static arguments
    description: str  # its static facts in words
    sources: tuple[str, ...]  # `source_files` of its factory's module
    library: str  # the library's path, relative to the directory
    library_sha256: str
    cuda_sha256: str  # of its CUDA source (the hash `compile_check` prints)
    compile_s: float  # how long it took to build


@attrs.frozen
class Index:
    """The index of a precompiled directory."""

    built_with: Toolchain
    #: The SHA-256 of every source file of the programs at the build, by `source_files` name.
    sources: Mapping[str, str]
    programs: tuple[ProgramEntry, ...]
    format: int = FORMAT


def stale_sources(index: Index, entry: ProgramEntry) -> tuple[str, ...]:
    """The source files of `entry` that do not hash here as they did at the build (empty: fresh)."""
    return tuple(
        name
        for name in entry.sources
        if index.sources.get(name) is None or file_sha256(name) != index.sources[name]
    )


def read_index(directory: str | os.PathLike[str]) -> Index:
    """The index of `directory`; raises PrecompiledFormatError naming the file and what is wrong."""
    path = pathlib.Path(directory) / INDEX_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrecompiledFormatError(
            f"{path}: expected the index of a precompiled directory (written by `tileprefill precompile`), "
            "got no such file"
        ) from None
    except (OSError, ValueError) as error:
        raise PrecompiledFormatError(f"{path}: expected a JSON index, got {error}") from None
    try:
        return _parse(document)
    except (KeyError, TypeError, ValueError) as error:
        raise PrecompiledFormatError(f"{path}: expected index format {FORMAT}, got {error!r}") from None


def _parse(document: Any) -> Index:
    if not isinstance(document, dict):
        raise TypeError(f"a JSON object, got {type(document).__name__}")
    if document.get("format") != FORMAT:
        raise ValueError(f"format {document.get('format')!r}")
    built = document["built_with"]
    programs = tuple(
        ProgramEntry(**{**item, "sources": tuple(item["sources"]), "compile_s": float(item["compile_s"])})
        for item in document["programs"]
    )
    sources = document["sources"]
    if not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values()):
        raise TypeError("sources: a mapping of file names to SHA-256 hex digests")
    return Index(built_with=Toolchain(**built), sources=dict(sources), programs=programs)


def write_index(directory: str | os.PathLike[str], index: Index) -> None:
    """Write `index` into `directory` at once (a reader sees the old index or the new one, whole)."""
    path = pathlib.Path(directory) / INDEX_FILE
    document = {
        "format": index.format,
        "built_with": attrs.asdict(index.built_with),
        "sources": dict(sorted(index.sources.items())),
        "programs": [
            {**attrs.asdict(entry), "sources": list(entry.sources)}
            for entry in sorted(index.programs, key=lambda e: (e.arch, e.key, e.description))
        ],
    }
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def library_path(directory: str | os.PathLike[str], entry: ProgramEntry) -> pathlib.Path:
    return pathlib.Path(directory) / entry.library


def library_name(program: str) -> str:
    """Where a program's library lies in its directory, by its id."""
    return f"{PROGRAMS_DIR}/{program}.so"
