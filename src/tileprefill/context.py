"""The typed facts of one prefill call, and the enums they are made of.

A `PrefillContext` is everything kernel selection may read. It holds no
tensors and is built either by an Op from its inputs (device facts read once
from the input tensor's device) or by hand in tests. Its validators reject
combinations no public Op can produce, so `select_plan` never sees them.
"""

from __future__ import annotations

import enum
import functools

import attrs
import torch


class KVLayout(enum.Enum):
    """Where the keys and values come from."""

    NONE = "none"  # k/v are plain inputs of this call, no cache
    CONTIGUOUS = "contiguous"  # (B, S_max, Hkv, D) cache with per-sequence lengths
    PAGED = "paged"  # (num_pages, page_size, Hkv, D) pages with a block table


class KVOrder(enum.Enum):
    """The order of a cache block's rows and heads in memory: NHD (rows before heads: a row's Hkv
    heads lie side by side, FlashAttention's and vLLM's default) or HND (heads before rows: one
    head's rows of a block lie side by side, FlashInfer's and vLLM's HND). The tensors are
    (blocks, rows, Hkv, D) views either way, strided as the engine stores them; a call without a
    cache is NHD."""

    NHD = "NHD"
    HND = "HND"


class RopeMode(enum.Enum):
    """Rotary embedding applied to q and the new keys before attention."""

    NONE = "none"
    NEOX = "neox"  # rotate halves: (x[:r/2], x[r/2:r])
    INTERLEAVED = "interleaved"  # rotate adjacent pairs: (x[0::2], x[1::2]) (GPT-J)


class Arch(enum.Enum):
    """Which code a kernel is built for. SM86/SM89 run SM80 code."""

    CPU = "cpu"  # torch reference kernels
    SM80 = "sm80"
    SM90 = "sm90"

    @classmethod
    def of_device(cls, device: torch.device) -> Arch:
        """Read once per call by an Op; raises for CUDA devices we have no code for."""
        if device.type != "cuda":
            return cls.CPU
        major, minor = torch.cuda.get_device_capability(device)
        try:
            return cls.of_capability(major, minor)
        except ValueError as error:
            raise ValueError(f"device {device}: {error}") from None

    @classmethod
    def of_capability(cls, major: int, minor: int) -> Arch:
        """The code a CUDA device of compute capability major.minor runs (an engine that names a
        capability before any tensor exists asks this); raises for one we have no code for."""
        if major == 9 and minor == 0:
            return cls.SM90
        if major == 8:
            return cls.SM80
        raise ValueError(f"expected a CUDA device of compute capability 8.x or 9.0, got {major}.{minor}")


@functools.cache
def arch_of(device: torch.device) -> Arch:
    """The Arch of a device, read once per device (the one place device facts are probed)."""
    return Arch.of_device(device)


@functools.cache
def sm_count_of(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (132 on an H100 SXM or H200, 114 on an H100
    PCIe, 78 on an H20), read once per device; 0 for any other device. A persistent SM90 attention
    program launches one CTA per SM: more would run as a second, partial wave."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


class DType(enum.Enum):
    """Element types of q and the KV tensors."""

    FP16 = "float16"
    BF16 = "bfloat16"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self]

    @classmethod
    def of(cls, dtype: torch.dtype, *, argument: str) -> DType:
        for member, torch_dtype in _TORCH_DTYPES.items():
            if torch_dtype == dtype:
                return member
        raise TypeError(f"{argument}: expected dtype float16 or bfloat16, got {dtype}")


_TORCH_DTYPES: dict[DType, torch.dtype] = {DType.FP16: torch.float16, DType.BF16: torch.bfloat16}


class IndexDType(enum.Enum):
    """Element types of a slot mapping (vLLM's is int64). A static fact of the programs that read one,
    not of the decision."""

    INT32 = "int32"
    INT64 = "int64"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.int32 if self is IndexDType.INT32 else torch.int64

    @classmethod
    def of(cls, dtype: torch.dtype, *, argument: str) -> IndexDType:
        for member in cls:
            if member.torch_dtype == dtype:
                return member
        raise TypeError(f"{argument}: expected dtype torch.int32 or torch.int64, got {dtype}")


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name}: expected an integer >= 1, got {value}")


@attrs.frozen(kw_only=True)
class PrefillContext:
    """Everything a kernel decision reads about one call.

    `page_size` is 0 unless `kv_layout` is PAGED. `ragged` means q (and k/v
    where they are inputs) are packed token-major with `cu_seqlens`: always
    true for the paged layout, never for the contiguous one (q is (B, Sq, Hq, D)).
    `sliding_window` (0: none) lets the query at absolute position p see only keys in
    (p - sliding_window, p] (causal only); `softcap` says whether the scaled scores are capped
    to c * tanh(score / c) (the cap c itself, like sm_scale, is a static fact of the kernels,
    not of the decision). Both are compiled into the attention programs.
    `kv_order` is the cache's row/head order (KVOrder; NHD without a cache).
    `slot_mapping` says that the call gives each new token's cache row itself (slot = page *
    page_size + row, -1: skip) and only writes the cache: its plan is one slot-append step, with
    no batch step and no attention (`PagedCacheSlotAppend`, vLLM's `reshape_and_cache_flash`).
    """

    kv_layout: KVLayout
    rope: RopeMode
    append: bool
    q_dtype: DType
    kv_dtype: DType
    arch: Arch
    head_dim: int = attrs.field(validator=_positive)
    group_size: int = attrs.field(validator=_positive)
    causal: bool
    page_size: int = 0
    ragged: bool = False
    sliding_window: int = 0
    softcap: bool = False
    slot_mapping: bool = False
    kv_order: KVOrder = KVOrder.NHD

    def __attrs_post_init__(self) -> None:
        problems = list(_impossible(self))
        if problems:
            raise ValueError("impossible PrefillContext: " + "; ".join(problems))


def _impossible(ctx: PrefillContext) -> list[str]:
    problems: list[str] = []
    if ctx.q_dtype is not ctx.kv_dtype:
        problems.append(
            f"kv_dtype: expected the same dtype as q ({ctx.q_dtype.value}), got {ctx.kv_dtype.value}"
        )
    if ctx.kv_layout is KVLayout.NONE and ctx.kv_order is not KVOrder.NHD:
        problems.append(
            f"kv_order: expected NHD with kv_layout none (there is no cache), got {ctx.kv_order.value}"
        )
    if ctx.kv_layout is KVLayout.NONE and ctx.append:
        problems.append("append: expected False with kv_layout none (there is no cache to append to)")
    if ctx.kv_layout is not KVLayout.NONE and ctx.rope is not RopeMode.NONE and not ctx.append:
        problems.append(
            "rope: expected none for a read-only cache (RoPE Ops rotate the new keys they append)"
        )
    if ctx.kv_layout is KVLayout.PAGED:
        if ctx.page_size < 1:
            problems.append(f"page_size: expected >= 1 with kv_layout paged, got {ctx.page_size}")
        if not ctx.ragged:
            problems.append("ragged: expected True with kv_layout paged (q is packed with cu_seqlens_q)")
    elif ctx.page_size != 0:
        problems.append(f"page_size: expected 0 with kv_layout {ctx.kv_layout.value}, got {ctx.page_size}")
    if ctx.kv_layout is KVLayout.CONTIGUOUS and ctx.ragged:
        problems.append("ragged: expected False with kv_layout contiguous (q is (B, Sq, Hq, D))")
    if ctx.sliding_window < 0:
        problems.append(f"sliding_window: expected 0 (none) or a positive int, got {ctx.sliding_window}")
    if ctx.sliding_window and not ctx.causal:
        problems.append(
            f"sliding_window: expected 0 without causal (the window ends at the query's own "
            f"position), got {ctx.sliding_window}"
        )
    if ctx.slot_mapping:
        if ctx.kv_layout is not KVLayout.PAGED or not ctx.append:
            problems.append(
                f"slot_mapping: expected kv_layout paged and append (a slot mapping names rows of a paged "
                f"cache to write), got kv_layout {ctx.kv_layout.value} and append {ctx.append}"
            )
        if ctx.rope is not RopeMode.NONE:
            problems.append(
                f"slot_mapping: expected rope none (a slot-mapped write copies the keys as given), "
                f"got rope {ctx.rope.value}"
            )
    if ctx.rope is not RopeMode.NONE and ctx.head_dim % 2:
        problems.append(f"head_dim: expected an even head_dim with RoPE, got {ctx.head_dim}")
    return problems
