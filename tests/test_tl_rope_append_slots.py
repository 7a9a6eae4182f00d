"""CPU checks of the slot-addressed RoPE + append programs (kernels/tl/rope_append.py).

Numerics need a GPU (tests/gpu/test_rope_append_slots_gpu.py). Here: the
factories reject impossible static configs by name, the chunk widths divide
what they must, and (marked `compile`) a few representative configs lower and
compile to device binaries for sm_90a and sm_80 (whose build also carries
sm_90 code) with nvcc, about a minute on 2 cores.
"""

from __future__ import annotations

import pathlib

import pytest

pytest.importorskip("tilelang", reason="the programs are TileLang programs")

from tileprefill.kernels.tl import rope_append


def test_factories_reject_impossible_static_configs() -> None:
    with pytest.raises(ValueError, match="num_heads: expected a positive multiple of num_kv_heads=3"):
        rope_append.rope_append_program(8, 3, 128, 128, "float16", False)
    with pytest.raises(ValueError, match="rotary_dim: expected an even value in"):
        rope_append.rope_append_program(8, 2, 64, 33, "float16", False)
    with pytest.raises(ValueError, match="rotary_dim: expected an even value in"):
        rope_append.rope_append_program(8, 2, 64, 66, "bfloat16", True)
    with pytest.raises(ValueError, match="head_dim: expected an even value"):
        rope_append.rope_append_program(8, 2, 65, 32, "float16", True)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(64, 64), (128, 64), (80, 32), (96, 96), (256, 16)])
def test_chunks_tile_the_row_with_aligned_widths(head_dim: int, rotary_dim: int, interleaved: bool) -> None:
    """Every width divides the extents and offsets it is used at, and the chunks cover the row."""
    geo = rope_append.rope_chunks(head_dim, rotary_dim, interleaved)
    half = rotary_dim // 2
    assert geo.rot_chunks * geo.pairs == half
    assert geo.pairs % geo.trig_vec == 0 and half % geo.trig_vec == 0
    assert head_dim % (2 * geo.pairs if interleaved else geo.pairs) == 0
    elements = 2 * geo.pairs if interleaved else geo.pairs  # of x in one access
    assert elements * 2 <= 16, "at most 16 bytes an access"
    assert geo.pass_chunks * geo.pass_vec == head_dim - rotary_dim
    assert rotary_dim % geo.pass_vec == 0 and head_dim % geo.pass_vec == 0


def test_batches_split_the_iterations_evenly() -> None:
    assert rope_append.batch_size(16, 3) == 2  # 2 loads an item, 4 in flight: batches of 2, 2
    assert rope_append.batch_size(8, 5) == 3  # 1 load an item: batches of 3, 2 (not 4, 1)
    assert rope_append.batch_size(8, 1) == 1
    assert rope_append.batch_size(8, 0) == 1  # no items (no pass-through dims): never used
    assert rope_append.batch_size(2, 40) == 14  # narrow items: 16 a batch at most, 3 batches


#: (label, factory name, arguments): both modes, partial rotary, D 64/128/256, groups 1/8, fp16/bf16.
COMPILE_CASES: list[tuple[str, str, tuple[object, ...]]] = [
    ("neox_h32_kv8_d128_fp16", "rope_append_program", (32, 8, 128, 128, "float16", False)),
    ("interleaved_h8_kv1_d64_r32_bf16", "rope_append_program", (8, 1, 64, 32, "bfloat16", True)),
    ("neox_h4_kv4_d256_r128_bf16", "rope_append_program", (4, 4, 256, 128, "bfloat16", False)),
]


@pytest.mark.compile
@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
@pytest.mark.parametrize(("label", "factory", "args"), COMPILE_CASES, ids=[c[0] for c in COMPILE_CASES])
def test_programs_compile(
    arch: str, label: str, factory: str, args: tuple[object, ...], tmp_path: pathlib.Path
) -> None:
    """Lower and compile with nvcc (TileLang's caches bypassed for an output directory), keeping
    the .cu: its global accesses of tensor data are 16-byte vectors."""
    from tileprefill.kernels.compile import _build

    kernel = _build(getattr(rope_append, factory), args, arch, str(tmp_path))
    binaries = [p for suffix in (".cubin", ".fatbin") for p in tmp_path.rglob(f"*{suffix}")]
    assert binaries and all(p.stat().st_size > 0 for p in binaries), f"no device binary for {label}"
    source = kernel.get_kernel_source()
    # Every tensor of rows is read and written through its 16-byte-stride view (`views.vector_view`).
    assert "uint4*)(k_dst" in source and "uint4*)(v_dst" in source
    if factory == "rope_append_program":
        assert "uint4*)(q_out" in source and "uint4*)(q +" in source
        assert "uint4*)(k_new" in source and "uint4*)(v_new" in source
