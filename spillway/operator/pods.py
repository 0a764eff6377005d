"""The Pod of one tenant replica, as a pure function of the decision (no I/O).

The name is deterministic (`<tenant>-<replica>`), so a retried or restarted reconcile can never
create a second pod for a replica: the API server refuses the duplicate name. The pod is pinned
to its node with required node affinity on `kubernetes.io/hostname` (not `nodeName`), so
kube-scheduler still binds it and counts `nvidia.com/gpu` and `spillway.dev/peer-hbm`.

Annotation contract with the device plugin (comma-separated where a replica has several
lender GPUs, one lease per lender, in the same order):
- `spillway.dev/reservation`: lease ids
- `spillway.dev/reservation-token`: the leases' tokens
- `spillway.dev/reservation-node`: the node the leases are on
- `spillway.dev/lender-gpus`: the lender GPU UUIDs
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

GROUP = "spillway.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "InferenceTenant"

PEER_HBM_RESOURCE = "spillway.dev/peer-hbm"
GPU_RESOURCE = "nvidia.com/gpu"
PEER_HBM_UNIT = 1 << 30  # one `spillway.dev/peer-hbm` unit = 1 GiB (the device plugin's default --unit)

LABEL_TENANT = "spillway.dev/tenant"
LABEL_REPLICA = "spillway.dev/replica"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "spillway-operator"

ANN_RESERVATION = "spillway.dev/reservation"
ANN_TOKEN = "spillway.dev/reservation-token"
ANN_NODE = "spillway.dev/reservation-node"
ANN_LENDERS = "spillway.dev/lender-gpus"
ANN_GPU = "spillway.dev/gpu"  # the GPU the planner meant for the replica's own model (informational)
ANN_PEER_BYTES = "spillway.dev/lender-bytes"  # bytes of each lease, comma-separated
ANN_FALLBACK = "spillway.dev/fallback"  # "HostMemory" when the replica runs without peer memory
ANN_TENANT_UID = "spillway.dev/tenant-uid"
# Bytes the replica's own GPU keeps for it: the operator sets the agent's local reservation
# (`SetGpuLocal reserved`) of that GPU to the sum over the pods there, so the pool never lends them.
ANN_LOCAL = "spillway.dev/local-reserved"


@dataclass(frozen=True)
class LeaseRef:
    """One reservation held for a replica at its node's agent."""

    id: str
    token: str
    gpu_uuid: str
    bytes: int
    kind: str = "RESERVATION"
    idempotency_key: str = ""


@dataclass(frozen=True)
class TenantRef:
    name: str
    namespace: str
    uid: str


@dataclass(frozen=True)
class PodPlan:
    """Everything that decides a replica's pod."""

    tenant: TenantRef
    replica: int
    node: str
    model: Mapping[str, Any]
    gpu_uuid: str = ""
    leases: Sequence[LeaseRef] = field(default_factory=tuple)
    fallback: str = ""  # "HostMemory" when running without peer memory
    priority_class: str = ""
    local_bytes: int = 0  # what `gpu_uuid` keeps for the model (ANN_LOCAL)


def pod_name(tenant: str, replica: int) -> str:
    return f"{tenant}-{replica}"


def peer_units(nbytes: int) -> int:
    """`spillway.dev/peer-hbm` units (1 GiB each, rounded up) for a byte count."""
    return math.ceil(nbytes / PEER_HBM_UNIT) if nbytes > 0 else 0


def holder_name(namespace: str, tenant: str, replica: int) -> str:
    """The lease holder string for a replica: the startup sweep parses it back."""
    return f"tenant:{namespace}/{tenant}/{replica}"


def parse_holder(holder: str) -> tuple[str, str, int] | None:
    """(namespace, tenant, replica) of a holder written by `holder_name`, else None."""
    if not holder.startswith("tenant:"):
        return None
    parts = holder.removeprefix("tenant:").split("/")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def idempotency_key(tenant_uid: str, replica: int, gpu_uuid: str, attempt: int = 1) -> str:
    """`<tenant uid>/<replica>/<lender gpu uuid>`; a later attempt (after the first lease on that
    GPU ended) adds `/<attempt>` so the agent makes a new lease instead of returning the old one."""
    key = f"{tenant_uid}/{replica}/{gpu_uuid}"
    return key if attempt <= 1 else f"{key}/{attempt}"


def owner_reference(tenant: TenantRef) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": tenant.name,
        "uid": tenant.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _env(env: Any) -> list[dict[str, Any]]:
    """The model's env as a container env list: a list of EnvVar objects or a name->value map."""
    if not env:
        return []
    if isinstance(env, Mapping):
        return [{"name": str(k), "value": str(v)} for k, v in env.items()]
    return [dict(e) for e in env]


def reservation_annotations(node: str, leases: Sequence[LeaseRef]) -> dict[str, str]:
    """The device-plugin contract annotations for a set of leases (empty values when none)."""
    return {
        ANN_RESERVATION: ",".join(lease.id for lease in leases),
        ANN_TOKEN: ",".join(lease.token for lease in leases),
        ANN_NODE: node,
        ANN_LENDERS: ",".join(lease.gpu_uuid for lease in leases),
        ANN_PEER_BYTES: ",".join(str(lease.bytes) for lease in leases),
    }


def parse_reservation_annotations(annotations: Mapping[str, str]) -> list[LeaseRef]:
    """The leases a pod's annotations name (tokens included), in order."""
    ids = [x for x in (annotations.get(ANN_RESERVATION) or "").split(",") if x]
    tokens = (annotations.get(ANN_TOKEN) or "").split(",")
    gpus = (annotations.get(ANN_LENDERS) or "").split(",")
    out = []
    for i, lease_id in enumerate(ids):
        out.append(
            LeaseRef(
                id=lease_id,
                token=tokens[i] if i < len(tokens) else "",
                gpu_uuid=gpus[i] if i < len(gpus) else "",
                bytes=0,
            )
        )
    return out


def build_pod(plan: PodPlan) -> dict[str, Any]:
    """The Pod manifest for one replica."""
    t = plan.tenant
    model = plan.model
    peer_bytes = sum(lease.bytes for lease in plan.leases)
    units = peer_units(peer_bytes)
    extra = dict(model.get("resources") or {})
    limits: dict[str, Any] = dict(extra.get("limits") or {})
    requests: dict[str, Any] = dict(extra.get("requests") or {})
    limits[GPU_RESOURCE] = "1"
    requests[GPU_RESOURCE] = "1"
    limits.pop(PEER_HBM_RESOURCE, None)
    requests.pop(PEER_HBM_RESOURCE, None)
    if units:
        limits[PEER_HBM_RESOURCE] = str(units)
        requests[PEER_HBM_RESOURCE] = str(units)
    container: dict[str, Any] = {
        "name": "model",
        "image": model.get("image") or "",
        "resources": {"limits": limits, "requests": requests},
    }
    if model.get("args"):
        container["args"] = [str(a) for a in model["args"]]
    env = _env(model.get("env"))
    if env:
        container["env"] = env
    if model.get("port"):
        container["ports"] = [{"name": "http", "containerPort": int(model["port"]), "protocol": "TCP"}]

    annotations = {ANN_TENANT_UID: t.uid, ANN_GPU: plan.gpu_uuid}
    annotations.update(reservation_annotations(plan.node, plan.leases))
    if plan.fallback:
        annotations[ANN_FALLBACK] = plan.fallback
    if plan.gpu_uuid and plan.local_bytes > 0:
        annotations[ANN_LOCAL] = str(plan.local_bytes)
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(t.name, plan.replica),
            "namespace": t.namespace,
            "labels": {
                LABEL_TENANT: t.name,
                LABEL_REPLICA: str(plan.replica),
                LABEL_MANAGED_BY: MANAGED_BY,
            },
            "annotations": annotations,
            "ownerReferences": [owner_reference(t)],
        },
        "spec": {
            "containers": [container],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [
                                {"key": "kubernetes.io/hostname", "operator": "In", "values": [plan.node]}
                            ]}
                        ]
                    }
                }
            },
            "tolerations": [
                {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"},
            ],
            "restartPolicy": "Always",
        },
    }
    if plan.priority_class:
        pod["spec"]["priorityClassName"] = plan.priority_class
    return pod


def local_bytes(t_memory: int, lending: bool, gpu_total: int) -> int:
    """What a replica's own GPU keeps for it: the model's memory, or the whole GPU when the tenant
    does not lend (`lending: false`), so the agent lends nothing from it."""
    return t_memory if lending or gpu_total <= 0 else max(t_memory, gpu_total)


def pod_replica(pod: Mapping[str, Any]) -> int | None:
    """The replica index of a pod built by `build_pod` (None for a pod that is not ours)."""
    labels = (pod.get("metadata") or {}).get("labels") or {}
    value = labels.get(LABEL_REPLICA)
    return int(value) if isinstance(value, str) and value.isdigit() else None


def pod_node(pod: Mapping[str, Any]) -> str:
    """The node a pod is pinned to (its reservation node, else its affinity, else where it is bound)."""
    meta = pod.get("metadata") or {}
    node = (meta.get("annotations") or {}).get(ANN_NODE)
    if node:
        return str(node)
    spec = pod.get("spec") or {}
    try:
        terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        return str(terms[0]["matchExpressions"][0]["values"][0])
    except (KeyError, IndexError, TypeError):
        return str(spec.get("nodeName") or "")
