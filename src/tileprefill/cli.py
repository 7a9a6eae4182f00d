"""tileprefill's command line: explain a call's plan, run the demo, compile the kernels, time them.

`tileprefill {explain,demo,compile,precompile,bench}`, or `python -m tileprefill ...`.

- explain: the plan a context gets; with --verbose, why every other kernel was not chosen.
- demo: a small engine loop (chunked prefill of several requests into one shared
  paged cache with RoPE), checked against a dense recomputation; `--engine transformers`:
  a random-weight model's generate() on tileprefill, checked against SDPA.
- compile: lower and compile every TileLang kernel for one arch (no GPU needed).
- precompile: build every program a model needs into a directory Ops load from (no GPU needed).
- bench: time our Ops against torch SDPA, TileOPs and FlashInfer (see tileprefill.bench).
"""

from __future__ import annotations

import argparse
import enum
import importlib
import importlib.metadata
import os
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn, Protocol, TypeVar, assert_never

import attrs
import torch

from tileprefill.aot.command import PrecompileArgs, run_precompile
from tileprefill.aot.models import OP_CLASSES, PRESETS, BuildOptions, ModelConfig, model_config
from tileprefill.bench.cases import DTYPES as BENCH_DTYPES
from tileprefill.bench.cases import Suite
from tileprefill.bench.settings import (
    FLASHINFER_PATH_ENV,
    PEER_PATH_ENV,
    SCOREBOARD,
    BenchSettings,
    defaults_for,
)
from tileprefill.context import Arch, DType, IndexDType, KVLayout, PrefillContext, RopeMode
from tileprefill.demo import DemoArgs, run_demo
from tileprefill.keys import (
    AppendKey,
    AttentionKey,
    BatchKey,
    RopeAppendKey,
    RopeKey,
    SlotAppendKey,
    code_of,
)
from tileprefill.selection import Explanation, explain

_DTYPES = {"fp16": DType.FP16, "bf16": DType.BF16}


@attrs.frozen
class ExplainArgs:
    layout: KVLayout
    rope: RopeMode
    append: bool
    ragged: bool
    dtype: DType
    arch: Arch
    head_dim: int
    group_size: int
    page_size: int | None  # None: DEFAULT_PAGE_SIZE with the paged layout, else none
    causal: bool
    sliding_window: int = 0
    softcap: float = 0.0
    slot_mapping: bool = False
    verbose: bool = False


@attrs.frozen
class CompileArgs:
    arch: Arch
    out_dir: str | None
    jobs: int | None = None


#: `bench`'s arguments are the run's settings record (tileprefill.bench.settings).
BenchArgs = BenchSettings

Command = ExplainArgs | DemoArgs | CompileArgs | PrecompileArgs | BenchArgs

#: The name the help and the errors give the tool when it runs as the console script.
PROG = "tileprefill"

#: Every spelling of an arch the flags accept: ours (Arch's value, the one printed) and nvcc's.
ARCH_SPELLINGS: dict[str, Arch] = {
    "cpu": Arch.CPU,
    "sm80": Arch.SM80,
    "sm_80": Arch.SM80,
    "sm90": Arch.SM90,
    "sm_90": Arch.SM90,
    "sm_90a": Arch.SM90,
}
#: The arches TileLang programs are compiled for.
COMPILED_ARCHS: tuple[Arch, ...] = (Arch.SM80, Arch.SM90)

#: The page size `explain --layout paged` assumes when none is given (vLLM's default block size).
DEFAULT_PAGE_SIZE = 16
#: The arch `explain` assumes when torch sees no GPU we have code for.
FALLBACK_ARCH = Arch.SM90


def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    """Run one command; `prog` is how the help and the errors name the tool."""
    command = parse_args(argv, prog=prog)
    match command:
        case ExplainArgs():
            return run_explain(command)
        case DemoArgs():
            return run_demo(command)
        case CompileArgs():
            return run_compile(command)
        case PrecompileArgs():
            return run_precompile(command)
        case BenchSettings():
            return run_bench(command)
        case _:
            assert_never(command)


def package_version() -> str:
    """The installed distribution's version, else the package's `__version__`, else "unknown"."""
    try:
        return importlib.metadata.version("tileprefill")
    except importlib.metadata.PackageNotFoundError:
        version = getattr(importlib.import_module("tileprefill"), "__version__", None)
        return version if isinstance(version, str) else "unknown"


def default_arch() -> Arch:
    """The local GPU's arch, or `FALLBACK_ARCH` when torch sees no GPU we have code for."""
    if not torch.cuda.is_available():
        return FALLBACK_ARCH
    try:
        return Arch.of_device(torch.device("cuda"))
    except ValueError:  # a GPU of another compute capability
        return FALLBACK_ARCH


@attrs.frozen
class BadValue:
    """A flag's value that does not parse, kept (not raised) so that every bad flag of a command line
    is reported at once."""

    message: str


T = TypeVar("T")


def _one_of(flag: str, values: Mapping[str, T], expected: str) -> Callable[[str], T | BadValue]:
    def parse(text: str) -> T | BadValue:
        return values[text] if text in values else BadValue(f"{flag}: expected {expected}, got {text!r}")

    return parse


def _add_choice(
    parser: argparse.ArgumentParser, flag: str, values: Mapping[str, object], default: object, help: str
) -> None:
    parser.add_argument(
        flag,
        type=_one_of(flag, values, "one of " + ", ".join(values)),
        metavar="{" + ",".join(values) + "}",
        default=default,
        help=help,
    )


def _arch_choice(flag: str, arches: Sequence[Arch]) -> Callable[[str], Arch | BadValue]:
    spellings = {text: arch for text, arch in ARCH_SPELLINGS.items() if arch in arches}
    return _one_of(flag, spellings, arch_choices(arches))


def arch_choices(arches: Sequence[Arch]) -> str:
    """`arches` in words, each with its other spellings: "sm80 (or sm_80) or sm90 (or sm_90, sm_90a)"."""

    def spelled(arch: Arch) -> str:
        others = [text for text, a in ARCH_SPELLINGS.items() if a is arch and text != arch.value]
        return arch.value + (f" (or {', '.join(others)})" if others else "")

    words = [spelled(arch) for arch in arches]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def _integer(flag: str, minimum: int) -> Callable[[str], int | BadValue]:
    def parse(text: str) -> int | BadValue:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            return BadValue(f"{flag}: expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def _add_integer(
    parser: argparse.ArgumentParser, flag: str, minimum: int, default: int | None, help: str
) -> None:
    parser.add_argument(flag, type=_integer(flag, minimum), default=default, help=help)


def _number(flag: str, *, minimum: float) -> Callable[[str], float | BadValue]:
    def parse(text: str) -> float | BadValue:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:  # `not >=`: NaN is refused too
            return BadValue(f"{flag}: expected a number >= {minimum:g}, got {text!r}")
        return value

    return parse


def _parser(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and its subcommands' parsers by name."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tileprefill {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    # The defaults explain a common call: dense bf16, head dim 128, four query heads a KV head
    # (Llama-3-8B's 32 over 8), on the local GPU's arch.
    ex = commands.add_parser(
        "explain",
        help="print the plan of a context (with --verbose: why other kernels were not chosen)",
        description="The plan of one call's context: the kernel of each step. Every flag has a default, "
        "so `explain` alone explains a dense bf16 call of head dim 128, four query heads a KV head, "
        "on the local GPU's arch. When no kernel serves a step, the last line says why.",
        epilog="exit status: 0 a plan, 1 no kernel serves some step, 2 bad flags (all of them reported)",
    )
    layouts = {m.value: m for m in KVLayout}
    _add_choice(
        ex, "--layout", layouts, KVLayout.NONE, "the KV cache layout (default: none, k and v as inputs)"
    )
    _add_choice(
        ex, "--rope", {m.value: m for m in RopeMode}, RopeMode.NONE, "the call's RoPE (default: none)"
    )
    ex.add_argument("--append", action="store_true", help="the call appends new keys to the cache")
    ex.add_argument("--ragged", action="store_true", help="q packed with cu_seqlens (implied by paged)")
    _add_choice(ex, "--dtype", _DTYPES, DType.BF16, "q, k and v's dtype (default: bf16)")
    ex.add_argument(
        "--arch",
        type=_arch_choice("--arch", tuple(Arch)),
        metavar="{" + ",".join(m.value for m in Arch) + "}",
        default=None,
        help=f"the arch the call runs on; nvcc's spellings (sm_80, sm_90, sm_90a) are accepted too "
        f"(default: the local GPU's, {FALLBACK_ARCH.value} when torch sees none)",
    )
    _add_integer(ex, "--head-dim", 1, 128, "default: 128")
    _add_integer(ex, "--group-size", 1, 4, "query heads per KV head (default: 4)")
    page_help = f"tokens per page (paged layout only; default: {DEFAULT_PAGE_SIZE})"
    _add_integer(ex, "--page-size", 1, None, page_help)
    ex.add_argument("--non-causal", action="store_true")
    _add_integer(ex, "--sliding-window", 0, 0, "keys a query sees, its own last (0: all)")
    ex.add_argument(
        "--softcap", type=_number("--softcap", minimum=0.0), default=0.0, help="logit softcap (0: none)"
    )
    ex.add_argument(
        "--slot-mapping",
        action="store_true",
        help="a slot-mapped cache write, no attention (PagedCacheSlotAppend; with --layout paged --append)",
    )
    ex.add_argument("-v", "--verbose", action="store_true", help="also list every kernel not chosen and why")

    demo = commands.add_parser("demo", help="chunked prefill of a few requests into a paged cache, checked")
    devices = {"cpu": "cpu", "cuda": "cuda"}
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    _add_choice(demo, "--device", devices, default_device, "default: cuda when torch sees a GPU, else cpu")
    _add_choice(demo, "--dtype", _DTYPES, DType.BF16, "default: bf16")
    _add_choice(
        demo,
        "--engine",
        {"paged": "paged", "transformers": "transformers"},
        "paged",
        "paged: the chunked-prefill loop; transformers: a random-weight Llama's generate() vs SDPA",
    )

    comp = commands.add_parser("compile", help="compile every TileLang kernel for one arch (no GPU needed)")
    comp.add_argument(
        "--arch",
        type=_arch_choice("--arch", COMPILED_ARCHS),
        metavar="{" + ",".join(m.value for m in COMPILED_ARCHS) + "}",
        help="required; sm_80, sm_90 and sm_90a are accepted too",
    )
    comp.add_argument("--out", default=None, help="keep the .cu and .cubin files under this folder")
    _add_integer(
        comp, "--jobs", 1, None, "compile in N processes side by side (default: the CPUs, at most 8)"
    )

    pre = _add_precompile(commands)

    bench = commands.add_parser(
        "bench",
        help="time our Ops against torch SDPA, TileOPs and FlashInfer; JSON, markdown and plots",
        description="Time our Ops (validate=False) against torch SDPA (flash, cuDNN), TileOPs 0.1.0 and "
        "FlashInfer (fa3, fa2; each peer in its own process) on one machine. With no selection flag, "
        "the whole default set runs; `--suite scoreboard`: the scoreboard (at most 40 cases, one GPU "
        "call of at most 9 minutes, its own timing defaults).",
    )
    bench.add_argument(
        "--suite",
        action="append",
        choices=[s.value for s in Suite] + [SCOREBOARD],
        help=f"only this suite (repeatable); {SCOREBOARD}: the scoreboard set (other suites then filter it)",
    )
    bench.add_argument(
        "--dtype", action="append", choices=sorted(BENCH_DTYPES), help="only this dtype (repeatable)"
    )
    bench.add_argument("--quick", action="store_true", help="a small representative subset of every suite")
    bench.add_argument("--max-cases", type=int, default=None, help="at most N cases of each suite")
    bench.add_argument("--out-dir", default="benchmarks/results", help="where the outputs go")
    bench.add_argument("--name", default=None, help="output file stem (default: <device>-<date>-<selection>)")
    bench.add_argument(
        "--peer-path",
        default=os.environ.get(PEER_PATH_ENV),
        help=f"PYTHONPATH of the TileOPs process, e.g. /tmp/peer:/tmp/tl (default ${PEER_PATH_ENV}; "
        "none: no peer run)",
    )
    bench.add_argument(
        "--flashinfer-path",
        default=os.environ.get(FLASHINFER_PATH_ENV),
        help=f"PYTHONPATH of the FlashInfer process, e.g. /tmp/fi (default ${FLASHINFER_PATH_ENV}; "
        "none: FlashInfer is not run)",
    )
    bench.add_argument(
        "--flashinfer-jit",
        action="store_true",
        help="let FlashInfer JIT-compile the modules it has no prebuilt one of (minutes each); "
        "default: such cases are declined with a note",
    )
    bench.add_argument("--no-peer", action="store_true", help="run no peer (TileOPs, FlashInfer)")
    bench.add_argument(
        "--peer-timeout", type=float, default=300.0, help="seconds each peer's timing process may take"
    )
    bench.add_argument(
        "--peer-compile-jobs",
        type=int,
        default=None,
        help="first compile TileOPs' kernels in N processes, beside our own compile (it compiles one "
        "at a time on first use); default 0, the scoreboard 16",
    )
    bench.add_argument(
        "--peer-results",
        default=None,
        help="fold in this peer JSON instead of running the peer (with --merge: into the merged cases)",
    )
    bench.add_argument("--peer-only", action="store_true", help="time only the peers")
    bench.add_argument("--warmup-ms", type=int, default=None, help="do_bench warm-up, ms (25; scoreboard 50)")
    bench.add_argument(
        "--rep-ms", type=int, default=None, help="do_bench repetitions, ms (100; scoreboard 200)"
    )
    bench.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="time no new case past this many seconds from the start (each stage gets its share); the "
        "outputs are written as usual (default none; scoreboard 450)",
    )
    bench.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    bench.add_argument("--jobs", type=int, default=None, help="prebuild worker processes")
    bench.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny cases on the CPU (reference kernels, wall clock; with --suite scoreboard its cases "
        "shrunk); peers only where their paths are given (there they end with their reason)",
    )
    bench.add_argument(
        "--list", action="store_true", help="print the selected cases, counts and estimate; time nothing"
    )
    bench.add_argument(
        "--merge",
        nargs="+",
        default=(),
        metavar="JSON",
        help="combine the JSON of split runs, per implementation (a figure is never replaced by a "
        "missing one); time nothing",
    )
    bench.add_argument(
        "--resume",
        nargs="+",
        default=(),
        metavar="JSON",
        help="leave out what these earlier runs measured (per stage: ours, the peer), e.g. after a run "
        "cut off at a time limit; then --merge the runs",
    )
    return parser, {"explain": ex, "demo": demo, "compile": comp, "precompile": pre, "bench": bench}


#: `precompile --lse`'s choices: which attention programs to build.
_LSE_CHOICES: dict[str, tuple[bool, ...]] = {"without": (False,), "with": (True,), "both": (False, True)}
_INDEX_DTYPES = {m.value: m for m in IndexDType}
#: The flags of `precompile` that describe a model's shapes (refused beside --preset).
_SHAPE_FLAGS = ("heads", "kv_heads", "head_dim", "window", "softcap", "sm_scale", "rotary_dim")


def _add_precompile(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    pre = commands.add_parser(
        "precompile",
        help="build every program a model needs into a directory Ops load from (no GPU needed)",
        description="Build every TileLang program a model's Ops can need (all Op families unless --op "
        "says which) for sm_80 and sm_90a into a directory, side by side, one line per program as it "
        "completes. Load it with TILEPREFILL_PRECOMPILED=DIR or tileprefill.use_precompiled(DIR). The "
        "model is a preset (--presets lists them) or its shapes (--heads, --kv-heads, --head-dim ...).",
        epilog="exit status: 0 all built (or listed), 1 some program failed, 2 bad flags or a model "
        "without kernels",
    )
    _add_choice(pre, "--preset", {name: name for name in PRESETS}, None, "a preset model")
    _add_integer(pre, "--heads", 1, None, "query heads (without --preset)")
    _add_integer(pre, "--kv-heads", 1, None, "key/value heads (without --preset)")
    _add_integer(pre, "--head-dim", 1, None, "head dim (without --preset)")
    pre.add_argument(
        "--window",
        action="append",
        type=_integer("--window", 0),
        help="a kind of attention layer: 0 full, N a sliding window of N keys (repeatable; default 0)",
    )
    pre.add_argument("--softcap", type=_number("--softcap", minimum=0.0), default=None, help="logit softcap")
    pre.add_argument(
        "--sm-scale", type=_number("--sm-scale", minimum=0.0), default=None, help="default: head_dim ** -0.5"
    )
    _add_choice(pre, "--rope", {m.value: m for m in RopeMode}, RopeMode.NEOX, "default: neox")
    _add_integer(pre, "--rotary-dim", 2, None, "dims RoPE rotates (default: the head dim)")
    pre.add_argument("--non-causal", action="store_true")
    _add_integer(
        pre, "--tensor-parallel", 1, 1, "GPUs the heads are split among: programs for one GPU's (default: 1)"
    )
    pre.add_argument(
        "--dtype",
        action="append",
        type=_one_of("--dtype", _DTYPES, "one of " + ", ".join(_DTYPES)),
        help="repeatable (default: the preset's, else bf16)",
    )
    pre.add_argument(
        "--op",
        action="append",
        type=_one_of("--op", {name: name for name in OP_CLASSES}, "one of " + ", ".join(OP_CLASSES)),
        help="an Op family, by its class name (repeatable; default: every one the model can use)",
    )
    pre.add_argument(
        "--arch",
        action="append",
        type=_arch_choice("--arch", COMPILED_ARCHS),
        help="sm80 (or sm_80) and/or sm90 (or sm_90, sm_90a) (repeatable; default: both)",
    )
    pre.add_argument(
        "--page-size", action="append", type=_integer("--page-size", 1), help="repeatable (default: 16)"
    )
    _add_choice(pre, "--lse", _LSE_CHOICES, _LSE_CHOICES["without"], "attention with the LSE output")
    pre.add_argument(
        "--sm-count",
        action="append",
        type=_integer("--sm-count", 1),
        help="SMs of the SM90 GPU (132 H100 SXM / H200, 114 H100 PCIe; repeatable; default: 132)",
    )
    pre.add_argument(
        "--index-dtype",
        action="append",
        type=_one_of("--index-dtype", _INDEX_DTYPES, "int32 or int64"),
        help="slot mappings of PagedCacheSlotAppend (repeatable; default: both)",
    )
    pre.add_argument("--out", default=None, help="the directory to build into (required unless --list)")
    _add_integer(pre, "--jobs", 1, None, "worker processes (default: the CPUs, at most 16)")
    pre.add_argument("--rebuild", action="store_true", help="build again what the directory holds")
    pre.add_argument("--list", action="store_true", help="print the programs, build nothing")
    pre.add_argument("--presets", action="store_true", help="print the preset models, build nothing")
    return pre


def precompile_args(ns: argparse.Namespace) -> PrecompileArgs:
    """The `precompile` command of parsed flags; raises FlagProblems naming every bad combination."""
    problems: list[str] = []
    given = [name for name in _SHAPE_FLAGS if getattr(ns, name) is not None]
    model: str | ModelConfig | None = None
    if ns.presets:
        model = "llama-3-8b"  # unused: the table is printed
    elif ns.preset is not None:
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            problems.append(f"{flags}: expected none with --preset (a preset has its shapes), got them")
        model = PRESETS[ns.preset]
        if ns.dtype:
            model = attrs.evolve(model, dtypes=tuple(dict.fromkeys(ns.dtype)))
    elif ns.heads is None or ns.kv_heads is None or ns.head_dim is None:
        missing = [
            f
            for f, v in (("--heads", ns.heads), ("--kv-heads", ns.kv_heads), ("--head-dim", ns.head_dim))
            if v is None
        ]
        problems.append(f"{', '.join(missing)}: expected a value (or --preset NAME), got none")
    else:
        try:
            model = ModelConfig(
                heads=ns.heads,
                kv_heads=ns.kv_heads,
                head_dim=ns.head_dim,
                dtypes=tuple(dict.fromkeys(ns.dtype or [DType.BF16])),
                windows=tuple(dict.fromkeys(ns.window or [0])),
                softcap=0.0 if ns.softcap is None else ns.softcap,
                sm_scale=ns.sm_scale,
                rope=ns.rope,
                rotary_dim=ns.rotary_dim,
                causal=not ns.non_causal,
            )
        except ValueError as error:
            problems.append(str(error))
    options: BuildOptions | None = None
    try:
        options = BuildOptions(
            ops=None if not ns.op else tuple(dict.fromkeys(ns.op)),
            archs=tuple(dict.fromkeys(ns.arch or COMPILED_ARCHS)),
            page_sizes=tuple(dict.fromkeys(ns.page_size or [16])),
            lse=ns.lse,
            sm_counts=tuple(dict.fromkeys(ns.sm_count or [132])),
            index_dtypes=tuple(dict.fromkeys(ns.index_dtype or list(IndexDType))),
        )
    except ValueError as error:
        problems.append(str(error))
    if ns.out is None and not (ns.list or ns.presets):
        problems.append("--out: expected the directory to build into (or --list), got none")
    if model is not None and ns.tensor_parallel != 1:
        try:
            model = model_config(model).sharded(ns.tensor_parallel)
        except ValueError as error:
            problems.append(str(error))
    if problems or model is None or options is None:
        raise FlagProblems(problems)
    keep_name = ns.preset is not None and not ns.dtype and ns.tensor_parallel == 1
    return PrecompileArgs(
        model=ns.preset if keep_name else model,
        options=options,
        out=ns.out,
        jobs=ns.jobs,
        rebuild=bool(ns.rebuild),
        list_only=bool(ns.list),
        presets=bool(ns.presets),
    )


class FlagProblems(ValueError):
    """Every problem of a command line's flags, each naming its flag."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


def parse_args(argv: Sequence[str] | None, *, prog: str = PROG) -> Command:
    """The command of `argv`. Bad flags exit 2 after the usage and one line per problem: every value
    is checked first, then (when all parse) the combinations."""
    parser, subparsers = _parser(prog)
    ns, unrecognized = parser.parse_known_args(argv)
    command: str = ns.command
    problems = [
        value.message
        for values in vars(ns).values()
        for value in (values if isinstance(values, list) else [values])  # repeatable flags
        if isinstance(value, BadValue)
    ]
    if unrecognized:
        problems.append("unrecognized arguments: " + " ".join(unrecognized))
    if command == "compile" and ns.arch is None:
        problems.append(f"--arch: expected {arch_choices(COMPILED_ARCHS)}, got none")
    if problems:
        _refuse(subparsers[command], problems)
    if command == "precompile":
        try:
            return precompile_args(ns)
        except FlagProblems as bad:
            _refuse(subparsers[command], bad.problems)
    parsed = _command(ns, argv)
    if isinstance(parsed, ExplainArgs):
        try:
            context_from(parsed)
        except FlagProblems as bad:
            _refuse(subparsers[command], bad.problems)
    return parsed


def _refuse(parser: argparse.ArgumentParser, problems: Sequence[str]) -> NoReturn:
    """Exit 2 after the usage and a line per problem, as argparse does for its one."""
    parser.print_usage(sys.stderr)
    parser.exit(2, "".join(f"{parser.prog}: error: {problem}\n" for problem in problems))


def _command(ns: argparse.Namespace, argv: Sequence[str] | None) -> Command:
    """The record of a namespace whose values all parsed."""
    command: str = ns.command
    if command == "explain":
        return ExplainArgs(
            layout=ns.layout,
            rope=ns.rope,
            append=bool(ns.append),
            ragged=bool(ns.ragged),
            dtype=ns.dtype,
            arch=default_arch() if ns.arch is None else ns.arch,
            head_dim=ns.head_dim,
            group_size=ns.group_size,
            page_size=ns.page_size,
            causal=not ns.non_causal,
            sliding_window=ns.sliding_window,
            softcap=ns.softcap,
            slot_mapping=bool(ns.slot_mapping),
            verbose=bool(ns.verbose),
        )
    if command == "demo":
        return DemoArgs(device=torch.device(ns.device), dtype=ns.dtype, engine=ns.engine)
    if command == "bench":
        scoreboard = SCOREBOARD in (ns.suite or ())
        # A dry run of the scoreboard (its cases shrunk, on a CPU) times as a dry run does.
        defaults = defaults_for(scoreboard=scoreboard and not ns.dry_run)
        return BenchSettings(
            suites=tuple(Suite(s) for s in ns.suite or () if s != SCOREBOARD),
            dtypes=tuple(str(d) for d in ns.dtype or ()),
            quick=bool(ns.quick),
            scoreboard=scoreboard,
            max_cases=None if ns.max_cases is None else int(ns.max_cases),
            out_dir=str(ns.out_dir),
            name=None if ns.name is None else str(ns.name),
            peer_path=None if ns.no_peer or not ns.peer_path else str(ns.peer_path),
            peer_timeout_s=float(ns.peer_timeout),
            peer_compile_jobs=defaults.peer_compile_jobs
            if ns.peer_compile_jobs is None
            else int(ns.peer_compile_jobs),
            flashinfer_path=None if ns.no_peer or not ns.flashinfer_path else str(ns.flashinfer_path),
            flashinfer_jit=bool(ns.flashinfer_jit),
            peer_results=None if ns.peer_results is None else str(ns.peer_results),
            peer_only=bool(ns.peer_only),
            warmup_ms=defaults.warmup_ms if ns.warmup_ms is None else int(ns.warmup_ms),
            rep_ms=defaults.rep_ms if ns.rep_ms is None else int(ns.rep_ms),
            sdpa=defaults.sdpa,
            deadline_s=defaults.deadline_s if ns.deadline_s is None else float(ns.deadline_s),
            device=str(ns.device),
            dry_run=bool(ns.dry_run),
            list_only=bool(ns.list),
            jobs=None if ns.jobs is None else int(ns.jobs),
            merge=tuple(str(p) for p in ns.merge),
            resume=tuple(str(p) for p in ns.resume),
            command=shlex.join(
                [sys.executable, "-m", "tileprefill", *(sys.argv[1:] if argv is None else argv)]
            ),
        )
    return CompileArgs(arch=ns.arch, out_dir=None if ns.out is None else str(ns.out), jobs=ns.jobs)


# --- explain ---------------------------------------------------------------------------------------

#: The kinds of key that can serve each step `explain` may find no kernel for.
STEP_KEYS: dict[str, tuple[type[enum.Enum], ...]] = {
    "batch": (BatchKey,),
    "rope": (RopeAppendKey, RopeKey),
    "append": (RopeAppendKey, AppendKey),
    "slot_append": (SlotAppendKey,),
    "attention": (AttentionKey,),
}


def context_from(args: ExplainArgs) -> PrefillContext:
    """The context of `args`; raises FlagProblems naming every impossible combination."""
    paged = args.layout is KVLayout.PAGED
    problems: list[str] = []
    if not paged and args.page_size is not None:
        problems.append(f"--page-size: expected none with --layout {args.layout.value}, got {args.page_size}")
    try:
        context = PrefillContext(
            kv_layout=args.layout,
            rope=args.rope,
            append=args.append,
            q_dtype=args.dtype,
            kv_dtype=args.dtype,
            arch=args.arch,
            head_dim=args.head_dim,
            group_size=args.group_size,
            causal=args.causal,
            page_size=(DEFAULT_PAGE_SIZE if args.page_size is None else args.page_size) if paged else 0,
            ragged=args.ragged or paged,
            sliding_window=args.sliding_window,
            softcap=args.softcap > 0,
            slot_mapping=args.slot_mapping,
        )
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise FlagProblems(problems)
    return context


def run_explain(args: ExplainArgs) -> int:
    explanation = explain(context_from(args))
    print(explain_report(explanation, verbose=args.verbose))
    return 0 if explanation.plan is not None else 1


def explain_report(explanation: Explanation, *, verbose: bool) -> str:
    """The explanation, with the kernels not chosen only when `verbose`; when some step has no kernel,
    the last line says why."""
    text = str(explanation)
    if not verbose:
        text = text.partition("\nnot chosen:")[0]
        text += f"\n({len(explanation.rejected)} kernels not chosen: --verbose says why)"
    return "\n".join([text, *blocking_reasons(explanation)])


def blocking_reasons(explanation: Explanation) -> tuple[str, ...]:
    """A line per step no kernel serves, with the reasons of its nearest kernel: of the step's kernels
    built for the call's arch, the one with the fewest reasons (the earliest preferred on a tie)."""
    arch = explanation.context.arch
    lines: list[str] = []
    for step in explanation.missing_steps:
        kinds = STEP_KEYS.get(step, ())
        candidates = [r for r in explanation.rejected if isinstance(r.key, kinds)]
        nearest = min(
            [r for r in candidates if arch in code_of(r.key).serves] or candidates,
            key=lambda r: len(r.reasons),
            default=None,
        )
        line = f"no plan: no kernel serves step {step}"
        if nearest is not None:
            line += f"; the nearest, {nearest.key.value}, refuses: " + "; ".join(nearest.reasons)
        lines.append(line)
    return tuple(lines)


# --- demo ------------------------------------------------------------------------------------------


# --- compile ---------------------------------------------------------------------------------------


class CompileMain(Protocol):
    def __call__(self, *, arch: str, out_dir: str | None, jobs: int | None) -> int: ...


def nvcc_arch(arch: Arch) -> str:
    """The nvcc target the programs of `arch` are compiled for."""
    match arch:
        case Arch.SM80:
            return "sm_80"
        case Arch.SM90:
            return "sm_90a"  # wgmma and setmaxnreg exist only in the arch-specific target
        case Arch.CPU:
            raise ValueError(f"arch: expected {arch_choices(COMPILED_ARCHS)}, got {arch.value}")
        case _:
            assert_never(arch)


def run_compile(args: CompileArgs) -> int:
    # Imported when the command runs: compile_check imports tilelang.
    compile_main: CompileMain = importlib.import_module("tileprefill.compile_check").main
    return compile_main(arch=nvcc_arch(args.arch), out_dir=args.out_dir, jobs=args.jobs)


# --- bench -----------------------------------------------------------------------------------------


class BenchMain(Protocol):
    def __call__(self, settings: BenchSettings) -> int: ...


def run_bench(args: BenchArgs) -> int:
    # Imported when the command runs: the runner imports the Ops' kernels, triton and matplotlib lazily.
    bench_main: BenchMain = importlib.import_module("tileprefill.bench.runner").run
    return bench_main(args)
