# Spillway. `make demo` runs the whole thing locally; `make test` runs every check.
# Everything heavy is cached outside the clone, under ~/.cache/spillway, keyed by version:
# the Python virtual environment (by the hash of the requirements files and their lock) and the
# Kubernetes binaries (by version, see hack/versions.env).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE_DIR  ?= $(HOME)/.cache/spillway
VENV_KEY   := $(shell cat requirements.txt requirements-dev.txt requirements-dev.lock requirements-vllm.lock | sha256sum | cut -c1-12)
VENV       ?= $(CACHE_DIR)/venv-$(VENV_KEY)
PY         := $(VENV)/bin/python
PYTEST_ARGS ?=
# Test workers (pytest-xdist): most of the suite waits on control planes, Prometheus and
# subprocesses, so two workers halve the wall time even on 2 cores. Each worker has its own
# control plane; a file's tests stay on one worker. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)
export PYTHONPATH := $(CURDIR)

PROTOS := $(shell find spillway/api -name '*.proto')

.PHONY: py help venv lock image proto proto-check lint test test-fast test-gpu gpu-bundle demo bench k8s-bins system-deps node-deps cluster-up cluster-down clean

help:
	@echo "make demo        the SLO loop on CPU: model servers, load, Prometheus, operator, simulated GPUs (Ctrl-C stops all)"
	@echo "make test        lint, type-check and run every test (installs what it needs)"
	@echo "make bench       run the benchmarks (results go in docs/BENCHMARKS.md)"
	@echo "make test-gpu    the GPU tests and GPU benchmarks (on a GPU machine; make gpu-bundle first where pip works)"
	@echo "make cluster-up  start the local control plane and print its KUBECONFIG; make cluster-down stops it"

# --- environment -----------------------------------------------------------------------
# Installs requirements-dev.lock: every transitive dependency pinned with its hashes
# (hack/lock.sh writes it from requirements*.txt; the image installs requirements.lock), then
# requirements-vllm.lock without dependencies (see requirements-vllm.txt: vLLM's offloading API
# runs on our torch).
venv: $(VENV)/.ok
$(VENV)/.ok: requirements.txt requirements-dev.txt requirements-dev.lock requirements-vllm.txt requirements-vllm.lock
	@mkdir -p $(CACHE_DIR)
	@hack/lock.sh --check
	@if [ ! -x $(PY) ]; then rm -rf $(VENV).tmp && python3 -m venv $(VENV).tmp && mv $(VENV).tmp $(VENV); fi
	$(PY) -m pip install --disable-pip-version-check -q --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --require-hashes -r requirements-vllm.lock
	@touch $@

system-deps:
	hack/system-deps.sh

k8s-bins:
	hack/build-k8s.sh

# After a change to requirements*.txt: write requirements.lock and requirements-dev.lock.
lock:
	hack/lock.sh

# The container image, built with buildah over a Debian base (see docs/operations.md).
image: system-deps
	hack/image.sh

# Grafana's npm packages for the dashboard test, under $(CACHE_DIR)/node-<hash of the lock file>.
node-deps: system-deps
	@hack/node-deps.sh >/dev/null

# --- generated code --------------------------------------------------------------------
proto: venv
	$(PY) hack/gen_proto.py

proto-check: venv
	$(PY) hack/gen_proto.py --check

# --- checks ----------------------------------------------------------------------------
lint: venv proto-check
	$(PY) -m ruff check spillway tests benchmarks hack examples
	$(PY) -m mypy

test: venv system-deps k8s-bins node-deps lint
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

# Unit tests only (no control plane): quick feedback while coding.
test-fast: venv
	$(PY) -m pytest -m "not cluster and not slow" $(XDIST) $(PYTEST_ARGS)

# The GPU check: `pytest -m gpu` and the GPU benchmarks, logs in one folder (hack/gpu-check.sh).
# On a GPU machine without a package registry, `make gpu-bundle` here first and carry `.gpu`.
test-gpu:
	PY=$(if $(wildcard $(PY)),$(PY),python3) hack/gpu-check.sh

gpu-bundle: venv k8s-bins
	PY=$(PY) hack/gpu-bundle.sh

# --- running it ------------------------------------------------------------------------
demo: venv system-deps k8s-bins
	$(PY) hack/demo.py

bench: venv system-deps k8s-bins
	$(PY) -m benchmarks

cluster-up: venv k8s-bins
	@$(PY) -m spillway.testing.cluster up

cluster-down: venv
	@$(PY) -m spillway.testing.cluster down

clean:
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info

# The interpreter of the cached environment, for scripts: `$(make -s py) -m pytest ...`
py:
	@echo $(PY)
