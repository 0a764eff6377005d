"""The reconcile's decisions, as pure functions of what was observed (no I/O).

- `observe_pod`: what a tenant pod says about its replica (node, GPU, leases from annotations).
- `decide`: which replicas keep their pod, which pods go (scale-down, node lost, pod failed) and
  which replicas need placing.
- `choose_lender`: a replacement lender GPU on the replica's node when a lease is lost.
- `build_status`: phase, placements, conditions, replicas/readyReplicas for `status`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spillway.operator.model import Assignment, NodeView, ReplicaKey, TenantSpec
from spillway.operator.pods import (
    ANN_FALLBACK,
    ANN_GPU,
    ANN_LOCAL,
    ANN_PEER_BYTES,
    ANN_TENANT_UID,
    LABEL_TENANT,
    LeaseRef,
    parse_reservation_annotations,
    pod_node,
    pod_replica,
)
from spillway.units import format_bytes

ANN_ELASTIC = "spillway.dev/elastic-leases"  # JSON list of ELASTIC leases grown by SLO feedback

PHASE_PENDING = "Pending"
PHASE_PLACING = "Placing"
PHASE_RUNNING = "Running"
PHASE_DEGRADED = "Degraded"
PHASE_FAILED = "Failed"
PHASES = (PHASE_PENDING, PHASE_PLACING, PHASE_RUNNING, PHASE_DEGRADED, PHASE_FAILED)


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

    @property
    def peer_bytes(self) -> int:
        return sum(x.bytes for x in self.leases) + sum(x.bytes for x in self.elastic)

    def all_leases(self) -> tuple[LeaseRef, ...]:
        return self.leases + self.elastic


def _lease_bytes(annotations: Mapping[str, str], leases: list[LeaseRef]) -> list[LeaseRef]:
    sizes = [s for s in (annotations.get(ANN_PEER_BYTES) or "").split(",") if s]
    if len(sizes) == len(leases) and all(s.isdigit() for s in sizes):
        return [LeaseRef(x.id, x.token, x.gpu_uuid, int(s)) for x, s in zip(leases, sizes, strict=True)]
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
        local_bytes=int(ann[ANN_LOCAL]) if str(ann.get(ANN_LOCAL) or "").isdigit() else 0,
    )


def reservation_patch(node: str, leases: Sequence[LeaseRef], *, fallback: bool) -> dict[str, Any]:
    """A merge patch for a pod's annotations after its reservations changed."""
    from spillway.operator.pods import reservation_annotations

    ann: dict[str, Any] = reservation_annotations(node, leases)
    ann[ANN_FALLBACK] = "HostMemory" if fallback else None
    return {"metadata": {"annotations": ann}}


@dataclass(frozen=True)
class Decision:
    keep: tuple[ObservedPod, ...] = ()
    remove: tuple[tuple[ObservedPod, str, str], ...] = ()  # (pod, reason, message)
    place: tuple[int, ...] = ()
    waiting: tuple[int, ...] = ()  # replicas whose old pod is still terminating


def decide(
    spec: TenantSpec, pods: Sequence[ObservedPod], nodes: Mapping[str, NodeView], lost: Mapping[str, str] | None = None
) -> Decision:
    """Sort the tenant's pods into kept and removed, and list the replicas to place. A pod on a
    node missing from `nodes` is removed (NodeLost); `lost` may say why that node is gone."""
    keep: list[ObservedPod] = []
    remove: list[tuple[ObservedPod, str, str]] = []
    waiting: set[int] = set()
    seen: set[int] = set()
    for p in sorted(pods, key=lambda p: (p.replica, p.name)):
        if p.terminating:
            waiting.add(p.replica)
            continue
        if p.tenant_uid and spec.uid and p.tenant_uid != spec.uid:
            remove.append((p, "StalePod", f"pod {p.name} belongs to an earlier tenant of the same name"))
        elif p.replica >= spec.replicas:
            remove.append((p, "ScaledDown", f"replica {p.replica} removed: spec.replicas is {spec.replicas}"))
        elif p.replica in seen:
            remove.append((p, "Duplicate", f"pod {p.name} duplicates replica {p.replica}"))
        elif p.node not in nodes:
            why = (lost or {}).get(p.node) or "has no live MemoryPool (its agent stopped publishing)"
            remove.append((p, "NodeLost", f"node {p.node} of replica {p.replica} {why}"))
        elif p.phase in ("Failed", "Succeeded"):
            remove.append((p, "PodFailed", f"pod {p.name} is {p.phase}; re-placing replica {p.replica}"))
        else:
            keep.append(p)
            seen.add(p.replica)
    removed = {p.replica for p, _, _ in remove}
    place = tuple(r for r in range(spec.replicas) if r not in seen and r not in waiting and r not in removed)
    return Decision(tuple(keep), tuple(remove), place, tuple(sorted(waiting)))


def assignment_of(namespace: str, tenant: str, pod: ObservedPod) -> Assignment:
    return Assignment(
        key=ReplicaKey(namespace, tenant, pod.replica),
        node=pod.node,
        gpu_uuid=pod.gpu_uuid,
        lenders=tuple((x.gpu_uuid, x.bytes) for x in pod.all_leases()),
        host_fallback=pod.fallback,
        keeps=pod.local_bytes,
    )


def choose_lender(node: NodeView, own_gpu: str, need: int, exclude: Sequence[str] = ()) -> str | None:
    """The GPU on `node` to lend `need` bytes to the replica on `own_gpu`: NVLink peers first, the
    one with the most lendable memory; None when no GPU has room."""
    candidates = [
        g for g in node.gpus
        if g.uuid != own_gpu and g.uuid not in exclude and g.lendable >= need
    ]
    if not candidates:
        return None
    candidates.sort(key=lambda g: (not node.nvlinked(own_gpu, g.uuid) if own_gpu else False, -g.lendable, g.index))
    return candidates[0].uuid


def selector(tenant: str) -> str:
    return f"{LABEL_TENANT}={tenant}"


@dataclass
class ReplicaStatus:
    replica: int
    pod: str = ""
    node: str = ""
    gpu: str = ""
    leases: list[dict[str, Any]] = field(default_factory=list)
    host_fallback: bool = False
    ready: bool = False
    reason: str = ""

    @property
    def elastic_bytes(self) -> int:
        """Bytes of the replica's ELASTIC leases (grown by SLO feedback, first reclaimed)."""
        return sum(int(x["bytes"]) for x in self.leases if x.get("kind") == "ELASTIC")

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"replica": self.replica, "pod": self.pod, "node": self.node, "gpu": self.gpu}
        by_gpu: dict[str, int] = {}
        for lease in self.leases:
            by_gpu[lease["gpu"]] = by_gpu.get(lease["gpu"], 0) + int(lease["bytes"])
        out["lenders"] = [{"gpu": g, "bytes": b} for g, b in by_gpu.items()]
        out["leases"] = self.leases
        out["elasticBytes"] = self.elastic_bytes
        out["hostFallback"] = self.host_fallback
        if self.reason:
            out["reason"] = self.reason
        return out


def _condition(
    old: Mapping[str, Mapping[str, Any]], type_: str, status: str, reason: str, message: str, now: str, generation: int
) -> dict[str, Any]:
    prev = old.get(type_) or {}
    changed = prev.get("status") != status
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now if changed or not prev.get("lastTransitionTime") else prev["lastTransitionTime"],
        "observedGeneration": generation,
    }


def phase_of(spec: TenantSpec, replicas: Sequence[ReplicaStatus], pending: Mapping[int, str]) -> str:
    placed = [r for r in replicas if r.pod]
    if spec.replicas == 0:
        return PHASE_RUNNING
    if not placed:
        return PHASE_PENDING
    if pending or any(r.host_fallback and spec.peer_request > 0 for r in placed):
        return PHASE_DEGRADED
    if len(placed) == spec.replicas and all(r.ready for r in placed):
        return PHASE_RUNNING
    return PHASE_PLACING


def build_status(
    spec: TenantSpec,
    replicas: Sequence[ReplicaStatus],
    pending: Mapping[int, str],
    old_status: Mapping[str, Any],
    now: str,
    slo_status: Mapping[str, Any] | None = None,
    slo_condition: tuple[str, str, str] | None = None,
) -> dict[str, Any]:
    """The whole `status` (a merge patch replaces lists, so every list is complete)."""
    old_conditions = {c.get("type", ""): c for c in old_status.get("conditions") or [] if isinstance(c, Mapping)}
    gen = spec.generation
    placed = [r for r in replicas if r.pod]
    ready = sum(1 for r in placed if r.ready)
    peer = sum(int(x["bytes"]) for r in placed for x in r.leases)
    phase = phase_of(spec, replicas, pending)
    all_placed = len(placed) == spec.replicas and not pending
    conditions = []
    if all_placed:
        conditions.append(_condition(old_conditions, "Placed", "True", "Placed",
                                     f"{len(placed)} of {spec.replicas} replicas placed", now, gen))
    else:
        why = "; ".join(f"replica {r}: {m}" for r, m in sorted(pending.items())) or "placing"
        conditions.append(_condition(old_conditions, "Placed", "False", "Unplaced",
                                     f"{len(placed)} of {spec.replicas} replicas placed; {why}", now, gen))
    if spec.peer_request <= 0:
        conditions.append(_condition(old_conditions, "PeerMemoryReserved", "True", "NotRequested",
                                     "the tenant asks for no peer memory", now, gen))
    else:
        short = [r for r in placed if sum(int(x["bytes"]) for x in r.leases) < spec.peer_request]
        if placed and not short:
            conditions.append(_condition(old_conditions, "PeerMemoryReserved", "True", "Reserved",
                                         f"{format_bytes(peer)} of peer memory leased", now, gen))
        elif short and all(r.host_fallback for r in short):
            conditions.append(_condition(
                old_conditions, "PeerMemoryReserved", "False", "HostMemoryFallback",
                "replicas " + ", ".join(str(r.replica) for r in short)
                + " run without peer memory and spill to host memory: "
                + "; ".join(r.reason for r in short if r.reason),
                now, gen))
        else:
            conditions.append(_condition(old_conditions, "PeerMemoryReserved", "False", "NotReserved",
                                         "peer memory not (yet) reserved for every replica", now, gen))
    if slo_condition is not None:
        conditions.append(_condition(old_conditions, "SLOMet", *slo_condition, now, gen))
    elif "SLOMet" in old_conditions:
        conditions.append(dict(old_conditions["SLOMet"]))
    else:
        conditions.append(_condition(old_conditions, "SLOMet", "Unknown", "NotEvaluated",
                                     "the SLO has not been evaluated yet", now, gen))
    is_ready = phase == PHASE_RUNNING
    conditions.append(_condition(old_conditions, "Ready", "True" if is_ready else "False",
                                 "Ready" if is_ready else phase, f"{ready} of {spec.replicas} replicas ready",
                                 now, gen))
    status: dict[str, Any] = {
        "phase": phase,
        "observedGeneration": gen,
        "replicas": len(placed),
        "readyReplicas": ready,
        "selector": selector(spec.name),
        "peerMemoryBytes": peer,
        "peerMemory": format_bytes(peer),
        "elasticBytes": sum(r.elastic_bytes for r in placed),
        "placements": [r.as_status() for r in sorted(replicas, key=lambda r: r.replica)],
        "conditions": conditions,
    }
    if slo_status is not None:
        status["slo"] = dict(slo_status)
    return status


def failed_status(message: str, old_status: Mapping[str, Any], now: str, generation: int) -> dict[str, Any]:
    old_conditions = {c.get("type", ""): c for c in old_status.get("conditions") or [] if isinstance(c, Mapping)}
    return {
        "phase": PHASE_FAILED,
        "observedGeneration": generation,
        "conditions": [
            _condition(old_conditions, "Ready", "False", "InvalidSpec", message, now, generation),
        ],
    }
