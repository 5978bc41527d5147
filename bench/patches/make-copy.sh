#!/bin/sh
# Makes a copy of this repository's app (src/, db/, package.json, tsconfig.json; node_modules linked) in DIR and
# applies the given diffs (bench/patches/*.diff) to it, for BENCH_APP_ROOT=DIR: the same benchmark, run against a
# proposed change to src/ without touching the working tree.
#   sh bench/patches/make-copy.sh /tmp/allocator-patched bench/patches/04-listener-parallel-reserve.diff
#   BENCH_APP_ROOT=/tmp/allocator-patched npm run bench:allocation
set -eu
[ $# -ge 1 ] || { echo "usage: $0 DIR [patch.diff ...]" >&2; exit 2; }
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=$1; shift
rm -rf "$dir"; mkdir -p "$dir"
cp -r "$root/src" "$root/db" "$root/package.json" "$root/tsconfig.json" "$dir/"
ln -s "$root/node_modules" "$dir/node_modules"
for p in "$@"; do
  case "$p" in /*) ;; *) p="$root/$p" ;; esac
  (cd "$dir" && patch -p1 --quiet < "$p")
  echo "applied $p"
done
echo "BENCH_APP_ROOT=$dir"
