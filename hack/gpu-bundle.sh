#!/usr/bin/env bash
# Prepares what the GPU check (hack/gpu-check.sh) needs on a GPU machine that has torch, numpy,
# scipy, pytest and the NVIDIA driver but no package registry and no Go toolchain:
#   .gpu/wheels/   cp312 manylinux x86-64 wheels of the pinned packages that machine lacks
#   .gpu/dpconformance   the kubelet device-plugin harness (Go), built here, static
#   .gpu/vllm.tar.xz  vLLM's Python files and metadata only (57 MB of its 336 MB wheel, no kernels,
#                  compressed): spillway.integrations.vllm imports vLLM's offloading API, nothing compiled
# Run here, in the checkout (`make gpu-bundle`); then carry `.gpu` to the GPU machine (the
# device tool carries at most 64 MiB with the tree: the bundle is about 35 MB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p .gpu/wheels
pin() { grep -hiE "^$1==" requirements.txt requirements-dev.txt requirements-vllm.txt | head -1; }
# What the GPU machine lacks (see docs/BENCHMARKS.md, "GPU machine"); versions as pinned here.
pkgs=("$(pin grpcio)" "$(pin protobuf)" "$(pin cryptography)" "$(pin pytest)" "$(pin pytest-asyncio)" cffi pycparser
      "$(pin msgspec)" "$(pin psutil)" "$(pin pyzmq)")
for p in "${pkgs[@]}"; do
  [ -n "$p" ] || continue
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 -d .gpu/wheels "$p"
done
# vLLM's Python files (its wheel without the compiled kernels), for the integration's GPU test
vllm=$(pin vllm)
tmp=$(mktemp -d)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "$vllm"
rm -rf .gpu/vllm .gpu/vllm.tar.xz && mkdir -p "$tmp/vllm"
"$PY" - "$tmp"/vllm-*.whl "$tmp/vllm" <<'PYEOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.endswith(".py") or ".dist-info/" in n])
PYEOF
tar -C "$tmp/vllm" -cJf .gpu/vllm.tar.xz .
rm -rf "$tmp"
# the Go harness, from the cache the tests build it in
"$PY" -c 'import shutil, sys; sys.path.insert(0, "."); from tests.fixtures_deviceplugin import build_harness; shutil.copy(build_harness(), ".gpu/dpconformance")'
du -sh .gpu
