"""benchmarks/kernel_probe.py on a CPU: a version that is a copy of `kernels/tl/` loads as a package
of its own beside the tree's, its modules importing one another, and its programs build."""

from __future__ import annotations

import importlib.util
import pathlib
import shutil
import sys
from types import ModuleType

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TREE = ROOT / "src" / "tileprefill" / "kernels" / "tl"


def _probe() -> ModuleType:
    pytest.importorskip("tilelang")
    if "kernel_probe" not in sys.modules:
        spec = importlib.util.spec_from_file_location("kernel_probe", ROOT / "benchmarks" / "kernel_probe.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["kernel_probe"] = module
        spec.loader.exec_module(module)
    return sys.modules["kernel_probe"]


def test_a_snapshot_of_kernels_tl_loads_beside_the_tree(tmp_path: pathlib.Path) -> None:
    probe = _probe()
    snapshot = tmp_path / "_variant_copy"
    shutil.copytree(TREE, snapshot, ignore=shutil.ignore_patterns("__pycache__"))
    with open(snapshot / "attention_entries.py", "a", encoding="utf-8") as file:
        file.write("\nSNAPSHOT_MARK = 1\n")
    from tileprefill import tiles
    from tileprefill.kernels.tl import attention_entries, attention_sm90

    program = probe.load_snapshot(snapshot, "_probe_test_copy")
    assert program.__name__ == "_probe_test_copy.attention_sm90"
    assert program is not attention_sm90
    entries = sys.modules["_probe_test_copy.attention_entries"]
    assert entries.SNAPSHOT_MARK == 1 and not hasattr(attention_entries, "SNAPSHOT_MARK")
    assert program.persistent_program is entries.persistent_program
    # The enum lives outside kernels/tl/ (tiles.py): a snapshot of this tree shares it with the tree.
    assert program.KVSource is tiles.KVSource
    prog = probe.Prog("new", "dense", 8, 2, 128, "bfloat16", True)
    args = (program.KVSource.DENSE, *prog.factory_args()[1:])
    assert program.program(*args) is not None


def test_a_folder_without_the_program_module_is_refused(tmp_path: pathlib.Path) -> None:
    probe = _probe()
    with pytest.raises(FileNotFoundError, match=r"found no attention_sm90\.py"):
        probe.load_snapshot(tmp_path, "_probe_test_empty")
