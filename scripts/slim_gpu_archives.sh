#!/usr/bin/env bash
# Repacks the archives that ../shared/gpu/pack.sh wrote into .gpu/ without what no CUDA build
# reads, so that both (ours and the TileOPs peer's) travel with the repository in one device
# call: a call carries 64 MiB at most, and the two archives as packed (37 + 29 MB) with the
# tracked files (2 MB) come to 68 MB.
#
#   scripts/slim_gpu_archives.sh            # rewrites .gpu/*.tar.xz in place (once; idempotent)
#
# Removed from each site: TVM's C++ sources (tilelang/3rdparty/tvm/src; the CUDA templates
# include TileLang's and CUTLASS's headers, never these), CUTLASS's tools, and AMD's
# composable_kernel (HIP builds only; in TileLang 0.1.12, the peer's).
set -euo pipefail
cd "$(dirname "$0")/.."
for archive in .gpu/tilelang-site.tar.xz .gpu/peer-site.tar.xz; do
  [ -f "$archive" ] || continue
  tmp=$(mktemp -d)
  tar -xJf "$archive" -C "$tmp"
  before=$(stat -c %s "$archive")
  rm -rf "$tmp"/tilelang/3rdparty/tvm/src "$tmp"/tilelang/3rdparty/cutlass/tools \
    "$tmp"/tilelang/3rdparty/composable_kernel
  tar -C "$tmp" -cf - . | xz -T0 -9 > "$archive.new"
  mv "$archive.new" "$archive"
  rm -rf "$tmp"
  echo "$archive: $before -> $(stat -c %s "$archive") bytes"
done
