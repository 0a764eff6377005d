#!/usr/bin/env bash
# The project's GPU check: the GPU tests and the GPU benchmarks, on a machine with an NVIDIA GPU
# and torch but no package registry (prepare with `make gpu-bundle` where the registry is
# reachable, then carry `.gpu`). Writes its logs to one folder: $1, else $OUT, else ./gpu-logs.
#
#   hack/gpu-check.sh [OUTDIR]        everything (about 10 minutes on one H200)
#   GPU_CHECK=tests hack/gpu-check.sh  only `pytest -m gpu`;  GPU_CHECK=bench: only the benchmarks
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-logs}}
mkdir -p "$out"
PY=${PY:-python3}
if ls .gpu/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spillway-site \
    .gpu/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/spillway-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# vLLM's Python files (gpu-bundle.sh), for spillway.integrations.vllm's GPU test
[ -d .gpu/vllm ] && export PYTHONPATH="$PYTHONPATH:$PWD/.gpu/vllm"
[ -x .gpu/dpconformance ] && export SPILLWAY_DPCONFORMANCE_BIN="$PWD/.gpu/dpconformance"
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi; "$PY" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; } \
  >"$out/machine.txt" 2>&1
rc=0
what=${GPU_CHECK:-all}
if [ "$what" = all ] || [ "$what" = tests ]; then
  # only the files with GPU tests: the others import what this machine lacks (kopf, kubernetes)
  mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
  timeout 420 "$PY" -m pytest -m gpu -p no:cacheprovider -o addopts="" -q -rA --timeout 300 -s "${files[@]}" \
    >"$out/pytest-gpu.log" 2>&1 || rc=1
  tail -5 "$out/pytest-gpu.log"
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  for b in slots datapath; do
    timeout 300 "$PY" -m benchmarks "$b" >"$out/bench-$b.log" 2>&1 || rc=1
    tail -12 "$out/bench-$b.log"
  done
  # issue 12: the Llama-3-8B-shaped toy server, 16 prompts of 8,192 tokens, a local budget of 4
  # contexts, lent vs pinned host vs no swapping in one run (about 16 GiB of each swap memory)
  timeout 420 "$PY" -m benchmarks.bench_responsiveness --model llama3-8b --requests 16 --prompt-tokens 8192 \
    --contexts 4 >"$out/bench-responsiveness.log" 2>&1 || rc=1
  tail -14 "$out/bench-responsiveness.log"
  # issue 13: generate() of a Llama-3-8B-shaped model at 32K context: no offloading, transformers'
  # offloading=True and SpillwayCache, same tokens, decode tokens/s and peak memory (about 2 minutes)
  timeout 420 "$PY" -m benchmarks transformers >"$out/bench-transformers.log" 2>&1 || rc=1
  tail -8 "$out/bench-transformers.log"
fi
echo "gpu-check: logs in $out (rc=$rc)"
exit $rc
