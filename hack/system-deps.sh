#!/usr/bin/env bash
# Debian packages the tests and the demo need: Prometheus and promtool (real metrics
# scraping and rule checks). Idempotent and quick when everything is already there.
set -euo pipefail
need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package starts a system Prometheus on :9090; the tests run their own.
$SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
pkill -x prometheus 2>/dev/null || true
echo "installed: ${need[*]}"
