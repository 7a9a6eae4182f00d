from collections.abc import Callable
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

ATTENTION_BACKENDS: dict[str, Callable[[Any], Any]]

def register_attention_backend(name: str) -> Callable[[_F], _F]: ...
