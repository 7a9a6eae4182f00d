"""validate=False with a decreasing cu_seqlens_q: the packed attention Ops still return.

The persistent SM90 ragged and paged programs build each CTA's schedule on the device from the
sequence lengths; they read every length clamped at 0 (`attention_parts.sequence_length`), since
a negative one could keep a CTA's walk over the schedule from ending and the launch from
returning. A kernel that never ends cannot be stopped from the host, so each call runs in a child
process (this file run as a script) under a time limit: first a valid call of the same program (it
compiles there only if the `compiled_programs` warm-up has not), then the bad one.

Run: `pytest -m gpu tests/gpu/test_packed_lengths_gpu.py`. The output of such a call is unspecified
(README, "validate=False"); only that it returns is checked.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch

import tileprefill as tp

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

#: Seconds the child may take to be ready (import, and compile where the warm-up did not) and then to
#: return from the bad call (a launch of a few tiles: well under a second when it ends at all).
READY_S = 900
RETURN_S = 60

DEV = torch.device("cuda")
#: Three sequences whose offsets go back: the second's length is 40 - 600 = -560 (minus 4 or 5 query
#: tiles of 128 rows).
BAD_CU_Q = [0, 600, 40, 700]
GOOD_CU_Q = [0, 300, 400, 700]
KV_LENS = [650, 100, 720]


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEV)


def _ragged(causal: bool, dtype: torch.dtype, heads: int, kv_heads: int, dim: int, cu_q: list[int]) -> None:
    """`GQAVarlenPrefill` over the three sequences, q offsets `cu_q`."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(cu_q[-1], heads, dim, generator=gen, device=DEV, dtype=dtype)
    k, v = (
        torch.randn(sum(KV_LENS), kv_heads, dim, generator=gen, device=DEV, dtype=dtype) for _ in range(2)
    )
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=DEV)
    tp.GQAVarlenPrefill(causal=causal, validate=False)(q, k, v, cu_q_t, _cumulative(KV_LENS))


def _paged(page_size: int, cu_q: list[int]) -> None:
    """`GQAPagedCachePrefill` (causal, fp16, 32 query heads over 8, D 128) over the three sequences,
    q offsets `cu_q`."""
    gen = torch.Generator(device=DEV).manual_seed(0)
    width = -(-max(KV_LENS) // page_size)
    num_pages = width * len(KV_LENS)
    q = torch.randn(cu_q[-1], 32, 128, generator=gen, device=DEV, dtype=torch.float16)
    k_pages, v_pages = (
        torch.randn(num_pages, page_size, 8, 128, generator=gen, device=DEV, dtype=torch.float16)
        for _ in range(2)
    )
    block_table = torch.arange(num_pages, dtype=torch.int32, device=DEV).reshape(len(KV_LENS), width)
    kv_seqlens = torch.tensor(KV_LENS, dtype=torch.int32, device=DEV)
    cu_q_t = torch.tensor(cu_q, dtype=torch.int32, device=DEV)
    tp.GQAPagedCachePrefill(validate=False)(q, k_pages, v_pages, block_table, kv_seqlens, cu_q_t)


#: Each case, called with the q offsets: the ragged program causal and not, the tiled paged one
#: (page 16) and the gathering one (page 1); static facts of `test_attention_gpu`'s configurations,
#: so that the GPU suite compiles no program for this module alone.
CASES: dict[str, Callable[[list[int]], None]] = {
    "ragged-causal": lambda cu_q: _ragged(True, torch.bfloat16, 16, 8, 128, cu_q),
    "ragged-full": lambda cu_q: _ragged(False, torch.float16, 16, 1, 64, cu_q),
    "paged-page16": lambda cu_q: _paged(16, cu_q),
    "paged-page1": lambda cu_q: _paged(1, cu_q),
}


def warm_up() -> None:
    """The valid call of every case (the `compiled_programs` fixture compiles what they build)."""
    for call in CASES.values():
        call(GOOD_CU_Q)


def _child(name: str) -> None:
    """In the child process: the valid call, `ready`, the bad call, `returned`."""
    CASES[name](GOOD_CU_Q)
    torch.cuda.synchronize()
    print("ready", flush=True)
    CASES[name](BAD_CU_Q)
    torch.cuda.synchronize()
    print("returned", flush=True)


@pytest.mark.parametrize("name", list(CASES))
def test_a_decreasing_cu_seqlens_q_call_returns(name: str) -> None:
    child = subprocess.Popen(
        [sys.executable, __file__, name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert child.stdout is not None
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            if line.strip() == "ready":
                ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(READY_S) or child.poll() is not None, f"not ready in {READY_S} s: {''.join(lines)}"
        assert ready.is_set(), f"the valid call failed:\n{''.join(lines)}"
        try:
            code = child.wait(timeout=RETURN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: the call with cu_seqlens_q {BAD_CU_Q} did not return within {RETURN_S} s")
        reader.join(timeout=10)
        assert code == 0 and lines[-1].strip() == "returned", "".join(lines)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


if __name__ == "__main__":
    _child(sys.argv[1])
