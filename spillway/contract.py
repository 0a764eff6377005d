"""The contract between Spillway's processes: every name and value that more than one of them
reads or writes (the operator, the agent, the device plugin, the borrower client, the chart).

This is the ground floor: it imports nothing from Spillway, and every part imports its wire
names from here. A change here changes the wire; `tests/test_contract.py` holds the literal
values so that such a change fails a test on purpose.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

# -- the Kubernetes API group (crds/, charts/spillway/crds/) ----------------------------------

GROUP = "spillway.dev"
VERSION = "v1alpha1"
GROUP_VERSION = f"{GROUP}/{VERSION}"  # an object's `apiVersion`
TENANT_KIND = "InferenceTenant"
TENANT_PLURAL = "inferencetenants"
POOL_KIND = "MemoryPool"
POOL_PLURAL = "memorypools"

# -- extended resources --------------------------------------------------------------------

PEER_HBM_RESOURCE = "spillway.dev/peer-hbm"  # advertised by the device plugin, requested by tenant pods
PEER_HBM_UNIT = 1 << 30  # one unit = 1 GiB (the device plugin's default --unit)
GPU_RESOURCE = "nvidia.com/gpu"

# -- how the operator gets a replica its peer memory (`spillway operator --allocation`) ------

ALLOCATION_DRA = "dra"  # one ResourceClaim per replica, allocated by kube-scheduler (docs/dra.md)
ALLOCATION_DEVICEPLUGIN = "deviceplugin"  # RESERVATION leases + the `spillway.dev/peer-hbm` resource
ALLOCATION_AUTO = "auto"  # dra where the cluster serves resource.k8s.io/v1 and has the DeviceClass
ALLOCATION_MODES = (ALLOCATION_AUTO, ALLOCATION_DRA, ALLOCATION_DEVICEPLUGIN)
# The name under which a tenant pod lists its ResourceClaim (spec.resourceClaims[].name and the
# model container's resources.claims[].name).
POD_CLAIM_REF = "peer-memory"


def claim_name(tenant: str, replica: int) -> str:
    """The ResourceClaim of a tenant replica (allocation dra): deterministic, so a retried or
    restarted reconcile finds it again and the API server refuses a second one."""
    return f"{tenant}-{replica}-peer-hbm"


# -- labels on tenant pods (and on their ResourceClaims) --------------------------------------

LABEL_TENANT = "spillway.dev/tenant"
LABEL_REPLICA = "spillway.dev/replica"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "spillway-operator"

# -- annotations -------------------------------------------------------------------------------
# On a tenant pod, written by the operator and read by the device plugin. The reservation ones
# are lists (`join_list`/`split_list`): one entry per lease, every list in the same order.
ANN_RESERVATION = "spillway.dev/reservation"  # lease ids
ANN_TOKEN = "spillway.dev/reservation-token"  # the leases' tokens
ANN_NODE = "spillway.dev/reservation-node"  # the node the leases are on (one name)
ANN_LENDERS = "spillway.dev/lender-gpus"  # the lender GPU UUIDs
ANN_PEER_BYTES = "spillway.dev/lender-bytes"  # bytes of each lease (decimal)
ANN_GPU = "spillway.dev/gpu"  # the GPU the planner meant for the replica's own model
ANN_FALLBACK = "spillway.dev/fallback"  # "HostMemory" when the replica runs without peer memory
FALLBACK_HOST_MEMORY = "HostMemory"
ANN_TENANT_UID = "spillway.dev/tenant-uid"
# Bytes the replica's own GPU keeps for its model (decimal): the operator's *local reservation*
# on that GPU (the agent's SetGpuLocal `reserved`) is the sum over the pods there.
ANN_LOCAL = "spillway.dev/local-reserved"
# JSON list of the replica's ELASTIC leases ({"id", "token", "gpu", "bytes", "key"}).
ANN_ELASTIC = "spillway.dev/elastic-leases"
# Written by the device plugin: JSON {container: {"leases": [...], "result": ..., "message": ...}}.
ANN_ALLOCATION = "spillway.dev/allocation"
# On a MemoryPool, written by the operator: JSON {GPU UUID: bytes} of the local reservations it
# set at that node's agent.
ANN_POOL_LOCAL = "spillway.dev/operator-local-reserved"

LIST_SEPARATOR = ","


def join_list(values: Iterable[object]) -> str:
    """An annotation list value (empty string for none)."""
    return LIST_SEPARATOR.join(str(v) for v in values)


def split_list(value: str | None) -> list[str]:
    """The entries of an annotation list value, in order (empty entries kept: lists align)."""
    return value.split(LIST_SEPARATOR) if value else []


# -- lease holders (the operator's leases at the agents) --------------------------------------

HOLDER_PREFIX = "tenant:"


def holder_name(namespace: str, tenant: str, replica: int) -> str:
    """The lease holder string for a tenant replica: the operator's sweep parses it back."""
    return f"{HOLDER_PREFIX}{namespace}/{tenant}/{replica}"


def parse_holder(holder: str) -> tuple[str, str, int] | None:
    """(namespace, tenant, replica) of a holder written by `holder_name`, else None."""
    if not holder.startswith(HOLDER_PREFIX):
        return None
    parts = holder.removeprefix(HOLDER_PREFIX).split("/")
    # isascii: isdigit() is also true for superscripts and other digits that int() rejects
    if len(parts) != 3 or not parts[0] or not parts[1] or not (parts[2].isascii() and parts[2].isdigit()):
        return None
    return parts[0], parts[1], int(parts[2])


# -- the borrower container's environment (set by the device plugin, read by spillway.client) --

ENV_LEASE_ID = "SPILLWAY_LEASE_ID"
ENV_LEASE_TOKEN = "SPILLWAY_LEASE_TOKEN"
ENV_AGENT_SOCKET = "SPILLWAY_AGENT_SOCKET"
ENV_LENDER_GPUS = "SPILLWAY_LENDER_GPUS"

# -- the agent's sockets and gRPC metadata ------------------------------------------------------

DEFAULT_AGENT_SOCKET = "/run/spillway/agent.sock"  # the agent's default --socket (a hostPath in the chart)
# Trailer of a RESOURCE_EXHAUSTED Acquire: the largest size the agent could grant (decimal bytes).
TRAILER_LARGEST_GRANTABLE = "spillway-largest-grantable-bytes"

# -- time ------------------------------------------------------------------------------------

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # RFC 3339 in UTC, whole seconds (status fields, heartbeats)


def format_time(epoch_s: float) -> str:
    """`epoch_s` (seconds since the epoch) as `TIME_FORMAT`."""
    return dt.datetime.fromtimestamp(epoch_s, dt.UTC).strftime(TIME_FORMAT)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime(TIME_FORMAT)
