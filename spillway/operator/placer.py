"""Placement and creation: plan the replicas that have no pod (`placement.plan`, pure), reserve
their RESERVATION leases at the chosen node's agent, then create their pods. The book of
assignments (every replica's node, GPU and lenders) lives here; what a failed reservation
means for the replica is decided in `reconcile.on_reserve_error` (pure).

Order of work for a replica: reserve first (idempotent Acquire), then create the pod
(deterministic name). A crash between the two leaves a lease that no pod names; the startup
sweep releases it. A crash after creating the pod leaves nothing to undo.

With allocation dra the reservation is the replica's ResourceClaim (`claims.ReplicaClaims`):
made first (deterministic name; an existing one that fits is taken), then the pod that lists
it. A crash in between leaves a claim that the replica's next placement finds again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from spillway.contract import FALLBACK_HOST_MEMORY
from spillway.operator import reconcile as rc
from spillway.operator.agents import AgentError, Agents
from spillway.operator.apiserver import ApiServer, KubeError
from spillway.operator.claims import ClaimError, ReplicaClaims
from spillway.operator.cluster import ClusterView
from spillway.operator.context import TenantContext
from spillway.operator.leases import ReplicaLeases
from spillway.operator.local import LocalReservations
from spillway.operator.metrics import OperatorMetrics
from spillway.operator.model import Assignment, NodeView, ReplicaKey, object_key
from spillway.operator.placement import plan as plan_placement
from spillway.operator.pods import LeaseRef, ObservedPod, PodPlan, build_pod, holder_name, observe_pod, pod_name
from spillway.units import format_bytes


@dataclass
class Placer:
    kube: ApiServer
    agents: Agents
    cluster: ClusterView
    leases: ReplicaLeases
    local: LocalReservations
    metrics: OperatorMetrics
    assignments: dict[ReplicaKey, Assignment]

    def __post_init__(self) -> None:
        self._lock = asyncio.Lock()
        self._last_pending: dict[str, dict[int, str]] = {}  # tenant key -> replica -> the last Unplaced said

    def forget(self, namespace: str, name: str) -> None:
        """The tenant is gone: drop its assignments and what was said about it."""
        for k in [k for k in self.assignments if k.namespace == namespace and k.name == name]:
            del self.assignments[k]
        self._last_pending.pop(object_key(namespace, name), None)

    async def place(
        self, ctx: TenantContext, replicas: Sequence[int], pending: dict[int, str],
        placeable: Callable[[], Mapping[str, NodeView]],
    ) -> list[ObservedPod]:
        """Place `replicas` on the pools `placeable()` returns (read under the placement lock, so
        no two plans see the same free memory); returns the pods created (or found). A replica
        that cannot be placed gets its reason in `pending`."""
        spec = ctx.spec
        created: list[ObservedPod] = []
        async with self._lock:
            current = dict(self.assignments)
            plan = plan_placement(list(placeable().values()), [spec], current)
            for r in replicas:
                key = ReplicaKey(spec.namespace, spec.name, r)
                a = plan.assignments.get(key)
                if a is None:
                    pending[r] = plan.pending.get(key) or "no node has a free GPU for it"
                    continue
                # Book it before any await so a concurrent reconcile of another tenant sees it.
                self.assignments[key] = a
                for gpu, nbytes in a.lenders:
                    self.cluster.debit(a.node, gpu, nbytes)
        said = self._last_pending.setdefault(ctx.key, {})
        for r in replicas:
            a = plan.assignments.get(ReplicaKey(spec.namespace, spec.name, r))
            if a is None:
                self.metrics.placements.labels(outcome="pending").inc()
                if r in pending and said.get(r) != pending[r]:
                    ctx.warning("Unplaced", f"replica {r}: {pending[r]}")
                    said[r] = pending[r]
                continue
            said.pop(r, None)
            pod = await self.reserve_and_create(ctx, a, pending)
            if pod is not None:
                created.append(pod)
        return created

    async def _reserve(self, ctx: TenantContext, a: Assignment) -> list[LeaseRef]:
        """The assignment's RESERVATION leases, one per lender; all or none (AgentError)."""
        spec, r = ctx.spec, a.key.replica
        leases: list[LeaseRef] = []
        pod = object_key(spec.namespace, pod_name(spec.name, r))
        try:
            endpoint = self.cluster.endpoint(a.node)
            for gpu, nbytes in a.lenders:
                leases.append(await self.agents.acquire(
                    endpoint, holder=holder_name(spec.namespace, spec.name, r), tenant_uid=spec.uid, replica=r,
                    gpu_uuid=gpu, size=nbytes, priority=spec.priority, pod=pod,
                ))
        except AgentError:
            await self.leases.release_all(a.node, leases)
            raise
        return leases

    async def reserve_and_create(
        self, ctx: TenantContext, a: Assignment, pending: dict[int, str]
    ) -> ObservedPod | None:
        spec, r = ctx.spec, a.key.replica
        name = pod_name(spec.name, r)
        leases: list[LeaseRef] = []
        fallback = a.host_fallback
        reason = ""
        claim = ""
        try:
            if isinstance(self.leases, ReplicaClaims):
                claim = await self.leases.ensure_claim(ctx, a) if a.lenders else ""
            else:
                leases = await self._reserve(ctx, a)
        except ClaimError as exc:
            self.assignments.pop(a.key, None)
            self.metrics.placements.labels(outcome="pending").inc()
            pending[r] = str(exc)
            ctx.warning("ClaimFailed", f"replica {r}: {exc}")
            return None
        except AgentError as exc:
            reason = str(exc)
            policy = rc.on_reserve_error(exc.code, spec.fallback)
            if policy is not rc.OnReserveError.HOST_MEMORY:
                self.assignments.pop(a.key, None)
                self.metrics.placements.labels(outcome="pending").inc()
                if policy is rc.OnReserveError.RETRY:
                    pending[r] = f"cannot reserve at the agent of {a.node}: {reason}"
                    ctx.warning("ReservationFailed", f"replica {r}: {pending[r]}")
                else:
                    pending[r] = f"peer memory could not be reserved: {reason}"
                    ctx.warning("ReservationFailed", f"replica {r} on {a.node}: {reason}; stays Pending")
                return None
            fallback = True
        pod = build_pod(PodPlan(
            tenant=ctx.ref, replica=r, node=a.node, gpu_uuid=a.gpu_uuid, leases=tuple(leases),
            fallback=FALLBACK_HOST_MEMORY if fallback and spec.peer_request > 0 else "",
            local_bytes=self.local.bytes_for(spec, a.node, a.gpu_uuid), claim=claim,
            model={"image": spec.image, "args": list(spec.args), "env": [dict(e) for e in spec.env],
                   "port": spec.port, "resources": dict(spec.resources)},
        ))
        try:
            created = await self.kube.create_pod(pod)
        except KubeError as exc:
            if exc.status == 409:
                # The pod exists already (a concurrent or earlier reconcile): it is the record; ours goes.
                existing = await self.kube.get_pod(spec.namespace, name)
                other = observe_pod(existing) if existing else None
                theirs = {x.id for x in other.all_leases()} if other else set()
                await self.leases.release_all(a.node, [x for x in leases if x.id not in theirs])
                return other
            await self.leases.release_all(a.node, leases)
            self.assignments.pop(a.key, None)
            raise
        self.assignments[a.key] = (dataclasses.replace(a, claim_lenders=a.lenders) if claim else
                                   dataclasses.replace(a, lenders=tuple((x.gpu_uuid, x.bytes) for x in leases),
                                                       host_fallback=fallback))
        if fallback and spec.peer_request > 0:
            self.metrics.placements.labels(outcome="fallback").inc()
            ctx.warning("FellBackToHostMemory", f"replica {r} placed on {a.node} GPU {a.gpu_uuid} without peer "
                        "memory" + (f" ({reason})" if reason else " (no lender had room)")
                        + "; it spills to host memory")
        else:
            self.metrics.placements.labels(outcome="placed").inc()
            lent = ", ".join(f"{x.id}: {format_bytes(x.bytes)} on {x.gpu_uuid}" for x in leases)
            if claim:
                lent = f"ResourceClaim {claim} for {format_bytes(a.peer_bytes)} of peer memory"
            ctx.normal("Placed", f"replica {r} on {a.node} GPU {a.gpu_uuid}" + (f"; reserved {lent}" if lent else "")
                       + f"; created pod {name}")
        return observe_pod(created)
