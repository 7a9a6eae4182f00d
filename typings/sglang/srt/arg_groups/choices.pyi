from collections.abc import Callable, Iterable

ATTENTION_BACKEND_CHOICES: list[str]
add_attention_backend_choices: Callable[[Iterable[str]], None]
