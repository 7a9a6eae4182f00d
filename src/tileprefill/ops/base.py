"""What every public Op shares: constructor, kernel map, plan selection, and the plan/run split.

An engine calls attention once per layer per step, so an Op splits a call in two:

- `op.plan(<metadata tensors>, shape=<the data tensors' shape facts>)`, once per
  batch: builds the `PrefillContext`, asks `select_plan` for the steps, binds
  each step's kernel (a TileLang kernel resolves its compiled program here),
  runs the value checks (with `validate=True`, one device-to-host copy for all
  metadata tensors; none with `validate=False`) and derives what the kernels
  need that no layer changes: token positions, cache slots, kv lengths.
- `plan.run(<data tensors>)`, once per layer: metadata checks that read no
  device memory, the output allocation, and the launches.

`op(<all inputs>)` is `op.plan(...).run(...)` in one call.

The log-sum-exp (`return_lse=True`, a constructor flag): cascade and context-parallel
attention merge partial results over split key ranges through each row's softmax
log-sum-exp, so an Op built with it returns `(out, lse)` from every call and `run`,
lse float32 `(tokens, Hq)` for packed q and `(B, Sq, Hq)` for dense q: the natural log
of the sum over the visible keys of exp(scaled, capped score), as flash-attn defines it
and vLLM's `merge_attn_states` reads it, and -inf for a row that sees no key (FlashInfer's
prefill wrappers return base 2 unless asked for "ln": theirs times ln 2 is ours). `run_into`
takes what `run` returns as its first argument: the caller's `out`, or the pair `(out, lse)`.

Why a constructor flag and a type parameter, not a per-call flag or optional tensors: the
kernel with the LSE output is another compiled program, chosen once when a plan binds its
kernels; `run`'s inputs stay fixed and ordered; and the result type is known statically.
Each public Op is generic in what its calls return (`ResultT`: `torch.Tensor`, or
`OutputAndLSE`), and its constructor overloads (for type checkers only, on each public
class: mypy does not carry a base class's self-type overloads to subclasses) bind
`return_lse=True` to `OutputAndLSE`, so `mypy --strict` proves `out, lse = op(...)` and
`plan.run(...)`. A `return_lse` that is a plain bool gives the union. A layout module
(`ops/dense.py`, `ops/contiguous.py`, `ops/paged.py`) says how one layout's
inputs become a context, what its plan derives and which launches a plan
means; a public Op names its inputs and writes each signature once.

The one-shot call must trace under `torch.compile(fullgraph=True)` and `run`
must run under CUDA-graph capture when `validate=False`: neither reads device
values on the host, and the decision from metadata to plan is one cached
function that the compiler treats as a constant (`plan_steps`).
"""

from __future__ import annotations

import abc
import functools
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, Required, TypeAlias, TypedDict, TypeVar, cast

import torch
from typing_extensions import TypeVar as DefaultTypeVar

from tileprefill.context import Arch, DType, KVLayout, KVOrder, PrefillContext, RopeMode, arch_of, sm_count_of
from tileprefill.kernels.base import (
    NO_LSE,
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    Kernel,
    PagedAttentionKernel,
    RaggedAttentionKernel,
    RopeAppendLaunch,
    RopeLaunch,
    StaticFacts,
)
from tileprefill.kernels.launch import check_writable
from tileprefill.kernels.registry import ALL_KERNELS, kernel_family
from tileprefill.keys import (
    ALL_KEYS,
    AppendKey,
    AttentionKey,
    BatchKey,
    KernelKey,
    RopeAppendKey,
    RopeKey,
    SlotAppendKey,
)
from tileprefill.selection import (
    TL_ATTENTION_HEAD_DIMS,
    Explanation,
    PrefillPlan,
    explain,
    rejections,
    select_plan,
)
from tileprefill.validation import (
    Binding,
    Dims,
    DtypeRule,
    StrideRule,
    TensorSpec,
    check_heads,
    check_kv_order,
    check_metadata,
    check_positive,
    check_same_strides,
    distinct_elements,
    follows,
    rotary_dim_of,
    spec,
)

KernelT = TypeVar("KernelT", bound=Kernel)

#: What the calls of an Op built with `return_lse=True` return: the output and the float32 LSE.
OutputAndLSE: TypeAlias = tuple[torch.Tensor, torch.Tensor]
#: What an Op's calls (`op(...)`, `plan.run(...)`) return: its output, or with `return_lse=True`
#: (out, lse). Its default keeps a bare `GQAPrefill` annotation meaning the Op without the LSE.
ResultT = DefaultTypeVar("ResultT", bound=torch.Tensor | OutputAndLSE, default=torch.Tensor)


class OpOptions(TypedDict, total=False):
    """The constructor parameters of an Op without RoPE other than `return_lse` (the typing-only
    constructor overloads of the public Ops take them as `**options`)."""

    causal: bool
    sm_scale: float | None
    sliding_window: int | None
    softcap: float | None
    kernel_map: Mapping[KernelKey, type[Kernel]] | None
    validate: bool


class RopeOpOptions(OpOptions, total=False):
    """`OpOptions` of an Op with RoPE: `rope` is required."""

    rope: Required[RopeMode]
    rotary_dim: int | None


#: The RoPE tables every RoPE Op takes last: float32 (max_position, rotary_dim // 2).
COS = spec("cos", DtypeRule.FLOAT32, "P, R2")
SIN = spec("sin", DtypeRule.FLOAT32, "P, R2")


class CallFacts(NamedTuple):
    """The metadata of one plan that the context is made of (hashable, no tensors)."""

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
    sliding_window: int
    softcap: bool
    kv_order: KVOrder


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
        sliding_window=facts.sliding_window,
        softcap=facts.softcap,
        kv_order=facts.kv_order,
    )


@functools.cache
def _plan_of(facts: CallFacts) -> PrefillPlan:
    return select_plan(context_of(facts))


class StepNames(NamedTuple):
    """The `.value` of each key of a plan (what the traced call path looks kernels up by), and of the
    arch the context was read for."""

    batch: str | None
    rope: str | None
    append: str | None
    rope_append: str | None
    attention: str
    arch: str


def plan_steps(*facts: object) -> tuple[str | None, str | None, str | None, str | None, str, str]:
    """The plan of a call, as key values, from the fields of its CallFacts (cached).

    Under torch.compile this is a constant of the trace (see `_mark_plan_constant`). It
    deals in plain values because the tracer passes a constant function plain values and
    cannot hash the enum members it returns.
    """
    call = CallFacts(*facts)  # type: ignore[arg-type]
    plan = _plan_of(call)
    assert plan.attention is not None, "every CallFacts context attends (no slot mapping)"
    return (
        None if plan.batch is None else plan.batch.value,
        None if plan.rope is None else plan.rope.value,
        None if plan.append is None else plan.append.value,
        None if plan.rope_append is None else plan.rope_append.value,
        plan.attention.value,
        arch_of(call.device).value,
    )


_ARCHS: dict[str, Arch] = {arch.value: arch for arch in Arch}


@functools.cache
def _mark_plan_constant() -> None:
    """Let torch.compile run `plan_steps` while tracing and keep its result as a constant.

    The plan depends only on metadata that torch.compile guards anyway (dtypes, shapes,
    device), and building a context is not traceable (attrs' frozen __init__). Done on the
    first Op construction rather than at import: it imports torch._dynamo (about a second).
    """
    torch.compiler.assume_constant_result(plan_steps)  # type: ignore[no-untyped-call]


class ShapeFacts(Protocol):
    """What every layout's plan shape says of the data tensors of every layer (each layout adds sizes)."""

    @property
    def heads(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def rotary_dim(self) -> int: ...


def candidate_keys(
    kv_layout: KVLayout, *, ragged: bool, rotates: bool, appends: bool, slot_mapping: bool = False
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
            slot_mapping=slot_mapping,
        )
        for arch, rope, dtype, head_dim, causal, page_size in itertools.product(
            Arch, modes, DType, TL_ATTENTION_HEAD_DIMS, (True, False), page_sizes
        )
    ]
    return tuple(key for key in ALL_KEYS if any(not rejections(key, ctx) for ctx in contexts))


def _is_kernel_key(key: object) -> bool:
    return isinstance(key, BatchKey | RopeKey | AppendKey | RopeAppendKey | SlotAppendKey | AttentionKey)


def checked_kernel_map(
    op_name: str, kernel_keys: Sequence[KernelKey], kernel_map: Mapping[KernelKey, type[Kernel]]
) -> dict[KernelKey, type[Kernel]]:
    """A constructor's `kernel_map` overrides, checked: each key is one the Op can plan, and its class
    serves that key and extends the key's family."""
    checked: dict[KernelKey, type[Kernel]] = {}
    for key, kernel in kernel_map.items():
        if not _is_kernel_key(key):
            raise TypeError(
                "kernel_map: expected BatchKey, RopeKey, AppendKey, RopeAppendKey, SlotAppendKey or "
                f"AttentionKey keys, got {key!r} ({type(key).__name__})"
            )
        if key not in kernel_keys:
            raise ValueError(
                f"kernel_map: key {key.value} cannot serve any call of {op_name}: expected one of "
                f"{[k.value for k in kernel_keys]}, got {key.value}"
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


#: The attention families whose `with_lse` an Op built with `return_lse=True` calls.
_ATTENTION_FAMILIES: tuple[type[Kernel], ...] = (
    DenseAttentionKernel,
    RaggedAttentionKernel,
    ContiguousAttentionKernel,
    PagedAttentionKernel,
)


def _check_computes_lse(kernel_map: Mapping[KernelKey, type[Kernel]]) -> None:
    """Every attention kernel of an Op built with `return_lse=True` implements `with_lse` (a
    `kernel_map` override may implement `__call__` only): found on construction, not mid-run."""
    for key, kernel in kernel_map.items():
        # The class whose `with_lse` the kernel's calls resolve to (None outside attention).
        owner = next((c for c in kernel.__mro__ if "with_lse" in vars(c)), None)
        if owner is not None and owner in _ATTENTION_FAMILIES:
            raise ValueError(
                f"kernel_map[{key.value}]: expected a class that implements with_lse (the Op was built "
                f"with return_lse=True), got {kernel.__name__}, which inherits {owner.__name__}.with_lse "
                "(it raises NotImplementedError)"
            )


def concrete_device(device: torch.device | str) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device, as tensors made on it say."""
    concrete = torch.device(device)
    index: int | None = concrete.index
    if concrete.type == "cuda" and index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return concrete


def metadata_specs(specs: Sequence[TensorSpec], names: Sequence[str]) -> tuple[TensorSpec, ...]:
    """The specs of `names`, in the order of `specs` (the call order)."""
    chosen = tuple(s for s in specs if s.name in names)
    assert [s.name for s in chosen] == list(names), f"{names} are not in call order"
    return chosen


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """`t` (..., heads, D) as rows (N, heads, D): the launches of RoPE and appends see any layout's
    tokens or cache slots so."""
    return t if t.dim() == 3 else t.view(-1, *t.shape[-2:])


def rotate(
    rope_q: RopeLaunch,
    rope_k: RopeLaunch,
    q: torch.Tensor,
    k: torch.Tensor,
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q and k into new tensors (the inputs are the caller's), one launch each."""
    rotated_q, rotated_k = torch.empty_like(q), torch.empty_like(k)
    rope_q(as_rows(q), q_positions, cos, sin, as_rows(rotated_q))
    rope_k(as_rows(k), k_positions, cos, sin, as_rows(rotated_k))
    return rotated_q, rotated_k


def rotate_and_write(
    rope_append: RopeAppendLaunch,
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> torch.Tensor:
    """RoPE of q (into a new tensor, returned) and of k_new, and the write of the rotated keys and
    v_new into the caches (blocks, rows, Hkv, D) at `slots` (one per new token: row slot % rows of
    block slot // rows), in one launch."""
    rotated = torch.empty_like(q)
    rope_append(
        as_rows(q),
        as_rows(k_new),
        as_rows(v_new),
        positions,
        slots,
        cos,
        sin,
        k_cache,
        v_cache,
        as_rows(rotated),
    )
    return rotated


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


BatchT = TypeVar("BatchT")


class BatchPlan(Generic[BatchT, ResultT]):
    """What `op.plan(...)` returns: the steps of a batch and what its runs share. Immutable.

    Subclasses (one per public Op) add `run(<data tensors>) -> ResultT`, which checks the data
    tensors' metadata against the plan (reading no device memory) and launches, and
    `run_into(out, <data tensors>) -> ResultT`, the same into the caller's `out`: a tensor, or
    with `return_lse=True` the pair (out, lse), as `run` returns it.
    """

    def __init__(
        self,
        op: PrefillOp[Any],
        steps: StepNames,
        context: CallFacts,
        dims: Dims,
        requirements: Sequence[Requirement],
        batch: BatchT,
    ) -> None:
        #: What the layout's runs share: metadata tensors, what plan derived, the bound launches.
        self._batch = batch
        self._op = op
        self._steps = steps
        self._context = context
        self._dims = dict(dims)
        self._requirements = tuple(requirements)
        self._data_specs = op.run_specs
        self._device = context.device
        sizes = tuple((symbol, binding.value) for symbol, binding in dims.items())
        self._expected, self._expected_out, self._expected_lse = _expectations(
            type(op), sizes, context.q_dtype
        )
        self._out_spec = op.output_spec
        self._lse_spec = op.lse_spec
        #: Whether the plan's attention kernel writes the LSE and its runs return (out, lse).
        self._lse = op.return_lse

    @property
    def plan(self) -> PrefillPlan:
        """The selected kernel keys, step by step."""
        return _plan_of(self._context)

    @property
    def steps(self) -> tuple[KernelKey, ...]:
        """The plan's kernel keys, in the order they launch."""
        return self.plan.steps

    def explain(self) -> Explanation:
        """The chosen plan and why every other kernel was not chosen."""
        return explain(context_of(self._context))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.plan})"

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        """Metadata checks of the data tensors against the plan (no device read), then the plan's
        requirements on the sizes the plan left free.

        The fast path compares each tensor with what the plan expects of it; on any difference
        the full `check_metadata` runs and raises the error that names the argument (a
        difference it does not see cannot exist: both read the same specs and sizes).
        """
        free: dict[str, int] = {}
        for t, expected in zip(tensors, self._expected, strict=True):
            if not (
                isinstance(t, torch.Tensor)
                and t.dtype == expected.dtype
                and t.device == self._device
                and follows(t, expected.strides)
            ):
                break
            shape = t.shape
            if expected.lead is None:
                if shape != expected.shape:
                    break
                continue
            if len(shape) != len(expected.shape) + 1 or shape[1:] != expected.shape:
                break
            if free.setdefault(expected.lead, shape[0]) != shape[0]:
                break
        else:
            for requirement in self._requirements:
                size = (
                    free[requirement.symbol]
                    if requirement.symbol in free
                    else self._dims[requirement.symbol].value
                )
                if not requirement.holds(size):
                    requirement.fail(size)
            return
        check_metadata(self._data_specs, tensors, bound=self._dims, device=self._device)
        raise AssertionError(f"plan check: {[tuple(t.shape) for t in tensors]} differ from the plan")

    def _allocate(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The output of `run` (like q) and, with `return_lse`, its LSE (float32, q's shape less the
        head dim); `NO_LSE` otherwise (the launches neither read nor write it). Both follow q's sizes,
        as torch.compile traces them."""
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device) if self._lse else NO_LSE
        return torch.empty_like(q), lse

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
        """`out` of `run_into`: the output's dtype, shape and device, contiguous and 16-byte aligned
        (the programs write it directly), sharing no memory with an input (metadata only)."""
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
        """A caller's tensor a run writes (returned, checked): the plan's dtype, shape and device,
        contiguous and 16-byte aligned, sharing no memory with an input (metadata only)."""
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
        check_writable(name, t)
        for input_spec, x in zip(self._data_specs, inputs, strict=True):
            if overlaps(t, x):
                raise ValueError(
                    f"{name}: expected memory apart from every input, got memory shared with "
                    f"{input_spec.name} (the programs read {input_spec.name} while they write {name})"
                )
        return t


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The byte range [start, end) a tensor's elements lie in."""
    start = t.data_ptr()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return start, start + (extent * t.element_size() if t.numel() else 0)


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory (metadata only). Byte ranges that do not meet never do.
    Two views with one shape and one set of strides are told apart exactly: the K and V halves of
    one cache storage interleave (vLLM's K|V-packed and `(blocks, 2, ...)` layouts) without sharing
    an element. Any other pair whose ranges meet counts as sharing."""
    if a.device != b.device or not a.numel() or not b.numel():
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    if not (a0 < b1 and b0 < a1):
        return False
    itemsize = a.element_size()
    if a.shape != b.shape or a.stride() != b.stride() or b.element_size() != itemsize:
        return True
    return _view_meets_shifted(tuple(a.shape), a.stride(), itemsize, b.data_ptr() - a0)


@functools.lru_cache(maxsize=256)
def _view_meets_shifted(
    shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int, shift_bytes: int
) -> bool:
    """Whether a view meets itself moved by `shift_bytes` (`overlaps` of two views of one shape and
    strides). Cached: an engine's K and V views keep one layout and one offset, checked every run."""
    if not distinct_elements(shape, strides):
        return True  # elements of one view overlap each other: no exact answer here
    shift, misaligned = divmod(shift_bytes, itemsize)
    dims = sorted(
        ((stride, size) for stride, size in zip(strides, shape, strict=True) if size > 1), reverse=True
    )
    return bool(misaligned) or _shift_meets(shift, dims)


def check_apart(written: Mapping[str, torch.Tensor], read: Mapping[str, torch.Tensor]) -> None:
    """The tensors a call writes in place share no memory with each other or with what it reads
    (metadata only): a shared element would race, or change an input in the middle of the call.
    Each written tensor is checked against the written ones before it, then against the read.
    Under torch.compile nothing is checked: addresses are not traced (as `cache_view_problem`)."""
    if torch.compiler.is_compiling():
        return
    # Tensors of separate allocations never meet: `overlaps` (byte ranges, exact for interleaved
    # views) runs only on two views of one storage. A run checks this every layer.
    tensors = {**written, **read}
    storage = {name: t.untyped_storage().data_ptr() for name, t in tensors.items()}
    earlier: list[str] = []
    for name, t in written.items():
        for other_name in (*earlier, *read):
            if storage[name] == storage[other_name] and overlaps(t, tensors[other_name]):
                raise ValueError(
                    f"{name}: expected memory apart from {other_name}, got memory shared with "
                    f"{other_name} (the write of {name} would change {other_name})"
                )
        earlier.append(name)


def _shift_meets(shift: int, dims: Sequence[tuple[int, int]]) -> bool:
    """Whether a view whose (stride, size) dims, outermost first, nest (each stride at least the
    extent of the dims inside it) meets itself moved by `shift` elements: whether shift is a sum
    of d * stride over its dims with |d| < size. The dims inside one span less than its stride, so
    only the two multiples of the outermost stride nearest to shift can start such a sum."""
    if not dims:
        return shift == 0
    (stride, size), inner = dims[0], dims[1:]
    return any(
        abs(d) < size and _shift_meets(shift - d * stride, inner)
        for d in {shift // stride, -(-shift // stride)}
    )


#: Attention of q over a plan's caches into out and lse (q, k_cache, v_cache, out, lse), the plan's
#: metadata bound; lse is `NO_LSE` unless the plan was made with `return_lse`.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
#: The write of k_new, v_new into a plan's caches (k_new, v_new, k_cache, v_cache), metadata bound.
Append = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class CacheSteps(NamedTuple):
    """What the runs of a plan over a KV cache (contiguous or paged) launch, with the plan's metadata
    (lengths, block table, cu_seqlens) bound: [RoPE, append | RoPE + append in one,] attention."""

    positions: torch.Tensor  # positions of the new tokens (RoPE Ops; empty otherwise)
    slots: torch.Tensor  # cache rows of the new tokens (the fused RoPE + append step; empty otherwise)
    attend: Attend
    append: Append | None
    rope_q: RopeLaunch | None
    rope_k: RopeLaunch | None
    rope_append: RopeAppendLaunch | None


class CachePlan(BatchPlan[CacheSteps, ResultT]):
    """A plan over a KV cache: its runs rotate and write the new keys (append Ops), then attend."""

    #: The names of the two cache inputs, for errors.
    cache_names: ClassVar[tuple[str, str]]

    def _run(
        self,
        q: torch.Tensor,
        k_new: torch.Tensor | None,
        v_new: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        out: torch.Tensor,
        lse: torch.Tensor,
    ) -> None:
        s = self._batch
        # The caches are views the programs read (and appends write) in place, never copies: one set
        # of strides for both, in the order the plan was made for (`check_metadata` checked each).
        k_name, v_name = self.cache_names
        check_same_strides({k_name: k_cache, v_name: v_cache})
        check_kv_order(k_name, k_cache, self._context.kv_order, "the plan's shape.kv_order")
        if k_new is not None and v_new is not None:
            # An append writes the caches in place while its launches read q and the new rows.
            check_apart({k_name: k_cache, v_name: v_cache}, {"q": q, "k_new": k_new, "v_new": v_new})
        if s.rope_append is not None:
            assert k_new is not None and v_new is not None and cos is not None and sin is not None
            q = rotate_and_write(
                s.rope_append, q, k_new, v_new, s.positions, s.slots, cos, sin, k_cache, v_cache
            )
        elif s.append is not None:
            assert k_new is not None and v_new is not None
            if s.rope_q is not None and s.rope_k is not None:
                assert cos is not None and sin is not None
                q, k_new = rotate(s.rope_q, s.rope_k, q, k_new, s.positions, s.positions, cos, sin)
            s.append(k_new, v_new, k_cache, v_cache)
        s.attend(q, k_cache, v_cache, out, lse)


class PrefillOp(abc.ABC, Generic[ResultT]):
    """Base of the public Ops. Subclasses declare their traits and input specs as class variables.

    Generic in what its calls return (`ResultT`): the output, or (out, lse) when built with
    `return_lse=True` (the module docstring says why and how the type follows the flag).
    """

    # Traits of the Op: what contexts it builds (and so which kernels can serve it).
    kv_layout: ClassVar[KVLayout]
    ragged: ClassVar[bool] = False
    appends: ClassVar[bool] = False
    rotates: ClassVar[bool] = False
    #: The Op's tensor inputs, in call order, and its output (the manifest lists the same).
    input_specs: ClassVar[tuple[TensorSpec, ...]]
    output_spec: ClassVar[TensorSpec]
    #: The float32 log-sum-exp its calls also return with `return_lse=True` (out's shape less D).
    lse_spec: ClassVar[TensorSpec]
    #: The names of the inputs `plan` takes (the per-batch metadata); `run` takes the others.
    plan_inputs: ClassVar[tuple[str, ...]]
    #: The specs of `plan`'s and `run`'s tensor inputs, in call order (derived).
    plan_specs: ClassVar[tuple[TensorSpec, ...]]
    run_specs: ClassVar[tuple[TensorSpec, ...]]
    #: The class of this Op's plans (it adds `run` with the Op's data tensors).
    plan_class: ClassVar[type[BatchPlan[Any, Any]]]
    #: The keys any call of this Op may plan, and the registered kernel class of each.
    kernel_keys: ClassVar[tuple[KernelKey, ...]]
    default_kernel_map: ClassVar[Mapping[KernelKey, type[Kernel]]]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        if "input_specs" in cls.__dict__:  # a public Op, not a layout base
            cls.plan_specs = metadata_specs(cls.input_specs, cls.plan_inputs)
            cls.run_specs = tuple(s for s in cls.input_specs if s.name not in cls.plan_inputs)
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
        sliding_window: int | None = None,
        softcap: float | None = None,
        return_lse: bool = False,
        kernel_map: Mapping[KernelKey, type[Kernel]] | None = None,
        validate: bool = True,
    ) -> None:
        if not isinstance(causal, bool):
            raise TypeError(f"causal: expected a bool, got {causal!r}")
        if sliding_window is not None and (
            isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1
        ):
            raise ValueError(f"sliding_window: expected None or an int >= 1, got {sliding_window!r}")
        if sliding_window is not None and not causal:
            raise ValueError(
                f"sliding_window: expected None with causal=False (a window ends at the query's own "
                f"position), got {sliding_window!r}"
            )
        if softcap is not None and (
            isinstance(softcap, bool)
            or not isinstance(softcap, int | float)
            or not (softcap > 0 and math.isfinite(softcap))
        ):
            raise ValueError(f"softcap: expected None or a positive finite float, got {softcap!r}")
        if sm_scale is not None and (
            isinstance(sm_scale, bool) or not isinstance(sm_scale, int | float) or not sm_scale > 0
        ):
            raise ValueError(f"sm_scale: expected None or a positive float, got {sm_scale!r}")
        if not isinstance(validate, bool):
            raise TypeError(f"validate: expected a bool, got {validate!r}")
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse: expected a bool, got {return_lse!r}")
        if not torch.compiler.is_compiling():
            _mark_plan_constant()
        self.causal = causal
        self.sm_scale = None if sm_scale is None else float(sm_scale)
        #: 0 and 0.0 stand for "none" in the context and the kernels' static facts.
        self.sliding_window = 0 if sliding_window is None else sliding_window
        self.softcap = 0.0 if softcap is None else float(softcap)
        self._capped = softcap is not None
        self.validate = validate
        #: Whether calls return (out, lse): the plan binds the attention kernel with `StaticFacts.lse`.
        self.return_lse = return_lse
        self.rope = RopeMode.NONE
        self.rotary_dim: int | None = None
        overrides = self._checked_overrides(kernel_map or {})
        #: key -> kernel class used by this instance: the defaults with `kernel_map` merged over them.
        self.kernel_map: Mapping[KernelKey, type[Kernel]] = MappingProxyType(
            {**self.default_kernel_map, **overrides}
        )
        if return_lse:
            _check_computes_lse(self.kernel_map)
        # Kernels are cheap to construct; one instance per key, looked up by key value in `plan`.
        self._kernels: dict[str, Kernel] = {key.value: cls() for key, cls in self.kernel_map.items()}

    @classmethod
    def _checked_overrides(
        cls, kernel_map: Mapping[KernelKey, type[Kernel]]
    ) -> dict[KernelKey, type[Kernel]]:
        return checked_kernel_map(cls.__name__, cls.kernel_keys, kernel_map)

    # --- what `plan` shares ----------------------------------------------------------------------

    @staticmethod
    def _concrete_device(device: torch.device | str) -> torch.device:
        return concrete_device(device)

    def _shape_dims(self, shape: ShapeFacts) -> dict[str, Binding]:
        """The shape symbols a plan's `shape` fixes, checked like the inputs' sizes would be."""
        for field in ("heads", "kv_heads", "head_dim"):
            value = getattr(shape, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"shape.{field}: expected an int, got {value!r}")
        DType.of(shape.dtype, argument="shape.dtype")
        dims = {
            "Hq": Binding(shape.heads, "shape.heads"),
            "Hkv": Binding(shape.kv_heads, "shape.kv_heads"),
            "D": Binding(shape.head_dim, "shape.head_dim"),
        }
        check_positive(dims, ("Hq", "Hkv", "D"))
        check_heads(dims)
        return dims

    def _metadata_dims(
        self, shape: ShapeFacts, tensors: Sequence[torch.Tensor], extra: Mapping[str, Binding]
    ) -> dict[str, Binding]:
        """Check `plan`'s tensors (on the shape's device) and bind every symbol a plan knows."""
        dims = {**self._shape_dims(shape), **extra}
        for s, t in zip(self.plan_specs, tensors, strict=True):
            if isinstance(t, torch.Tensor) and t.device != shape.device:
                raise ValueError(
                    f"{s.name}: expected a tensor on {shape.device} (shape.device), got {t.device}"
                )
        bound = check_metadata(self.plan_specs, tensors, bound=dims, device=shape.device)
        if self.rotates and self.rotary_dim is not None:
            bound["R2"] = Binding(self.rotary_dim // 2, "rotary_dim")
        return bound

    def _check_call(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, Binding]:
        """The metadata checks of a one-shot call, over all its inputs at once, so that every error
        names the input it is about; returns the size of each shape symbol."""
        dims = check_metadata(self.input_specs, [tensors[s.name] for s in self.input_specs])
        check_positive(dims, [s for s in ("Hq", "Hkv", "D", "PS", "R2", "P") if s in dims])
        check_heads(dims)
        if self.rotates:
            rotary_dim_of(dims, self.rotary_dim)
        return dims

    def _facts(self, shape: ShapeFacts, page_size: int, kv_order: KVOrder = KVOrder.NHD) -> CallFacts:
        # Under torch.compile with dynamic shapes a size may be symbolic. The plan needs the value:
        # operator.index (unlike int()) makes the tracer specialise it, guarding on it.
        return CallFacts(
            kv_layout=self.kv_layout,
            rope=self.rope,
            append=self.appends,
            q_dtype=shape.dtype,
            kv_dtype=shape.dtype,
            device=shape.device,
            head_dim=operator.index(shape.head_dim),
            group_size=operator.index(shape.heads // shape.kv_heads),
            causal=self.causal,
            page_size=operator.index(page_size),
            ragged=self.ragged,
            sliding_window=operator.index(self.sliding_window),
            # Whether, not how much: under torch.compile the float is symbolic, and the plan (a
            # constant of the trace) depends only on the bool.
            softcap=self._capped,
            kv_order=kv_order,
        )

    def _select(self, facts: CallFacts) -> StepNames:
        return StepNames(*plan_steps(*facts))

    def static_facts(
        self, facts: CallFacts, steps: StepNames, shape: ShapeFacts, *, rotary_dim: int = 0
    ) -> StaticFacts:
        """What the plan's kernels are specialised for."""
        return StaticFacts(
            arch=_ARCHS[steps.arch],
            dtype=DType.of(shape.dtype, argument="shape.dtype"),
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            causal=self.causal,
            sm_scale=self.sm_scale if self.sm_scale is not None else float(shape.head_dim) ** -0.5,
            page_size=facts.page_size,
            rotary_dim=rotary_dim,
            window=self.sliding_window,
            softcap=self.softcap,
        )

    def attention_facts(self, static: StaticFacts, device: torch.device) -> StaticFacts:
        """What the plan's attention kernel is specialised for: `static`, whether it writes the LSE
        and, on SM90, the SM count of `device` (one CTA per SM for a persistent program). The other
        steps keep both unset: facts they do not read must not compile them twice."""
        sm_count = sm_count_of(device) if static.arch is Arch.SM90 else 0
        return static._replace(lse=self.return_lse, sm_count=sm_count)

    def _kernel_of(self, name: str, family: Callable[..., KernelT]) -> KernelT:
        """This Op's kernel instance for the key whose value is `name`, typed as the family the plan
        step needs (its class extends the key's family: `kernel_map` is checked on construction)."""
        kernel = self._kernels.get(name)
        if kernel is None:
            raise LookupError(
                f"{type(self).__name__}: the plan needs kernel {name}, but kernel_map has no class for "
                f"it: expected one of {sorted(self._kernels)}, got {name}; pass "
                f"kernel_map={{<its key>: <class>}}"
            )
        assert isinstance(kernel, family)  # type: ignore[arg-type]
        return kernel  # type: ignore[return-value]

    def _rotary_dim(self, shape: ShapeFacts) -> int:
        """The rotary dim a RoPE plan's kernels are built for: the constructor's, else the shape's."""
        if self.rotary_dim is not None:
            if shape.rotary_dim not in (0, self.rotary_dim):
                raise ValueError(
                    f"shape.rotary_dim: expected 0 or {self.rotary_dim} (the Op's rotary_dim), "
                    f"got {shape.rotary_dim}"
                )
            return self.rotary_dim
        if (
            isinstance(shape.rotary_dim, bool)
            or not isinstance(shape.rotary_dim, int)
            or shape.rotary_dim < 2
        ):
            raise ValueError(
                f"shape.rotary_dim: expected 2 * cos.shape[1] (an even int >= 2: the Op was built without "
                f"rotary_dim), got {shape.rotary_dim!r}"
            )
        return shape.rotary_dim


class RotatingOp(PrefillOp[ResultT]):
    """An Op that rotates q and the keys with RoPE before attention."""

    rotates: ClassVar[bool] = True

    def __init__(
        self,
        *,
        rope: RopeMode,
        rotary_dim: int | None = None,
        causal: bool = True,
        sm_scale: float | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        return_lse: bool = False,
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
        super().__init__(
            causal=causal,
            sm_scale=sm_scale,
            sliding_window=sliding_window,
            softcap=softcap,
            return_lse=return_lse,
            kernel_map=kernel_map,
            validate=validate,
        )
        self.rope = rope
        self.rotary_dim = rotary_dim
