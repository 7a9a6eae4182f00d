# `T.prim_func` keeps the function's type; the kernel language itself is
# untyped to mypy (the tl/ modules are exempt from valid-type).
from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

def prim_func(func: _F) -> _F: ...

# `T.macro` keeps the function's type too (macros are expanded into the calling program).
def macro(func: _F) -> _F: ...
def __getattr__(name: str) -> Any: ...
