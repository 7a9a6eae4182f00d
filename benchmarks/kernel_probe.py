"""GPU probe of the SM90 attention programs: correctness against a float32 reference and
old-vs-new timing, side by side in one process.

Run on a Hopper GPU from the repository root:

    python benchmarks/kernel_probe.py [--quick] [--only TEXT[,TEXT...]] [--out DIR]
        [--ncu [--ncu-case dense|paged32]] [--dry-run]

`--ncu` also profiles one launch of every version's program of `--ncu-case` (dense: D128
non-causal at S 8192, long tiles; paged32: the tiled paged program on 32 x (512 + 128) at page
32, short tiles) with Nsight Compute (`--clock-control none`, full set, source counters) and
writes each report's details and per-instruction SASS table as CSV under DIR. `--dry-run` runs
on a CPU: it loads every version, builds (does not compile) each program the run would compile,
and prints the dense timing cases' first-wave K/V and CTA balance from each version's order model
(`kernels/tl/dense_order.py`, where the version has one).

The program modules are loaded without importing `tileprefill` itself (stub parent
packages), so the probe depends only on `kernels/tl/` and keeps working while the rest
of the package is being edited. The new program is checked on every source (the ragged one
also with `persistent_ctas = 0`, the one-CTA-per-tile grid). `--wait-for FILE` holds the
timing back until FILE exists, so the GPU test suite can share the call (and the CPUs for
compiling) without disturbing the timings.

Versions. "new" is the tree's `kernels/tl/`. Beside this file, "old" and each variant NAME are
either a whole `kernels/tl/` of their own (a folder: `_old/`, `_variant_NAME/`, loaded as the
package `_probe_old` / `_probe_NAME`, its imports of `tileprefill.kernels.tl` pointed at itself,
so every version's programs, orders and helpers coexist in one process) or, the older form, one
program module (`_old_attention_sm90.py`, `_variant_NAME.py`, which imports the tree's other
`kernels/tl/` modules). Every version is timed on every case ("new" is checked against the
reference on every source, each variant on the shapes it is timed on, "old" not at all). From the
repository root, with BRANCH a branch or commit:

    mkdir -p benchmarks/_old
    git archive main src/tileprefill/kernels/tl | tar -x -C benchmarks/_old --strip-components=4
    mkdir -p benchmarks/_variant_NAME
    git archive BRANCH src/tileprefill/kernels/tl | tar -x -C benchmarks/_variant_NAME --strip-components=4
    git show BRANCH:src/tileprefill/kernels/tl/attention_sm90.py > benchmarks/_variant_NAME.py  # one module

(They are untracked files of the tree: a device call carries them unless git ignores them, in
which case name them in its `carry`.) `rm -r benchmarks/_old benchmarks/_variant_*` clears them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import math
import multiprocessing
import os
import pathlib
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
for _name, _sub in (("tileprefill", "src/tileprefill"), ("tileprefill.kernels", "src/tileprefill/kernels")):
    if _name not in sys.modules:
        _stub = types.ModuleType(_name)
        _stub.__path__ = [str(ROOT / _sub)]
        sys.modules[_name] = _stub

from tileprefill.kernels.tl import attention_sm90  # noqa: E402
from tileprefill.tiles import KVSource, sm90_config  # noqa: E402
from tileprefill.tiles import KVSource as Source  # noqa: E402

#: The package every module of `kernels/tl/` imports its siblings from.
TREE_PACKAGE = "tileprefill.kernels.tl"


def _extra_pass_configs(factory: Any) -> dict[str, Any]:
    """The TileLang pass configs a program factory asks for (`kernels/tl/build_options.py`, on trees
    that have it)."""
    try:
        from tileprefill.kernels.tl import build_options
    except ImportError:
        return {}
    return build_options.pass_configs(factory)


def _load(path: pathlib.Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


class _SnapshotLoader(importlib.abc.Loader):
    """Runs a module of a `kernels/tl/` snapshot with its imports of TREE_PACKAGE pointed at the
    snapshot's own package. (Only import lines change, so line numbers stay those of the file,
    which TileLang reads its programs' source from.)"""

    def __init__(self, path: pathlib.Path, package: str) -> None:
        self.path = path
        self.package = package

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        source = self.path.read_text(encoding="utf-8").replace(TREE_PACKAGE, self.package)
        exec(compile(source, str(self.path), "exec", dont_inherit=True), module.__dict__)


class _SnapshotFinder(importlib.abc.MetaPathFinder):
    """Finds the package `package` and its modules in `folder` (a copy of `kernels/tl/`)."""

    def __init__(self, package: str, folder: pathlib.Path) -> None:
        self.package = package
        self.folder = folder

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == self.package:
            init = self.folder / "__init__.py"
            return importlib.util.spec_from_file_location(
                fullname,
                init,
                loader=_SnapshotLoader(init, self.package),
                submodule_search_locations=[str(self.folder)],
            )
        prefix, _, name = fullname.rpartition(".")
        if prefix != self.package or not (self.folder / f"{name}.py").is_file():
            return None
        file = self.folder / f"{name}.py"
        loader = _SnapshotLoader(file, self.package)
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def load_snapshot(folder: pathlib.Path, package: str) -> Any:
    """The program module (`attention_sm90`) of the `kernels/tl/` copy in `folder`, imported as the
    package `package`."""
    if not (folder / "attention_sm90.py").is_file():
        raise FileNotFoundError(f"{folder}: expected a copy of kernels/tl/, found no attention_sm90.py")
    if not any(isinstance(f, _SnapshotFinder) and f.package == package for f in sys.meta_path):
        sys.meta_path.insert(0, _SnapshotFinder(package, folder))
    return importlib.import_module(f"{package}.attention_sm90")


def _version(here: pathlib.Path, stem: str, name: str) -> Any | None:
    """Version `name` from the folder `stem` or the module file `stem`_attention_sm90.py / `stem`.py."""
    if (here / stem).is_dir():
        return load_snapshot(here / stem, f"_probe_{name}")
    for file in (here / f"{stem}_attention_sm90.py", here / f"{stem}.py"):
        if file.is_file():
            return _load(file)
    return None


def _modules() -> dict[str, Any]:
    """The versions timed side by side, by name: "new" (the tree's program module), "old" and one per
    variant (see the module docstring)."""
    here = pathlib.Path(__file__).parent
    modules: dict[str, Any] = {"new": attention_sm90}
    old = _version(here, "_old", "old")
    if old is not None:
        modules["old"] = old
    names = {p.name.removesuffix(".py").removeprefix("_variant_") for p in here.glob("_variant_*")}
    for name in sorted(names):
        modules[name] = _version(here, f"_variant_{name}", name)
    return modules


MODULES = _modules()


@dataclasses.dataclass(frozen=True)
class Prog:
    """One program: module name, source, static facts and whether it runs persistent."""

    module: str
    source: str
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    page_size: int = 0
    persistent: bool = True

    def factory_args(self) -> tuple[Any, ...]:
        config = sm90_config(_SOURCES[self.source], self.head_dim)
        module = MODULES[self.module]
        if config.block_M > 128 and getattr(module, "MAX_CONSUMERS", 2) < 3:
            # A program from before D 64 ran three consumer warpgroups: two.
            config = dataclasses.replace(config, block_M=128, threads=384)
        if not self.persistent:
            config = dataclasses.replace(config, persistent_ctas=0)
        # The version's own enum: a snapshot's program compares with its own members.
        source = getattr(module, "KVSource", KVSource)(self.source)
        if takes_scalars(module):
            return (source, self.head_dim, self.dtype, self.causal, self.page_size, config)
        heads = (self.heads, self.kv_heads)
        return (
            source,
            *heads,
            self.head_dim,
            self.dtype,
            self.causal,
            self.head_dim**-0.5,
            self.page_size,
            config,
        )

    def scalars(self) -> tuple[float | int, ...]:
        """What a launch of the program passes after its tensors: the scale, the cap's factor and the
        window (none here) for a version that takes them at launch; nothing for one compiled for them."""
        return (self.head_dim**-0.5, 0.0, 0) if takes_scalars(MODULES[self.module]) else ()


def takes_scalars(module: Any) -> bool:
    """Whether a version's programs read their head counts from their tensors and take the score
    scalars at launch (its `program` has no `heads` argument)."""
    return "heads" not in inspect.signature(module.program).parameters


#: The selection source of each program source name.
_SOURCES: dict[str, Source] = {
    "dense": Source.DENSE,
    "ragged": Source.RAGGED,
    "contiguous": Source.CONTIGUOUS,
    "paged": Source.PAGED,
    "paged_tiled": Source.PAGED_TILED,
}
_KERNELS: dict[Prog, Any] = {}
#: Where the probe's tensors live ("cpu" only to test the probe itself with fake kernels).
DEV = "cuda"


def compile_prog(prog: Prog) -> float:
    import tilelang

    if prog in _KERNELS:
        return 0.0
    start = time.time()
    factory = MODULES[prog.module].program
    func = factory(*prog.factory_args())
    target = tilelang.tvm.target.Target({"kind": "cuda", "arch": "sm_90a"})
    with target:
        kernel = tilelang.compile(
            func,
            target=target,
            execution_backend="tvm_ffi",
            pass_configs={
                tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: True,
                **_extra_pass_configs(factory),
            },
        )
    _KERNELS[prog] = kernel
    return time.time() - start


def _compile_worker(prog: Prog) -> tuple[Prog, float, str | None]:
    try:
        return prog, compile_prog(prog), None
    except Exception as error:  # reported, not raised: one bad program must not hide the rest
        return prog, 0.0, f"{type(error).__name__}: {error}"[:2000]


def prebuild(progs: list[Prog], log: Any) -> dict[Prog, str]:
    """Compile `progs` side by side: "new" first, then the other versions, so that a version's
    program that is the same as new's (same TIR: a variant that changes other sources) is a hit in
    TileLang's cache instead of a second compile running beside the first."""
    failed: dict[Prog, str] = {}
    todo = list(dict.fromkeys(progs))
    context = multiprocessing.get_context("spawn")
    start = time.time()
    for phase in ([p for p in todo if p.module == "new"], [p for p in todo if p.module != "new"]):
        if not phase:
            continue
        # One process a program, a few more than cores: one round of compiles instead of two.
        workers = min(len(phase), len(os.sched_getaffinity(0)) + 8)
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for prog, seconds, error in pool.map(_compile_worker, phase):
                log(f"compiled {prog} in {seconds:.1f}s" + (f" FAILED {error}" if error else ""))
                if error:
                    failed[prog] = error
    for prog in todo:
        if prog not in failed:
            compile_prog(prog)  # from TileLang's cache
    log(f"prebuild of {len(todo)} programs: {time.time() - start:.1f}s")
    return failed


def same_as_new(prog: Prog) -> bool:
    """Whether another version's program of `prog` is new's, character for character (then it is
    neither checked nor timed again: its figures would be new's)."""
    twin = dataclasses.replace(prog, module="new")
    if prog.module == "new" or prog not in _KERNELS or twin not in _KERNELS:
        return False
    return bool(_KERNELS[prog].get_kernel_source() == _KERNELS[twin].get_kernel_source())


# ---------------------------------------------------------------- reference


def reference(q: Any, k: Any, v: Any, q_len: int, kv_len: int, causal: bool, scale: float) -> Any:
    """float32 attention of one sequence: q (Sq, H, D), k/v (Skv, Hkv, D) -> (Sq, H, D); rows that
    see no key are 0. Bottom-right causal."""
    import torch

    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    qf = q[:q_len].float().transpose(0, 1)  # H, Sq, D
    kf = k[:kv_len].float().transpose(0, 1).repeat_interleave(group, 0)
    vf = v[:kv_len].float().transpose(0, 1).repeat_interleave(group, 0)
    out = torch.zeros_like(qf)
    rows = torch.arange(q_len, device=q.device)[:, None]
    cols = torch.arange(kv_len, device=q.device)[None, :]
    visible = (cols <= rows + kv_len - q_len) if causal else torch.ones_like(rows * cols, dtype=torch.bool)
    chunk = max(1, (1 << 28) // max(1, q_len * max(kv_len, 1)))
    for h0 in range(0, heads, chunk):
        s = torch.einsum("hqd,hkd->hqk", qf[h0 : h0 + chunk], kf[h0 : h0 + chunk]) * scale
        s = s.masked_fill(~visible, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        out[h0 : h0 + chunk] = torch.einsum("hqk,hkd->hqd", p, vf[h0 : h0 + chunk])
    return out.transpose(0, 1)


def _dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def check(name: str, got: Any, want: Any, results: list[dict[str, Any]], log: Any, tol: float = 2e-2) -> None:
    got = got.float()
    nan = bool(got.isnan().any())
    err = float((got - want).abs().max()) if got.numel() else 0.0
    ok = (not nan) and err <= tol
    results.append({"check": name, "max_abs_err": err, "nan": nan, "ok": ok})
    log(f"{'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.3e} nan={nan}")


def dense_case(
    prog: Prog, batch: int, seq_q: int, seq_kv: int, results: list[dict[str, Any]], log: Any
) -> None:
    import torch

    dt = _dtype(prog.dtype)
    q = torch.randn(batch, seq_q, prog.heads, prog.head_dim, device=DEV, dtype=dt)
    k = torch.randn(batch, seq_kv, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    v = torch.randn(batch, seq_kv, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    out = torch.full_like(q, float("nan"))
    _KERNELS[prog](q, k, v, out, *prog.scalars())
    torch.cuda.synchronize()
    want = torch.stack(
        [reference(q[b], k[b], v[b], seq_q, seq_kv, prog.causal, prog.head_dim**-0.5) for b in range(batch)]
    )
    check(f"{prog} B{batch} Sq{seq_q} Skv{seq_kv}", out, want, results, log)


def ragged_case(
    prog: Prog, q_lens: list[int], kv_lens: list[int], results: list[dict[str, Any]], log: Any
) -> None:
    import torch

    dt = _dtype(prog.dtype)
    cq = torch.tensor([0, *itertools_accumulate(q_lens)], dtype=torch.int32, device=DEV)
    ck = torch.tensor([0, *itertools_accumulate(kv_lens)], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), prog.heads, prog.head_dim, device=DEV, dtype=dt)
    k = torch.randn(sum(kv_lens), prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    v = torch.randn(sum(kv_lens), prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    out = torch.full_like(q, float("nan"))
    _KERNELS[prog](q, k, v, cq, ck, out, *prog.scalars())
    torch.cuda.synchronize()
    parts = []
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        qs, ks = int(cq[b]), int(ck[b])
        parts.append(
            reference(
                q[qs : qs + ql], k[ks : ks + kl], v[ks : ks + kl], ql, kl, prog.causal, prog.head_dim**-0.5
            )
        )
    check(f"{prog} q{q_lens} kv{kv_lens}", out, torch.cat(parts), results, log)


def itertools_accumulate(values: list[int]) -> list[int]:
    total, out = 0, []
    for value in values:
        total += value
        out.append(total)
    return out


def contiguous_case(
    prog: Prog, seq_q: int, kv_lens: list[int], max_seq: int, results: list[dict[str, Any]], log: Any
) -> None:
    import torch

    dt = _dtype(prog.dtype)
    batch = len(kv_lens)
    q = torch.randn(batch, seq_q, prog.heads, prog.head_dim, device=DEV, dtype=dt)
    k = torch.randn(batch, max_seq, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    v = torch.randn(batch, max_seq, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    for b, kl in enumerate(kv_lens):
        k[b, kl:] = float("nan")
        v[b, kl:] = float("nan")
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    _KERNELS[prog](q, k, v, lens, out, *prog.scalars())
    torch.cuda.synchronize()
    want = torch.stack(
        [
            reference(q[b], k[b], v[b], seq_q, kl, prog.causal, prog.head_dim**-0.5)
            for b, kl in enumerate(kv_lens)
        ]
    )
    check(f"{prog} Sq{seq_q} kv{kv_lens}", out, want, results, log)


def paged_case(
    prog: Prog, q_lens: list[int], kv_lens: list[int], results: list[dict[str, Any]], log: Any
) -> None:
    import torch

    dt = _dtype(prog.dtype)
    ps = prog.page_size
    batch = len(q_lens)
    pages_of = [math.ceil(kl / ps) for kl in kv_lens]
    max_pages = max(1, max(pages_of))
    num_pages = sum(pages_of) + 3
    perm = torch.randperm(num_pages, device=DEV).to(torch.int32)
    table = torch.zeros(batch, max_pages, dtype=torch.int32, device=DEV)
    kp = torch.full((num_pages, ps, prog.kv_heads, prog.head_dim), float("nan"), device=DEV, dtype=dt)
    vp = torch.full_like(kp, float("nan"))
    ks, vs = [], []
    used = 0
    for b, kl in enumerate(kv_lens):
        kb = torch.randn(kl, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
        vb = torch.randn_like(kb)
        ks.append(kb)
        vs.append(vb)
        for i in range(pages_of[b]):
            page = int(perm[used])
            used += 1
            table[b, i] = page
            rows = min(ps, kl - i * ps)
            kp[page, :rows] = kb[i * ps : i * ps + rows]
            vp[page, :rows] = vb[i * ps : i * ps + rows]
    cq = torch.tensor([0, *itertools_accumulate(q_lens)], dtype=torch.int32, device=DEV)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), prog.heads, prog.head_dim, device=DEV, dtype=dt)
    out = torch.full_like(q, float("nan"))
    _KERNELS[prog](q, kp, vp, table, lens, cq, out, *prog.scalars())
    torch.cuda.synchronize()
    parts = []
    for b, (ql, kl) in enumerate(zip(q_lens, kv_lens, strict=True)):
        qs = int(cq[b])
        parts.append(reference(q[qs : qs + ql], ks[b], vs[b], ql, kl, prog.causal, prog.head_dim**-0.5))
    check(f"{prog} q{q_lens} kv{kv_lens}", out, torch.cat(parts), results, log)


# ---------------------------------------------------------------- timing


def visible_pairs(seq_q: int, seq_kv: int, causal: bool) -> int:
    if not causal:
        return seq_q * seq_kv
    offset = seq_kv - seq_q
    return sum(min(seq_kv, max(0, r + offset + 1)) for r in range(seq_q))


def time_dense(prog: Prog, batch: int, seq: int) -> float:
    import torch
    from triton.testing import do_bench

    dt = _dtype(prog.dtype)
    q = torch.randn(batch, seq, prog.heads, prog.head_dim, device=DEV, dtype=dt)
    k = torch.randn(batch, seq, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    v = torch.randn(batch, seq, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    out = torch.empty_like(q)
    kernel, scalars = _KERNELS[prog], prog.scalars()
    ms = do_bench(lambda: kernel(q, k, v, out, *scalars), warmup=100, rep=400, return_mode="median")
    flops = 4 * batch * prog.heads * prog.head_dim * visible_pairs(seq, seq, prog.causal)
    return float(flops / (ms * 1e-3) / 1e12)


def time_ragged(prog: Prog, q_lens: list[int]) -> float:
    import torch
    from triton.testing import do_bench

    dt = _dtype(prog.dtype)
    cq = torch.tensor([0, *itertools_accumulate(q_lens)], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), prog.heads, prog.head_dim, device=DEV, dtype=dt)
    k = torch.randn(sum(q_lens), prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    v = torch.randn_like(k)
    out = torch.empty_like(q)
    kernel, scalars = _KERNELS[prog], prog.scalars()
    ms = do_bench(lambda: kernel(q, k, v, cq, cq, out, *scalars), warmup=100, rep=400, return_mode="median")
    flops = sum(4 * prog.heads * prog.head_dim * visible_pairs(n, n, prog.causal) for n in q_lens)
    return float(flops / (ms * 1e-3) / 1e12)


def paged_inputs(prog: Prog, q_lens: list[int], kv_lens: list[int]) -> tuple[Any, ...]:
    """The arguments of a paged program (q, pages, table, lengths, cu_seqlens_q, out): each
    sequence's pages scattered over a shuffled pool."""
    import torch

    dt = _dtype(prog.dtype)
    ps = prog.page_size
    pages_of = [math.ceil(kl / ps) for kl in kv_lens]
    num_pages = sum(pages_of)
    perm = torch.randperm(num_pages, device=DEV).to(torch.int32)
    table = torch.zeros(len(q_lens), max(pages_of), dtype=torch.int32, device=DEV)
    used = 0
    for b, n in enumerate(pages_of):
        table[b, :n] = perm[used : used + n]
        used += n
    kp = torch.randn(num_pages, ps, prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    vp = torch.randn_like(kp)
    cq = torch.tensor([0, *itertools_accumulate(q_lens)], dtype=torch.int32, device=DEV)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), prog.heads, prog.head_dim, device=DEV, dtype=dt)
    return q, kp, vp, table, lens, cq, torch.empty_like(q)


def time_paged(prog: Prog, q_lens: list[int], kv_lens: list[int]) -> float:
    """Paged (or tiled paged) cache: each sequence's pages scattered over a shuffled pool."""
    from triton.testing import do_bench

    inputs = paged_inputs(prog, q_lens, kv_lens)
    kernel, scalars = _KERNELS[prog], prog.scalars()
    ms = do_bench(lambda: kernel(*inputs, *scalars), warmup=100, rep=400, return_mode="median")
    flops = sum(
        4 * prog.heads * prog.head_dim * visible_pairs(ql, kl, prog.causal)
        for ql, kl in zip(q_lens, kv_lens, strict=True)
    )
    return float(flops / (ms * 1e-3) / 1e12)


def time_contiguous(prog: Prog, seq_q: int, kv_lens: list[int]) -> float:
    import torch
    from triton.testing import do_bench

    dt = _dtype(prog.dtype)
    batch = len(kv_lens)
    q = torch.randn(batch, seq_q, prog.heads, prog.head_dim, device=DEV, dtype=dt)
    k = torch.randn(batch, max(kv_lens), prog.kv_heads, prog.head_dim, device=DEV, dtype=dt)
    v = torch.randn_like(k)
    lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)
    kernel, scalars = _KERNELS[prog], prog.scalars()
    ms = do_bench(lambda: kernel(q, k, v, lens, out, *scalars), warmup=100, rep=400, return_mode="median")
    flops = sum(4 * prog.heads * prog.head_dim * visible_pairs(seq_q, kl, prog.causal) for kl in kv_lens)
    return float(flops / (ms * 1e-3) / 1e12)


# (label, batch, seq, heads, kv_heads, D, dtype, causal): the reference dense cases, D 64 both ways,
# and the group-1 causal shapes whose K/V exceeds the L2 (the dense order's bands; the group-4
# S 8192 pair above them is their control).
DENSE_TIMING = [
    ("B1 S8192 32/8 D128 nc bf16", 1, 8192, 32, 8, 128, "bfloat16", False),
    ("B4 S4096 32/8 D128 nc fp16", 4, 4096, 32, 8, 128, "float16", False),
    ("B1 S8192 32/8 D128 causal bf16", 1, 8192, 32, 8, 128, "bfloat16", True),
    ("B4 S2048 32/8 D64 causal bf16", 4, 2048, 32, 8, 64, "bfloat16", True),
    ("B2 S8192 32/8 D64 nc bf16", 2, 8192, 32, 8, 64, "bfloat16", False),
    ("B4 S4096 32/8 D64 causal fp16", 4, 4096, 32, 8, 64, "float16", True),
    ("B16 S1024 32/8 D64 causal bf16", 16, 1024, 32, 8, 64, "bfloat16", True),
    ("B16 S1024 32/8 D64 nc bf16", 16, 1024, 32, 8, 64, "bfloat16", False),
    ("B8 S1024 40/8 D128 causal bf16", 8, 1024, 40, 8, 128, "bfloat16", True),
    ("B4 S4096 32/8 D256 causal bf16", 4, 4096, 32, 8, 256, "bfloat16", True),
    ("B2 S8192 32/8 D256 nc fp16", 2, 8192, 32, 8, 256, "float16", False),
    ("B8 S2048 32/32 D128 causal bf16", 8, 2048, 32, 32, 128, "bfloat16", True),
    ("B4 S4096 32/32 D128 causal bf16", 4, 4096, 32, 32, 128, "bfloat16", True),
    ("B2 S8192 32/32 D128 causal bf16", 2, 8192, 32, 32, 128, "bfloat16", True),
    ("B16 S1024 32/32 D128 causal bf16", 16, 1024, 32, 32, 128, "bfloat16", True),
]
RAGGED_LENS = [17, 4096, 300, 2048, 1000, 129, 3000, 777]
#: (label, source, page size, q_lens, kv_lens): the reference packed cases, 32/8 D128 bf16 causal.
PACKED_TIMING = [
    ("ragged 8 mixed 17..4096", "ragged", 0, RAGGED_LENS, RAGGED_LENS),
    ("paged 8x(3000+700) p16", "paged_tiled", 16, [700] * 8, [3700] * 8),
    ("paged 8x(3000+700) p64", "paged_tiled", 64, [700] * 8, [3700] * 8),  # page 16 against page 64
    ("paged 32x(512+128) p32", "paged_tiled", 32, [128] * 32, [640] * 32),
    ("paged 2x(2048+256) p1", "paged", 1, [256] * 2, [2304] * 2),
    ("contiguous 4x(4096+512)", "contiguous", 0, [512] * 4, [4608] * 4),
]


def _wait_for(path: str | None, log: Any) -> None:
    """Block until `path` exists (another GPU job sharing the device is done), at most 10 minutes."""
    if not path:
        return
    start = time.time()
    while not os.path.exists(path) and time.time() - start < 600:
        time.sleep(2)
    log(f"waited {time.time() - start:.0f}s for {path}")


#: The cases `--ncu` can profile (one launch after two warm-ups): dense D128 non-causal at S 8192
#: (long tiles), and the chunked-prefill paged batch, 32 x (512 + 128) at page 32 (short tiles).
NCU_CASES = ("dense", "paged32")


def ncu_launch(module: str, case: str) -> None:
    """Launch `case`'s program of `module` three times (the child process ncu profiles)."""
    import torch

    if case == "paged32":
        prog = Prog(module, "paged_tiled", 32, 8, 128, "bfloat16", True, page_size=32)
        compile_prog(prog)
        inputs = paged_inputs(prog, [128] * 32, [640] * 32)
    else:
        prog = Prog(module, "dense", 32, 8, 128, "bfloat16", False)
        compile_prog(prog)
        q = torch.randn(1, 8192, 32, 128, device=DEV, dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8192, 8, 128, device=DEV, dtype=torch.bfloat16) for _ in "kv")
        inputs = (q, k, v, torch.empty_like(q))
    for _ in range(3):
        _KERNELS[prog](*inputs, *prog.scalars())
    torch.cuda.synchronize()


def profile(module: str, case: str, out_dir: pathlib.Path, log: Any) -> None:
    """ncu on the third launch of `module`'s `case` program: details and SASS source tables as CSV."""
    import subprocess

    ncu = os.environ.get("NCU", "ncu")
    report = out_dir / f"ncu-{case}-{module}"
    kernel = "regex:main_paged" if case == "paged32" else "regex:main_dense"
    command = [
        ncu, "--clock-control", "none", "--set", "full", "--import-source", "no",
        "--launch-skip", "2", "--launch-count", "1", "--kernel-name", kernel,
        "-f", "-o", str(report), sys.executable, __file__, "--ncu-child", module, "--ncu-case", case,
    ]  # fmt: skip
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    log(f"ncu {module}: exit {done.returncode} in {time.time() - start:.0f}s {done.stderr[-500:]}")
    for page, extra in (("details", []), ("source", ["--print-source", "sass"])):
        dump = subprocess.run(
            [ncu, "-i", f"{report}.ncu-rep", "--page", page, "--csv", *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        (out_dir / f"ncu-{case}-{module}-{page}.csv").write_text(dump.stdout + dump.stderr[-2000:])


def order_model(module: str) -> Any | None:
    """The dense order's model (`kernels/tl/dense_order.py`) of version `module`, if it has one."""
    package = MODULES[module].__name__.rpartition(".")[0]
    try:
        return importlib.import_module(f"{package}.dense_order") if package else None
    except ImportError:
        return None


def dry_run(progs: list[Prog], timing: list[tuple[str, Prog, Any]], log: Any) -> None:
    """Build every program of `progs` once (no compile: on a CPU this checks that every version loads
    and builds), then print each dense timing case's first-wave K/V and CTA balance per version."""
    start = time.time()
    built = list(dict.fromkeys(progs))
    for prog in built:
        MODULES[prog.module].program(*prog.factory_args())
    versions = sorted({p.module for p in built})
    log(f"built {len(built)} programs of versions {versions} in {time.time() - start:.0f}s")
    for label, prog, (source, batch, seq) in timing:
        model = order_model(prog.module) if source == "dense" else None
        if model is None:
            continue
        config = prog.factory_args()[-1]
        if not config.persistent_ctas:
            continue
        order = model.DenseOrder(
            ctas=config.persistent_ctas,
            heads=prog.heads,
            kv_heads=prog.kv_heads,
            causal=prog.causal,
            kv_key_bytes=4 * prog.head_dim,
        )
        shape = model.Shape(batch, seq, seq, config.block_M, config.block_N)
        wave = model.first_wave_kv_bytes(order, shape) / (1 << 20)
        busiest = model.balance(order, shape)
        log(f"order {label}: first wave {wave:.1f} MiB of K/V, busiest CTA {busiest:.3f}x the mean")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/probe"))
    parser.add_argument("--quick", action="store_true", help="correctness only")
    parser.add_argument("--ncu", action="store_true", help="also profile every version's --ncu-case (ncu)")
    parser.add_argument("--ncu-case", choices=NCU_CASES, default="dense", help="what --ncu profiles")
    parser.add_argument("--ncu-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--wait-for", default=None, help="a file to wait for before timing")
    parser.add_argument(
        "--check-variants",
        default="",
        help="comma-separated variant names run over every check of new too (where their program differs)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="time only the cases whose label contains one of these comma-separated texts, and skip "
        "the correctness checks (with --quick: check the listed shapes and those cases' shapes)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="on a CPU: build (not compile) every program the run would compile, print the dense "
        "timing cases' order figures, and stop",
    )
    args = parser.parse_args()
    if args.ncu_child:
        ncu_launch(args.ncu_child, args.ncu_case)
        return
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(out_dir / "probe.log", "a")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    B16 = "bfloat16"
    versions = [name for name in MODULES if name != "new"] + ["new"]
    timing: list[tuple[str, Prog, Any]] = []
    for label, batch, seq, h, hk, d, dt, causal in DENSE_TIMING:
        for module in versions:
            prog = Prog(module, "dense", h, hk, d, dt, causal)
            timing.append((f"{label} [{module}]", prog, ("dense", batch, seq)))
    for label, source, ps, ql, kl in PACKED_TIMING:
        for module in versions:
            prog = Prog(module, source, 32, 8, 128, B16, True, page_size=ps)
            timing.append((f"{label} [{module}]", prog, (source, ql, kl)))

    # The new program over every source: unaligned lengths, empty sequences, q_len > kv_len (rows
    # that see nothing), more tiles than CTAs and fewer, batches wide enough that the walk's cost
    # bands are wider than 1, one-CTA-per-tile grids, head dims of every tile config.
    rng = __import__("random").Random(7)
    many_q = [rng.choice([0, 1, 37, 128, 129, 300, 700]) for _ in range(40)]
    many_kv = [q + rng.choice([0, 5, 200, 900]) for q in many_q]
    new = Prog("new", "ragged", 32, 8, 128, B16, True)
    ragged_checks = [
        (p, lens)
        for p in (new, dataclasses.replace(new, persistent=False))
        for lens in (([5, 0, 300, 128, 129], [5, 7, 500, 128, 100]), ([1], [1]), (many_q, many_kv))
    ]
    ragged_checks += [
        (Prog("new", "ragged", 16, 1, 64, "float16", False), ([5, 0, 300, 128, 129], [5, 7, 500, 128, 100])),
        (Prog("new", "ragged", 16, 1, 64, "float16", False), (many_q, many_kv)),
        (Prog("new", "ragged", 16, 2, 192, B16, True), ([5, 0, 300, 129], [5, 7, 500, 100])),
    ]
    contiguous_checks = [
        (Prog("new", "contiguous", 32, 8, 128, B16, True), (200, [500, 150, 0, 333], 640)),
        (Prog("new", "contiguous", 32, 8, 128, B16, True), (700, [3000, 129, 700, 1], 3000)),
    ]
    paged_checks = []
    for source, ps in (("paged", 1), ("paged_tiled", 16), ("paged_tiled", 32)):
        p = Prog("new", source, 32, 8, 128, B16, True, page_size=ps)
        paged_checks.append((p, ([100, 0, 37], [300, 10, 37])))
        paged_checks.append((p, (many_q, many_kv)))
        paged_checks.append((p, ([128] * 32, [640] * 32)))
    dense_checks = [
        (Prog("new", "dense", 32, 8, 128, B16, True), (2, 300, 777)),
        (Prog("new", "dense", 32, 8, 128, B16, True), (1, 777, 300)),
        (Prog("new", "dense", 32, 8, 128, "float16", False), (2, 1057, 1057)),
        (Prog("new", "dense", 20, 4, 64, B16, True), (3, 1, 1)),
        (Prog("new", "dense", 32, 2, 256, B16, True), (1, 1000, 1200)),
        (Prog("new", "dense", 16, 1, 96, "float16", False), (2, 333, 129)),
        (Prog("new", "dense", 16, 16, 176, B16, True), (1, 500, 900)),
        (Prog("new", "dense", 16, 4, 192, B16, True), (2, 700, 900)),
        # Group 1, K/V over the L2: bands of 22 tiles (one band here), two-tile units, an odd tile
        # count (the last unit one tile), q_len < kv_len.
        (Prog("new", "dense", 15, 15, 128, B16, True), (3, 1100, 5000)),
        # D 64 (192-row tiles): two bands of 8.
        (Prog("new", "dense", 8, 8, 64, B16, True), (8, 3000, 3000)),
    ]
    variants = [name for name in args.check_variants.split(",") if name]
    unknown = [name for name in variants if name not in MODULES or name in ("new", "old")]
    if unknown:
        parser.error(f"--check-variants: expected variant names of {sorted(MODULES)}, got {unknown}")

    def with_variants(checks: list[tuple[Prog, Any]]) -> list[tuple[Prog, Any]]:
        return checks + [
            (dataclasses.replace(p, module=name), shape) for name in variants for p, shape in checks
        ]

    listed_checks = {
        "dense": dense_checks,
        "ragged": ragged_checks,
        "contiguous": contiguous_checks,
        "paged": paged_checks,
    }
    checks = {kind: with_variants(listed) for kind, listed in listed_checks.items()}
    if args.only is not None:
        wanted = [text for text in args.only.split(",") if text]
        timing = [entry for entry in timing if any(text in entry[0] for text in wanted)]
        if not args.quick:
            checks = {kind: [] for kind in checks}
    progs = [p for _, p, _ in timing] + [p for listed in checks.values() for p, _ in listed]
    if args.dry_run:
        dry_run(progs, timing, log)
        return

    import torch

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    log(f"device {torch.cuda.get_device_name()} sms {sms}")
    failed = prebuild(progs, log)
    same = {p for p in progs if same_as_new(p)}
    # A variant's check of a program that is new's would repeat new's.
    checks = {kind: [(p, shape) for p, shape in listed if p not in same] for kind, listed in checks.items()}
    dense_checks, ragged_checks = checks["dense"], checks["ragged"]
    contiguous_checks, paged_checks = checks["contiguous"], checks["paged"]
    for label, prog, _ in timing:
        if prog in same:
            log(f"{label}: the same program as new's, not timed again")

    results: list[dict[str, Any]] = []
    torch.manual_seed(0)
    for prog, (batch, sq, skv) in dense_checks:
        if prog not in failed:
            dense_case(prog, batch, sq, skv, results, log)
    for prog, (ql, kl) in ragged_checks:
        if prog not in failed:
            ragged_case(prog, ql, kl, results, log)
    for prog, (sq, kl, mx) in contiguous_checks:
        if prog not in failed:
            contiguous_case(prog, sq, kl, mx, results, log)
    for prog, (ql, kl) in paged_checks:
        if prog not in failed:
            paged_case(prog, ql, kl, results, log)
    for _label, prog, (source, a, b) in timing:
        # Every version but main's ("old") is checked on its timed shapes, variants included.
        if (
            prog.module != "old"
            and prog not in failed
            and prog not in same
            and (args.only is None or args.quick)
        ):
            if source == "dense":
                dense_case(prog, min(a, 2), min(b, 2048) + 33, min(b, 2048) + 33, results, log)
            elif source == "ragged":
                ragged_case(prog, [x + 3 for x in a], [x + 3 for x in b], results, log)
            elif source == "contiguous":
                contiguous_case(prog, a[0] + 3, [x + 5 for x in b], max(b) + 5, results, log)
            else:
                paged_case(prog, [x + 3 for x in a], [x + 5 for x in b], results, log)
    bad = [r for r in results if not r["ok"]]
    log(f"checks: {len(results) - len(bad)} ok, {len(bad)} failed; compile failures {len(failed)}")

    timings: list[dict[str, Any]] = []
    if not args.quick:
        _wait_for(args.wait_for, log)
        # Two passes, the second in reverse order, and their mean: one pass timed every case's
        # "old" before its "new", and on an H100 two byte-identical dense programs then differed
        # by 7% (627 against 582 TFLOP/s): the later one ran on a warmer, slower GPU.
        passes: dict[str, list[float]] = {}
        for order in (timing, timing[::-1]):
            for label, prog, (source, a, b) in order:
                if prog in failed or prog in same:
                    continue
                if source == "dense":
                    tflops = time_dense(prog, a, b)
                elif source == "ragged":
                    tflops = time_ragged(prog, a)
                elif source == "contiguous":
                    tflops = time_contiguous(prog, a[0], b)
                else:
                    tflops = time_paged(prog, a, b)
                passes.setdefault(label, []).append(tflops)
                log(f"time {label}: {tflops:.1f} TFLOP/s")
        timings = [{"case": label, "tflops": sum(v) / len(v), "passes": v} for label, v in passes.items()]
    (out_dir / "probe.json").write_text(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "checks": results,
                "timings": timings,
                "failed": {str(k): v for k, v in failed.items()},
                "same_as_new": sorted(label for label, prog, _ in timing if prog in same),
            },
            indent=1,
        )
    )
    if args.ncu:
        for module in versions:
            profile(module, args.ncu_case, out_dir, log)
    log(f"checks: {len(results) - len(bad)} ok, {len(bad)} failed; compile failures {len(failed)}")
    for row in timings:
        each = " ".join(f"{t:.1f}" for t in row["passes"])
        log(f"{row['case']:<48} {row['tflops']:7.1f}  (passes: {each})")


if __name__ == "__main__":
    main()
