"""The lengths a persistent packed program's schedule reads are never negative (no GPU).

With validate=False a caller may pass a decreasing `cu_seqlens_q`; the schedule's walk moves
forward by each sequence's count of query tiles and would not end on a negative one (the GPU
test `tests/gpu/test_packed_lengths_gpu.py` runs such a call under a time limit).
"""

from __future__ import annotations

import pytest

pytest.importorskip("tilelang", reason="the program pieces are TileLang expressions")

from tilelang import tvm

from tileprefill.kernels.tl.attention_parts import sequence_length


def test_a_sequence_length_is_never_negative() -> None:
    first, end = tvm.tirx.Var("first", "int32"), tvm.tirx.Var("end", "int32")
    analyzer = tvm.arith.Analyzer()
    assert analyzer.can_prove(sequence_length(first, end) >= 0)
    assert not analyzer.can_prove(end - first >= 0)  # what it guards against: any int32 offsets


def test_a_decreasing_pair_of_offsets_is_an_empty_sequence() -> None:
    analyzer = tvm.arith.Analyzer()
    int32 = tvm.tirx.IntImm
    assert analyzer.simplify(sequence_length(int32("int32", 700), int32("int32", 40))) == 0
    assert analyzer.simplify(sequence_length(int32("int32", 40), int32("int32", 700))) == 660
