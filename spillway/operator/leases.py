"""A replica's leases at its node's agent (RESERVATION and ELASTIC): renew them, replace the ones
it lost on another lender of its node, release them, and sweep the ones no replica names.
What becomes of a replica that lost leases is decided in `reconcile.after_lost` (pure)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from spillway.api.v1 import agent_pb2
from spillway.contract import format_time
from spillway.operator import reconcile as rc
from spillway.operator.agents import AgentError, Agents, state_name
from spillway.operator.apiserver import ApiServer
from spillway.operator.cluster import ClusterView
from spillway.operator.context import TenantContext
from spillway.operator.model import Assignment, ReplicaKey, object_key
from spillway.operator.pods import LeaseRef, ObservedPod, elastic_patch, holder_name, reservation_patch
from spillway.units import format_bytes

log = logging.getLogger(__name__)


def describe(leases: Sequence[LeaseRef]) -> str:
    return ", ".join(f"{x.id} ({format_bytes(x.bytes)} on {x.gpu_uuid})" for x in leases)


@dataclass
class ReplicaLeases:
    kube: ApiServer
    agents: Agents
    cluster: ClusterView
    assignments: dict[ReplicaKey, Assignment]  # shared with the placer: a replica re-placed is forgotten here
    # Whether a replica's reservation is a ResourceClaim (`claims.ReplicaClaims`, allocation dra)
    # rather than RESERVATION leases made here.
    dra: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.facts: dict[str, dict[str, Any]] = {}  # lease id -> state, expiresAt (last renew)

    async def load(self, namespace: str, tenant: str) -> None:
        """Read what the tenant's replicas hold outside the pods (their claims, allocation dra)."""

    def held_bytes(self, pod: ObservedPod) -> int:
        """The peer memory the replica holds now (reservation and ELASTIC)."""
        return pod.peer_bytes

    async def release_replica(self, pod: ObservedPod) -> int:
        """The replica's pod is gone or going: give back what it holds; returns how many leases
        (and claims) were given back."""
        await self.release_all(pod.node, pod.all_leases())
        return len(pod.all_leases())

    async def forget_tenant(self, namespace: str, tenant: str) -> int:
        """The tenant is deleted: give back what its replicas hold outside pods and leases (claims)."""
        return 0

    async def startup_sweep(self, namespaces: Sequence[str], tenants: Mapping[tuple[str, str], rc.TenantFacts]) -> int:
        """Before any reconcile: give back what no replica can want besides leases (claims)."""
        return 0

    def replica_status(self, pod: ObservedPod) -> rc.ReplicaStatus:
        leases = [
            {"id": x.id, "gpu": x.gpu_uuid, "bytes": x.bytes, "kind": x.kind or "RESERVATION",
             **self.facts.get(x.id, {"state": "RESERVED"})}
            for x in pod.all_leases()
        ]
        return rc.ReplicaStatus(
            replica=pod.replica, pod=pod.name, node=pod.node, gpu=pod.gpu_uuid, leases=leases,
            host_fallback=pod.fallback, ready=pod.ready and pod.phase == "Running",
            reason="no peer memory could be reserved; spilling to host memory" if pod.fallback else "",
        )

    async def release_all(self, node: str, leases: Sequence[LeaseRef]) -> None:
        if not leases:
            return
        try:
            endpoint = self.cluster.endpoint(node)
        except AgentError:
            return  # the node is gone; its agent (if it comes back) expires the leases by TTL
        for lease in leases:
            try:
                await self.agents.release(endpoint, lease)
            except AgentError as exc:
                log.warning("release failed", extra={"lease": lease.id, "error": str(exc)})

    async def patch_elastic(self, ns: str, pod: str, leases: Sequence[LeaseRef]) -> None:
        await self.kube.patch_pod(ns, pod, elastic_patch(leases))

    async def renew(self, ctx: TenantContext, pod: ObservedPod) -> ObservedPod:
        """Renew the replica's leases; move or drop the ones it lost."""
        if not pod.all_leases():
            return pod
        try:
            endpoint = self.cluster.endpoint(pod.node)
        except AgentError:
            return pod
        lost: list[LeaseRef] = []
        whys: list[str] = []
        for lease in pod.all_leases():
            try:
                renewed, why = await self.agents.renew(endpoint, lease)
            except AgentError as exc:
                log.warning("renew failed", extra={"lease": lease.id, "error": str(exc)})
                continue
            if renewed is None:
                lost.append(lease)
                whys.append(why)
                self.facts.pop(lease.id, None)
                ctx.warning("LeaseRevoking" if "REVOKING" in why else "LeaseLost",
                            f"replica {pod.replica}: lease {lease.id} ({format_bytes(lease.bytes)} on "
                            f"{lease.gpu_uuid}) cannot be renewed: {why}")
            else:
                self.facts[lease.id] = {"state": state_name(renewed.state),
                                        "expiresAt": format_time(renewed.expires_at_ms / 1000)}
        if not lost:
            return pod
        return await self.replace_lost(ctx, pod, lost, "; ".join(whys))

    async def replace_lost(
        self, ctx: TenantContext, pod: ObservedPod, lost: Sequence[LeaseRef], why: str
    ) -> ObservedPod:
        """A replica lost leases (revoked, expired): reserve the same bytes on another lender GPU of
        its node; else fall back to host memory (fallback HostMemory) or re-place the replica."""
        spec = ctx.spec
        ns = spec.namespace
        endpoint = self.cluster.endpoint(pod.node)
        lost_ids = {x.id for x in lost}
        keep_res = [x for x in pod.leases if x.id not in lost_ids]
        keep_el = [x for x in pod.elastic if x.id not in lost_ids]
        need = sum(x.bytes for x in pod.leases if x.id in lost_ids)
        new: list[LeaseRef] = []
        if need > 0:
            view = self.cluster.pools.get(pod.node)
            lender = rc.choose_lender(view, pod.gpu_uuid, need, [x.gpu_uuid for x in lost]) if view else None
            if lender is not None:
                try:
                    got = await self.agents.acquire(
                        endpoint, holder=holder_name(ns, spec.name, pod.replica), tenant_uid=spec.uid,
                        replica=pod.replica, gpu_uuid=lender, size=need, priority=spec.priority,
                        pod=object_key(ns, pod.name),
                    )
                    new.append(got)
                    self.cluster.debit(pod.node, lender, got.bytes)
                except AgentError as exc:
                    log.info("no replacement lease", extra={"error": str(exc)})
        for lease in lost:
            try:
                await self.agents.release(endpoint, lease)  # ends a REVOKING lease at once
            except AgentError as exc:
                log.warning("release of a lost lease failed", extra={"lease": lease.id, "error": str(exc)})
        lost_desc = describe(lost)
        outcome = rc.after_lost(need, bool(new), spec.fallback)
        if outcome is rc.AfterLost.REPLACE:
            await self.kube.delete_pod(ns, pod.name, uid=pod.uid)
            await self.release_all(pod.node, keep_res + keep_el)
            self.assignments.pop(ReplicaKey(ns, spec.name, pod.replica), None)
            ctx.warning("Replacing", f"replica {pod.replica} lost {lost_desc} ({why}) and no lender on {pod.node} "
                        f"has {format_bytes(need)}; fallback is None, so its pod {pod.name} is deleted to re-place it")
            return dataclasses.replace(pod, leases=(), elastic=(), phase="Failed")
        if outcome is rc.AfterLost.HOST_MEMORY:
            await self.kube.patch_pod(ns, pod.name, reservation_patch(pod.node, keep_res, fallback=True))
            await self.patch_elastic(ns, pod.name, keep_el)
            ctx.warning("FellBackToHostMemory", f"replica {pod.replica} lost {lost_desc} ({why}); no other lender "
                        f"on {pod.node} has {format_bytes(need)}, so it spills to host memory")
            return dataclasses.replace(pod, leases=tuple(keep_res), elastic=tuple(keep_el), fallback=True)
        leases = keep_res + new
        if not pod.claim:  # a pod whose claim holds its reservation carries no reservation annotations
            await self.kube.patch_pod(ns, pod.name, reservation_patch(pod.node, leases, fallback=pod.fallback))
        if len(keep_el) != len(pod.elastic):
            await self.patch_elastic(ns, pod.name, keep_el)
        if outcome is rc.AfterLost.MOVED:
            ctx.normal("PeerMemoryMoved", f"replica {pod.replica} lost {lost_desc} ({why}); reserved "
                       f"{describe(new)} instead")
        else:
            ctx.normal("ElasticReleased", f"replica {pod.replica} gave back {lost_desc} ({why})")
        return dataclasses.replace(pod, leases=tuple(leases), elastic=tuple(keep_el))

    async def sweep(self, prefix: str, orphan: Callable[[agent_pb2.Lease], bool]) -> int:
        """Release every live lease at every known agent whose holder starts with `prefix` and
        that `orphan` says no replica wants; returns how many were released."""
        n = 0
        for node, view in list(self.cluster.pools.items()):
            try:
                held = await self.agents.held(view.endpoint, prefix)
            except AgentError as exc:
                log.warning("cannot list leases", extra={"node": node, "error": str(exc)})
                continue
            for lease in held:
                if orphan(lease):
                    try:
                        if await self.agents.release_listed(view.endpoint, lease):
                            n += 1
                    except AgentError as exc:
                        log.warning("cannot release orphan", extra={"lease": lease.id, "error": str(exc)})
        return n
