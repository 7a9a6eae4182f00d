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

On a CUDA device the engines take their CUDA paths, which import their compiled kernel packages.
Those are built against the engines' own torch (a torch extension does not load beside another)
and weigh hundreds of MB, so the GPU host's engine archive leaves them out (scripts/engine_site.sh),
and where one is absent a stand-in of the same kind takes its place. What the tested code touches
of them, from the engines' sources (and a CPU run with their CUDA checks answering yes):

- vLLM 0.34: `vllm/platforms/cuda.py` imports `vllm._C_stable_libtorch` (its custom ops) unguarded;
  its attention layers' package imports `vllm.vllm_flash_attn` (through
  `v1/attention/backends/fa_utils.py`), which raises unless `_vllm_fa2_C` or `_vllm_fa3_C` imports;
  and `quantization/utils/w8a8_utils.py` asks `torch.ops._C.cutlass_scaled_mm_supports_block_fp8`
  at import. Nothing the tests run calls a compiled vLLM op: the layers run the TILEPREFILL
  backend, which writes the caches and attends with tileprefill's kernels, and vLLM's worker
  helpers (allocation, metadata, slot mappings) are torch code. The stand-ins for
  `vllm._C_stable_libtorch` and `vllm.vllm_flash_attn._vllm_fa2_C` register no op, so a test that
  called one would fail on torch's missing operator; the first registers the two import-time
  questions of which CUTLASS kernels exist (`cutlass_scaled_mm_supports_fp8`, `..._block_fp8`),
  answering no. Every other import of vLLM's extensions is guarded.
- SGLang 0.5.23 imports `sgl_kernel` (the sglang-kernel package) at module level on the way to its
  pools and layers (quantization schemes, host pools, norms, activations) and calls none of it
  here: its KV pool stores with its JIT kernel (built with nvcc from sglang/kernels/jit, or plain
  indexing where that fails) and the HND pool with a Triton kernel. Its stand-in is torchvision's
  kind: any name imports, calling it raises.

A subprocess a test starts does not load this file: SUBPROCESS_PRELUDE, put before the code it
runs, installs the same stand-ins there (empty on the CPU).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types
from collections.abc import Callable, Sequence

import pytest
import torch

#: Where the engine tests run: "cpu" (the default) or "cuda" (TILEPREFILL_ENGINE_DEVICE).
DEVICE = os.environ.get("TILEPREFILL_ENGINE_DEVICE", "cpu")
if torch.device(DEVICE).type not in ("cpu", "cuda"):
    raise ValueError(f"TILEPREFILL_ENGINE_DEVICE={DEVICE!r}: expected cpu or cuda")
if torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available():
    raise RuntimeError(f"TILEPREFILL_ENGINE_DEVICE={DEVICE!r}, but torch sees no CUDA device")

#: For a test whose spies wrap the reference kernels, what the Ops run on the CPU: on a CUDA device
#: the TileLang kernels run instead, reached through the same backend code with the same views.
SPIES_ON_REFERENCE_KERNELS = pytest.mark.skipif(
    torch.device(DEVICE).type != "cpu",
    reason="the spies wrap the reference kernels, which serve the CPU",
)


class _Absent:
    """What naming an attribute of the stand-in gives: more of the same, and an error when called."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> _Absent:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Absent(f"{self._name}.{attribute}")

    def __call__(self, *args: object, **kwargs: object) -> object:
        package = self._name.split(".")[0]
        raise RuntimeError(
            f"{self._name}: {package} is a stand-in in the engine tests (tests/engines/conftest.py)"
        )


class _StandInModule(types.ModuleType):
    def __getattr__(self, attribute: str) -> _Absent:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Absent(f"{self.__name__}.{attribute}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the named modules, and every submodule of a named package, as stand-in modules;
    `setup` (by module name) runs when one is imported."""

    def __init__(
        self,
        packages: Sequence[str] = (),
        modules: Sequence[str] = (),
        setup: dict[str, Callable[[], None]] | None = None,
    ) -> None:
        self._packages, self._modules = tuple(packages), tuple(modules)
        self._setup = setup or {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.split(".")[0] in self._packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        if fullname in self._modules:
            return importlib.machinery.ModuleSpec(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _StandInModule(spec.name)
        if spec.submodule_search_locations is not None:
            module.__path__ = []
        module.__version__ = "0.0.0"  # type: ignore[attr-defined]  # a module attribute set at run time
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__name__ in self._setup:
            self._setup[module.__name__]()


def _torchvision_imports() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # ImportError, or the RuntimeError of a wheel built for another torch
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        return False
    return True


if importlib.util.find_spec("sglang") is not None and not _torchvision_imports():
    sys.meta_path.insert(0, _StandInFinder(packages=["torchvision"]))

#: The ops the stand-ins define.
_OPS: list[object] = []


def _no_cutlass_kernels() -> None:
    """vLLM's questions at import of which CUTLASS kernels its `_C` extension has: none."""
    for name in ("cutlass_scaled_mm_supports_fp8", "cutlass_scaled_mm_supports_block_fp8"):

        def none(cuda_device_capability: int) -> bool:
            return False

        _OPS.append(torch.library.custom_op(f"_C::{name}", none, mutates_args=()))


if torch.device(DEVICE).type == "cuda":
    # Last on the path: only a module that no other finder finds is stood in for.
    sys.meta_path.append(
        _StandInFinder(
            packages=["sgl_kernel"],
            modules=["vllm._C_stable_libtorch", "vllm.vllm_flash_attn._vllm_fa2_C"],
            setup={"vllm._C_stable_libtorch": _no_cutlass_kernels},
        )
    )
    SUBPROCESS_PRELUDE = f"import runpy; runpy.run_path({__file__!r})\n"
else:
    SUBPROCESS_PRELUDE = ""
