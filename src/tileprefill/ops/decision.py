"""The decision of a call: its `PrefillContext` and the `PrefillPlan` `select_plan` makes of it,
once per configuration.

An Op builds the context from the metadata of its inputs (dtypes, shapes, device), so the
decision needs no tensor values. Under torch.compile it is a constant of the trace (`decide`):
torch.compile guards that metadata anyway, and building a context (attrs' frozen __init__) is not
traceable. On the CPU every step runs its torch reference kernel; a call that no GPU kernel would
serve warns there (`NoGPUKernelWarning`), once per configuration, with selection's reasons.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

from tileprefill.context import Arch, DType, KVLayout, KVOrder, PrefillContext, RopeMode, arch_of
from tileprefill.selection import PrefillPlan, gpu_gaps, select_plan

P = ParamSpec("P")
R = TypeVar("R")


class NoGPUKernelWarning(UserWarning):
    """A call on the CPU that no GPU kernel would serve: the reference kernels run it here, but the
    same call on a GPU raises `UnsupportedContextError`."""


# --- the decision of a call ------------------------------------------------------------------------


@functools.cache
def decided(
    *,
    kv_layout: KVLayout,
    rope: RopeMode,
    append: bool,
    dtype: torch.dtype,
    device: torch.device,
    head_dim: int,
    group_size: int,
    causal: bool,
    page_size: int,
    ragged: bool,
    sliding_window: int,
    softcap: bool,
    kv_order: KVOrder,
) -> tuple[PrefillContext, PrefillPlan]:
    """The context of a call and its plan, once per configuration (and so the CPU warning). The
    arguments are the context's fields as a traced call has them: the dtype and the device (the
    arch is read from it) as torch gives them."""
    context = PrefillContext(
        kv_layout=kv_layout,
        rope=rope,
        append=append,
        q_dtype=DType.of(dtype, argument="q"),
        kv_dtype=DType.of(dtype, argument="kv"),
        arch=arch_of(device),
        head_dim=head_dim,
        group_size=group_size,
        causal=causal,
        page_size=page_size,
        ragged=ragged,
        sliding_window=sliding_window,
        softcap=softcap,
        kv_order=kv_order,
    )
    plan = select_plan(context)
    if context.arch is Arch.CPU:
        warn_without_gpu_kernel(context)
    return context, plan


def _uncached(cached: Callable[P, R]) -> Callable[P, R]:
    """A plain function calling `cached`: torch.compile traces into a functools.cache wrapper instead
    of keeping its result as a constant, so the constant is this function."""

    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        return cached(*args, **kwargs)

    return call


#: `decided` as the Ops call it. Under torch.compile a constant of the trace
#: (`mark_decision_constant`): it reads only metadata that torch.compile guards anyway (dtypes,
#: shapes, device), and building a context is not traceable (attrs' frozen __init__).
decide = _uncached(decided)


def warn_without_gpu_kernel(context: PrefillContext) -> None:
    """Warn (`NoGPUKernelWarning`) when the GPU kernels would not serve a call like `context`, at the
    caller's line (the first frame outside this package)."""
    gaps = gpu_gaps(context)
    if gaps:
        warnings.warn(
            f"no GPU kernel serves this call ({'; '.join(gaps)}); on the CPU the reference kernels run it",
            NoGPUKernelWarning,
            stacklevel=_callers_level(),
        )


def _callers_level() -> int:
    """The `stacklevel` of the first frame outside tileprefill, for a warning raised by the caller."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("tileprefill."):
        frame, level = frame.f_back, level + 1
    return level


@functools.cache
def mark_decision_constant() -> None:
    """Let torch.compile run `decide` while tracing and keep its result as a constant. Done on the
    first Op construction rather than at import: it imports torch._dynamo (about a second)."""
    torch.compiler.assume_constant_result(decide)  # type: ignore[no-untyped-call]
