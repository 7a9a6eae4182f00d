"""Where a cached call's host time goes: per-call wall time of two Ops, a cProfile of each, and the
dense attention launch peeled layer by layer (the JITKernel alone, `_launch`, the custom op).

    PYTHONPATH=/tmp/tl:$PWD/src python3 benchmarks/profile_calls.py

Tiny inputs (see `call_costs.py`), so the GPU work is negligible and the times are host time.
"""

import cProfile
import io
import pstats
import sys
import time

sys.path.insert(0, "benchmarks")
import torch
from call_costs import CALLS

import tileprefill.kernels.attention_tl as at

for name in ("dense", "paged_rope_append"):
    call = CALLS[name](False)
    call()
    torch.cuda.synchronize()
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(1000):
        call()
    torch.cuda.synchronize()
    print(name, "per call us", (time.perf_counter() - t) * 1e3)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        call()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(28)
    print(s.getvalue()[:9000])
# the raw kernel launch alone
q = torch.randn(1, 16, 32, 128, dtype=torch.float16, device="cuda")
k = torch.randn(1, 16, 8, 128, dtype=torch.float16, device="cuda")
kern = at.build_program(
    at.AttentionKey.DENSE_SM90,
    at.StaticFacts(heads=32, kv_heads=8, head_dim=128, dtype="float16", causal=True, sm_scale=128**-0.5),
)
out = torch.empty_like(q)
for _ in range(50):
    kern(q, k, k, out)
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(1000):
    kern(q, k, k, out)
torch.cuda.synchronize()
print("raw JITKernel call us", (time.perf_counter() - t) * 1e3)
op = at.OPS[at.AttentionKey.DENSE_SM90]
t = time.perf_counter()
for _ in range(1000):
    op(q, k, k, True, 128**-0.5)
torch.cuda.synchronize()
print("custom op call us", (time.perf_counter() - t) * 1e3)
t = time.perf_counter()
for _ in range(1000):
    at._launch(at.AttentionKey.DENSE_SM90, (q, k, k), True, 128**-0.5)
torch.cuda.synchronize()
print("_launch us", (time.perf_counter() - t) * 1e3)
