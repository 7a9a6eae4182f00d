"""The one launch path of every TileLang kernel.

Every TileLang kernel key has one `KernelRecord`: the tensor parameters of its
program in order (outputs are parameters too: callers allocate them), the ones
the program writes, and how the static facts of a plan become the program's
factory and arguments. `register(record)` makes it the custom op
`tileprefill::<key value>`; `Launcher.of(record, facts)` is what a plan holds:

- in eager calls (CUDA-graph capture included) a launch is a direct call of
  the compiled program's TVM-FFI entry function, so no Python wrapper of
  TileLang's and no torch dispatch sit on the hot path;
- while `torch.compile` traces, a launch is the custom op, which declares the
  tensors the program writes so that the compiler orders reads after it.

Every custom op returns nothing and has one schema shape: the record's tensors,
then the static facts as scalars. Its implementation rebuilds the launcher from
those (compiled once, cached by `build`).

A program is compiled for some of the facts (`KernelRecord.program`: its factory's arguments) and
may take others at launch, as scalar parameters after its tensors (`KernelRecord.scalar_params`):
launchers of facts that differ only in those share one compiled program. tilelang is imported only
when a program is built: importing this module does not import it.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import attrs
import torch

from tileprefill.context import Arch, DType, IndexDType
from tileprefill.kernels.base import StaticFacts
from tileprefill.kernels.compile import build, is_recorded, is_recording
from tileprefill.kernels.precompiled import PrecompiledKernel
from tileprefill.keys import KernelKey
from tileprefill.validation import view_problem

if TYPE_CHECKING:
    from torch._library.custom_ops import CustomOpDef


class Program(NamedTuple):
    """A TileLang program factory and the static arguments it is called with, for one arch."""

    factory: Callable[..., Any]
    args: tuple[Hashable, ...]
    arch: Arch


def no_scalar_params(facts: StaticFacts) -> tuple[float | int, ...]:
    """The scalar parameters of a program that takes none (only tensors)."""
    return ()


@attrs.frozen
class KernelRecord:
    """What the launch path knows of one TileLang kernel key."""

    key: KernelKey
    #: The program's tensor parameters, in order (outputs included).
    tensors: tuple[str, ...]
    #: The parameters the program writes (its outputs and any cache).
    mutates: tuple[str, ...]
    #: The program that serves `facts` (a pure function of them).
    program: Callable[[StaticFacts], Program]
    #: The values of the program's scalar parameters, which follow its tensors, for `facts`: the
    #: facts it is not compiled for but reads at launch (a pure function of them).
    scalar_params: Callable[[StaticFacts], tuple[float | int, ...]] = no_scalar_params
    #: A second record of the same key for programs with another parameter list (attention with
    #: `facts.lse` writes one more output) names itself by this suffix: one custom op each.
    variant: str = ""
    #: The parameters of rows (..., H, D) the program reads and writes through their strides
    #: (`kernels/tl/views.py`): q, k and v, the KV caches, the new keys and values, the outputs of
    #: rows. Views of the caller's storage with any strides the caller checked
    #: (`validation.check_view`), passed as they are, never copied: a copy of a fused projection's
    #: slice is a copy per layer, one of a cache a whole cache, and an append into a copy is lost.
    views: tuple[str, ...] = ()

    @property
    def op_name(self) -> str:
        return f"tileprefill::{self.key.value}{self.variant}"

    @property
    def schema(self) -> str:
        tensors = ", ".join(
            f"Tensor(a{i}!) {name}" if name in self.mutates else f"Tensor {name}"
            for i, name in enumerate(self.tensors)
        )
        return f"({tensors}, {_FACTS_SCHEMA}) -> ()"


#: The static facts as custom-op scalars, in `StaticFacts` order.
_FACTS_SCHEMA: Final = (
    "str arch, str dtype, int heads, int kv_heads, int head_dim, bool causal, float sm_scale, "
    "int page_size, int rotary_dim, int window, float softcap, bool lse, int sm_count, str index_dtype"
)


def scalars(facts: StaticFacts) -> tuple[object, ...]:
    """The static facts as a custom op takes them, after its tensors (the schema's order)."""
    return (facts.arch.value, facts.dtype.value, *facts[2:-1], facts.index_dtype.value)


def _facts(scalars: tuple[Any, ...]) -> StaticFacts:
    arch, dtype, *rest, index_dtype = scalars
    return StaticFacts(Arch(arch), DType(dtype), *rest)._replace(index_dtype=IndexDType(index_dtype))


#: The custom op of every registered record without a variant, by key.
OPS: dict[KernelKey, CustomOpDef] = {}
#: The custom op of every registered record, by its name.
_OPS_BY_NAME: dict[str, CustomOpDef] = {}
_RECORDS: dict[str, KernelRecord] = {}


def register(record: KernelRecord) -> KernelRecord:
    """Register `record`'s custom op (at import of its kernel module; tilelang is not imported)."""
    if record.op_name in _RECORDS:
        raise RuntimeError(f"kernel key {record.key.value} has two launch records {record.op_name}")
    count = len(record.tensors)

    def launch_op(*arguments: Any) -> None:
        tensors, scalars = arguments[:count], arguments[count:]
        Launcher.of(record, _facts(scalars)).direct(*tensors)

    def fake(*arguments: Any) -> None:
        return None

    op = torch.library.custom_op(
        record.op_name, launch_op, mutates_args=record.mutates, device_types="cuda", schema=record.schema
    )
    op.register_fake(fake)
    if not record.variant:
        OPS[record.key] = op
    _OPS_BY_NAME[record.op_name] = op
    _RECORDS[record.op_name] = record
    return record


#: Every launcher `Launcher.of` made, by record name and static facts.
_LAUNCHERS: dict[tuple[str, StaticFacts], Launcher] = {}


def _entry_function(kernel: Any) -> Callable[..., object]:
    """The TVM-FFI function a compiled TileLang kernel runs, called with every parameter (outputs
    included): TileLang's own `__call__` wraps it in per-call Python (argument stitching, output
    allocation) that costs about 10 us. Falls back to the kernel itself for other backends."""
    if isinstance(kernel, PrecompiledKernel):  # loaded from a precompiled directory
        return kernel.entry
    adapter = getattr(kernel, "adapter", None)
    exportable = getattr(adapter, "get_exportable_executable", None)
    if exportable is None:
        return kernel  # type: ignore[no-any-return]
    executable = exportable()
    # A freshly compiled kernel holds an Executable (linked on first use); one loaded from
    # TileLang's disk cache holds the loaded runtime module itself.
    module = executable.jit() if hasattr(type(executable), "jit") else executable
    return module.main  # type: ignore[no-any-return]


class Launcher:
    """One compiled program for one set of static facts, ready to launch (what `bind` returns).

    Made by `Launcher.of` once per plan; while torch.compile traces, nothing is built: a
    launch is then the custom op, whose implementation builds (cached) when the compiled
    graph runs.
    """

    __slots__ = ("_entry", "_inputs", "_op", "_scalar_params", "_scalars")

    def __init__(self, record: KernelRecord, facts: StaticFacts) -> None:
        self._op = _OPS_BY_NAME[record.op_name]
        self._scalars = scalars(facts)
        self._scalar_params: tuple[float | int, ...] = ()
        #: Which parameters may be copied into the layout the program reads: the read-only ones but
        #: the views (the index tensors and RoPE tables).
        self._inputs = tuple(
            name not in record.mutates and name not in record.views for name in record.tensors
        )
        self._entry: Callable[..., object] | None = None
        if torch.compiler.is_compiling():
            return  # the custom op's launcher, made from the facts when the graph runs, passes them
        # Checked before anything is built: a rejected value builds nothing.
        self._scalar_params = tuple(record.scalar_params(facts))
        program = record.program(facts)
        kernel = build(program.factory, program.args, program.arch)
        # A warm-up's recorded build launches nothing.
        self._entry = kernel if is_recorded(kernel) else _entry_function(kernel)

    @classmethod
    def of(cls, record: KernelRecord, facts: StaticFacts) -> Launcher:
        """The launcher of `record` for `facts`, made once: an engine plans every step, and making
        one (program arguments, build cache, TVM-FFI module lookup) costs about 10 us. Launchers
        made while tracing or recording builds launch differently and are not kept."""
        launcher = _LAUNCHERS.get((record.op_name, facts))
        if launcher is not None and not is_recording():
            return launcher
        launcher = cls(record, facts)
        if launcher._entry is not None and not is_recording():
            _LAUNCHERS[record.op_name, facts] = launcher
        return launcher

    def __call__(self, *tensors: torch.Tensor) -> None:
        if torch.compiler.is_compiling():
            self._op(*tensors, *self._scalars)
        else:
            self.direct(*tensors)

    def direct(self, *tensors: torch.Tensor) -> None:
        """Launch on the current stream of the tensors' device, the program's scalar parameters after
        the tensors. Read-only inputs that are not contiguous and 16-byte aligned are copied first (but
        views); written ones and views were checked by the caller."""
        entry = self._entry
        assert entry is not None, "a launcher built while tracing launches through its custom op"
        tensors = tuple(aligned(t) if read else t for t, read in zip(tensors, self._inputs, strict=True))
        index = tensors[0].device.index
        if index is None or index == torch.cuda.current_device():
            entry(*tensors, *self._scalar_params)
            return
        with torch.cuda.device(index):
            entry(*tensors, *self._scalar_params)


#: TileLang reads inputs in 16-byte vectors (and TMA needs 16-byte aligned tiles).
ALIGNMENT_BYTES = 16


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` if it is contiguous and 16-byte aligned, else such a copy of it (for inputs only:
    a written tensor cannot be copied, see `check_writable`)."""
    if tensor.is_contiguous() and tensor.data_ptr() % ALIGNMENT_BYTES == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def readable(tensor: torch.Tensor) -> torch.Tensor:
    """A read-only view parameter of an allocating kernel call: `tensor` if the program can read it
    in place (`validation.view_problem`), else a contiguous, aligned copy of it. (An Op checks its
    views and never needs the copy.)"""
    if view_problem(tensor) is None:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def check_writable(name: str, tensor: torch.Tensor) -> None:
    """A tensor a program writes in place must come contiguous and aligned (metadata only). While
    torch.compile traces, the address is not known (and not traceable): contiguity is checked."""
    misaligned = not torch.compiler.is_compiling() and tensor.data_ptr() % ALIGNMENT_BYTES != 0
    if not tensor.is_contiguous() or misaligned:
        raise ValueError(
            f"{name}: expected a contiguous tensor whose data is {ALIGNMENT_BYTES}-byte aligned, "
            f"got strides {tensor.stride()} at address {tensor.data_ptr():#x}"
        )


def check_cuda(name: str, tensor: torch.Tensor) -> None:
    """TileLang programs run on CUDA tensors only (checked last, so that the checks before it also
    run, and are tested, on CPU tensors)."""
    if not tensor.is_cuda:
        raise ValueError(
            f"{name}: expected a CUDA tensor for the TileLang kernel, got device {tensor.device}"
        )


__all__ = [
    "ALIGNMENT_BYTES",
    "OPS",
    "KernelRecord",
    "Launcher",
    "Program",
    "aligned",
    "check_cuda",
    "check_writable",
    "no_scalar_params",
    "readable",
    "register",
]
