"""What every public Op shares: constructor, kernel map, checks, plan selection, kernel lookup.

An Op turns its fixed, ordered tensor inputs into a `PrefillContext`, asks
`select_plan` for the steps, looks each step's key up in its `kernel_map` and
runs the kernels in order. A layout base class (`ops/dense.py`,
`ops/contiguous.py`, `ops/paged.py`) says how one layout's inputs become a
context and which kernel calls a plan means; a public Op only names its inputs.

The call path must trace under `torch.compile(fullgraph=True)` and run under
CUDA graph capture when `validate=False`: it reads only metadata, and the
decision from metadata to plan is one cached function that the compiler treats
as a constant (`plan_steps`).
"""

from __future__ import annotations

import abc
import functools
import itertools
import operator
from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Generic, NamedTuple, TypeVar

import torch

from tileprefill.context import Arch, DType, KVLayout, PrefillContext, RopeMode
from tileprefill.kernels.base import Kernel, RopeKernel
from tileprefill.kernels.registry import ALL_KERNELS, kernel_family
from tileprefill.keys import ALL_KEYS, AppendKey, AttentionKey, KernelKey, RopeKey
from tileprefill.selection import (
    TL_ATTENTION_HEAD_DIMS,
    Explanation,
    PrefillPlan,
    explain,
    rejections,
    select_plan,
)
from tileprefill.validation import (
    Dims,
    DtypeRule,
    TensorSpec,
    check_heads,
    check_metadata,
    check_positive,
    spec,
)
from tileprefill.validation import rotary_dim_of as _rotary_dim_of

#: The RoPE tables every RoPE Op takes last: float32 (max_position, rotary_dim // 2).
COS = spec("cos", DtypeRule.FLOAT32, "P, R2")
SIN = spec("sin", DtypeRule.FLOAT32, "P, R2")

InputsT = TypeVar("InputsT", bound=tuple[torch.Tensor | None, ...])


class CallFacts(NamedTuple):
    """The metadata of one call that the context is made of (hashable, no tensors)."""

    kv_layout: KVLayout
    rope: RopeMode
    append: bool
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    device: torch.device
    head_dim: int
    group_size: int
    causal: bool
    page_size: int
    ragged: bool


@functools.cache
def arch_of(device: torch.device) -> Arch:
    """The Arch of a device, read once per device."""
    return Arch.of_device(device)


def context_of(facts: CallFacts) -> PrefillContext:
    return PrefillContext(
        kv_layout=facts.kv_layout,
        rope=facts.rope,
        append=facts.append,
        q_dtype=DType.of(facts.q_dtype, argument="q"),
        kv_dtype=DType.of(facts.kv_dtype, argument="kv"),
        arch=arch_of(facts.device),
        head_dim=facts.head_dim,
        group_size=facts.group_size,
        causal=facts.causal,
        page_size=facts.page_size,
        ragged=facts.ragged,
    )


@functools.cache
def _plan_of(facts: CallFacts) -> PrefillPlan:
    return select_plan(context_of(facts))


class StepNames(NamedTuple):
    """The `.value` of each key of a plan: what the traced call path looks kernels up by."""

    rope: str | None
    append: str | None
    attention: str


def plan_steps(*facts: object) -> tuple[str | None, str | None, str]:
    """The plan of a call, as key values, from the fields of its CallFacts (cached).

    Under torch.compile this is a constant of the trace (see `_mark_plan_constant`). It
    deals in plain values because the tracer passes a constant function plain values and
    cannot hash the enum members it returns.
    """
    plan = _plan_of(CallFacts(*facts))  # type: ignore[arg-type]
    return (
        None if plan.rope is None else plan.rope.value,
        None if plan.append is None else plan.append.value,
        plan.attention.value,
    )


@functools.cache
def _mark_plan_constant() -> None:
    """Let torch.compile run `plan_steps` while tracing and keep its result as a constant.

    The plan depends only on metadata that torch.compile guards anyway (dtypes, shapes,
    device), and building a context is not traceable (attrs' frozen __init__). Done on the
    first Op construction rather than at import: it imports torch._dynamo (about a second).
    """
    torch.compiler.assume_constant_result(plan_steps)  # type: ignore[no-untyped-call]


def candidate_keys(
    kv_layout: KVLayout, *, ragged: bool, rotates: bool, appends: bool
) -> tuple[KernelKey, ...]:
    """Every key whose kernel serves some call an Op of these traits can make, on any arch.

    Derived from `selection.rejections` over the contexts such an Op can build:
    every arch, dtype, RoPE mode and causality, the head dims with TileLang
    kernels, and page sizes on both sides of the tiled-paging rule.
    """
    modes = (RopeMode.NEOX, RopeMode.INTERLEAVED) if rotates else (RopeMode.NONE,)
    page_sizes = (1, 7, 16, 64, 256) if kv_layout is KVLayout.PAGED else (0,)
    contexts = [
        PrefillContext(
            kv_layout=kv_layout,
            rope=rope,
            append=appends,
            q_dtype=dtype,
            kv_dtype=dtype,
            arch=arch,
            head_dim=head_dim,
            group_size=1,
            causal=causal,
            page_size=page_size,
            ragged=ragged,
        )
        for arch, rope, dtype, head_dim, causal, page_size in itertools.product(
            Arch, modes, DType, TL_ATTENTION_HEAD_DIMS, (True, False), page_sizes
        )
    ]
    return tuple(key for key in ALL_KEYS if any(not rejections(key, ctx) for ctx in contexts))


def _is_kernel_key(key: object) -> bool:
    return isinstance(key, RopeKey | AppendKey | AttentionKey)


class PrefillOp(abc.ABC, Generic[InputsT]):
    """Base of the public Ops. Subclasses declare their traits and input specs as class variables."""

    # Traits of the Op: what contexts it builds (and so which kernels can serve it).
    kv_layout: ClassVar[KVLayout]
    ragged: ClassVar[bool] = False
    appends: ClassVar[bool] = False
    rotates: ClassVar[bool] = False
    #: The Op's tensor inputs, in call order, and its output (the manifest lists the same).
    input_specs: ClassVar[tuple[TensorSpec, ...]]
    output_spec: ClassVar[TensorSpec]
    #: The keys any call of this Op may plan, and the registered kernel class of each.
    kernel_keys: ClassVar[tuple[KernelKey, ...]]
    default_kernel_map: ClassVar[Mapping[KernelKey, type[Kernel]]]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "input_specs" in cls.__dict__:  # a public Op, not a layout base
            cls.kernel_keys = candidate_keys(
                cls.kv_layout, ragged=cls.ragged, rotates=cls.rotates, appends=cls.appends
            )
            cls.default_kernel_map = MappingProxyType(
                {key: ALL_KERNELS[key] for key in cls.kernel_keys if key in ALL_KERNELS}
            )

    def __init__(
        self,
        *,
        causal: bool = True,
        sm_scale: float | None = None,
        kernel_map: Mapping[KernelKey, type[Kernel]] | None = None,
        validate: bool = True,
    ) -> None:
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {causal!r}")
        if sm_scale is not None and (
            isinstance(sm_scale, bool) or not isinstance(sm_scale, int | float) or not sm_scale > 0
        ):
            raise ValueError(f"sm_scale: expected None or a positive float, got {sm_scale!r}")
        if not isinstance(validate, bool):
            raise TypeError(f"validate: expected a bool, got {validate!r}")
        if not torch.compiler.is_compiling():
            _mark_plan_constant()
        self.causal = causal
        self.sm_scale = None if sm_scale is None else float(sm_scale)
        self.validate = validate
        self.rope = RopeMode.NONE
        self.rotary_dim: int | None = None
        overrides = self._checked_overrides(kernel_map or {})
        #: key -> kernel class used by this instance: the defaults with `kernel_map` merged over them.
        self.kernel_map: Mapping[KernelKey, type[Kernel]] = MappingProxyType(
            {**self.default_kernel_map, **overrides}
        )
        # Kernels are cheap to construct; one instance per key, looked up by key value on the call path.
        self._kernels: dict[str, Kernel] = {key.value: cls() for key, cls in self.kernel_map.items()}

    @classmethod
    def _checked_overrides(
        cls, kernel_map: Mapping[KernelKey, type[Kernel]]
    ) -> dict[KernelKey, type[Kernel]]:
        checked: dict[KernelKey, type[Kernel]] = {}
        for key, kernel in kernel_map.items():
            if not _is_kernel_key(key):
                raise TypeError(
                    f"kernel_map: expected RopeKey, AppendKey or AttentionKey keys, got {key!r} "
                    f"({type(key).__name__})"
                )
            if key not in cls.kernel_keys:
                raise ValueError(
                    f"kernel_map: key {key.value} cannot serve any call of {cls.__name__}: expected one of "
                    f"{[k.value for k in cls.kernel_keys]}, got {key.value}"
                )
            family = kernel_family(key)
            if not isinstance(kernel, type) or not issubclass(kernel, Kernel):
                raise TypeError(
                    f"kernel_map[{key.value}]: expected a subclass of {family.__name__}, got {kernel!r}"
                )
            if kernel.key is not key:
                raise ValueError(
                    f"kernel_map[{key.value}]: expected a class whose .key is {key.value}, "
                    f"got {kernel.__name__} with .key {kernel.key.value}"
                )
            if not issubclass(kernel, family):
                raise TypeError(
                    f"kernel_map[{key.value}]: expected a subclass of {family.__name__}, "
                    f"got {kernel.__name__} (bases: {', '.join(b.__name__ for b in kernel.__mro__[1:])})"
                )
            checked[key] = kernel
        return checked

    # --- the shared call path --------------------------------------------------------------------

    def _run(self, inputs: InputsT) -> torch.Tensor:
        dims = self._check_metadata(inputs)
        if self.validate:
            self._check_values(inputs, dims)
        steps = StepNames(*plan_steps(*self._facts(inputs, dims)))
        return self._execute(steps, inputs, dims)

    def _plan_for(self, inputs: InputsT) -> PrefillPlan:
        dims = self._check_metadata(inputs)
        return _plan_of(self._facts(inputs, dims))

    def _explain(self, inputs: InputsT) -> Explanation:
        dims = self._check_metadata(inputs)
        return explain(context_of(self._facts(inputs, dims)))

    def _check_metadata(self, inputs: InputsT) -> Dims:
        tensors = tuple(getattr(inputs, s.name) for s in self.input_specs)
        dims = check_metadata(self.input_specs, tensors)
        check_positive(dims, [s for s in ("Hq", "Hkv", "D", "PS", "R2", "P") if s in dims])
        check_heads(dims)
        if self.rope is not RopeMode.NONE:
            _rotary_dim_of(dims, self.rotary_dim)
        self._check_layout_metadata(dims)
        return dims

    def _facts(self, inputs: InputsT, dims: Dims) -> CallFacts:
        # Under torch.compile with dynamic shapes a size may be symbolic. The plan needs the value:
        # operator.index (unlike int()) makes the tracer specialise it, guarding on it.
        return CallFacts(
            kv_layout=self.kv_layout,
            rope=self.rope,
            append=self.appends,
            q_dtype=self._tensor(inputs, 0).dtype,
            kv_dtype=self._tensor(inputs, 1).dtype,
            device=self._tensor(inputs, 0).device,
            head_dim=operator.index(dims["D"].value),
            group_size=operator.index(dims["Hq"].value // dims["Hkv"].value),
            causal=self.causal,
            page_size=operator.index(dims["PS"].value) if "PS" in dims else 0,
            ragged=self.ragged,
        )

    def _tensor(self, inputs: InputsT, index: int) -> torch.Tensor:
        t = getattr(inputs, self.input_specs[index].name)
        assert isinstance(t, torch.Tensor)
        return t

    def _scale(self, dims: Dims) -> float:
        return self.sm_scale if self.sm_scale is not None else float(dims["D"].value) ** -0.5

    def _kernel(self, name: str) -> Kernel:
        """This Op's kernel instance for the key whose value is `name` (its class extends the key's
        family: `kernel_map` is checked on construction)."""
        kernel = self._kernels.get(name)
        if kernel is None:
            raise LookupError(
                f"{type(self).__name__}: the plan needs kernel {name}, but kernel_map has no class for it: "
                f"expected one of {sorted(self._kernels)}, got {name}; pass kernel_map={{<its key>: <class>}}"
            )
        return kernel

    def _rotate(
        self, name: str, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """A rotated copy of x (..., H, D): the RoPE kernel sees it as (T, H, D)."""
        kernel = self._kernel(name)
        assert isinstance(kernel, RopeKernel)
        flat = x.reshape(-1, x.shape[-2], x.shape[-1])
        return kernel(flat, positions, cos, sin).reshape(x.shape)

    # --- what each layout says -------------------------------------------------------------------

    @abc.abstractmethod
    def _check_layout_metadata(self, dims: Dims) -> None:
        """Shape checks beyond the specs (always run)."""

    @abc.abstractmethod
    def _check_values(self, inputs: InputsT, dims: Dims) -> None:
        """Checks that read index tensors' values (validate=True only)."""

    @abc.abstractmethod
    def _execute(self, steps: StepNames, inputs: InputsT, dims: Dims) -> torch.Tensor:
        """Run the plan's kernels in order; return the attention output."""


class RotatingOp(PrefillOp[InputsT]):
    """An Op that rotates q and the keys with RoPE before attention."""

    rotates: ClassVar[bool] = True

    def __init__(
        self,
        *,
        rope: RopeMode,
        rotary_dim: int | None = None,
        causal: bool = True,
        sm_scale: float | None = None,
        kernel_map: Mapping[KernelKey, type[Kernel]] | None = None,
        validate: bool = True,
    ) -> None:
        if not isinstance(rope, RopeMode) or rope is RopeMode.NONE:
            raise ValueError(
                f"rope: expected RopeMode.NEOX or RopeMode.INTERLEAVED for {type(self).__name__} "
                f"(use the Op without RoPE otherwise), got {rope!r}"
            )
        if rotary_dim is not None and (
            isinstance(rotary_dim, bool)
            or not isinstance(rotary_dim, int)
            or rotary_dim < 2
            or rotary_dim % 2
        ):
            raise ValueError(f"rotary_dim: expected None or an even int >= 2, got {rotary_dim!r}")
        super().__init__(causal=causal, sm_scale=sm_scale, kernel_map=kernel_map, validate=validate)
        self.rope = rope
        self.rotary_dim = rotary_dim


def required(t: torch.Tensor | None) -> torch.Tensor:
    """An input a layout reads only for some Ops: present whenever the Op's specs name it."""
    assert t is not None
    return t
