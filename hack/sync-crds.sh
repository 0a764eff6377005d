#!/usr/bin/env bash
# Copies the CRDs (crds/*.yaml, the source) into the Helm chart (charts/spillway/crds/), byte
# for byte. `hack/sync-crds.sh --check` changes nothing and exits 1 if the copies drifted.
# The chart's kopf-peerings.yaml (kopf's peering CRDs, for the operator's hot standby) has no
# counterpart in crds/ and is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
src=crds
dst=charts/spillway/crds
chart_only=(kopf-peerings.yaml)
check=false
[ "${1:-}" = "--check" ] && check=true
status=0
for f in "$src"/*.yaml; do
  name=$(basename "$f")
  if ! cmp -s "$f" "$dst/$name"; then
    if $check; then echo "$dst/$name differs from $f: run hack/sync-crds.sh" >&2; status=1
    else cp "$f" "$dst/$name"; echo "copied $f -> $dst/$name"; fi
  fi
done
for f in "$dst"/*.yaml; do
  name=$(basename "$f")
  [ -e "$src/$name" ] && continue
  printf '%s\n' "${chart_only[@]}" | grep -qx "$name" && continue
  if $check; then echo "$f has no source in $src/: remove it or run hack/sync-crds.sh" >&2; status=1
  else rm "$f"; echo "removed $f (no source in $src/)"; fi
done
exit $status
