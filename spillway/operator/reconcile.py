"""The reconcile's decisions, as pure functions of what was observed (no I/O). What a pod says
about its replica is read in `pods.observe_pod`; the SLO's decisions are in `slo`.

- `decide`: which replicas keep their pod, which pods go (scale-down, node lost, pod failed) and
  which replicas need placing.
- `on_reserve_error`: what a replica does when its RESERVATION leases cannot be acquired.
- `choose_lender`, `after_lost`: a replacement lender GPU on the replica's node when a lease is
  lost, and what happens to the replica when there is none.
- `is_orphan`: whether a lease found at an agent belongs to no replica (the startup sweep).
- `build_status`: phase, placements, conditions, replicas/readyReplicas for `status`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from spillway.operator.model import Assignment, NodeView, ReplicaKey, TenantSpec
from spillway.operator.pods import ObservedPod, selector
from spillway.units import format_bytes

PHASE_PENDING = "Pending"
PHASE_PLACING = "Placing"
PHASE_RUNNING = "Running"
PHASE_DEGRADED = "Degraded"
PHASE_FAILED = "Failed"
PHASES = (PHASE_PENDING, PHASE_PLACING, PHASE_RUNNING, PHASE_DEGRADED, PHASE_FAILED)


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


def assignment_of(namespace: str, tenant: str, pod: ObservedPod, previous: Assignment | None = None) -> Assignment:
    """The replica's assignment as its pod shows it. The lenders of a pod whose ResourceClaim
    holds its peer memory are not on the pod: it keeps the claim's lenders of `previous` on the
    same node (planned, or read from the claim's allocation) beside its ELASTIC leases."""
    claim_lenders = previous.claim_lenders if pod.claim and previous is not None and previous.node == pod.node else ()
    return Assignment(
        key=ReplicaKey(namespace, tenant, pod.replica),
        node=pod.node,
        gpu_uuid=pod.gpu_uuid,
        lenders=claim_lenders + tuple((x.gpu_uuid, x.bytes) for x in pod.all_leases()),
        host_fallback=pod.fallback,
        keeps=pod.local_bytes,
        claim_lenders=claim_lenders,
    )


class OnReserveError(Enum):
    """What a replica does when the RESERVATION leases of its placement cannot be acquired."""

    RETRY = "retry"  # the agent did not answer or refused the call itself: stay Pending, try next resync
    PENDING = "pending"  # no room, and the tenant has no fallback: stay Pending
    HOST_MEMORY = "host-memory"  # no room: run without peer memory, spilling to host memory


NO_ROOM_CODES = frozenset({"RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"})


def on_reserve_error(code: str, fallback: str) -> OnReserveError:
    """The policy for a failed Acquire (`code`: the gRPC status code name) of a tenant whose
    `spec.peerMemory.fallback` is `fallback`."""
    if code not in NO_ROOM_CODES:
        return OnReserveError.RETRY
    return OnReserveError.PENDING if fallback == "None" else OnReserveError.HOST_MEMORY


class AfterLost(Enum):
    """What becomes of a replica that lost leases (revoked, expired)."""

    MOVED = "moved"  # the lost RESERVATION bytes are reserved again on another lender of its node
    GIVEN_BACK = "given-back"  # only ELASTIC leases were lost: nothing to replace
    HOST_MEMORY = "host-memory"  # no lender has room: it runs on, spilling to host memory
    REPLACE = "replace"  # no lender has room and fallback is None: its pod goes, the replica is re-placed


def after_lost(need: int, replaced: bool, fallback: str) -> AfterLost:
    """`need`: the RESERVATION bytes lost; `replaced`: whether a replacement lease was acquired."""
    if need <= 0 or replaced:
        return AfterLost.MOVED if replaced else AfterLost.GIVEN_BACK
    return AfterLost.REPLACE if fallback == "None" else AfterLost.HOST_MEMORY


@dataclass(frozen=True)
class TenantFacts:
    """What the startup sweep knows of a tenant that exists."""

    uid: str
    replicas: int | None  # spec.replicas when it is an int


def is_orphan(
    holder: tuple[str, str, int] | None,
    idempotency_key: str,
    lease_id: str,
    age_ms: float | None,
    *,
    young_ms: float,
    namespaces: Sequence[str],
    tenants: Mapping[tuple[str, str], TenantFacts],
    named_by_pods: Mapping[tuple[str, str, int], set[str]],
) -> bool:
    """Whether a live lease at an agent belongs to no replica: its tenant is gone (or was
    recreated: another uid), its replica is beyond spec.replicas, or no pod of the replica names
    it. A lease younger than `young_ms` (`age_ms`; None when unknown) is never an orphan: it may
    be another operator's reservation whose pod is being created right now; one not held by a
    tenant replica (`holder` None) or outside the watched `namespaces` is not ours to judge."""
    if holder is None:
        return False
    if age_ms is not None and age_ms < young_ms:
        return False
    ns, name, replica = holder
    if namespaces and ns not in namespaces:
        return False
    t = tenants.get((ns, name))
    if t is None:
        return True
    if t.uid and idempotency_key and not idempotency_key.startswith(t.uid + "/"):
        return True
    if t.replicas is not None and replica >= t.replicas:
        return True
    return lease_id not in named_by_pods.get((ns, name, replica), set())


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
    claim: str = ""  # the ResourceClaim holding its peer memory (allocation dra)

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
        if self.claim:
            out["claim"] = self.claim
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
