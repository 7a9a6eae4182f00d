"""The engine tests' environment: the engines' own classes, on the CPU or on a CUDA device.

The device: TILEPREFILL_ENGINE_DEVICE names where the tests put their tensors, caches and the
engines' configs, `cpu` (the default: `nox -s engines`) or `cuda` (a GPU host:
`scripts/gpu_host.sh engines`). DEVICE is its value, as the engines' configs take it.

SGLang 0.5.23 imports torchvision on the way to its `ForwardBatch` (`sglang.srt.configs` imports
multimodal processors at module level), although nothing these tests run calls it. PyPI's
torchvision wheels are built against PyPI's CUDA build of torch and fail to import beside the CPU
build the tests install (`operator torchvision::nms does not exist`). So, when sglang is installed
and torchvision cannot be imported, a stand-in takes its place: `import torchvision...` of any
submodule succeeds and any attribute can be named, but calling anything of it raises, naming the
stand-in, so a test that needed torchvision would fail rather than pass on it. Where a real
torchvision imports (an engine's GPU environment), it is used as is.

The stand-in reports version 0.0.0: transformers reads the version of an importable torchvision
and, finding none, would fail to parse it; 0.0.0 makes every version check it does answer no.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Sequence

import torch

#: Where the engine tests run: "cpu" (the default) or "cuda" (TILEPREFILL_ENGINE_DEVICE).
DEVICE = os.environ.get("TILEPREFILL_ENGINE_DEVICE", "cpu")
if torch.device(DEVICE).type not in ("cpu", "cuda"):
    raise ValueError(f"TILEPREFILL_ENGINE_DEVICE={DEVICE!r}: expected cpu or cuda")
if torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(f"TILEPREFILL_ENGINE_DEVICE={DEVICE!r}, but torch sees no CUDA device")


class _Absent:
    """What naming an attribute of the stand-in gives: more of the same, and an error when called."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> _Absent:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Absent(f"{self._name}.{attribute}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError(
            f"{self._name}: torchvision is a stand-in in the engine tests (tests/engines/conftest.py)"
        )


class _StandInModule(types.ModuleType):
    def __getattr__(self, attribute: str) -> _Absent:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Absent(f"{self.__name__}.{attribute}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds torchvision and every submodule of it as a stand-in module."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision" and not fullname.startswith("torchvision."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"  # type: ignore[attr-defined]  # a module attribute set at run time
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _torchvision_imports() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # ImportError, or the RuntimeError of a wheel built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


if importlib.util.find_spec("sglang") is not None and not _torchvision_imports():
    sys.meta_path.insert(0, _StandInFinder())
