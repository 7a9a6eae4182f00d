"""What `op.plan(...)` returns: a `BatchPlan`, the decision and the bound launches of one batch, and
the checks each `run` makes of its data tensors against it (metadata only: no device read).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar, cast

import torch

from tileprefill.context import PrefillContext
from tileprefill.kernels.base import NO_LSE
from tileprefill.kernels.launch import check_writable
from tileprefill.keys import KernelKey
from tileprefill.ops.op import ResultT, Shape
from tileprefill.selection import Explanation, PrefillPlan, explain
from tileprefill.validation import (
    Dims,
    DtypeRule,
    StrideRule,
    TensorSpec,
    check_metadata,
    check_view,
    follows,
    overlaps,
)

if TYPE_CHECKING:
    from tileprefill.ops.op import PrefillOp


class Requirement(NamedTuple):
    """A fact `plan` read from the metadata values that a data tensor's size must satisfy in `run`.

    `holds(size)` is checked on the host (no device read); `fail(size)` raises the error
    that names the argument, the expected and the actual value.
    """

    symbol: str
    holds: Callable[[int], bool]
    fail: Callable[[int], None]


class Expected(NamedTuple):
    """What a plan expects of one data tensor: its dtype and shape. A leading size the plan does not
    fix (pages in the pool, rows of a RoPE table) is `lead`, bound by the first tensor that has it;
    `shape` is then the rest."""

    dtype: torch.dtype
    lead: str | None
    shape: tuple[int, ...]
    strides: StrideRule = StrideRule.CONTIGUOUS


def expected_of(s: TensorSpec, dims: Mapping[str, int], q_dtype: torch.dtype) -> Expected:
    dtype = {DtypeRule.INT32: torch.int32, DtypeRule.FLOAT32: torch.float32}.get(s.dtype, q_dtype)
    first, *rest = s.dims
    lead = None if first.symbol in dims else first.symbol
    known = rest if lead is not None else s.dims
    assert all(d.symbol in dims for d in known), f"{s.name}: only a leading size may be left free by a plan"
    return Expected(dtype, lead, tuple(dims[d.symbol] + d.offset for d in known), s.strides)


def matches(
    tensors: Sequence[torch.Tensor], expected: Sequence[Expected], device: torch.device
) -> dict[str, int] | None:
    """The sizes the plan left free, by symbol, if every tensor is what the plan expects of it
    (dtype, device, layout, shape); None at the first difference (then `check_metadata` names it)."""
    free: dict[str, int] = {}
    for t, want in zip(tensors, expected, strict=True):
        if not (
            isinstance(t, torch.Tensor)
            and t.dtype == want.dtype
            and t.device == device
            and follows(t, want.strides)
        ):
            return None
        shape = t.shape
        if want.lead is None:
            if shape != want.shape:
                return None
            continue
        if len(shape) != len(want.shape) + 1 or shape[1:] != want.shape:
            return None
        if free.setdefault(want.lead, shape[0]) != shape[0]:
            return None
    return free


@functools.lru_cache(maxsize=1024)
def _expectations(
    op: type[PrefillOp[Any]], sizes: tuple[tuple[str, int], ...], q_dtype: torch.dtype
) -> tuple[tuple[Expected, ...], Expected, Expected]:
    """What a plan of `op` whose shape symbols have `sizes` expects of `run`'s tensors, of an
    output and of an LSE: cached, since an engine plans every step and most steps repeat a batch
    shape."""
    dims = dict(sizes)
    return (
        tuple(expected_of(s, dims, q_dtype) for s in op.run_specs),
        expected_of(op.output_spec, dims, q_dtype),
        expected_of(op.lse_spec, dims, q_dtype),
    )


class DecidedPlan:
    """What every plan records of its decision: the context of the batch's calls and the kernel keys
    selected for it."""

    __slots__ = ("_context", "_plan")

    def __init__(self, decision: tuple[PrefillContext, PrefillPlan]) -> None:
        self._context, self._plan = decision

    @property
    def context(self) -> PrefillContext:
        """The facts of the batch's calls that the kernels were selected by."""
        return self._context

    @property
    def plan(self) -> PrefillPlan:
        """The selected kernel keys, step by step."""
        return self._plan

    @property
    def steps(self) -> tuple[KernelKey, ...]:
        """The plan's kernel keys, in the order they launch."""
        return self._plan.steps

    def explain(self) -> Explanation:
        """The chosen plan and why every other kernel was not chosen."""
        return explain(self._context)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._plan})"


LaunchesT = TypeVar("LaunchesT")


class BatchPlan(DecidedPlan, Generic[LaunchesT, ResultT]):
    """What `op.plan(...)` returns: the decision of a batch and what its runs share. Immutable.

    Subclasses (one per public Op) add `run(<data tensors>) -> ResultT`, which checks the data
    tensors' metadata against the plan (reading no device memory) and launches, and
    `run_into(out, <data tensors>) -> ResultT`, the same into the caller's `out`: a tensor, or
    with `return_lse=True` the pair (out, lse), as `run` returns it.
    """

    def __init__(
        self,
        op: PrefillOp[Any],
        decision: tuple[PrefillContext, PrefillPlan],
        shape: Shape,
        dims: Dims,
        requirements: Sequence[Requirement],
        launches: LaunchesT,
    ) -> None:
        super().__init__(decision)
        #: What the layout's runs launch, with the batch's metadata bound.
        self._launches = launches
        self._dims = dict(dims)
        self._requirements = tuple(requirements)
        self._data_specs = op.run_specs
        self._device = shape.device
        sizes = tuple((symbol, binding.value) for symbol, binding in dims.items())
        self._expected, self._expected_out, self._expected_lse = _expectations(type(op), sizes, shape.dtype)
        self._out_spec = op.output_spec
        self._lse_spec = op.lse_spec
        #: Whether the plan's attention kernel writes the LSE and its runs return (out, lse).
        self._lse = op.return_lse

    def _run_checked(self, tensors: Sequence[torch.Tensor], outputs: ResultT | None = None) -> ResultT:
        """`run(*tensors)` (outputs None) or `run_into(outputs, *tensors)`: the data tensors checked
        against the plan, the outputs allocated (or the caller's checked), then the launches."""
        self._check(tensors)
        if outputs is None:
            out, lse = self._allocate(tensors[0])
            self._launch(tensors, out, lse)
            return self._result(out, lse)
        self._launch(tensors, *self._callers_outputs(outputs, tensors))
        return outputs

    def _launch(self, tensors: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor) -> None:
        """The launches of one run over the checked data tensors (`run`'s), into out and lse."""
        raise NotImplementedError

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        """Metadata checks of the data tensors against the plan (no device read), then the plan's
        requirements on the sizes the plan left free.

        The fast path compares each tensor with what the plan expects of it; on any difference
        the full `check_metadata` runs and raises the error that names the argument (a
        difference it does not see cannot exist: both read the same specs and sizes).
        """
        free = matches(tensors, self._expected, self._device)
        if free is None:
            check_metadata(self._data_specs, tensors, bound=self._dims, device=self._device)
            raise AssertionError(f"plan check: {[tuple(t.shape) for t in tensors]} differ from the plan")
        for requirement in self._requirements:
            size = (
                free[requirement.symbol]
                if requirement.symbol in free
                else self._dims[requirement.symbol].value
            )
            if not requirement.holds(size):
                requirement.fail(size)

    def _allocate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of `run` (q's shape, contiguous whatever q's strides) and, with `return_lse`, its
        LSE (float32, q's shape less the head dim); `NO_LSE` otherwise (the launches neither read nor
        write it). Both follow q's sizes, as torch.compile traces them."""
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if self._lse else NO_LSE
        return torch.empty(q.shape, dtype=q.dtype, device=q.device), lse

    def _result(self, out: torch.Tensor, lse: torch.Tensor) -> ResultT:
        """What the runs of this plan return: `out`, or (out, lse) with `return_lse` (the Op's type
        parameter says which; the cast states what the constructor overloads bound it to)."""
        return cast(ResultT, (out, lse) if self._lse else out)

    def _callers_outputs(
        self, outputs: object, inputs: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first argument of `run_into` checked (metadata only, before anything is written) and
        split into the output and the LSE buffer (`NO_LSE` without `return_lse`)."""
        name = self._out_spec.name
        if not self._lse:
            if isinstance(outputs, tuple):
                raise TypeError(
                    f"{name}: expected a torch.Tensor (the Op was built without return_lse), "
                    f"got a tuple of {len(outputs)}"
                )
            return self._check_out(outputs, inputs), NO_LSE
        if not (isinstance(outputs, tuple) and len(outputs) == 2):
            got = f"a tuple of {len(outputs)}" if isinstance(outputs, tuple) else type(outputs).__name__
            raise TypeError(
                f"{name}: expected the pair ({name}, {self._lse_spec.name}) of tensors (the Op was built "
                f"with return_lse=True), got {got}"
            )
        out = self._check_out(outputs[0], inputs)
        return out, self._check_lse(outputs[1], out, inputs)

    def _check_out(self, out: object, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """`out` of `run_into`: the output's dtype, shape and device, a view the programs write in place
        (`check_view`: D contiguous, strides and address multiples of a row's vector), sharing no
        memory with an input (metadata only)."""
        return self._check_written(self._out_spec, self._expected_out, out, inputs)

    def _check_lse(self, lse: object, out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """The LSE buffer of `run_into`, like `out`; and apart from `out` too (both are written)."""
        checked = self._check_written(self._lse_spec, self._expected_lse, lse, inputs)
        if overlaps(checked, out):
            name, out_name = self._lse_spec.name, self._out_spec.name
            raise ValueError(
                f"{name}: expected memory apart from {out_name}, got memory shared with {out_name} "
                "(the programs write both)"
            )
        return checked

    def _check_written(
        self, spec_: TensorSpec, expected: Expected, t: object, inputs: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """A caller's tensor a run writes (returned, checked): the plan's dtype, shape and device, the
        layout of its spec (a view for out, contiguous and 16-byte aligned for the LSE), sharing no
        memory with an input (metadata only)."""
        name = spec_.name
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dtype != expected.dtype:
            raise ValueError(f"{name}: expected dtype {expected.dtype} (the plan's), got {t.dtype}")
        if tuple(t.shape) != expected.shape:
            raise ValueError(
                f"{name}: expected shape {spec_.shape} = {expected.shape} (the plan's), got {tuple(t.shape)}"
            )
        if t.device != self._device:
            raise ValueError(f"{name}: expected a tensor on {self._device} (the plan's), got {t.device}")
        if spec_.strides is StrideRule.VIEW:
            check_view(name, t)
        else:
            check_writable(name, t)
        for input_spec, x in zip(self._data_specs, inputs, strict=True):
            if overlaps(t, x):
                raise ValueError(
                    f"{name}: expected memory apart from every input, got memory shared with "
                    f"{input_spec.name} (the programs read {input_spec.name} while they write {name})"
                )
        return t
