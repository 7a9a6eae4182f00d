# Stubs for the part of tilelang 0.1.15 that tileprefill uses. Keep them to that.
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, overload

from tilelang import language as language

_F = TypeVar("_F", bound=Callable[..., Any])

__version__: str
tvm: Any

class PassConfigKey:
    TL_ENABLE_FAST_MATH: str
    TL_DISABLE_TMA_LOWER: str
    TL_DISABLE_WARP_SPECIALIZED: str

class JITKernel:
    def __call__(self, *args: Any) -> Any: ...
    def get_kernel_source(self) -> str: ...
    def export_library(self, kernel_file: str) -> None: ...

def compile(
    func: Any,
    out_idx: Sequence[int] | int | None = ...,
    execution_backend: str = ...,
    target: Any = ...,
    target_host: str | None = ...,
    verbose: bool = ...,
    pass_configs: Mapping[str, Any] | None = ...,
    compile_flags: Sequence[str] | None = ...,
) -> JITKernel: ...
def lower(func: Any, target: Any = ..., **kwargs: Any) -> Any: ...
def is_cache_enabled() -> bool: ...
def disable_cache() -> None: ...
def enable_cache() -> None: ...
@overload
def jit(func: _F) -> _F: ...
@overload
def jit(
    *,
    out_idx: Sequence[int] | int | None = ...,
    target: Any = ...,
    execution_backend: str = ...,
    pass_configs: Mapping[str, Any] | None = ...,
    compile_flags: Sequence[str] | None = ...,
) -> Callable[[_F], _F]: ...
