"""What the persistent dense order makes the resident CTAs read, per dense scoreboard case.

`python -m tileprefill.bench.first_wave [--sms N]` prints, for every dense case of the scoreboard,
the K/V bytes that the first tile of every resident CTA reads (the L2 working set at the launch),
the whole batch's K/V for scale, the band width the order chose, and how evenly it loads the
CTAs: figures of the order's Python model (`kernels/tl/dense_order.py`), which evaluates the same
rule the SM90 program computes. No GPU and no compile: a static check of the schedule.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import attrs

from tileprefill.bench.cases import Case, Layout
from tileprefill.bench.scoreboard import scoreboard_cases
from tileprefill.kernels.tl.dense_order import (
    PYTHON_ARITH,
    DenseOrder,
    Shape,
    balance,
    band_layout,
    first_wave_kv_bytes,
)
from tileprefill.tiles import SM90_PERSISTENT_CTAS, KVSource, sm90_config

#: Bytes of one K or V element of the scoreboard's dtypes.
_ELEMENT_BYTES = {"bf16": 2, "fp16": 2}
MIB = 1 << 20


@attrs.frozen
class FirstWave:
    """One dense case's order figures."""

    case: str
    first_wave_bytes: int
    batch_kv_bytes: int
    band_width: int
    busiest_over_mean: float


def order_and_shape(case: Case, sm_count: int) -> tuple[DenseOrder, Shape] | None:
    """The order facts and launch shape of a dense case's SM90 program; None where the program is
    not persistent (one CTA per query tile, in the hardware's launch order)."""
    config = sm90_config(KVSource.DENSE, case.head_dim, sm_count)
    if not config.persistent_ctas:
        return None
    order = DenseOrder(
        ctas=config.persistent_ctas,
        heads=case.heads,
        kv_heads=case.kv_heads,
        causal=case.causal,
        kv_key_bytes=2 * case.head_dim * _ELEMENT_BYTES[case.dtype],
    )
    shape = Shape(
        batch=len(case.q_lens),
        seq_q=case.q_lens[0],
        seq_kv=case.kv_lens[0],
        block_M=config.block_M,
        block_N=config.block_N,
        window=case.window,
    )
    return order, shape


def first_waves(sm_count: int = SM90_PERSISTENT_CTAS) -> list[FirstWave]:
    """The figures of every dense scoreboard case whose program is persistent, in table order."""
    rows = []
    for case in scoreboard_cases():
        facts = order_and_shape(case, sm_count) if case.layout is Layout.DENSE else None
        if facts is None:
            continue
        order, shape = facts
        layout = band_layout(order, shape.batch, shape.seq_kv, shape.m_tiles, PYTHON_ARITH)
        rows.append(
            FirstWave(
                case=case.name,
                first_wave_bytes=first_wave_kv_bytes(order, shape),
                batch_kv_bytes=shape.batch * case.kv_heads * shape.seq_kv * order.kv_key_bytes,
                band_width=int(layout.width),
                busiest_over_mean=balance(order, shape),
            )
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tileprefill.bench.first_wave", description=__doc__)
    parser.add_argument(
        "--sms", type=int, default=SM90_PERSISTENT_CTAS, help="the device's SM count (resident CTAs)"
    )
    args = parser.parse_args(argv)
    if args.sms < 1:
        parser.error(f"--sms: expected the device's SM count (>= 1), got {args.sms}")
    print(f"{'case':<44} {'first wave MiB':>14} {'batch K/V MiB':>13} {'band':>5} {'busiest/mean':>12}")
    for row in first_waves(args.sms):
        print(
            f"{row.case:<44} {row.first_wave_bytes / MIB:14.1f} {row.batch_kv_bytes / MIB:13.1f}"
            f" {row.band_width:5d} {row.busiest_over_mean:12.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
