# syntax=docker/dockerfile:1
# One image for every part of Spillway: `spillway agent`, `spillway deviceplugin`,
# `spillway operator` and the admin commands (`spillway pool show`, ...).
#
#   docker build -t spillway/spillway:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t spillway/spillway:0.1.0 .   # + arm64 (GH200/GB200)
#   hack/image.sh [--arch arm64]    # buildah (no daemon) over a Debian base made by mmdebstrap
#
# torch is not in it: the `client` extra belongs in the model servers' images.
# The base is pinned by digest (python:3.11.14-slim-bookworm, multi-platform index); bump both
# together. Any Debian bookworm image with CPython 3.11 and its venv module as `python3` will do
# (hack/image.sh passes one made by mmdebstrap from Debian's mirror).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# --- build: spillway and every dependency from the lock file (hashes checked) ----------------
FROM ${PYTHON_IMAGE} AS build
# Build arguments seen by pip: the CA bundle it trusts (behind a proxy that re-signs TLS, mount
# the host's bundle into the build and name it here), and its download cache (in this stage only,
# which the image does not carry; hack/image.sh mounts one kept outside, so a rebuild downloads
# nothing). The hashes in the lock file are checked either way.
ARG PIP_CERT=/etc/ssl/certs/ca-certificates.crt
ARG PIP_CACHE_DIR=/tmp/pip-cache
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# requirements.lock (hack/lock.sh): requirements.txt without torch, every transitive dependency
# pinned with the sha256 of each file (amd64 and arm64 wheels), and the build backend. Its own
# layer, so a change to the sources does not download the dependencies again.
COPY requirements.lock ./
RUN python3 -m venv /opt/spillway \
    && /opt/spillway/bin/pip install --no-compile --require-hashes --only-binary=:all: --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY spillway ./spillway
RUN /opt/spillway/bin/pip install --no-compile --no-deps --no-build-isolation --no-index . \
    && /opt/spillway/bin/pip check \
    && /opt/spillway/bin/pip uninstall --yes pip setuptools wheel \
    && find /opt/spillway -name '__pycache__' -type d -prune -exec rm -rf {} + \
    && /opt/spillway/bin/python -m compileall -q -j 0 /opt/spillway/lib

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# hack/image.sh passes these (pyproject.toml's version, `git rev-parse HEAD`); so should CI.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/spillway/spillway
LABEL org.opencontainers.image.title="spillway" \
      org.opencontainers.image.description="Lend idle GPU memory (HBM) to the inference tenants that need it" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"
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
