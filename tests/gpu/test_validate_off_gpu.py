"""The validate=False contract (README, "Reliability"): out-of-range block-table entries and lengths
never make an Op write outside its caches, and a cache row changes only where a valid destination
says (position >= 0, inside the block table, page entry in [0, num_pages)).

The cases are `sanitize_workload.py`'s `validate-off/...` cases (guard pages around every cache);
`nox -s gpu_sanitize` runs the same calls under memcheck, which also sees any access outside an
allocation (a read too).
"""

from __future__ import annotations

import pytest
import reliability as rel
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("compiled_programs")]

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("tilelang", reason="needs tilelang for the TileLang kernels")

import sanitize_workload  # noqa: E402 (after the skips: it needs a CUDA device)

CASES = sanitize_workload.validate_off_cases()


def warm_up() -> None:
    rel.run_calls(rel.warm_up_calls(), torch.device("cuda"))


@pytest.mark.parametrize(
    "check", [c for _, c in CASES], ids=[n.removeprefix("validate-off/") for n, _ in CASES]
)
def test_out_of_range_metadata_writes_only_valid_destinations(check: rel.Check) -> None:
    problem = check()
    assert problem is None, problem
