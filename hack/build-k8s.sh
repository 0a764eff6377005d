#!/usr/bin/env bash
# Builds the control-plane binaries that the tests and the demo run against, from source,
# through the Go module proxy only: kube-apiserver, kube-scheduler, kube-controller-manager,
# kubectl (hack/k8s), etcd (hack/tools/etcd), kwok (hack/tools/kwok) and helm
# (hack/tools/helm). Every version comes from hack/versions.env.
#
#   hack/build-k8s.sh          build if needed (stdout stays empty: `eval "$(make -s cluster-up)"`)
#   hack/build-k8s.sh --pin    rewrite the go.mod/go.sum files from hack/versions.env
#                              (after a version bump), then build
#
# Binaries go to ${SPILLWAY_CACHE_DIR:-~/.cache/spillway}/k8s/<K8S_VERSION>/bin, outside the
# clone. A second run finds them and exits at once. A build goes to a temporary directory
# that is renamed into place only when complete, so an interrupted build never looks done.
set -euo pipefail

HACK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HACK/versions.env"
export PATH="/usr/local/go/bin:$PATH"
export GOTOOLCHAIN=local GOFLAGS=-mod=readonly CGO_ENABLED=0

CACHE_ROOT="${SPILLWAY_CACHE_DIR:-$HOME/.cache/spillway}/k8s"
DEST="$CACHE_ROOT/$K8S_VERSION"
BINS=(kube-apiserver kube-scheduler kube-controller-manager kubectl etcd kwok helm)
STAMP="K8S_VERSION=$K8S_VERSION ETCD_VERSION=$ETCD_VERSION KWOK_VERSION=$KWOK_VERSION HELM_VERSION=$HELM_VERSION"

PIN=0
[ "${1:-}" = "--pin" ] && PIN=1

complete() {
  [ -f "$DEST/VERSIONS" ] && [ "$(cat "$DEST/VERSIONS")" = "$STAMP" ] || return 1
  for b in "${BINS[@]}"; do [ -x "$DEST/bin/$b" ] || return 1; done
  [ -f "$DEST/etc/kwok-stages.yaml" ]
}

if [ $PIN -eq 0 ] && complete; then
  exit 0
fi

log() { echo "[build-k8s] $*" >&2; }

# One build at a time per cache (two test sessions may both ask); the second waits for the
# first and then finds the binaries.
mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.build.lock"
if ! flock -n 9; then
  log "another build holds $CACHE_ROOT/.build.lock; waiting for it"
  flock 9
fi
if [ $PIN -eq 0 ] && complete; then
  exit 0
fi

# Kubernetes staging modules: k8s.io/kubernetes requires them at v0.0.0 and replaces them
# with directories of its own repository, which a dependency cannot do; we replace each with
# its published v0.X.Y instead.
STAGING=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice
  externaljwt kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl
  kubelet metrics mount-utils pod-security-admission sample-apiserver streaming)

# pin DIR MODULE VERSION TOOL... : write DIR/go.mod requiring MODULE@VERSION, with TOOLs.
pin() {
  local dir=$1 mod=$2 ver=$3; shift 3
  log "pinning $dir: $mod@$ver"
  (
    cd "$dir"
    rm -f go.mod go.sum
    go mod init "spillway.dev/hack/$(basename "$dir")" 2>/dev/null
    go mod edit -go=1.26.0
    if [ "$mod" = k8s.io/kubernetes ]; then
      local staging_ver="v0.${K8S_VERSION#v1.}"
      for s in "${STAGING[@]}"; do go mod edit -replace "k8s.io/$s=k8s.io/$s@$staging_ver"; done
    fi
    go mod edit -require "$mod@$ver"
    for t in "$@"; do go mod edit -tool "$t"; done
    GOFLAGS=-mod=mod go mod tidy
  )
}

# The version each go.mod pins must be the one in versions.env.
check_pin() {
  local dir=$1 mod=$2 ver=$3 got
  got=$(cd "$dir" && go list -m -f '{{.Version}}' "$mod" 2>/dev/null || true)
  [ "$got" = "$ver" ]
}

K8S_TOOLS=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-scheduler
  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kubectl)
ETCD_TOOLS=(go.etcd.io/etcd/server/v3)
KWOK_TOOLS=(sigs.k8s.io/kwok/cmd/kwok)
HELM_MAJOR="${HELM_VERSION%%.*}"
HELM_TOOLS=("helm.sh/helm/$HELM_MAJOR/cmd/helm")

declare -A MODS=([k8s]=k8s.io/kubernetes [tools/etcd]=go.etcd.io/etcd/server/v3 [tools/kwok]=sigs.k8s.io/kwok [tools/helm]="helm.sh/helm/$HELM_MAJOR")
declare -A VERS=([k8s]=$K8S_VERSION [tools/etcd]=$ETCD_VERSION [tools/kwok]=$KWOK_VERSION [tools/helm]=$HELM_VERSION)
for d in k8s tools/etcd tools/kwok tools/helm; do
  if [ $PIN -eq 1 ] || ! check_pin "$HACK/$d" "${MODS[$d]}" "${VERS[$d]}"; then
    if [ $PIN -eq 0 ] && [ -f "$HACK/$d/go.mod" ]; then
      log "hack/$d/go.mod does not pin ${MODS[$d]}@${VERS[$d]} (versions.env); run hack/build-k8s.sh --pin"
      exit 1
    fi
    case $d in
      k8s) pin "$HACK/$d" "${MODS[$d]}" "${VERS[$d]}" "${K8S_TOOLS[@]}" ;;
      tools/etcd) pin "$HACK/$d" "${MODS[$d]}" "${VERS[$d]}" "${ETCD_TOOLS[@]}" ;;
      tools/kwok) pin "$HACK/$d" "${MODS[$d]}" "${VERS[$d]}" "${KWOK_TOOLS[@]}" ;;
      tools/helm) pin "$HACK/$d" "${MODS[$d]}" "${VERS[$d]}" "${HELM_TOOLS[@]}" ;;
    esac
  fi
done

mkdir -p "$CACHE_ROOT"
TMP="$(mktemp -d "$CACHE_ROOT/.build-$K8S_VERSION.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$TMP/bin"
start=$(date +%s)

# build DIR OUTPUT PACKAGE LDFLAGS
build() {
  local dir=$1 out=$2 pkg=$3 ldflags=$4 t0
  t0=$(date +%s)
  log "building $out ($pkg)"
  (cd "$HACK/$dir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$TMP/bin/$out" "$pkg")
  log "built $out in $(($(date +%s) - t0)) s"
}

K8S_MINOR="${K8S_VERSION#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"
K8S_LD=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  K8S_LD+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$K8S_MINOR"
  K8S_LD+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
build k8s kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$K8S_LD"
build k8s kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$K8S_LD"
build k8s kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$K8S_LD"
build k8s kubectl k8s.io/kubernetes/cmd/kubectl "$K8S_LD"
build tools/etcd etcd go.etcd.io/etcd/server/v3 ""
build tools/kwok kwok sigs.k8s.io/kwok/cmd/kwok "-X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
HELM_PKG="helm.sh/helm/$HELM_MAJOR"
build tools/helm helm "$HELM_PKG/cmd/helm" "-X $HELM_PKG/internal/version.version=$HELM_VERSION
  -X $HELM_PKG/internal/version.metadata= -X $HELM_PKG/internal/version.gitTreeState=clean
  -X $HELM_PKG/pkg/chart/common.k8sVersionMajor=1 -X $HELM_PKG/pkg/chart/common.k8sVersionMinor=$K8S_MINOR
  -X $HELM_PKG/pkg/chartutil.k8sVersionMajor=1 -X $HELM_PKG/pkg/chartutil.k8sVersionMinor=$K8S_MINOR"

# kwok's node and pod lifecycle (the Stages kwokctl uses by default), from the pinned kwok
# source: nodes become Ready and keep a lease; scheduled pods become Running and Ready;
# deleted pods go away.
mkdir -p "$TMP/etc"
KWOK_DIR="$(cd "$HACK/tools/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
  pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
  echo "---"
  cat "$KWOK_DIR/kustomize/stage/$f"
done >"$TMP/etc/kwok-stages.yaml"

echo "$STAMP" >"$TMP/VERSIONS"
elapsed=$(($(date +%s) - start))
echo "$elapsed" >"$TMP/BUILD_SECONDS"
# Swap into place with one rename; a stale directory (other versions) is moved aside first.
if [ -e "$DEST" ]; then mv "$DEST" "$TMP.old" && rm -rf "$TMP.old"; fi
mv "$TMP" "$DEST"
log "all binaries built in $elapsed s -> $DEST/bin"
