"""FlashInfer's batch prefill (backends fa3 and fa2), a peer, timed in its own process on the
benchmark cases. FlashInfer is what vLLM and SGLang run prefill on.

It runs with FlashInfer's prefill site as its PYTHONPATH (torch, triton and jinja2 from the host):

    PYTHONPATH=/tmp/fi python3 benchmarks/bench_flashinfer_peer.py --cases cases.json --out fi.json

`python -m tileprefill bench --flashinfer-path /tmp/fi` starts it with the cases it selected and
folds its JSON in (one figure per case and backend: `flashinfer_fa3`, `flashinfer_fa2`). The
driver, the JSON format and the output check are `bench_peer.py`'s (imported from beside this
file).

How a case maps onto FlashInfer (NHD layouts, the same tensors our Ops get): dense and ragged
cases run `BatchPrefillWithRaggedKVCacheWrapper` on the packed tokens; paged cases
`BatchPrefillWithPagedKVCacheWrapper` on the same pages (its page list read off our block table);
a contiguous cache is one page of S_max tokens per sequence. `plan` runs once per case, outside
the timing; `run` is timed. Its causal mask is bottom-right aligned like ours; a window of W keys
is its `window_left = W - 1`; the softcap its `logits_soft_cap`. RoPE + append has no Op in its
prefill API: those cases are declined (the run times each one's attention-alone twin).

Modules: FlashInfer loads prebuilt ones from `flashinfer/data/aot/` (the site's bf16 D128 sm_90a
archive: 0.2 s) and JIT-compiles any other (dtype, head dim) with nvcc, for many minutes each. With
FLASHINFER_DISABLE_JIT set (what the harness does unless --flashinfer-jit) such a case is declined
with a note instead; once declined, a module is not asked for again. With JIT on, this script puts
`ninja` on PATH and gives the linker an unversioned libcuda.so where the CUDA install has none.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# bench_peer.py, the shared driver, sits beside this file: importable however this file is loaded.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_peer
from bench_peer import Adapter, Unsupported

#: FlashInfer's float workspace (split-KV partial results): twice the 128 MB its docs recommend, for
#: the longest batches here.
WORKSPACE_BYTES = 256 * 1024 * 1024
#: Result key -> FlashInfer backend.
BACKENDS = {"flashinfer_fa3": "fa3", "flashinfer_fa2": "fa2"}


class FlashInfer:
    """FlashInfer's prefill wrappers on the cases, a wrapper planned per case and backend."""

    implementations = tuple(BACKENDS)
    void_on_mismatch = True  # a new mapping onto another API: a wrong answer must not become a figure

    def __init__(self, missing_module: type[Exception], device: str = "cuda") -> None:
        import torch

        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.missing_module = missing_module
        #: Why each (backend, dtype, head dim, window, softcap) module without a prebuilt copy was declined.
        self.declined: dict[tuple[object, ...], str] = {}

    def call(self, case: Any, x: dict[str, Any], implementation: str) -> tuple[Callable[[], Any], str]:
        backend = BACKENDS[implementation]
        if case.suite.value == "rope-append":
            raise Unsupported(
                "unavailable: FlashInfer's prefill API has no RoPE + append Op (the run times this batch's "
                "attention alone as its own case)"
            )
        module = (backend, case.dtype, case.head_dim, bool(case.window), bool(case.softcap))
        if module in self.declined:
            raise Unsupported(self.declined[module])
        try:
            fn, note = self.plan(case, x, backend)
            fn()  # loads the module (prebuilt, or JIT-compiled where allowed)
        except self.missing_module as exc:
            transforms = "".join((" window" if case.window else "", " softcap" if case.softcap else ""))
            self.declined[module] = (
                f"unavailable: no prebuilt FlashInfer {backend} module for {case.dtype} D{case.head_dim}"
                f"{transforms}, and JIT compiling is off (bench --flashinfer-jit allows it: minutes per "
                f"module) [{type(exc).__name__}]"
            )
            raise Unsupported(self.declined[module]) from exc
        return fn, note

    def plan(self, case: Any, x: dict[str, Any], backend: str) -> tuple[Callable[[], Any], str]:
        import torch
        from flashinfer.prefill import (
            BatchPrefillWithPagedKVCacheWrapper,
            BatchPrefillWithRaggedKVCacheWrapper,
        )

        q = x["q"].flatten(0, -3)  # (tokens, Hq, D): dense and contiguous q are (B, S, Hq, D)

        def offsets(lens: list[int]) -> torch.Tensor:
            return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=q.device)

        out = torch.empty_like(q)
        options = {
            "causal": case.causal,
            "window_left": case.window - 1 if case.window else -1,
            "logits_soft_cap": case.softcap or None,
            "q_data_type": q.dtype,
            "kv_data_type": q.dtype,
        }
        heads = (case.heads, case.kv_heads, case.head_dim)
        q_offsets = offsets(list(case.q_lens))
        layout = case.layout.value
        if layout in ("dense", "ragged"):
            k, v = x["k"].flatten(0, -3), x["v"].flatten(0, -3)
            ragged = BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD", backend=backend)
            ragged.plan(q_offsets, offsets(list(case.kv_lens)), *heads, **options)
            return (lambda: ragged.run(q, k, v, out=out)), ""
        if layout == "paged":
            page = case.page_size
            counts = [math.ceil(n / page) for n in case.kv_lens]
            table = x["block_table"]
            indices = torch.cat([table[b, :n] for b, n in enumerate(counts)])
            last = [n - (c - 1) * page if c else 0 for n, c in zip(case.kv_lens, counts, strict=True)]
            caches, note = (x["k_pages"], x["v_pages"]), ""
        else:  # contiguous: each sequence's cache is one page of S_max tokens
            page, counts = case.capacity, [1] * case.batch
            indices = torch.arange(case.batch, dtype=torch.int32, device=q.device)
            last = list(case.kv_lens)
            caches, note = (
                (x["k_cache"], x["v_cache"]),
                "the contiguous cache as one page of S_max per sequence",
            )
        last_lens = torch.tensor(last, dtype=torch.int32, device=q.device)
        paged = BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend=backend)
        paged.plan(q_offsets, offsets(counts), indices, last_lens, *heads, page, **options)
        return (lambda: paged.run(q, caches, out=out)), note


def _jit_toolchain(torch: Any) -> None:
    """What FlashInfer's JIT build needs on a host with a bare CUDA install: `ninja` on PATH (a
    venv's, when python was started by its path) and unversioned libcuda.so / libcudart.so to link
    against (links to the libraries loaded or shipped with torch, via FLASHINFER_EXTRA_LDFLAGS)."""
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    cuda_home = os.environ["CUDA_HOME"]
    links = Path(os.environ["FLASHINFER_WORKSPACE_BASE"]) / "linkstubs"
    for library in ("cuda", "cudart"):
        if glob.glob(f"{cuda_home}/lib64/**/lib{library}.so", recursive=True):
            continue
        torch.cuda.init()
        with open("/proc/self/maps") as maps:
            loaded = [line.split()[-1] for line in maps if f"/lib{library}.so" in line]
        if not loaded:
            continue
        links.mkdir(parents=True, exist_ok=True)
        link = links / f"lib{library}.so"
        link.unlink(missing_ok=True)
        link.symlink_to(loaded[0])
        flags = os.environ.get("FLASHINFER_EXTRA_LDFLAGS", "")
        if str(links) not in flags:
            os.environ["FLASHINFER_EXTRA_LDFLAGS"] = f"{flags} -L{links}".strip()


def load_flashinfer(device: str) -> tuple[Adapter, str, dict[str, str]]:
    os.environ.setdefault("FLASHINFER_WORKSPACE_BASE", "/tmp/fi-cache")  # its JIT cache and locks
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    import flashinfer
    import torch
    from flashinfer.prefill import BatchPrefillWithRaggedKVCacheWrapper  # noqa: F401  (what it times)

    try:
        from flashinfer.jit import MissingJITCacheError
    except ImportError:  # a version without it: every module can be built
        MissingJITCacheError = type("MissingJITCacheError", (Exception,), {})
    jit = not os.environ.get("FLASHINFER_DISABLE_JIT")
    if jit:
        _jit_toolchain(torch)
    prebuilt = Path(flashinfer.__file__).parent / "data" / "aot"
    modules = sorted(p.name for p in prebuilt.iterdir()) if prebuilt.is_dir() else []
    versions = {
        "flashinfer": str(flashinfer.__version__),
        "prebuilt modules": str(len(modules)),
        "jit": "on" if jit else "off",
    }
    return FlashInfer(MissingJITCacheError, device), f"FlashInfer {flashinfer.__version__}", versions


if __name__ == "__main__":
    sys.exit(bench_peer.main(load_flashinfer, __doc__))
