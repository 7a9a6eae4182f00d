"""Developer sessions. They run in the current environment (`venv_backend="none"`):
install once with the README's command, then `nox -s lint typecheck tests compile compat`.

`tests` is the CPU suite CI runs; `compile` lowers every TileLang program and
compiles cubins for sm_80 and sm_90a (nvcc, no GPU); `compat` does both, a representative set
of programs only, in a fresh environment with the TileLang vLLM and SGLang pin; `engines` runs
the engine integrations inside the engines' own classes (tests/engines) in a fresh environment
with the engines installed; `gpu` and `bench` need a CUDA device and tilelang.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests", "compile"]
nox.options.default_venv_backend = "none"

_CACHE = {"TILELANG_CACHE_DIR": os.environ.get("TILELANG_CACHE_DIR", os.path.abspath(".tilelang-cache"))}


@nox.session
def lint(session: nox.Session) -> None:
    session.run("ruff", "check", "src", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.run("mypy")


@nox.session
def tests(session: nox.Session) -> None:
    # pytest exits 5 when it collects nothing; nox treats that as a failure, as it should.
    session.run("pytest", "-q", "-m", "not gpu and not compile and not sanitize", *session.posargs)


@nox.session
def compile(session: nox.Session) -> None:
    # Minutes of nvcc: -v names each test as it starts, and the whole-set test prints a line per
    # program as it completes (past pytest's capture), so the log shows where the run is.
    session.run("pytest", "-v", "-m", "compile", *session.posargs, env=_CACHE)


#: What vLLM 0.34 and SGLang 0.5.23 pin: tileprefill installs and works beside them.
_ENGINE_TILELANG = ("tilelang==0.1.12", "apache-tvm-ffi==0.1.11")


@nox.session(venv_backend="venv")
def compat(session: nox.Session) -> None:
    # A fresh environment of its own: pip must resolve tileprefill beside the engines' pins, then
    # the CPU suite and a representative set of programs (tests/test_compat.py) run on them.
    # torch first, as the README installs it: tilelang asked for without one brings a CUDA build.
    session.install("torch==2.13.0")
    session.install(*_ENGINE_TILELANG, "-e", ".[dev]")
    session.run("pip", "check")
    session.run("pytest", "-q", "-m", "not gpu and not compile and not sanitize", *session.posargs)
    session.run("pytest", "-v", "-m", "compile", "tests/test_compat.py", env=_CACHE)


@nox.session(venv_backend="venv")
def engines(session: nox.Session) -> None:
    # A fresh environment of its own: torch first (a CPU build here), then tileprefill, then each
    # engine's packages from tests/engines/requirements-*.txt. Those are installed without their
    # dependencies (an engine pins a CUDA torch and its serving stack), so each file lists every
    # package the engine's tested modules import. pytest collecting nothing (exit 5) fails the session.
    session.install("torch==2.13.0")
    session.install("-e", ".[dev]")
    requirements = sorted(Path("tests/engines").glob("requirements-*.txt"))
    if not requirements:
        session.error("no tests/engines/requirements-*.txt: nothing to install the engines from")
    for path in requirements:
        session.install("--no-deps", "-r", str(path))
    session.run("pytest", "-q", "-m", "engines", "tests/engines", *session.posargs)


@nox.session
def gpu(session: nox.Session) -> None:
    session.run("pytest", "-q", "-m", "gpu", *session.posargs, env=_CACHE)


@nox.session
def bench(session: nox.Session) -> None:
    # Ours, torch SDPA and (with --peer-path or $TILEPREFILL_PEER_PATH) TileOPs in its own process;
    # the whole default set unless told otherwise: `nox -s bench -- --quick`, `-- --suite paged`, `-- --list`.
    session.run("python", "-m", "tileprefill", "bench", *session.posargs, env=_CACHE)


@nox.session
def gpu_sanitize(session: nox.Session) -> None:
    # Compiles the workload's programs side by side (warm cache), then one process per tool
    # (memcheck, racecheck, synccheck) over every case; see tests/gpu/test_sanitize_gpu.py.
    session.run(
        "pytest", "-q", "-s", "-m", "sanitize", "tests/gpu/test_sanitize_gpu.py", *session.posargs, env=_CACHE
    )


@nox.session
def gpu_fuzz(session: nox.Session) -> None:
    # Seeded, time-boxed fuzzing of every public Op against the reference:
    # `nox -s gpu_fuzz -- --seed 1 --budget-s 120` (a failing case prints the command that replays it).
    session.run("python", "tests/gpu/fuzz.py", *session.posargs, env=_CACHE)
