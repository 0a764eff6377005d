"""A tenant replica's Pod, both ways, as pure functions (no I/O): `build_pod` writes it from the
decision, `observe_pod` reads a replica back from it, and the `*_patch` functions change its
annotations. Every pod label and annotation the operator reads or writes goes through here; their
names and encodings are the processes' contract (`spillway.contract`).

The name is deterministic (`<tenant>-<replica>`), so a retried or restarted reconcile can never
create a second pod for a replica: the API server refuses the duplicate name. The pod is pinned
to its node with required node affinity on `kubernetes.io/hostname` (not `nodeName`), so
kube-scheduler still binds it and counts `nvidia.com/gpu` and `spillway.dev/peer-hbm`.

The device plugin reads the reservation annotations (one entry per lease, every list in the
same order) to find the pod an Allocate is for; see `spillway.contract`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spillway.contract import (
    ANN_ELASTIC,
    ANN_FALLBACK,
    ANN_GPU,
    ANN_LENDERS,
    ANN_LOCAL,
    ANN_NODE,
    ANN_PEER_BYTES,
    ANN_RESERVATION,
    ANN_TENANT_UID,
    ANN_TOKEN,
    FALLBACK_HOST_MEMORY,
    GPU_RESOURCE,
    GROUP_VERSION,
    LABEL_MANAGED_BY,
    LABEL_REPLICA,
    LABEL_TENANT,
    MANAGED_BY,
    PEER_HBM_RESOURCE,
    PEER_HBM_UNIT,
    POD_CLAIM_REF,
    TENANT_KIND,
    holder_name,
    join_list,
    parse_holder,
    split_list,
)
from spillway.units import plain_int

__all__ = [  # the contract names tests and callers reach through this module
    "ANN_ELASTIC", "ANN_LOCAL", "holder_name", "parse_holder",
]


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
    claim: str = ""  # allocation dra: the replica's ResourceClaim (instead of leases and peer-hbm units)


def pod_name(tenant: str, replica: int) -> str:
    return f"{tenant}-{replica}"


def peer_units(nbytes: int) -> int:
    """`spillway.dev/peer-hbm` units (1 GiB each, rounded up) for a byte count."""
    return math.ceil(nbytes / PEER_HBM_UNIT) if nbytes > 0 else 0


def idempotency_key(tenant_uid: str, replica: int, gpu_uuid: str, attempt: int = 1) -> str:
    """`<tenant uid>/<replica>/<lender gpu uuid>`; a later attempt (after the first lease on that
    GPU ended) adds `/<attempt>` so the agent makes a new lease instead of returning the old one."""
    key = f"{tenant_uid}/{replica}/{gpu_uuid}"
    return key if attempt <= 1 else f"{key}/{attempt}"


def owner_reference(tenant: TenantRef) -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": TENANT_KIND,
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
        ANN_RESERVATION: join_list(lease.id for lease in leases),
        ANN_TOKEN: join_list(lease.token for lease in leases),
        ANN_NODE: node,
        ANN_LENDERS: join_list(lease.gpu_uuid for lease in leases),
        ANN_PEER_BYTES: join_list(lease.bytes for lease in leases),
    }


def parse_reservation_annotations(annotations: Mapping[str, str]) -> list[LeaseRef]:
    """The leases a pod's annotations name (tokens included), in order."""
    ids = [x for x in split_list(annotations.get(ANN_RESERVATION)) if x]
    tokens = split_list(annotations.get(ANN_TOKEN))
    gpus = split_list(annotations.get(ANN_LENDERS))
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
    if plan.claim:
        container["resources"]["claims"] = [{"name": POD_CLAIM_REF}]
    if model.get("args"):
        container["args"] = [str(a) for a in model["args"]]
    env = _env(model.get("env"))
    if env:
        container["env"] = env
    if model.get("port"):
        container["ports"] = [{"name": "http", "containerPort": int(model["port"]), "protocol": "TCP"}]

    annotations = {ANN_TENANT_UID: t.uid, ANN_GPU: plan.gpu_uuid}
    if not plan.claim:  # with a claim, the claim holds the reservation: no lease annotations
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
    if plan.claim:
        pod["spec"]["resourceClaims"] = [{"name": POD_CLAIM_REF, "resourceClaimName": plan.claim}]
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
    return plain_int(value)


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


@dataclass(frozen=True)
class ObservedPod:
    """One tenant pod as the API server shows it."""

    replica: int
    name: str
    uid: str
    node: str
    gpu_uuid: str
    leases: tuple[LeaseRef, ...]
    elastic: tuple[LeaseRef, ...] = ()
    phase: str = "Pending"
    ready: bool = False
    terminating: bool = False
    fallback: bool = False
    tenant_uid: str = ""
    local_bytes: int = 0  # what its own GPU keeps for it (ANN_LOCAL); 0 on pods made before that annotation
    namespace: str = ""
    claim: str = ""  # the ResourceClaim holding its peer memory (allocation dra), else ""

    @property
    def peer_bytes(self) -> int:
        return sum(x.bytes for x in self.leases) + sum(x.bytes for x in self.elastic)

    def all_leases(self) -> tuple[LeaseRef, ...]:
        return self.leases + self.elastic


def _lease_bytes(annotations: Mapping[str, str], leases: list[LeaseRef]) -> list[LeaseRef]:
    sizes = [s for s in (annotations.get(ANN_PEER_BYTES) or "").split(",") if s]
    values = [plain_int(s, max_digits=24) for s in sizes]
    if len(values) == len(leases) and all(v is not None for v in values):
        return [LeaseRef(x.id, x.token, x.gpu_uuid, v or 0) for x, v in zip(leases, values, strict=True)]
    return leases


def parse_elastic(annotations: Mapping[str, str]) -> tuple[LeaseRef, ...]:
    try:
        raw = json.loads(annotations.get(ANN_ELASTIC) or "[]")
        return tuple(
            LeaseRef(str(x["id"]), str(x["token"]), str(x["gpu"]), int(x["bytes"]), "ELASTIC", str(x.get("key", "")))
            for x in raw
        )
    except (ValueError, KeyError, TypeError):
        return ()


def elastic_annotation(leases: Sequence[LeaseRef]) -> str:
    return json.dumps(
        [{"id": x.id, "token": x.token, "gpu": x.gpu_uuid, "bytes": x.bytes, "key": x.idempotency_key} for x in leases],
        separators=(",", ":"),
    )


def observe_pod(pod: Mapping[str, Any]) -> ObservedPod | None:
    replica = pod_replica(pod)
    if replica is None:
        return None
    meta = pod.get("metadata") or {}
    ann = meta.get("annotations") or {}
    status = pod.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return ObservedPod(
        replica=replica,
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        node=pod_node(pod),
        gpu_uuid=str(ann.get(ANN_GPU) or ""),
        leases=tuple(_lease_bytes(ann, parse_reservation_annotations(ann))),
        elastic=parse_elastic(ann),
        phase=str(status.get("phase") or "Pending"),
        ready=ready,
        terminating=bool(meta.get("deletionTimestamp")),
        fallback=bool(ann.get(ANN_FALLBACK)),
        tenant_uid=str(ann.get(ANN_TENANT_UID) or ""),
        local_bytes=plain_int(ann.get(ANN_LOCAL), max_digits=24) or 0,
        namespace=str(meta.get("namespace") or ""),
        claim=pod_claim(pod),
    )


def pod_claim(pod: Mapping[str, Any]) -> str:
    """The ResourceClaim a tenant pod lists under `POD_CLAIM_REF`, else ""."""
    for ref in (pod.get("spec") or {}).get("resourceClaims") or []:
        if isinstance(ref, Mapping) and ref.get("name") == POD_CLAIM_REF:
            return str(ref.get("resourceClaimName") or "")
    return ""


def reservation_patch(node: str, leases: Sequence[LeaseRef], *, fallback: bool) -> dict[str, Any]:
    """A merge patch for a pod's annotations after its reservations changed."""
    ann: dict[str, Any] = reservation_annotations(node, leases)
    ann[ANN_FALLBACK] = FALLBACK_HOST_MEMORY if fallback else None
    return {"metadata": {"annotations": ann}}


def elastic_patch(leases: Sequence[LeaseRef]) -> dict[str, Any]:
    """A merge patch for a pod's ELASTIC leases."""
    return {"metadata": {"annotations": {ANN_ELASTIC: elastic_annotation(leases)}}}


def local_patch(nbytes: int) -> dict[str, Any]:
    """A merge patch for what a pod's own GPU keeps for it (ANN_LOCAL)."""
    return {"metadata": {"annotations": {ANN_LOCAL: str(nbytes)}}}


def selector(tenant: str) -> str:
    return f"{LABEL_TENANT}={tenant}"
