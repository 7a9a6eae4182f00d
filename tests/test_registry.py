"""One concrete Kernel class per key, extending its family's base, and no tilelang at import.

Fails until every kernel module (reference, RoPE, append, attention) has landed:
a key without a class is a plan step nothing can run.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest

from tileprefill.kernels.base import (
    ContiguousAppendKernel,
    ContiguousAttentionKernel,
    DenseAttentionKernel,
    Kernel,
    PagedAppendKernel,
    PagedAttentionKernel,
    PagedBatchKernel,
    RaggedAttentionKernel,
    RopeAppendKernel,
    RopeKernel,
    SlotAppendKernel,
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

# Written out key by key so that a wrong `kernel_family` is caught too.
EXPECTED_FAMILY: dict[KernelKey, type[Kernel]] = {
    BatchKey.PAGED_REF: PagedBatchKernel,
    BatchKey.PAGED_TL: PagedBatchKernel,
    RopeKey.NEOX_REF: RopeKernel,
    RopeKey.INTERLEAVED_REF: RopeKernel,
    RopeKey.NEOX_TL: RopeKernel,
    RopeKey.INTERLEAVED_TL: RopeKernel,
    AppendKey.CONTIGUOUS_REF: ContiguousAppendKernel,
    AppendKey.PAGED_REF: PagedAppendKernel,
    AppendKey.CONTIGUOUS_TL: ContiguousAppendKernel,
    AppendKey.PAGED_TL: PagedAppendKernel,
    RopeAppendKey.NEOX_TL: RopeAppendKernel,
    RopeAppendKey.INTERLEAVED_TL: RopeAppendKernel,
    SlotAppendKey.REF: SlotAppendKernel,
    SlotAppendKey.TL: SlotAppendKernel,
    AttentionKey.DENSE_REF: DenseAttentionKernel,
    AttentionKey.RAGGED_REF: RaggedAttentionKernel,
    AttentionKey.CONTIGUOUS_REF: ContiguousAttentionKernel,
    AttentionKey.PAGED_REF: PagedAttentionKernel,
    AttentionKey.DENSE_SM80: DenseAttentionKernel,
    AttentionKey.DENSE_SM90: DenseAttentionKernel,
    AttentionKey.RAGGED_SM80: RaggedAttentionKernel,
    AttentionKey.RAGGED_SM90: RaggedAttentionKernel,
    AttentionKey.CONTIGUOUS_SM80: ContiguousAttentionKernel,
    AttentionKey.CONTIGUOUS_SM90: ContiguousAttentionKernel,
    AttentionKey.PAGED_SM80: PagedAttentionKernel,
    AttentionKey.PAGED_SM90: PagedAttentionKernel,
    AttentionKey.PAGED_TILED_SM80: PagedAttentionKernel,
    AttentionKey.PAGED_TILED_SM90: PagedAttentionKernel,
}


def test_family_table_covers_every_key() -> None:
    assert set(EXPECTED_FAMILY) == set(ALL_KEYS)


@pytest.mark.parametrize("key", ALL_KEYS, ids=lambda k: k.value)
def test_kernel_family(key: KernelKey) -> None:
    assert kernel_family(key) is EXPECTED_FAMILY[key]


@pytest.mark.parametrize("key", ALL_KEYS, ids=lambda k: k.value)
def test_every_key_has_one_concrete_kernel(key: KernelKey) -> None:
    serving = [cls for cls in ALL_KERNELS.values() if cls.key is key]
    assert len(serving) == 1, f"{key.value}: expected one Kernel class, got {serving}"
    (cls,) = serving
    assert ALL_KERNELS[key] is cls
    assert issubclass(cls, EXPECTED_FAMILY[key])
    assert cls.__name__.endswith("Kernel")
    assert not inspect.isabstract(cls), f"{cls.__name__} leaves abstract methods: {cls.__abstractmethods__}"


def test_no_class_serves_two_keys() -> None:
    assert len(set(ALL_KERNELS.values())) == len(ALL_KERNELS)
    assert set(ALL_KERNELS) <= set(ALL_KEYS)


def test_registry_does_not_import_tilelang() -> None:
    # Constructing kernels is cheap too: tilelang is imported on the call path only.
    script = textwrap.dedent(
        """
        import sys
        from tileprefill.kernels.registry import ALL_KERNELS
        kernels = [cls() for cls in ALL_KERNELS.values()]
        loaded = sorted(m for m in sys.modules if m == "tilelang" or m.startswith("tilelang."))
        assert not loaded, loaded
        print(len(kernels))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(ALL_KERNELS)
