#!/usr/bin/env bash
# Builds the Spillway image from the Dockerfile with buildah (vfs storage, chroot isolation: no
# daemon, no privileges beyond root, no registry) over a Debian bookworm base that mmdebstrap
# makes from Debian's own mirror, and prints the image's name.
#
#   hack/image.sh                  # build (or reuse) localhost/spillway:<inputs hash>
#   hack/image.sh --arch arm64     # the same for arm64 (needs qemu-user-static + binfmt-support)
#
# Everything is cached under ~/.cache/spillway/buildah, keyed by the hash of the inputs (the
# Dockerfile, the lock file, the package's sources, this script): a second run with the same
# inputs only prints the name. A changed input rebuilds the image, but pip's downloads come from
# a cache kept there too (the lock's hashes are checked either way). No intermediate layers are
# kept (vfs stores each as a full copy), and an older image of the same arch is removed.
# tests/test_image.py runs it and then the agent, device plugin and operator inside the image.
# Set SPILLWAY_BUILDAH_ROOT to keep the storage elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
arch=$(dpkg --print-architecture)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) arch="$2"; shift 2 ;;
    *) echo "usage: hack/image.sh [--arch amd64|arm64]" >&2; exit 2 ;;
  esac
done
cache="${SPILLWAY_CACHE_DIR:-$HOME/.cache/spillway}"
root="${SPILLWAY_BUILDAH_ROOT:-$cache/buildah}"
mkdir -p "$root"
bah=(buildah --root "$root/storage" --runroot "$root/run" --storage-driver vfs)

# Serialize builds sharing the storage (parallel test workers, several checkouts).
exec 9>"$root/lock"
flock 9

# --- the base: Debian bookworm (minbase) with CPython 3.11 and venv -------------------------
base_packages="python3,python3-venv,ca-certificates"
base_key=$(printf '%s\n' "bookworm" "$arch" "$base_packages" | sha256sum | cut -c1-12)
base_image="localhost/spillway-base:bookworm-$arch-$base_key"
if ! "${bah[@]}" inspect --type image "$base_image" >/dev/null 2>&1; then
  rootfs="$root/base-$arch-$base_key"
  if [ ! -d "$rootfs" ]; then
    # No mirror argument: mmdebstrap uses Debian's, plus bookworm-updates and -security.
    rm -rf "$rootfs.tmp"
    SOURCE_DATE_EPOCH=0 mmdebstrap --quiet --variant=minbase --architectures="$arch" \
      --include="$base_packages" --aptopt='Acquire::Retries "3"' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
      bookworm "$rootfs.tmp"
    mv "$rootfs.tmp" "$rootfs"
  fi
  ctr=$("${bah[@]}" from --arch "$arch" scratch)
  "${bah[@]}" add "$ctr" "$rootfs" / >/dev/null
  "${bah[@]}" config --arch "$arch" --os linux --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/sh "$ctr"
  "${bah[@]}" commit --quiet "$ctr" "$base_image" >/dev/null
  "${bah[@]}" rm "$ctr" >/dev/null
fi

# --- the image ---------------------------------------------------------------------------------
key=$( { cat Dockerfile .dockerignore requirements.lock pyproject.toml README.md "$0"; echo "$arch $base_image";
         git ls-files -z spillway examples/topologies 2>/dev/null | xargs -0 cat 2>/dev/null \
           || find spillway examples/topologies -type f ! -name '*.pyc' | LC_ALL=C sort | xargs cat; } \
       | sha256sum | cut -c1-12)
image="localhost/spillway:$key-$arch"
if ! "${bah[@]}" inspect --type image "$image" >/dev/null 2>&1; then
  version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml)
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  # Behind a proxy that re-signs TLS the host trusts its CA: so does pip in the build.
  ca=()
  bundle="${PIP_CERT:-${SSL_CERT_FILE:-}}"
  if [ -n "$bundle" ] && [ -f "$bundle" ]; then
    ca=(--volume "$(readlink -f "$bundle"):/run/spillway-build-ca.crt:ro" --build-arg PIP_CERT=/run/spillway-build-ca.crt)
  fi
  mkdir -p "$root/pip-cache-$arch"
  "${bah[@]}" rm --all >/dev/null 2>&1 || true   # a failed build's working containers
  "${bah[@]}" build "${ca[@]}" --quiet --isolation chroot --layers=false --pull=never --arch "$arch" \
    --volume "$root/pip-cache-$arch:/run/pip-cache" --build-arg PIP_CACHE_DIR=/run/pip-cache \
    --build-arg "PYTHON_IMAGE=$base_image" --build-arg "VERSION=$version" --build-arg "REVISION=$revision" \
    -f Dockerfile -t "$image" . >&2
  # Older images of this arch go, and whatever a build left untagged.
  "${bah[@]}" images --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep "^localhost/spillway:.*-$arch\$" \
    | grep -v -x -F "$image" | xargs -r "${bah[@]}" rmi >/dev/null 2>&1 || true
  "${bah[@]}" rm --all >/dev/null 2>&1 || true
  "${bah[@]}" rmi --prune >/dev/null 2>&1 || true
fi
echo "$image"
