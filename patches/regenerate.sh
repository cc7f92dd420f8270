#!/usr/bin/env bash
# Turn the commits of a prepared llama.cpp tree back into patches/*.patch (never edit patches by hand).
#
#   python patches/prepare.py build/llama.cpp   # one commit per patch, subject = patch name
#   cd build/llama.cpp && <edit> && git commit -am 0002-my-change    # or --amend an existing one
#   patches/regenerate.sh build/llama.cpp
#
# Every commit after the pinned one becomes patches/<subject>.patch; stale patch files are removed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tree=${1:-$here/../build/llama.cpp}
base=$(sed -n 's/^commit=//p' "$here/LLAMA_CPP_VERSION")
if [ -n "$(git -C "$tree" status --porcelain)" ]; then
  echo "regenerate: $tree has uncommitted changes; commit them (the subject names the patch)" >&2
  exit 1
fi
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
for c in $(git -C "$tree" rev-list --reverse "$base"..HEAD); do
  name=$(git -C "$tree" log -1 --format=%s "$c")
  case "$name" in [0-9][0-9][0-9][0-9]-*) ;; *) echo "regenerate: commit $c subject '$name' is not NNNN-name" >&2; exit 1;; esac
  git -C "$tree" diff --no-color --no-ext-diff "$c^" "$c" > "$tmp/$name.patch"
done
rm -f "$here"/*.patch
cp "$tmp"/*.patch "$here"/ 2>/dev/null || true
ls "$here"/*.patch 2>/dev/null || echo "regenerate: no patches"
