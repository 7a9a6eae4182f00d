"""The base of every public Op: its constructor, its kernel map, and the decision of a call's plan.

An engine calls attention once per layer per step, so an Op splits a call in two:

- `op.plan(<metadata tensors>, shape=<the data tensors' shape facts>)`, once per
  batch: the `PrefillContext` and `select_plan`'s `PrefillPlan` for it (`decide`),
  each step's kernel bound (a TileLang kernel resolves its compiled program
  here), the value checks (with `validate=True`, one device-to-host copy for all
  metadata tensors; none with `validate=False`) and what the kernels need that no
  layer changes: token positions, cache slots, kv lengths. It returns a
  `BatchPlan` (`ops/plan.py`).
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
values on the host, and the decision from metadata to `(PrefillContext, PrefillPlan)`
is one cached function that the compiler treats as a constant (`ops/decision.py`).
"""

from __future__ import annotations

import abc
import itertools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Generic,
    ParamSpec,
    Protocol,
    Required,
    TypeAlias,
    TypedDict,
    TypeVar,
)

import torch
from typing_extensions import TypeVar as DefaultTypeVar

from tileprefill.context import Arch, DType, KVLayout, KVOrder, PrefillContext, RopeMode, sm_count_of
from tileprefill.kernels.base import (
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    Kernel,
    PagedAttentionKernel,
    RaggedAttentionKernel,
    RopeAppendKernel,
    RopeAppendLaunch,
    RopeKernel,
    RopeLaunch,
    StaticFacts,
)
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
from tileprefill.ops.decision import decide, mark_decision_constant
from tileprefill.selection import TL_ATTENTION_HEAD_DIMS, PrefillPlan, rejections
from tileprefill.validation import (
    Binding,
    DtypeRule,
    TensorSpec,
    check_heads,
    check_metadata,
    check_positive,
    rotary_dim_of,
    spec,
)

if TYPE_CHECKING:
    from tileprefill.ops.plan import BatchPlan

KernelT = TypeVar("KernelT", bound=Kernel)
P = ParamSpec("P")
R = TypeVar("R")

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


# --- the kernel map --------------------------------------------------------------------------------


class Shape(Protocol):
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


# --- the Ops ---------------------------------------------------------------------------------------


class PrefillOp(abc.ABC, Generic[ResultT]):
    """Base of the public Ops. Subclasses declare their traits and input specs as class variables.

    Generic in what its calls return (`ResultT`): the output, or (out, lse) when built with
    `return_lse=True` (the module docstring says why and how the type follows the flag).

    On a CPU tensor every step runs its torch reference kernel. A call that no GPU kernel would
    serve (a head dim the TileLang programs are not compiled for: they serve 64 to 256 in steps
    of 16) runs there too, and warns with `NoGPUKernelWarning` once per configuration, naming
    the reason for each GPU arch; on a GPU the same call raises `UnsupportedContextError`. Turn
    the warning into an error with `warnings.simplefilter("error", NoGPUKernelWarning)`.
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
            mark_decision_constant()
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

    def _shape_dims(self, shape: Shape) -> dict[str, Binding]:
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
        self, shape: Shape, tensors: Sequence[torch.Tensor], extra: Mapping[str, Binding]
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

    def _decide(
        self, shape: Shape, page_size: int, kv_order: KVOrder = KVOrder.NHD
    ) -> tuple[PrefillContext, PrefillPlan]:
        """The context of a plan with `shape` and its selected steps (`decide`)."""
        # Under torch.compile with dynamic shapes a size may be symbolic. The plan needs the value:
        # operator.index (unlike int()) makes the tracer specialise it, guarding on it.
        return decide(
            kv_layout=self.kv_layout,
            rope=self.rope,
            append=self.appends,
            dtype=shape.dtype,
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

    def static_facts(self, context: PrefillContext, shape: Shape, *, rotary_dim: int = 0) -> StaticFacts:
        """What the plan's kernels are specialised for."""
        return StaticFacts(
            arch=context.arch,
            dtype=DType.of(shape.dtype, argument="shape.dtype"),
            heads=shape.heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            causal=self.causal,
            sm_scale=self.sm_scale if self.sm_scale is not None else float(shape.head_dim) ** -0.5,
            page_size=context.page_size,
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

    def _kernel_of(self, key: KernelKey | None, family: Callable[..., KernelT]) -> KernelT:
        """This Op's kernel instance for `key`, typed as the family the plan step needs (its class
        extends the key's family: `kernel_map` is checked on construction)."""
        assert key is not None, "a step the plan of every call of this Op has"
        kernel = self._kernels.get(key.value)
        if kernel is None:
            raise LookupError(
                f"{type(self).__name__}: the plan needs kernel {key.value}, but kernel_map has no class "
                f"for it: expected one of {sorted(self._kernels)}, got {key.value}; pass "
                f"kernel_map={{<its key>: <class>}}"
            )
        assert isinstance(kernel, family)  # type: ignore[arg-type]
        return kernel  # type: ignore[return-value]

    def _bind_rope(
        self, plan: PrefillPlan, static: StaticFacts
    ) -> tuple[RopeLaunch | None, RopeLaunch | None]:
        """The RoPE launches of q and of the keys (kv heads), or None without a RoPE step."""
        if plan.rope is None:
            return None, None
        kernel = self._kernel_of(plan.rope, RopeKernel)
        return kernel.bind(static), kernel.bind(static._replace(heads=static.kv_heads))

    def _bind_rope_append(self, plan: PrefillPlan, static: StaticFacts) -> RopeAppendLaunch | None:
        """The fused RoPE + append launch, or None without that step."""
        if plan.rope_append is None:
            return None
        return self._kernel_of(plan.rope_append, RopeAppendKernel).bind(static)

    def _rotary_dim(self, shape: Shape) -> int:
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
