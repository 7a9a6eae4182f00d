"""`tileprefill precompile`: its flags, what they parse into, and what it does with them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import attrs

from tileprefill.aot.build import precompile
from tileprefill.aot.models import OP_CLASSES, PRESETS, BuildOptions, ModelConfig, model_config
from tileprefill.aot.programs import ProgramSpec, programs_for
from tileprefill.context import DType, IndexDType, RopeMode
from tileprefill.flags import (
    COMPILED_ARCHS,
    DTYPE_SPELLINGS,
    FlagProblems,
    add_choice,
    add_integer,
    arch_choice,
    integer,
    number,
    one_of,
)


@attrs.frozen
class PrecompileArgs:
    """The model (a preset's name, or the shapes given by flags), how it is served, and what to do."""

    model: str | ModelConfig
    options: BuildOptions
    out: str | None  # None only with list_only or presets
    jobs: int | None = None
    rebuild: bool = False
    list_only: bool = False  # print the programs, build nothing
    presets: bool = False  # print the preset table, build nothing


def run_precompile(args: PrecompileArgs, *, say: Callable[[str], None] = print) -> int:
    """0 when every program built (or was listed), 1 when some did not, 2 when the model has no
    kernel on an arch of the build (the reason is printed)."""
    if args.presets:
        say(presets_table())
        return 0
    try:
        specs = programs_for(args.model, args.options)
    except ValueError as error:
        print(f"tileprefill precompile: {error}", file=sys.stderr)
        return 2
    if args.list_only:
        say(programs_table(specs))
        return 0
    assert args.out is not None, "the flags require --out unless --list or --presets"
    report = precompile(
        args.model, args.out, args.options, jobs=args.jobs, rebuild=args.rebuild, progress=say
    )
    for outcome in report.failed:
        print(
            f"failed: {outcome.spec.arch.value} {outcome.spec.key.value} {outcome.spec.description}: "
            f"{outcome.error}",
            file=sys.stderr,
        )
    return 1 if report.failed else 0


def programs_table(specs: tuple[ProgramSpec, ...]) -> str:
    """One line per program: arch, kernel key, static facts, the Op families that need it."""
    lines = [
        f"{spec.arch.value:<5} {spec.key.value:<28} {spec.description:<56} ({', '.join(spec.ops)})"
        for spec in specs
    ]
    lines.append(f"{len(specs)} programs")
    return "\n".join(lines)


def presets_table() -> str:
    """One line per preset: its attention facts and where they come from."""
    lines = []
    for name, model in PRESETS.items():
        windows = "/".join("full" if w == 0 else f"window {w}" for w in model.windows)
        extra = f", softcap {model.softcap:g}" if model.softcap else ""
        scale = f", scale {model.sm_scale:g}" if model.sm_scale is not None else ""
        dtypes = "/".join(d.name.lower() for d in model.dtypes)
        lines.append(
            f"{name:<12} Hq {model.heads:>2} / Hkv {model.kv_heads}, D {model.head_dim}, {dtypes}, "
            f"{windows}{extra}{scale}, RoPE {model.rope.value}  ({model.source})"
        )
    return "\n".join(lines)


#: `precompile --lse`'s choices: which attention programs to build.
_LSE_CHOICES: dict[str, tuple[bool, ...]] = {"without": (False,), "with": (True,), "both": (False, True)}
_INDEXDTYPE_SPELLINGS = {m.value: m for m in IndexDType}
#: The flags of `precompile` that describe a model's shapes (refused beside --preset).
_SHAPE_FLAGS = ("heads", "kv_heads", "head_dim", "window", "softcap", "sm_scale", "rotary_dim")


def add_precompile_parser(
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
    add_choice(pre, "--preset", {name: name for name in PRESETS}, None, "a preset model")
    add_integer(pre, "--heads", 1, None, "query heads (without --preset)")
    add_integer(pre, "--kv-heads", 1, None, "key/value heads (without --preset)")
    add_integer(pre, "--head-dim", 1, None, "head dim (without --preset)")
    pre.add_argument(
        "--window",
        action="append",
        type=integer("--window", 0),
        help="a kind of attention layer: 0 full, N a sliding window of N keys (repeatable; default 0)",
    )
    pre.add_argument("--softcap", type=number("--softcap", minimum=0.0), default=None, help="logit softcap")
    pre.add_argument(
        "--sm-scale", type=number("--sm-scale", minimum=0.0), default=None, help="default: head_dim ** -0.5"
    )
    add_choice(pre, "--rope", {m.value: m for m in RopeMode}, RopeMode.NEOX, "default: neox")
    add_integer(pre, "--rotary-dim", 2, None, "dims RoPE rotates (default: the head dim)")
    pre.add_argument("--non-causal", action="store_true")
    add_integer(
        pre, "--tensor-parallel", 1, 1, "GPUs the heads are split among: programs for one GPU's (default: 1)"
    )
    pre.add_argument(
        "--dtype",
        action="append",
        type=one_of("--dtype", DTYPE_SPELLINGS, "one of " + ", ".join(DTYPE_SPELLINGS)),
        help="repeatable (default: the preset's, else bf16)",
    )
    pre.add_argument(
        "--op",
        action="append",
        type=one_of("--op", {name: name for name in OP_CLASSES}, "one of " + ", ".join(OP_CLASSES)),
        help="an Op family, by its class name (repeatable; default: every one the model can use)",
    )
    pre.add_argument(
        "--arch",
        action="append",
        type=arch_choice("--arch", COMPILED_ARCHS),
        help="sm80 (or sm_80) and/or sm90 (or sm_90, sm_90a) (repeatable; default: both)",
    )
    pre.add_argument(
        "--page-size", action="append", type=integer("--page-size", 1), help="repeatable (default: 16)"
    )
    add_choice(pre, "--lse", _LSE_CHOICES, _LSE_CHOICES["without"], "attention with the LSE output")
    pre.add_argument(
        "--sm-count",
        action="append",
        type=integer("--sm-count", 1),
        help="SMs of the SM90 GPU (132 H100 SXM / H200, 114 H100 PCIe; repeatable; default: 132)",
    )
    pre.add_argument(
        "--index-dtype",
        action="append",
        type=one_of("--index-dtype", _INDEXDTYPE_SPELLINGS, "int32 or int64"),
        help="slot mappings of PagedCacheSlotAppend (repeatable; default: both)",
    )
    pre.add_argument("--out", default=None, help="the directory to build into (required unless --list)")
    add_integer(pre, "--jobs", 1, None, "worker processes (default: the CPUs, at most 16)")
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
