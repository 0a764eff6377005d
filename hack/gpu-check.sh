#!/usr/bin/env bash
# The project's GPU check: the GPU tests and the GPU benchmarks, on a machine with an NVIDIA GPU
# and torch but no package registry (prepare with `make gpu-bundle` where the registry is
# reachable, then carry `.gpu`). Writes its logs to one folder: $1, else $OUT, else ./gpu-logs.
#
#   hack/gpu-check.sh [OUTDIR]                 everything (about 11 minutes on one H200)
#   GPU_CHECK=tests,data hack/gpu-check.sh     `pytest -m gpu` and the data-path benchmarks
#   GPU_CHECK=engines hack/gpu-check.sh        the model-server and transformers benchmarks
# With the device tool: run(command="GPU_CHECK=tests,data hack/gpu-check.sh $OUT", carry=[".gpu"]).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu-logs}}
mkdir -p "$out"
PY=${PY:-python3}
# The bundle's wheels are for the GPU machine's Python (cp312); elsewhere the environment has them.
if ls .gpu/wheels/*.whl >/dev/null 2>&1 && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/spillway-site \
    .gpu/wheels/*.whl || exit 1
  export PYTHONPATH="/tmp/spillway-site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
# vLLM's Python files (gpu-bundle.sh), for spillway.integrations.vllm's GPU test
if [ -f .gpu/vllm.tar.xz ]; then
  mkdir -p /tmp/spillway-vllm && tar -C /tmp/spillway-vllm -xJf .gpu/vllm.tar.xz || exit 1
  export PYTHONPATH="$PYTHONPATH:/tmp/spillway-vllm"
fi
[ -x .gpu/dpconformance ] && export SPILLWAY_DPCONFORMANCE_BIN="$PWD/.gpu/dpconformance"
export PYTHONUNBUFFERED=1
{ date -u; nvidia-smi; "$PY" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; } \
  >"$out/machine.txt" 2>&1
rc=0
what=${GPU_CHECK:-all}
want() { [ "$what" = all ] || [[ ",$what," == *",$1,"* ]]; }
step() {  # step SECONDS NAME COMMAND...: one log per step, its tail on stdout
  local limit=$1 name=$2; shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1 || { rc=1; echo "== $name FAILED (or ran past ${limit}s)"; }
  echo "== $name"; tail -"${TAIL:-12}" "$out/$name.log"
}
# Groups (GPU_CHECK=tests,data,engines; default all). On one H200 tests take ~3 min, data ~3 min,
# engines ~5 min: a 10-minute device call fits tests,data and then engines in a second call.
if want tests; then
  # only the files with GPU tests: the others import what this machine lacks (kopf, kubernetes)
  mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py)
  step 330 pytest-gpu "$PY" -m pytest -m gpu -p no:cacheprovider -o addopts="" -q -rA --timeout 240 -s "${files[@]}"
fi
if want data; then
  step 60 bench-slots "$PY" -m benchmarks slots
  TAIL=16 step 200 bench-datapath "$PY" -m benchmarks datapath
fi
if want engines; then
  # issue 12: the Llama-3-8B-shaped toy server, 16 prompts of 8,192 tokens, a local budget of 4
  # contexts, lent vs pinned host vs no swapping in one run (about 16 GiB of each swap memory)
  TAIL=16 step 300 bench-responsiveness "$PY" -m benchmarks.bench_responsiveness --model llama3-8b --requests 16 \
    --prompt-tokens 8192 --contexts 4
  # issue 13: generate() of a Llama-3-8B-shaped model at 32K context: no offloading, transformers'
  # offloading=True and SpillwayCache, same tokens, decode tokens/s and peak memory
  step 240 bench-transformers "$PY" -m benchmarks transformers
fi
echo "gpu-check: logs in $out (rc=$rc)"
exit $rc
