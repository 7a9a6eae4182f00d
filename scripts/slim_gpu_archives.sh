#!/usr/bin/env bash
# Repacks the archives that ../shared/gpu/pack.sh wrote into .gpu/ without what no CUDA build
# reads, so that both (ours and the TileOPs peer's) travel with the repository in one device
# call: a call carries 64 MiB (67.1 MB) at most. As packed, the two archives (37 + 29 MB) with the
# tracked files (2-6 MB) come to 68-72 MB.
#
#   scripts/slim_gpu_archives.sh [DIR]      # rewrites DIR/*.tar.xz in place (default .gpu; idempotent)
#
# Removed from each site: TVM's C++ sources (tilelang/3rdparty/tvm/src), CUTLASS's tools, AMD's
# composable_kernel (HIP builds only; in TileLang 0.1.12, the peer's), and TileLang's own C++
# sources (tilelang/src, but for tl_templates: the headers every generated kernel includes, found
# through TL_TEMPLATE_PATH = tilelang/src). The peer's CUTLASS headers, when they are the same files
# as ours, become a link to ours where scripts/gpu_host.sh unpacks them
# (/tmp/tl/tilelang/3rdparty/cutlass): one copy of 27 MB of headers instead of two.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu}"
ours_unpacked=""
for archive in "$dir/tilelang-site.tar.xz" "$dir/peer-site.tar.xz"; do
  [ -f "$archive" ] || continue
  tmp=$(mktemp -d)
  tar -xJf "$archive" -C "$tmp"
  before=$(stat -c %s "$archive")
  rm -rf "$tmp"/tilelang/3rdparty/tvm/src "$tmp"/tilelang/3rdparty/cutlass/tools \
    "$tmp"/tilelang/3rdparty/composable_kernel
  find "$tmp"/tilelang/src -mindepth 1 -maxdepth 1 ! -name tl_templates -exec rm -rf {} +
  if [ "$archive" = "$dir/peer-site.tar.xz" ] && [ -n "$ours_unpacked" ] && [ ! -L "$tmp"/tilelang/3rdparty/cutlass ] \
    && diff -rq "$ours_unpacked"/tilelang/3rdparty/cutlass "$tmp"/tilelang/3rdparty/cutlass > /dev/null; then
    rm -rf "$tmp"/tilelang/3rdparty/cutlass
    ln -s /tmp/tl/tilelang/3rdparty/cutlass "$tmp"/tilelang/3rdparty/cutlass
  fi
  tar -C "$tmp" -cf - . | xz -T0 -9 > "$archive.new"
  mv "$archive.new" "$archive"
  if [ "$archive" = "$dir/tilelang-site.tar.xz" ]; then
    ours_unpacked="$tmp"
  else
    rm -rf "$tmp"
  fi
  echo "$archive: $before -> $(stat -c %s "$archive") bytes"
done
[ -z "$ours_unpacked" ] || rm -rf "$ours_unpacked"
