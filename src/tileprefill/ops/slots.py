"""A slot-mapped write into a paged KV cache, with no attention: vLLM's `reshape_and_cache_flash`.

Token t of k_new/v_new (T, Hkv, D) goes to slot s = slot_mapping[t] of k_pages/v_pages
(num_pages, page_size, Hkv, D): page s // page_size, row s % page_size; s = -1 skips
the token (padding). The engine computes the slots (it owns the page allocation); this
Op checks and writes them.

`op.plan(slot_mapping, shape=SlotAppendShape(...))` once per batch: the context, the
plan step (one slot-append kernel), and with `validate=True` the value checks (one
device-to-host copy); then `plan.run(k_new, v_new, k_pages, v_pages)` per layer:
metadata checks that read no device memory, then one launch. `op(k_new, v_new, k_pages,
v_pages, slot_mapping)` is both in one call. Every check runs before the write, so a
rejected call leaves the caches byte for byte unchanged.

This is not a `PrefillOp`: it has no q, no output and no attention parameters, so it
shares the pieces of one (the context, `select_plan`, the kernel map, the specs and
checks) rather than its class.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import ClassVar, NamedTuple

import torch

from tileprefill.context import Arch, DType, IndexDType, KVLayout, PrefillContext, RopeMode, arch_of
from tileprefill.kernels.base import Kernel, SlotAppendKernel, SlotAppendLaunch, StaticFacts
from tileprefill.kernels.registry import ALL_KERNELS
from tileprefill.keys import KernelKey
from tileprefill.ops.decision import warn_without_gpu_kernel
from tileprefill.ops.op import candidate_keys, checked_kernel_map, concrete_device, metadata_specs
from tileprefill.ops.plan import DecidedPlan, Expected, Requirement, expected_of, matches
from tileprefill.selection import PrefillPlan, select_plan
from tileprefill.validation import (
    Binding,
    DtypeRule,
    StrideRule,
    TensorSpec,
    check_apart,
    check_metadata,
    check_positive,
    check_same_strides,
    check_slot_mapping,
    check_slots_fit,
    spec,
)


class SlotAppendShape(NamedTuple):
    """The data tensors' sizes a slot-append plan is made for (the same in every layer of the batch)."""

    tokens: int  # T: k_new/v_new (T, Hkv, D), slot_mapping (T,)
    page_size: int  # PS: pages (num_pages, PS, Hkv, D)
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device


_K_NEW = spec("k_new", DtypeRule.ACTIVATION, "T, Hkv, D", StrideRule.VIEW)
_V_NEW = spec("v_new", DtypeRule.SAME_AS_K_NEW, "T, Hkv, D", StrideRule.VIEW)
_K_PAGES = spec("k_pages", DtypeRule.SAME_AS_K_NEW, "NP, PS, Hkv, D", StrideRule.VIEW)
_V_PAGES = spec("v_pages", DtypeRule.SAME_AS_K_NEW, "NP, PS, Hkv, D", StrideRule.VIEW)
_SLOT_MAPPING = spec("slot_mapping", DtypeRule.INDEX, "T")


@functools.cache
def _decided(
    dtype: DType, device: torch.device, head_dim: int, page_size: int
) -> tuple[PrefillContext, PrefillPlan]:
    """The context of a slot-mapped write and its plan (one slot-append step), once per configuration."""
    context = PrefillContext(
        kv_layout=KVLayout.PAGED,
        rope=RopeMode.NONE,
        append=True,
        q_dtype=dtype,
        kv_dtype=dtype,
        arch=arch_of(device),
        head_dim=head_dim,
        group_size=1,  # no query heads: read by no decision of a slot-mapped write
        causal=False,  # no attention
        page_size=page_size,
        ragged=True,
        slot_mapping=True,
    )
    plan = select_plan(context)
    assert plan.slot_append is not None and plan.steps == (plan.slot_append,), plan
    if context.arch is Arch.CPU:
        warn_without_gpu_kernel(context)
    return context, plan


class PagedCacheSlotAppendPlan(DecidedPlan):
    """What `PagedCacheSlotAppend.plan(...)` returns: the slot mapping, its checks and the bound
    launch. Immutable; `run` writes one layer's k_new/v_new into its pages."""

    __slots__ = ("_dims", "_dtype", "_expected", "_launch", "_requirements", "_slot_mapping")

    def __init__(
        self,
        decision: tuple[PrefillContext, PrefillPlan],
        dims: Mapping[str, Binding],
        requirements: Sequence[Requirement],
        launch: SlotAppendLaunch,
        slot_mapping: torch.Tensor,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(decision)
        self._dims = dict(dims)
        self._requirements = tuple(requirements)
        self._launch = launch
        self._slot_mapping = slot_mapping
        self._dtype = dtype
        sizes = {symbol: binding.value for symbol, binding in dims.items()}
        self._expected: tuple[Expected, ...] = tuple(
            expected_of(s, sizes, dtype) for s in PagedCacheSlotAppend.run_specs
        )

    @property
    def slot_mapping(self) -> torch.Tensor:
        """The tensor every `run` reads the slots from: the caller's own (not a copy). Writing new
        values into it between CUDA-graph replays of `run` changes where they write; the plan's
        checks (validate=True) covered the values it had when planned."""
        return self._slot_mapping

    def run(
        self, k_new: torch.Tensor, v_new: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor
    ) -> None:
        """Write this layer's k_new, v_new (T, Hkv, D) into its pages at the plan's slots, in place."""
        tensors = (k_new, v_new, k_pages, v_pages)
        self._check(tensors)
        self._launch(k_new, v_new, k_pages, v_pages, self._slot_mapping)

    def _check(self, tensors: Sequence[torch.Tensor]) -> None:
        """Metadata checks against the plan (no device read), then the plan's requirement on num_pages.

        The fast path compares each tensor with what the plan expects of it; on any difference the
        full `check_metadata` runs and raises the error that names the argument.
        """
        device = self._slot_mapping.device
        free = matches(tensors, self._expected, device)
        if free is None:
            specs = PagedCacheSlotAppend.run_specs
            check_metadata(specs, tensors, bound=self._dims, device=device, dtype=self._dtype)
            raise AssertionError(f"plan check: {[tuple(t.shape) for t in tensors]} differ from the plan")
        for requirement in self._requirements:
            if not requirement.holds(free[requirement.symbol]):
                requirement.fail(free[requirement.symbol])
        _check_apart(tensors)


def _check_apart(tensors: Sequence[torch.Tensor]) -> None:
    """The caches are written in place: views with one set of strides, sharing no memory with each
    other or with the new rows (metadata only; `check_metadata` checked each view)."""
    k_new, v_new, k_pages, v_pages = tensors
    check_same_strides({"k_pages": k_pages, "v_pages": v_pages})
    check_apart({"k_pages": k_pages, "v_pages": v_pages}, {"k_new": k_new, "v_new": v_new})


class PagedCacheSlotAppend:
    """Write k_new, v_new (T, Hkv, D) into k_pages, v_pages (num_pages, page_size, Hkv, D), in place,
    at the slots of slot_mapping (T,), int32 or int64: token t goes to page slot_mapping[t] //
    page_size, row slot_mapping[t] % page_size; -1 skips the token. vLLM's
    `reshape_and_cache_flash` (the caches here are two tensors, the layout (num_pages, page_size,
    Hkv, D)). Returns None.

    `plan(slot_mapping, shape=SlotAppendShape(...))` once per batch, then `run(k_new, v_new,
    k_pages, v_pages)` per layer; `op(k_new, v_new, k_pages, v_pages, slot_mapping)` does both.
    Every check runs before the write: a rejected call leaves the pages unchanged.
    `validate=False` skips (they read device values): slots in [-1, num_pages * page_size) and
    no slot twice. With bad values a slot outside [0, num_pages * page_size) writes nothing (no
    value makes the kernel write outside the pages); two tokens with one slot race, one of
    them wins.
    """

    kv_layout: ClassVar[KVLayout] = KVLayout.PAGED
    #: The Op's tensor inputs, in call order (the manifest lists the same), and the ones it writes.
    input_specs: ClassVar[tuple[TensorSpec, ...]] = (_K_NEW, _V_NEW, _K_PAGES, _V_PAGES, _SLOT_MAPPING)
    mutates: ClassVar[tuple[str, ...]] = ("k_pages", "v_pages")
    #: The names of the inputs `plan` takes (the per-batch metadata); `run` takes the others.
    plan_inputs: ClassVar[tuple[str, ...]] = ("slot_mapping",)
    plan_specs: ClassVar[tuple[TensorSpec, ...]] = metadata_specs(input_specs, plan_inputs)
    #: The inputs `run` takes, in call order (tests/test_slot_append.py checks that they are the rest).
    run_specs: ClassVar[tuple[TensorSpec, ...]] = (_K_NEW, _V_NEW, _K_PAGES, _V_PAGES)
    plan_class: ClassVar[type[PagedCacheSlotAppendPlan]] = PagedCacheSlotAppendPlan
    #: The keys any call of this Op may plan, and the registered kernel class of each.
    kernel_keys: ClassVar[tuple[KernelKey, ...]] = candidate_keys(
        KVLayout.PAGED, ragged=True, rotates=False, appends=True, slot_mapping=True
    )
    default_kernel_map: ClassVar[Mapping[KernelKey, type[Kernel]]] = MappingProxyType(
        {key: ALL_KERNELS[key] for key in kernel_keys if key in ALL_KERNELS}
    )

    def __init__(
        self,
        *,
        kernel_map: Mapping[KernelKey, type[Kernel]] | None = None,
        validate: bool = True,
    ) -> None:
        if not isinstance(validate, bool):
            raise TypeError(f"validate: expected a bool, got {validate!r}")
        self.validate = validate
        overrides = checked_kernel_map(type(self).__name__, self.kernel_keys, kernel_map or {})
        #: key -> kernel class used by this instance: the defaults with `kernel_map` merged over them.
        self.kernel_map: Mapping[KernelKey, type[Kernel]] = MappingProxyType(
            {**self.default_kernel_map, **overrides}
        )
        self._kernels: dict[KernelKey, Kernel] = {key: cls() for key, cls in self.kernel_map.items()}

    def __call__(
        self,
        k_new: torch.Tensor,
        v_new: torch.Tensor,
        k_pages: torch.Tensor,
        v_pages: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        tensors = (k_new, v_new, k_pages, v_pages, slot_mapping)
        # One metadata check over every input at once, so that each error names the input it is about.
        dims = check_metadata(self.input_specs, tensors)
        check_positive(dims, ("Hkv", "D", "PS"))
        shape = SlotAppendShape(
            tokens=dims["T"].value,
            page_size=dims["PS"].value,
            kv_heads=dims["Hkv"].value,
            head_dim=dims["D"].value,
            dtype=k_new.dtype,
            device=k_new.device,
        )
        self.plan(slot_mapping, shape=shape).run(k_new, v_new, k_pages, v_pages)

    def plan(self, slot_mapping: torch.Tensor, *, shape: SlotAppendShape) -> PagedCacheSlotAppendPlan:
        device = concrete_device(shape.device)
        for field in ("tokens", "page_size", "kv_heads", "head_dim"):
            value = getattr(shape, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"shape.{field}: expected an int, got {value!r}")
        dtype = DType.of(shape.dtype, argument="shape.dtype")
        dims = {
            "T": Binding(shape.tokens, "shape.tokens"),
            "PS": Binding(shape.page_size, "shape.page_size"),
            "Hkv": Binding(shape.kv_heads, "shape.kv_heads"),
            "D": Binding(shape.head_dim, "shape.head_dim"),
        }
        check_positive(dims, ("PS", "Hkv", "D"))
        if shape.tokens < 0:
            raise ValueError(f"shape.tokens: expected an int >= 0, got {shape.tokens}")
        dims = check_metadata(self.plan_specs, [slot_mapping], bound=dims, device=device)
        context, selected = _decided(dtype, device, shape.head_dim, shape.page_size)
        requirements: list[Requirement] = []
        if self.validate:
            values = slot_mapping.tolist()  # the one device-to-host copy
            check_slot_mapping(values)
            highest = max(values, default=-1)
            page_size = shape.page_size
            requirements.append(
                Requirement(
                    "NP",
                    lambda pages: highest < pages * page_size,
                    lambda pages: check_slots_fit(values, pages, page_size),
                )
            )
        facts = StaticFacts(
            arch=context.arch,
            dtype=dtype,
            heads=shape.kv_heads,
            kv_heads=shape.kv_heads,
            head_dim=shape.head_dim,
            page_size=shape.page_size,
            index_dtype=IndexDType.of(slot_mapping.dtype, argument="slot_mapping"),
        )
        launch = self._kernel_of(selected.slot_append).bind(facts)
        return PagedCacheSlotAppendPlan(
            (context, selected), dims, requirements, launch, slot_mapping, shape.dtype
        )

    def _kernel_of(self, key: KernelKey | None) -> SlotAppendKernel:
        assert key is not None, "the plan of every slot-mapped write has a slot-append step"
        kernel = self._kernels.get(key)
        if kernel is None:
            raise LookupError(
                f"{type(self).__name__}: the plan needs kernel {key.value}, but kernel_map has no class "
                f"for it: expected one of {sorted(k.value for k in self._kernels)}, got {key.value}; "
                f"pass kernel_map={{<its key>: <class>}}"
            )
        assert isinstance(kernel, SlotAppendKernel)  # kernel_map is checked on construction
        return kernel
