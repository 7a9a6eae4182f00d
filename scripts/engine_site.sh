#!/usr/bin/env bash
# Packs the engines that tests/engines drives (vLLM 0.34, SGLang 0.5.23 and what their tested modules
# import) for the GPU host of scripts/gpu_host.sh: Python 3.12, x86-64, torch, triton, pytest and
# transformers installed, no package index.
#
#   scripts/engine_site.sh     -> .gpu/engines-site.tar.xz (about 21.5 MB; needs pip, unzip, strip, xz)
#
# On the GPU host `scripts/gpu_host.sh engines` unpacks it to /tmp/engines. A device call carries
# 64 MiB in all and TileLang's archive takes 35 MB of it: this one must stay under about 22 MB.
#
# What goes in: the packages of tests/engines/requirements-*.txt as Python 3.12 manylinux wheels,
# unzipped into one site folder, and EXTRA: what those packages import that `nox -s engines` gets
# from tileprefill's dev extra instead (the engines are installed there with --no-deps). Never the
# host's own packages (HOST): everything on PYTHONPATH comes before the host's site-packages, so a
# packed torch, triton or transformers would shadow the host's (and a torch extension built for
# another torch does not load). A pin of the requirements files on one of them yields to the host's.
#
# What comes out, since the engine tests cannot use it on that host:
#  - vLLM's compiled CUDA ops (every *.so in vllm/): built against vLLM's own torch, and 300 MB.
#    vLLM's CUDA platform imports `vllm._C_stable_libtorch` unguarded, and its attention layers
#    import `vllm.vllm_flash_attn`, which needs `_vllm_fa2_C` or `_vllm_fa3_C`: tests/engines/conftest.py
#    stands in for those two when the tests run on CUDA. Every other import of them is guarded.
#  - vLLM's Rust server binary (vllm/vllm-rs) and SGLang's Rust extensions (its server, benchmark and
#    multimodal processors load them).
#  - PRUNE: folders of vllm/ and sglang/ that no engine test imports, on the CPU or with the engines'
#    CUDA checks answering yes (kernel sources and headers of third-party kernels, model zoos,
#    tuned-config tables, servers, benchmarks, SGLang's diffusion runtime, features such as KV
#    transfer, LoRA, MoE or speculative decoding), and Pillow's optional codecs. SGLang's JIT kernel
#    sources (sglang/kernels/jit/csrc, include) stay: its KV pool builds its store kernel from them
#    on CUDA.
#  - the debug information of the compiled modules that stay (strip), and __pycache__ folders.
set -euo pipefail
cd "$(dirname "$0")/.."
out=.gpu
mkdir -p "$out"

#: On the GPU host already (torch and what it requires, triton, pytest, transformers and what it
#: requires, TileLang's requirements): never packed.
HOST=(torch triton pytest transformers numpy typing-extensions filelock fsspec jinja2 markupsafe
      networkx sympy mpmath setuptools huggingface-hub tokenizers safetensors regex pyyaml packaging
      tqdm psutil cloudpickle ml-dtypes attrs pluggy iniconfig pygments apache-tvm-ffi)
#: What the packed packages import, left out of the requirements files (`nox -s engines` has them
#: from tileprefill's dev extra; versions as it resolves them): pydantic's own packages (pydantic-core
#: at the version pydantic pins, added below), fastapi's annotated-doc, the HTTP stack's anyio,
#: idna and h11, uvicorn's click, and Pillow (vLLM's multimodal hasher imports PIL.Image).
EXTRA=(annotated-types==0.8.0 typing-inspection==0.4.5 annotated-doc==0.0.7 anyio==4.16.0
       idna==3.21 h11==0.16.0 click==8.5.1 pillow==13.0.0)
#: What no engine test imports (see the header), on the CPU or on the CUDA platform.
PRUNE=(
  # vLLM's Rust server, third-party kernel sources and headers, FlashAttention 4, Helion kernels,
  # model-specific kernels, fused MoE, tuned-config tables, its servers and benchmarks
  vllm/vllm-rs
  vllm/third_party/deep_gemm vllm/third_party/fmha_sm100 vllm/third_party/tml_fa4
  vllm/third_party/flash_linear_attention vllm/third_party/triton_kernels
  vllm/vllm_flash_attn/cute vllm/kernels/helion vllm/models vllm/model_executor/kernels/linear
  vllm/model_executor/layers/fused_moe vllm/model_executor/layers/quantization/utils/configs
  vllm/entrypoints vllm/benchmarks vllm/parser vllm/renderers vllm/tool_parsers
  # vLLM features the tests do not use: KV and EC transfer connectors, KV offloading tiers, weight
  # transfer, expert load balancing, LoRA kernels, mamba layers, two quantization schemes,
  # torch.compile fusion passes
  vllm/distributed/kv_transfer/kv_connector/v1/mooncake vllm/distributed/kv_transfer/kv_connector/v1/moriio
  vllm/distributed/kv_transfer/kv_connector/v1/nixl vllm/distributed/kv_transfer/kv_connector/v1/offloading
  vllm/distributed/kv_transfer/kv_connector/v1/umbp vllm/distributed/ec_transfer/ec_connector/mooncake
  vllm/v1/kv_offload/tiering vllm/distributed/weight_transfer vllm/distributed/eplb vllm/lora/ops
  vllm/model_executor/layers/mamba vllm/model_executor/layers/quantization/compressed_tensors
  vllm/model_executor/layers/quantization/quark vllm/compilation/passes/fusion
  # SGLang's Rust extensions, diffusion runtime, model zoo, benchmarks, tuned-config tables
  sglang/srt/rust_extensions/*.so sglang/srt/mem_cache/rust_tree_core/*.so
  sglang/multimodal_gen sglang/srt/models sglang/benchmark
  sglang/srt/layers/moe/moe_runner/triton_utils/configs sglang/kernels/ops/gemm/configs
  # SGLang kernels and features the tests do not use: FlashAttention sources, DeepSeek-V4, linear,
  # sparse and FLA attention, KDA, LoRA, diffusion and speculative-decoding kernels, disaggregation,
  # the NPU backend, its Ascend tests, a debugging comparator
  sglang/kernels/ops/attention/flash_attn sglang/kernels/ops/attention/dsv4/flydsl_v4nm
  sglang/kernels/ops/attention/fa4_sm120 sglang/kernels/ops/attention/fla sglang/kernels/ops/attention/linear
  sglang/kernels/ops/attention/minimax_sparse sglang/kernels/kda_kernels sglang/kernels/ops/lora/dense
  sglang/kernels/ops/lora/moe sglang/kernels/ops/diffusion/norm sglang/kernels/ops/speculative/dspark
  sglang/srt/layers/attention/dsv4 sglang/srt/lora/moe sglang/srt/lora/trtllm_lora_temp
  sglang/srt/speculative/dspark_components sglang/srt/disaggregation/common
  sglang/srt/disaggregation/encoder sglang/srt/disaggregation/mooncake
  sglang/srt/hardware_backend/npu/attention sglang/test/ascend sglang/srt/debug_utils/comparator
  # compressed-tensors' Hadamard matrices (read by its transforms only)
  compressed_tensors/transform/utils/hadamards.safetensors
  # Pillow's optional codecs and their libraries (AVIF, WebP, fonts, colour management, Tk): PIL.Image
  # loads only _imaging, which needs libjpeg, libopenjp2, libtiff (libzstd, liblzma) and libxcb (libXau)
  PIL/_avif.*.so PIL/_webp.*.so PIL/_imagingft.*.so PIL/_imagingcms.*.so PIL/_imagingtk.*.so
  pillow.libs/libavif-* pillow.libs/libwebp* pillow.libs/libsharpyuv-* pillow.libs/libfreetype-*
  pillow.libs/libharfbuzz-* pillow.libs/libbrotli* pillow.libs/libpng16-* pillow.libs/liblcms2-*
)

# manylinux_2_31 and 2_34: llguidance's and SGLang's Python 3.12 wheels are built for those. SGLang's
# compiled parts (its Rust extensions) do not stay; llguidance's, which vLLM imports, needs glibc 2.31.
plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
      --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# The requirement lines, less comments and the host's packages (names compared as pip does).
host_re="^($(IFS='|'; echo "${HOST[*]}" | sed 's/[-_.]/[-_.]/g'))([^A-Za-z0-9._-]|$)"
sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^$/d' tests/engines/requirements-*.txt \
  | { grep -viE "$host_re" || true; } > "$tmp/requirements.txt"
python3 -m pip download -q "${plat[@]}" -d "$tmp/whl" -r "$tmp/requirements.txt" "${EXTRA[@]}"
pydantic_core=$(unzip -p "$tmp"/whl/pydantic-[0-9]*.whl '*.dist-info/METADATA' \
  | sed -n 's/^Requires-Dist: pydantic-core[[:space:]]*\(==[^;[:space:]]*\).*/pydantic-core\1/p')
python3 -m pip download -q "${plat[@]}" -d "$tmp/whl" "${pydantic_core:?pydantic names no pydantic-core pin}"

mkdir "$tmp/site"
for w in "$tmp"/whl/*.whl; do unzip -qo "$w" -d "$tmp/site"; done
# PRUNE unquoted: its globs expand here. The compiled modules that stay lose their debug information
# (uvloop's alone is 14 MB of it).
(cd "$tmp/site" && find vllm -name '*.so' -delete && rm -rf ${PRUNE[@]} \
  && find . -name __pycache__ -prune -exec rm -rf {} + \
  && find . -name '*.so*' -type f -exec strip --strip-unneeded {} +)
tar -C "$tmp/site" -cf - . | xz -T2 -8 > "$out/engines-site.tar.xz"
ls "$tmp/whl" > "$tmp/wheels.txt"
echo "wheels: $(wc -l < "$tmp/wheels.txt") ($(grep -cvE -- '-(py3-none-any|cp312-[^-]+-[^-]+|cp3[0-9]+-abi3-[^-]+)\.whl$' "$tmp/wheels.txt" || true) not py3-none-any, cp312 or abi3)"
ls -la "$out/engines-site.tar.xz"
