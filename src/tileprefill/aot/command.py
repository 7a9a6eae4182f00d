"""`tileprefill precompile`: what its flags parse into, and what it does with them (the flags
themselves are in `tileprefill.cli`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import attrs

from tileprefill.aot.build import precompile
from tileprefill.aot.models import PRESETS, BuildOptions, ModelConfig
from tileprefill.aot.programs import ProgramSpec, programs_for


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
