"""Ahead-of-time builds: every program a model needs, built on any machine with nvcc (no GPU) into
a precompiled directory, and loaded from it before anything compiles.

- `models`: what a model needs (`ModelConfig`, `PRESETS`) and how it is served (`BuildOptions`);
- `programs`: the programs of a model's Ops, from selection (`programs_for`);
- `build`: `precompile`, the parallel build into a directory;
- `warm`: `warm_up`, an engine's setup on its device (load, or compile what is missing).

The directory's layout and checks are `kernels/artifact.py`; loading is `kernels/precompiled.py`.
"""

from tileprefill.aot.build import PrecompileReport, precompile
from tileprefill.aot.models import PRESETS, BuildOptions, ModelConfig
from tileprefill.aot.programs import ProgramSpec, programs_for
from tileprefill.aot.warm import WarmUp, warm_up

__all__ = [
    "PRESETS",
    "BuildOptions",
    "ModelConfig",
    "PrecompileReport",
    "ProgramSpec",
    "WarmUp",
    "precompile",
    "programs_for",
    "warm_up",
]
