"""Division by a launch value in one multiply and one shift (Granlund and Montgomery's round-up
method, as CUTLASS's FastDivmod).

A program that splits a flat index by a count it reads at launch (RoPE's rows into tokens and heads)
would otherwise emit a full integer division for every index (a reciprocal and a dozen
instructions); with the divisor's `Divisor` passed as scalar parameters it costs what a division by
a constant costs, a wide multiply and a shift. Exact for every dividend in [0, 2**31): with
l = ceil(log2 d), p = 31 + l and m = ceil(2**p / d), floor(n m / 2**p) = floor(n / d), since
m d - 2**p < d and 2**p >= 2**31 d. m < 2**32, so n m fits 63 bits.

Pure Python: the launch layer computes the parameters (`divisor`); `quotient` is the arithmetic,
evaluated by a program on TIR values and by the CPU tests on ints.
"""

from __future__ import annotations

from typing import Any, NamedTuple

#: Dividends the method is exact for: [0, DIVIDEND_LIMIT).
DIVIDEND_LIMIT = 2**31


class Divisor(NamedTuple):
    """The scalar parameters that divide by d: n // d == (n * multiplier) >> shift (ints here; in a
    program, the parameters widened to 64 bits)."""

    multiplier: Any  # < 2**32 (a uint32 parameter)
    shift: Any  # 31 .. 62


def divisor(d: int) -> Divisor:
    """The parameters of division by `d` (an int in [1, 2**31)). Raises ValueError naming it."""
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d < DIVIDEND_LIMIT:
        raise ValueError(f"divisor: expected an int in [1, 2**31), got {d!r}")
    shift = 31 + (d - 1).bit_length()  # 31 + ceil(log2 d)
    return Divisor(-(-(1 << shift) // d), shift)


def quotient(n: Any, by: Divisor) -> Any:
    """n // d for 0 <= n < 2**31: on ints (what the tests check), and on 64-bit TIR values in a
    program."""
    return (n * by.multiplier) >> by.shift
