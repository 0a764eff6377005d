#!/usr/bin/env bash
# Grafana's own npm packages for the dashboard test (tests/grafana/package.json: @grafana/schema,
# @grafana/data, TypeScript), installed with `npm ci` from the committed package-lock.json into
# ~/.cache/spillway/node-<hash of the lock file>; prints that directory. Node and npm come from
# Debian (hack/system-deps.sh). Idempotent and quick once installed.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
src="$here/tests/grafana"
key="$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -c1-12)"
dir="${SPILLWAY_CACHE_DIR:-$HOME/.cache/spillway}/node-$key"
if [ ! -f "$dir/.ok" ]; then
  command -v npm >/dev/null 2>&1 || { echo "npm is missing: run hack/system-deps.sh (Debian packages nodejs, npm)" >&2; exit 1; }
  rm -rf "$dir.tmp" && mkdir -p "$dir.tmp"
  cp "$src/package.json" "$src/package-lock.json" "$dir.tmp/"
  (cd "$dir.tmp" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2)
  touch "$dir.tmp/.ok"
  rm -rf "$dir" && mv "$dir.tmp" "$dir"
fi
echo "$dir"
