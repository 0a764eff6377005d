# syntax=docker/dockerfile:1
# One image for every part of Spillway: `spillway agent`, `spillway deviceplugin`,
# `spillway operator` and the admin commands (`spillway pool show`, ...).
#
#   docker build -t spillway/spillway:0.1.0 .
#
# torch is not in it: the `client` extra belongs in the model servers' images.
# The base is pinned by digest (python:3.11.14-slim-bookworm, multi-platform index); bump both
# together.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- build: wheels for spillway and its pinned runtime dependencies -----------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# The pins of requirements.txt, minus torch (the borrower client's extra, not needed here).
COPY requirements.txt ./
RUN grep -v -E '^[[:space:]]*torch([=<>~ ]|$)' requirements.txt > constraints.txt
COPY pyproject.toml README.md ./
COPY spillway ./spillway
RUN python -m venv /opt/spillway \
    && /opt/spillway/bin/pip install --no-compile --constraint constraints.txt . \
    && /opt/spillway/bin/pip uninstall --yes pip setuptools wheel \
    && find /opt/spillway -name '__pycache__' -type d -prune -exec rm -rf {} + \
    && /opt/spillway/bin/python -m compileall -q -j 0 /opt/spillway/lib

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="spillway" \
      org.opencontainers.image.description="Lend idle GPU memory (HBM) to the inference tenants that need it" \
      org.opencontainers.image.licenses="Apache-2.0"
# NVML: the agent on GPU nodes needs only libnvidia-ml.so.1 and the /dev/nvidia* device nodes,
# which the NVIDIA container runtime mounts when the container asks for them
# (NVIDIA_VISIBLE_DEVICES=all, NVIDIA_DRIVER_CAPABILITIES=utility; the chart sets both). The
# image carries no driver and the agent needs no privileged mode or capabilities.
ENV PATH=/opt/spillway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=utility
COPY --from=build /opt/spillway /opt/spillway
# Topologies for the simulated backend (demos and tests without GPUs).
COPY examples/topologies /usr/share/spillway/topologies
# Non-root by default (operator, admin commands). The node DaemonSet runs the agent and the
# device plugin as root without capabilities, for the kubelet's root-owned directories.
RUN groupadd --system --gid 65532 spillway \
    && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin spillway \
    && spillway --version
USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["spillway"]
CMD ["--help"]
