"""The TileLang releases tileprefill runs on, and what the older one lacks.

The programs are written for TileLang 0.1.15. vLLM 0.34 and SGLang 0.5.23 pin 0.1.12, so
tileprefill installed beside either gets that release. Its frontend lacks two ways of writing a
program down that the programs use, both of which 0.1.15 turns into plain TIR while tracing:

- `T.view(buffer, strides=...)`: a tensor of rows (a KV cache, q, k, v, an output) seen with
  strides that TileLang can prove aligned (`kernels/tl/views.py`); every program takes its rows so.
- `for c in consumer_ids:` over a Python tuple in a program's body, unrolled while the program
  is traced: the SM90 attention programs emit one block per consumer warpgroup that way.

`backport()` teaches 0.1.12 both, the way 0.1.15 does them: a view with strides is the same
strided buffer over the same data, and a loop over a tuple or list runs in Python. Each accepts
only what 0.1.12 refused with an error, so nothing that 0.1.12 traced before traces differently
(an engine's own TileLang programs share the process). On any other release it changes nothing.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterator
from typing import Any

#: The TileLang releases tileprefill is tested on (CI compiles its programs with each).
SUPPORTED_RELEASES: tuple[str, ...] = ("0.1.12", "0.1.15")

#: The releases `backport()` completes.
BACKPORTED_RELEASES: frozenset[str] = frozenset({"0.1.12"})


@functools.cache
def backport() -> bool:
    """Teach the installed TileLang what the programs need of 0.1.15, once a process; whether it
    had to. Called before a program is traced (`kernels.compile`)."""
    tilelang = importlib.import_module("tilelang")
    if tilelang.__version__ not in BACKPORTED_RELEASES:
        return False
    _backport_view(importlib.import_module("tilelang.language"))
    _backport_python_loops(importlib.import_module("tilelang.language.eager.builder").Builder)
    return True


def _backport_view(language: Any) -> None:
    plain_view = language.view
    base_tensor = importlib.import_module("tilelang.language.proxy").BaseTensorProxy

    def view(src: Any, shape: Any = None, dtype: Any = None, strides: Any = None) -> Any:
        if strides is None:
            return plain_view(src, shape, dtype)
        shape = src.shape if shape is None else shape
        dtype = src.dtype if dtype is None else dtype
        if len(strides) != len(shape):
            raise ValueError(
                f"T.view: expected {len(shape)} strides for shape {tuple(shape)}, got {len(strides)}"
            )
        # 0.1.15's `T.StridedTensor(shape, strides, dtype, data=src.data)`; 0.1.12's proxy takes no
        # `data`, its base class does (the same buffer).
        return base_tensor.__call__(
            language.StridedTensor, shape, dtype=dtype, data=src.data, strides=tuple(strides)
        )

    language.view = view


class _PythonLoop:
    """Marks a loop over a Python sequence among the builder's frames, so that a `break` or
    `continue` in its body is refused instead of leaving the TIR loop around it."""

    def __exit__(self, *exc: object) -> None:
        return None


def _backport_python_loops(builder: Any) -> None:
    tir_loop = builder.ctx_for
    tir_break, tir_continue = builder.ctx_break, builder.ctx_continue
    frames = importlib.import_module("tilelang.language.eager.builder").tirx.frame
    loops = (_PythonLoop, frames.ForFrame, frames.WhileFrame)

    def ctx_for(self: Any, it: Any) -> Iterator[Any]:
        if not isinstance(it, tuple | list):
            yield from tir_loop(self, it)
            return
        # No scope of its own (as in Python): what the body binds stays visible after the loop.
        position = len(self.frames)
        self.frames.append(_PythonLoop())
        try:
            yield from it
        finally:
            self.frames.pop(position)

    def in_python_loop(self: Any) -> bool:
        index = self.find_frame_idx(loops)
        return index is not None and isinstance(self.frames[index], _PythonLoop)

    def ctx_break(self: Any) -> None:
        if in_python_loop(self):
            raise TypeError("break in a loop over a Python sequence needs TileLang 0.1.15")
        tir_break(self)

    def ctx_continue(self: Any) -> None:
        if in_python_loop(self):
            raise TypeError("continue in a loop over a Python sequence needs TileLang 0.1.15")
        tir_continue(self)

    builder.ctx_for, builder.ctx_break, builder.ctx_continue = ctx_for, ctx_break, ctx_continue
