#!/usr/bin/env bash
# On the lent GPU host (torch, pytest, triton present; no tilelang, no network):
# unpack the archives that ../shared/gpu/pack.sh wrote into .gpu/, then run what is asked.
# A call that carries both archives (bench with the TileOPs peer) needs them slimmed first, once,
# here: scripts/slim_gpu_archives.sh (as packed, they and the tracked files pass a call's 64 MiB).
# The FlashInfer peer's archives (from ../shared/peers/flashinfer/: flashinfer_prefill_site.tar.xz and
# flashinfer_prefill_aot_sm90a_bf16_d128.tar.xz, 7 MB) do not fit in the same call as those two:
# carry them in a call of their own first (`unpack`); what it unpacks under /tmp stays while the
# machine is held, and `bench` uses every peer it finds unpacked there.
#   scripts/gpu_host.sh unpack                unpack the archives in .gpu/ and stop
#   scripts/gpu_host.sh tests [pytest args]   GPU tests, logs to $OUT/gpu-tests.log
#   scripts/gpu_host.sh demo                  python -m tileprefill demo on CUDA
#   scripts/gpu_host.sh bench [harness args]  python -m tileprefill bench (ours, SDPA, and TileOPs and
#                                             FlashInfer each in its own process) into $OUT (plots,
#                                             logs and side files packed into bench-extra.tar.xz);
#                                             e.g. `bench --suite scoreboard` (LIMIT=530: one call)
#   scripts/gpu_host.sh costs [--profile F]   first-call compile and per-call host time, to $OUT/costs.json
#   scripts/gpu_host.sh sanitize [pytest args] every kernel key under compute-sanitizer (memcheck, racecheck,
#                                             synccheck), logs to $OUT; LIMIT bounds the whole pytest run
#   scripts/gpu_host.sh fuzz [fuzz args]      tests/gpu/fuzz.py, e.g. `fuzz --seed 1 --budget-s 120`
#   scripts/gpu_host.sh engines [pytest args] the engine tests (tests/engines: vLLM and SGLang running
#                                             tileprefill) on CUDA, from .gpu/engines-site.tar.xz
#                                             (scripts/engine_site.sh, unpacked to /tmp/engines; with
#                                             TileLang's archive 56 MB of a call), logs to
#                                             $OUT/engines.log; TILEPREFILL_ENGINE_DEVICE=cpu runs them on
#                                             the CPU instead
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
# The peers' sites: TileOPs (its CUTLASS headers are a link to ours under /tmp/tl, which the lines
# above unpacked: scripts/slim_gpu_archives.sh) and FlashInfer (prefill-only site, then its prebuilt
# bf16 D128 sm_90a modules into the same folder).
unpack_peers() {
  if [ -f .gpu/peer-site.tar.xz ] && [ ! -d /tmp/peer/tileops ]; then
    mkdir -p /tmp/peer && tar -xJf .gpu/peer-site.tar.xz -C /tmp/peer
  fi
  if [ -f .gpu/flashinfer_prefill_site.tar.xz ] && [ ! -d /tmp/fi/flashinfer ]; then
    mkdir -p /tmp/fi && tar -xJf .gpu/flashinfer_prefill_site.tar.xz -C /tmp/fi
  fi
  if [ -f .gpu/flashinfer_prefill_aot_sm90a_bf16_d128.tar.xz ] && [ -d /tmp/fi/flashinfer ] \
    && [ ! -d /tmp/fi/flashinfer/data/aot ]; then
    tar -xJf .gpu/flashinfer_prefill_aot_sm90a_bf16_d128.tar.xz -C /tmp/fi
  fi
}
what="${1:-tests}"; shift || true
case "$what" in
  unpack)
    unpack_peers
    ls -d /tmp/tl/tilelang /tmp/peer/tileops /tmp/fi/flashinfer /tmp/fi/flashinfer/data/aot/* 2>/dev/null || true
    ;;
  tests)
    timeout -k 5 "$limit" python3 -m pytest -m gpu -q -p no:cacheprovider "$@" 2>&1 | grep -v '\[TileLang:' | tee "$out/gpu-tests.log"
    ;;
  demo)
    timeout -k 5 "$limit" python3 -m tileprefill demo --device cuda 2>&1 | grep -v '\[TileLang:' | tee "$out/demo.log"
    ;;
  bench)
    unpack_peers
    peers=()
    if [ -d /tmp/peer/tileops ]; then peers+=(--peer-path /tmp/peer:/tmp/tl); fi
    if [ -d /tmp/fi/flashinfer ]; then
      # FlashInfer's JIT cache and locks; nvcc is $CUDA_HOME/bin/nvcc; ninja (JIT only) may be the
      # pip one beside python3.
      export FLASHINFER_WORKSPACE_BASE="${FLASHINFER_WORKSPACE_BASE:-/tmp/fi-cache}"
      command -v ninja > /dev/null || export PATH="$PATH:$(dirname "$(command -v python3)")"
      peers+=(--flashinfer-path /tmp/fi)
    fi
    timeout -k 5 "$limit" python3 -m tileprefill bench ${peers[@]+"${peers[@]}"} --out-dir "$out" "$@" 2>&1 \
      | tee "$out/bench.log"
    # A device call brings back at most 8 files from $OUT (seen: a run's .md and .json left behind
    # by its 16 peer compile logs). Keep the tables, the JSON, the peers' JSON and the log; pack
    # the plots, the peers' logs and side files into one archive.
    (cd "$out" && shopt -s nullglob && side=(*.png *.log *-cases.json *-compile-*.json) \
      && pack=() && for f in "${side[@]}"; do [ "$f" = bench.log ] || pack+=("$f"); done \
      && if [ ${#pack[@]} -gt 0 ]; then tar -cJf bench-extra.tar.xz --remove-files "${pack[@]}"; fi)
    ;;
  costs)
    timeout -k 5 "$limit" python3 benchmarks/call_costs.py --out "$out/costs.json" "$@" 2>&1 | grep -v '\[TileLang:'
    ;;
  sanitize)
    export PATH="$PATH:$CUDA_HOME/bin" TILEPREFILL_SANITIZE_LOGS="$out"
    timeout -k 5 "$limit" python3 -m pytest -m sanitize -q -s -p no:cacheprovider tests/gpu/test_sanitize_gpu.py "$@" \
      2>&1 | grep -v '\[TileLang:' | tee "$out/sanitize.log"
    ;;
  engines)
    # PYTHONPATH comes before the host's site-packages whatever its order, so the engines' site holds
    # none of the host's packages (scripts/engine_site.sh); ours and TileLang come first. Unpacked
    # again when the archive differs from the one unpacked there.
    if [ -f .gpu/engines-site.tar.xz ]; then
      sum=$(md5sum < .gpu/engines-site.tar.xz)
      if [ "$(cat /tmp/engines/.archive-md5 2>/dev/null)" != "$sum" ]; then
        rm -rf /tmp/engines && mkdir -p /tmp/engines && tar -xJf .gpu/engines-site.tar.xz -C /tmp/engines \
          && echo "$sum" > /tmp/engines/.archive-md5 || exit 1
      fi
    fi
    # The engines find tileprefill's plugins through its installed metadata (the vllm.general_plugins
    # and sglang.srt.plugins entry points), which src/ lacks: written from pyproject.toml, as pip would.
    rm -rf /tmp/tileprefill-meta
    python3 - <<'PY' || exit 1
import pathlib, tomllib
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
info = pathlib.Path("/tmp/tileprefill-meta") / f"{project['name']}-{project['version']}.dist-info"
info.mkdir(parents=True)
info.joinpath("METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
info.joinpath("entry_points.txt").write_text("".join(
    f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in points.items()) + "\n"
    for group, points in project["entry-points"].items()
))
PY
    # SGLang builds its KV store kernel with nvcc (sglang/kernels/jit) into its cache under $HOME.
    export PATH="$PATH:$CUDA_HOME/bin" PYTHONPATH="$PYTHONPATH:/tmp/tileprefill-meta:/tmp/engines"
    TILEPREFILL_ENGINE_DEVICE="${TILEPREFILL_ENGINE_DEVICE:-cuda}" timeout -k 5 "$limit" \
      python3 -m pytest -m engines -q -p no:cacheprovider tests/engines "$@" 2>&1 | grep -v '\[TileLang:' \
      | tee "$out/engines.log"
    ;;
  fuzz)
    timeout -k 5 "$limit" python3 tests/gpu/fuzz.py "$@" 2>&1 | grep -v '\[TileLang:' | tee "$out/fuzz.log"
    ;;
  *) echo "usage: $0 unpack|tests|demo|bench|costs|sanitize|fuzz|engines" >&2; exit 2 ;;
esac
