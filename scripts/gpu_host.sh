#!/usr/bin/env bash
# On the lent GPU host (torch, pytest, triton present; no tilelang, no network):
# unpack the archives that ../shared/gpu/pack.sh wrote into .gpu/, then run what is asked.
# A call that carries both archives (bench with the TileOPs peer) needs them slimmed first, once,
# here: scripts/slim_gpu_archives.sh (as packed, they and the tracked files pass a call's 64 MiB).
#   scripts/gpu_host.sh tests [pytest args]   GPU tests, logs to $OUT/gpu-tests.log
#   scripts/gpu_host.sh demo                  python -m tileprefill demo on CUDA
#   scripts/gpu_host.sh bench [harness args]  python -m tileprefill bench (ours, SDPA, TileOPs in its own
#                                             process) into $OUT (plots and peer logs packed into
#                                             bench-extra.tar.xz); e.g. `bench --quick`
#   scripts/gpu_host.sh costs [--profile F]   first-call compile and per-call host time, to $OUT/costs.json
#   scripts/gpu_host.sh sanitize [pytest args] every kernel key under compute-sanitizer (memcheck, racecheck,
#                                             synccheck), logs to $OUT; LIMIT bounds the whole pytest run
#   scripts/gpu_host.sh fuzz [fuzz args]      tests/gpu/fuzz.py, e.g. `fuzz --seed 1 --budget-s 120`
# LIMIT (seconds, default 500) bounds each python run: `timeout` is put on python itself, because
# a timeout on this script leaves its pytest workers running (seen: a later benchmark in the same
# call then shared the machine with them). Do not run the GPU tests under pytest-xdist with many
# workers: each worker compiles its own kernels and the run starves (seen: -n 14, no test done in 330 s).
set -uo pipefail
limit="${LIMIT:-500}"
out="${OUT:-/tmp/out}"; mkdir -p "$out"
if [ ! -d /tmp/tl/tilelang ]; then
  mkdir -p /tmp/tl && tar -xJf .gpu/tilelang-site.tar.xz -C /tmp/tl || exit 1
fi
export PYTHONPATH="/tmp/tl:$PWD/src" PYTHONUNBUFFERED=1
export TILELANG_CACHE_DIR="${TILELANG_CACHE_DIR:-/tmp/tlcache}" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
what="${1:-tests}"; shift || true
case "$what" in
  tests)
    timeout -k 5 "$limit" python3 -m pytest -m gpu -q -p no:cacheprovider "$@" 2>&1 | grep -v '\[TileLang:' | tee "$out/gpu-tests.log"
    ;;
  demo)
    timeout -k 5 "$limit" python3 -m tileprefill demo --device cuda 2>&1 | grep -v '\[TileLang:' | tee "$out/demo.log"
    ;;
  bench)
    # The peer's CUTLASS headers are a link to ours under /tmp/tl (scripts/slim_gpu_archives.sh),
    # which the top of this script has unpacked.
    if [ -f .gpu/peer-site.tar.xz ] && [ ! -d /tmp/peer/tileops ]; then
      mkdir -p /tmp/peer && tar -xJf .gpu/peer-site.tar.xz -C /tmp/peer
    fi
    timeout -k 5 "$limit" python3 -m tileprefill bench --peer-path /tmp/peer:/tmp/tl --out-dir "$out" "$@" 2>&1 \
      | tee "$out/bench.log"
    # A device call brings back at most 8 files from $OUT (seen: a run's .md and .json left behind
    # by its 16 peer compile logs). Keep the tables, the JSON and the logs; pack the plots and the
    # peer's side files into one archive.
    (cd "$out" && shopt -s nullglob && extra=(*.png *-peer-compile-* *-peer-cases.json *-peer.log) \
      && if [ ${#extra[@]} -gt 0 ]; then tar -cJf bench-extra.tar.xz --remove-files "${extra[@]}"; fi)
    ;;
  costs)
    timeout -k 5 "$limit" python3 benchmarks/call_costs.py --out "$out/costs.json" "$@" 2>&1 | grep -v '\[TileLang:'
    ;;
  sanitize)
    export PATH="$PATH:$CUDA_HOME/bin" TILEPREFILL_SANITIZE_LOGS="$out"
    timeout -k 5 "$limit" python3 -m pytest -m sanitize -q -s -p no:cacheprovider tests/gpu/test_sanitize_gpu.py "$@" \
      2>&1 | grep -v '\[TileLang:' | tee "$out/sanitize.log"
    ;;
  fuzz)
    timeout -k 5 "$limit" python3 tests/gpu/fuzz.py "$@" 2>&1 | grep -v '\[TileLang:' | tee "$out/fuzz.log"
    ;;
  *) echo "usage: $0 tests|demo|bench|costs|sanitize|fuzz" >&2; exit 2 ;;
esac
