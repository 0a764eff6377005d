"""The operator's coordinator. The kopf handlers (`handlers.py`) call only into `Engine`, which
holds one collaborator per concern and decides nothing itself (the decisions are the pure
functions of `reconcile`, `placement`, `slo` and `pods`):

- `cluster` (`cluster.py`): the nodes and their MemoryPools, verdicts, the Node watch;
- `local` (`local.py`): the local reservations (what a model's own GPU keeps for it);
- `leases` (`leases.py`): a replica's leases: renew, replace the lost, release, sweep; with
  `--allocation dra` a `claims.ReplicaClaims`, whose replicas hold a ResourceClaim instead of
  RESERVATION leases;
- `placer` (`placer.py`): placement, reservation and pod creation, the book of assignments;
- `growth` (`growth.py`): SLO evaluation and ELASTIC growth and shrink.

A reconcile reads the tenant's pods, asks `reconcile.decide` what to keep, remove and place,
and hands each part to its collaborator with a `TenantContext` (the tenant, its spec, Events).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spillway.api.v1 import agent_pb2
from spillway.contract import (
    ALLOCATION_DEVICEPLUGIN,
    ALLOCATION_DRA,
    GROUP,
    HOLDER_PREFIX,
    LABEL_TENANT,
    POOL_PLURAL,
    TENANT_PLURAL,
    VERSION,
    now_rfc3339,
    parse_holder,
)
from spillway.operator import reconcile as rc
from spillway.operator import slo as slomod
from spillway.operator.agents import Agents, state_name
from spillway.operator.apiserver import ApiServer, KubeError
from spillway.operator.claims import ReplicaClaims
from spillway.operator.cluster import ClusterView
from spillway.operator.context import EventFn, TenantContext, no_events
from spillway.operator.growth import SloGrowth
from spillway.operator.leases import ReplicaLeases
from spillway.operator.local import LocalReservations
from spillway.operator.metrics import OperatorMetrics
from spillway.operator.model import Assignment, NodeView, ReplicaKey, TenantSpec, key_of, object_key
from spillway.operator.placer import Placer
from spillway.operator.pods import ObservedPod, observe_pod, pod_name, selector
from spillway.units import format_bytes

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    namespaces: Sequence[str] = ()
    lease_ttl_s: float = 120.0
    prometheus_url: str = ""
    slo_selector: str = slomod.DEFAULT_SELECTOR
    slo_step_bytes: int = slomod.GIB
    pool_stale_s: float = 60.0  # a MemoryPool whose heartbeat is older counts as a lost node (0: never)
    allocation: str = ALLOCATION_DEVICEPLUGIN  # or ALLOCATION_DRA (decided at start-up: claims.choose_allocation)


@dataclass
class Engine:
    kube: ApiServer
    agents: Agents
    metrics: OperatorMetrics
    config: EngineConfig = field(default_factory=EngineConfig)
    event: EventFn = no_events
    prometheus: slomod.PrometheusClient | None = None

    def __post_init__(self) -> None:
        if self.config.prometheus_url and self.prometheus is None:
            self.prometheus = slomod.PrometheusClient(self.config.prometheus_url)
        self.phases: dict[str, str] = {}  # tenant key -> phase
        self.assignments: dict[ReplicaKey, Assignment] = {}
        self.cluster = ClusterView(self.kube, self.config.pool_stale_s, self.event)
        self.local = LocalReservations(self.kube, self.agents, self.cluster)
        holder = ReplicaClaims if self.config.allocation == ALLOCATION_DRA else ReplicaLeases
        self.leases = holder(self.kube, self.agents, self.cluster, self.assignments)
        self.placer = Placer(self.kube, self.agents, self.cluster, self.leases, self.local, self.metrics,
                             self.assignments)
        self.growth = SloGrowth(self.agents, self.cluster, self.leases, self.metrics, self.phases, self.prometheus,
                                self.config.slo_selector, self.config.slo_step_bytes)
        self.synced = False
        self._locks: dict[str, asyncio.Lock] = {}
        self._last_phase: dict[str, str] = {}  # tenant key -> the phase last announced

    @property
    def pools(self) -> dict[str, NodeView]:
        return self.cluster.pools

    def ready(self) -> str:
        return "" if self.synced else "initial sync (startup sweep) not finished"

    def _lock(self, key: str) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # -- inputs kept current by the watches ------------------------------------------------

    def pool_changed(self, body: Mapping[str, Any]) -> None:
        if self.cluster.pool_changed(body) is not None:
            self.local.pool_changed(body)

    def pool_deleted(self, name: str) -> None:
        self.cluster.pool_deleted(name)

    def pod_changed(self, body: Mapping[str, Any], deleted: bool = False) -> str | None:
        """Keep assignments and local reservations current; returns the node whose local
        reservations changed (to sync), else None."""
        meta = body.get("metadata") or {}
        tenant = (meta.get("labels") or {}).get(LABEL_TENANT)
        p = observe_pod(body)
        if not tenant or p is None:
            return None
        key = ReplicaKey(str(meta.get("namespace")), str(tenant), p.replica)
        if deleted:
            current = self.assignments.get(key)
            if current is not None and current.node == p.node:
                del self.assignments[key]
        else:
            self.assignments[key] = rc.assignment_of(key.namespace, key.name, p, self.assignments.get(key))
        return self.local.note(key, p, deleted)

    # -- the pools as a reconcile sees them (an Event on each MemoryPool whose verdict changed) --

    def live_and_lost(self) -> tuple[dict[str, NodeView], dict[str, str]]:
        """The pools whose node is not lost (their replicas keep running), and why the others are."""
        verdicts = self.cluster.verdicts()
        self.cluster.announce(verdicts)
        lost = {n: v[0] for n, v in verdicts.items() if v[0]}
        return {n: v for n, v in self.cluster.pools.items() if n not in lost}, lost

    def live_pools(self) -> dict[str, NodeView]:
        return self.live_and_lost()[0]

    def lost_reasons(self) -> dict[str, str]:
        return self.live_and_lost()[1]

    def placeable_pools(self) -> dict[str, NodeView]:
        """The live pools that may take new replicas (node Ready and not cordoned)."""
        verdicts = self.cluster.verdicts()
        self.cluster.announce(verdicts)
        return {n: v for n, v in self.cluster.pools.items() if n not in verdicts}

    # -- the reconcile -----------------------------------------------------------------------

    async def reconcile(self, body: Mapping[str, Any], *, renew: bool = True, slo: bool = False) -> str:
        """Bring one tenant to its spec; returns its phase."""
        meta = body.get("metadata") or {}
        key = key_of(body)
        t0 = time.monotonic()
        try:
            async with self._lock(key):
                if meta.get("deletionTimestamp"):
                    return "Terminating"
                phase = await self._reconcile(body, renew=renew, slo=slo)
        except Exception:
            self.metrics.reconciles.labels(result="error").inc()
            raise
        finally:
            self.metrics.reconcile_duration.observe(time.monotonic() - t0)
        self.metrics.reconciles.labels(result="ok").inc()
        self.phases[key] = phase
        self.metrics.set_phases(self.phases)
        return phase

    async def _invalid(self, body: Mapping[str, Any], error: ValueError) -> str:
        meta = body.get("metadata") or {}
        old_status = body.get("status") or {}
        status = rc.failed_status(str(error), old_status, now_rfc3339(), int(meta.get("generation") or 0))
        await self._write_status(str(meta.get("namespace")), str(meta.get("name")), status)
        if old_status.get("phase") != rc.PHASE_FAILED:
            self.event(body, "Warning", "InvalidSpec", str(error))
        return rc.PHASE_FAILED

    async def _reconcile(self, body: Mapping[str, Any], *, renew: bool, slo: bool) -> str:
        try:
            ctx = TenantContext(body, TenantSpec.from_resource(body), self.event)
        except ValueError as exc:
            return await self._invalid(body, exc)
        spec = ctx.spec
        ns, name = spec.namespace, spec.name
        observed = [p for p in (observe_pod(x) for x in await self.kube.list_pods(ns, selector(name))) if p]
        await self.leases.load(ns, name)
        for p in observed:
            if p.terminating and self.cluster.node_gone(p.node):
                # Deleted before its Node went (or by someone else): only the pod GC would end it.
                await self.kube.delete_pod(ns, p.name, uid=p.uid, grace_s=0)
        decision = rc.decide(spec, observed, *self.live_and_lost())
        touched: set[str] = set()  # nodes whose local reservations may have changed

        for pod, reason, message in decision.remove:
            await self._remove_pod(ctx, pod, reason, message)

        replicas: dict[int, rc.ReplicaStatus] = {}
        pending: dict[int, str] = dict.fromkeys(decision.waiting, "waiting for the previous pod to terminate")
        kept: dict[int, ObservedPod] = {}
        for pod in decision.keep:
            pod = await self.local.follow_spec(spec, pod)
            pod = await self.leases.renew(ctx, pod) if renew else pod
            if self.local.note(ReplicaKey(ns, name, pod.replica), pod):
                touched.add(pod.node)
            if pod.phase != "Failed":
                kept[pod.replica] = pod
            replicas[pod.replica] = self.leases.replica_status(pod)

        if decision.place:
            for pod in await self.placer.place(ctx, decision.place, pending, self.placeable_pools):
                self.local.note(ReplicaKey(ns, name, pod.replica), pod)
                touched.add(pod.node)
                replicas[pod.replica] = self.leases.replica_status(pod)

        if slo:
            for pod in await self.growth.evaluate(ctx, list(kept.values())):
                replicas[pod.replica] = self.leases.replica_status(pod)
        for node in sorted(touched):
            try:
                await self.local.sync(node)
            except Exception as exc:  # the timer on the node's MemoryPool tries again
                log.warning("local reservation sync failed", extra={"node": node, "error": str(exc)[:300]})
        report = self.growth.of(ctx.key).report
        old_status = body.get("status") or {}
        status = rc.build_status(spec, list(replicas.values()), pending, old_status, now_rfc3339(),
                                 report.status if report else None, report.condition if report else None)
        await self._write_status(ns, name, status)
        phase = str(status["phase"])
        if phase != self._last_phase.get(ctx.key, "") and phase != old_status.get("phase"):
            (ctx.warning if phase in (rc.PHASE_DEGRADED, rc.PHASE_FAILED) else ctx.normal)(
                f"Phase{phase}", f"tenant is {phase}: " + _condition_message(status))
        self._last_phase[ctx.key] = phase
        self.metrics.peer_memory.labels(ns, name, "RESERVATION").set(
            sum(int(x["bytes"]) for r in replicas.values() for x in r.leases if x.get("kind") == "RESERVATION"))
        return phase

    async def _write_status(self, ns: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            await self.kube.patch_custom(GROUP, VERSION, TENANT_PLURAL, name, {"status": status}, ns,
                                         subresource="status")
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def _remove_pod(self, ctx: TenantContext, pod: ObservedPod, reason: str, message: str) -> None:
        """Delete the pod first, then release its leases (a crash in between leaves leases no pod
        names: the sweep's job). A pod whose Node object is gone is deleted at once (grace 0): no
        kubelet will ever confirm it, and its replica's new pod has the same name."""
        ns = ctx.spec.namespace
        await self.kube.delete_pod(ns, pod.name, uid=pod.uid, grace_s=0 if self.cluster.node_gone(pod.node) else None)
        released = await self.leases.release_replica(pod)
        self.assignments.pop(ReplicaKey(ns, ctx.spec.name, pod.replica), None)
        (ctx.normal if reason == "ScaledDown" else ctx.warning)(
            reason, f"{message}; pod {pod.name} deleted, {released} lease(s)"
            + (" and claim(s)" if pod.claim else "") + " released")

    # -- delete (finalizer) ----------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any]) -> None:
        """The tenant is being deleted: delete its pods, release every lease it holds anywhere."""
        meta = body.get("metadata") or {}
        ns, name, uid = str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid") or "")
        key = object_key(ns, name)
        async with self._lock(key):
            released = 0
            for p in (observe_pod(x) for x in await self.kube.list_pods(ns, selector(name))):
                if p is None:
                    continue
                await self.kube.delete_pod(ns, p.name, uid=p.uid)
                released += await self.leases.release_replica(p)
            released += await self.leases.sweep(f"{HOLDER_PREFIX}{ns}/{name}/", lambda lease: True)
            released += await self.leases.forget_tenant(ns, name)
            self.placer.forget(ns, name)
            self.phases.pop(key, None)
            self.growth.forget(key)
            self._last_phase.pop(key, None)
            self.metrics.set_phases(self.phases)
            self.metrics.forget_tenant(ns, name)
            what = "lease(s) and claim(s)" if self.leases.dra else "lease(s)"
            self.event(body, "Normal", "Released", f"tenant deleted (uid {uid}): pods deleted, {released} {what} "
                       "released")

    # -- startup ---------------------------------------------------------------------------

    async def startup_sync(self) -> int:
        """Load pools and pods, then release the leases no replica wants (`reconcile.is_orphan`).
        Runs before any reconcile. Returns the number released."""
        for pool in await self.kube.list_custom(GROUP, VERSION, POOL_PLURAL):
            self.pool_changed(pool)
        await self.cluster.list_nodes()
        tenants: dict[tuple[str, str], rc.TenantFacts] = {}
        named_by_pods: dict[tuple[str, str, int], set[str]] = {}
        for ns in self.config.namespaces or [""]:
            for t in await self.kube.list_custom(GROUP, VERSION, TENANT_PLURAL, ns):
                m = t.get("metadata") or {}
                replicas = (t.get("spec") or {}).get("replicas", 1)
                tenants[(str(m.get("namespace")), str(m.get("name")))] = rc.TenantFacts(
                    str(m.get("uid") or ""), replicas if isinstance(replicas, int) else None)
            for raw in await self.kube.list_pods(ns, LABEL_TENANT):
                self.pod_changed(raw)
                p = observe_pod(raw)
                if p is None:
                    continue
                meta = raw.get("metadata") or {}
                key = (str(meta.get("namespace")), str((meta.get("labels") or {}).get(LABEL_TENANT)), p.replica)
                named_by_pods.setdefault(key, set()).update(x.id for x in p.all_leases())

        # A lease younger than half its TTL may be another operator's reservation whose pod is
        # being created right now (a second replica starting beside the active one under kopf
        # peering): leave it. Nobody renews a real orphan, so the agent expires it by TTL anyway.
        young_ms = self.config.lease_ttl_s * 500
        now_ms = time.time() * 1000

        def orphan(lease: agent_pb2.Lease) -> bool:
            return rc.is_orphan(
                parse_holder(lease.holder), lease.idempotency_key, lease.id,
                now_ms - lease.created_at_ms if lease.created_at_ms else None,
                young_ms=young_ms, namespaces=self.config.namespaces, tenants=tenants, named_by_pods=named_by_pods,
            )

        released = await self.leases.sweep(HOLDER_PREFIX, orphan)
        if released:
            log.info("startup sweep released orphaned leases", extra={"released": released})
        released += await self.leases.startup_sweep(self.config.namespaces, tenants)
        self.synced = True
        return released

    # -- agent events ----------------------------------------------------------------------

    async def on_lease_event(self, lease: agent_pb2.Lease) -> None:
        """A lease changed state at an agent; act on REVOKING (and on ends we did not cause)."""
        if lease.state not in (agent_pb2.REVOKING, agent_pb2.REVOKED, agent_pb2.EXPIRED):
            return
        parsed = parse_holder(lease.holder)
        if parsed is None:
            return
        ns, name, replica = parsed
        body = await self.kube.get_custom(GROUP, VERSION, TENANT_PLURAL, name, ns)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        async with self._lock(object_key(ns, name)):
            raw = await self.kube.get_pod(ns, pod_name(name, replica))
            pod = observe_pod(raw) if raw else None
            if pod is None or lease.id not in {x.id for x in pod.all_leases()}:
                return
            try:
                ctx = TenantContext(body, TenantSpec.from_resource(body), self.event)
            except ValueError:
                return
            lost = [x for x in pod.all_leases() if x.id == lease.id]
            why = f"{state_name(lease.state)} at the agent: {lease.reason or 'reclaimed by the lender'}"
            ctx.warning("LeaseRevoking" if lease.state == agent_pb2.REVOKING else "LeaseLost",
                        f"replica {replica}: lease {lease.id} ({format_bytes(int(lease.bytes))} on {lease.gpu_uuid}) "
                        f"is {why}")
            await self.leases.replace_lost(ctx, pod, lost, why)
        await self.reconcile(body, renew=False)

    async def close(self) -> None:
        await self.kube.close()
        await self.agents.pool.close()
        if self.prometheus is not None:
            await self.prometheus.close()


def _condition_message(status: Mapping[str, Any]) -> str:
    for c in status.get("conditions") or []:
        if c.get("status") != "True" and c.get("type") in ("Placed", "PeerMemoryReserved"):
            return str(c.get("message") or "")
    return f"{status.get('readyReplicas', 0)} of {status.get('replicas', 0)} replicas ready"
