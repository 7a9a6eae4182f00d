"""`warm_up`: make a model's programs ready on a device when an engine sets the model up, so that
its first request compiles nothing.

Every program the model's Ops can need on the device's arch (`programs_for`, with the device's SM
count) is loaded from the precompiled directories in use, and the others are compiled side by side
(`kernels.compile.prebuild`); each then lies in the build cache the Ops' plans read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs
import torch

from tileprefill.aot.models import BuildOptions, ModelConfig
from tileprefill.aot.programs import programs_for
from tileprefill.context import Arch, arch_of, sm_count_of
from tileprefill.kernels.compile import prebuild
from tileprefill.ops.op import concrete_device


@attrs.frozen
class WarmUp:
    """What `warm_up` made ready: programs loaded from precompiled directories and programs compiled."""

    device: str
    arch: Arch
    programs: int
    loaded: int
    compiled: int
    seconds: float


def warm_up(
    model: str | ModelConfig | Sequence[str | ModelConfig],
    device: torch.device | str = "cuda",
    options: BuildOptions | None = None,
    *,
    jobs: int | None = None,
) -> WarmUp:
    """Load or compile now every program the calls of `model` (a `ModelConfig` or a preset's name,
    or several: one model's kinds of layer) through the Op families of `options` can need on
    `device` (its arch and SM count replace those of `options`). Compiles in up to `jobs` worker
    processes, side by side, what no precompiled directory holds (in strict mode that raises
    `PrecompiledError`). On a CPU device there is nothing to do.
    """
    started = time.perf_counter()
    where = concrete_device(device)
    arch = arch_of(where)
    if arch is Arch.CPU:
        return WarmUp(str(where), arch, 0, 0, 0, 0.0)
    chosen = BuildOptions() if options is None else options
    on_device = attrs.evolve(chosen, archs=(arch,), sm_counts=(sm_count_of(where),))
    models = [model] if isinstance(model, str | ModelConfig) else list(model)
    specs = {spec.request: spec for one in models for spec in programs_for(one, on_device)}
    done = prebuild(list(specs), jobs=jobs)
    return WarmUp(str(where), arch, len(specs), done.loaded, done.compiled, time.perf_counter() - started)
