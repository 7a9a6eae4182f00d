"""The scalars an attention program takes at launch: how it scales and caps its scores, and its
sliding window's length.

A program is compiled for whether it caps its scores and whether it has a window (code of its
own), never for the values: the Op's `sm_scale`, `softcap` and `sliding_window` arrive as scalar
parameters after the tensors (`ScoreScalars`, in that order), so every model of one head dim,
dtype and causality shares its programs. The program holds its scores raw (or, capped, as
`tanh(score * sm_scale / softcap)`) and folds the rest of the scale into the exp2 argument, one
fused multiply-add a score (`attention_parts`).

Pure Python: the launch layer imports it without TileLang.
"""

from __future__ import annotations

import math
from typing import NamedTuple

#: log2(e): exp(x) = exp2(x * LOG2E).
LOG2E = 1.0 / math.log(2.0)

#: The longest window a program takes (its parameter is an int32). A longer one sees the same keys:
#: every key at or before the query, as the window of 2**31 - 1 keys does.
MAX_WINDOW = 2**31 - 1


class ScoreScalars(NamedTuple):
    """The scalar parameters of every attention program, in its parameter order after the tensors."""

    #: The factor of a score the program holds: sm_scale, or, capped, softcap (the scores held are
    #: then tanh(...) in [-1, 1]). The program multiplies it by log2(e) for its exp2 arguments.
    score_scale: float
    #: Capped programs: the factor inside the cap, sm_scale / softcap. Others do not read it (0.0).
    cap_scale: float
    #: Programs with a window: its length in keys, >= 1. Others do not read it (0).
    window: int


def score_scalars(sm_scale: float, softcap: float, window: int) -> ScoreScalars:
    """The launch scalars of a call with `sm_scale` (> 0), `softcap` (0: none) and a causal sliding
    `window` of that many keys (0: none). Raises ValueError naming the argument."""
    if not (math.isfinite(sm_scale) and sm_scale > 0):
        raise ValueError(f"sm_scale: expected a finite float > 0, got {sm_scale!r}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap: expected a finite float >= 0 (0: none), got {softcap!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window: expected an int >= 0 (0: none), got {window!r}")
    if softcap:
        return ScoreScalars(softcap, sm_scale / softcap, min(window, MAX_WINDOW))
    return ScoreScalars(sm_scale, 0.0, min(window, MAX_WINDOW))
