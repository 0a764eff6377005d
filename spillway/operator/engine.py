"""The reconcile loop's I/O: read the tenant's pods and the pools, apply the pure decisions of
`reconcile` and `placement`, reserve at the agents, create and delete pods, write status, post
events. The kopf handlers (`handlers.py`) only call into this object.

Order of work for a replica: reserve first (idempotent Acquire), then create the pod
(deterministic name). A crash between the two leaves a lease that no pod names; the startup
sweep releases it. A crash after creating the pod leaves nothing to undo.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import importlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from spillway.api.v1 import agent_pb2
from spillway.operator import reconcile as rc
from spillway.operator import slo as slomod
from spillway.operator.kube import KubeClient, KubeError
from spillway.operator.metrics import OperatorMetrics
from spillway.operator.model import (
    API_GROUP,
    API_VERSION,
    TENANT_PLURAL,
    Assignment,
    GpuView,
    NodeView,
    Plan,
    ReplicaKey,
    TenantSpec,
)
from spillway.operator.pods import (
    LeaseRef,
    PodPlan,
    TenantRef,
    build_pod,
    holder_name,
    parse_holder,
    pod_name,
)
from spillway.operator.reservations import ReservationError, Reservations, state_name
from spillway.units import format_bytes

log = logging.getLogger(__name__)

EventFn = Callable[[Mapping[str, Any], str, str, str], None]  # (body, type "Normal"/"Warning", reason, message)


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class EngineConfig:
    namespaces: Sequence[str] = ()
    lease_ttl_s: float = 120.0
    prometheus_url: str = ""
    slo_selector: str = slomod.DEFAULT_SELECTOR
    slo_step_bytes: int = slomod.GIB
    pool_stale_s: float = 60.0  # a MemoryPool whose heartbeat is older counts as a lost node (0: never)


@dataclass
class _TenantMemory:
    last_slo_eval: float = 0.0
    slo_status: dict[str, Any] | None = None
    slo_condition: tuple[str, str, str] | None = None
    slo_missed: bool = False
    last_phase: str = ""
    last_pending: dict[int, str] = field(default_factory=dict)


@dataclass
class Engine:
    kube: KubeClient
    reservations: Reservations
    metrics: OperatorMetrics
    config: EngineConfig = field(default_factory=EngineConfig)
    event: EventFn = lambda body, type_, reason, message: None
    prometheus: slomod.PrometheusClient | None = None

    def __post_init__(self) -> None:
        self.pools: dict[str, NodeView] = {}
        self.assignments: dict[ReplicaKey, Assignment] = {}
        self.phases: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._place_lock = asyncio.Lock()
        self._memory: dict[str, _TenantMemory] = {}
        self.synced = False
        self._lease_facts: dict[str, dict[str, Any]] = {}  # lease id -> state, expiresAt (last renew)
        if self.config.prometheus_url and self.prometheus is None:
            self.prometheus = slomod.PrometheusClient(self.config.prometheus_url)

    # -- inputs kept current by the watches ------------------------------------------------

    def pool_changed(self, body: Mapping[str, Any]) -> None:
        try:
            view = NodeView.from_memorypool(body)
        except ValueError as exc:
            log.warning("ignoring MemoryPool", extra={"error": str(exc)})
            return
        if view.gpus and view.endpoint:
            self.pools[view.name] = view

    def live_pools(self) -> dict[str, NodeView]:
        """The pools whose agent published recently: a node whose heartbeat stopped is lost."""
        limit = self.config.pool_stale_s
        if limit <= 0:
            return dict(self.pools)
        now = time.time()
        return {n: v for n, v in self.pools.items() if not v.heartbeat or now - v.heartbeat <= limit}

    def pool_deleted(self, name: str) -> None:
        self.pools.pop(name, None)

    def pod_changed(self, body: Mapping[str, Any], deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        tenant = (meta.get("labels") or {}).get(rc.LABEL_TENANT)
        p = rc.observe_pod(body)
        if not tenant or p is None:
            return
        key = ReplicaKey(str(meta.get("namespace")), str(tenant), p.replica)
        if deleted:
            current = self.assignments.get(key)
            if current is not None and current.node == p.node:
                del self.assignments[key]
        else:
            self.assignments[key] = rc.assignment_of(key.namespace, key.name, p)

    def ready(self) -> str:
        return "" if self.synced else "initial sync (startup sweep) not finished"

    def _planner(self) -> Callable[..., Plan]:
        """`spillway.operator.placement.plan(nodes, tenants, current) -> Plan` (pure; its own module)."""
        return importlib.import_module("spillway.operator.placement").plan

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _mem(self, key: str) -> _TenantMemory:
        return self._memory.setdefault(key, _TenantMemory())

    def _endpoint(self, node: str) -> str:
        view = self.pools.get(node)
        if view is None or not view.endpoint:
            raise ReservationError(f"node {node} has no MemoryPool with an agent endpoint", "UNAVAILABLE")
        return view.endpoint

    def _debit(self, node: str, gpu: str, nbytes: int) -> None:
        """Count a new lease against our copy of the pool until the agent publishes again."""
        view = self.pools.get(node)
        if view is None:
            return
        gpus = tuple(
            dataclasses.replace(g, lendable=max(0, g.lendable - nbytes), leased=g.leased + nbytes)
            if g.uuid == gpu else g
            for g in view.gpus
        )
        self.pools[node] = dataclasses.replace(view, gpus=gpus)

    # -- the reconcile -----------------------------------------------------------------------

    async def reconcile(self, body: Mapping[str, Any], *, renew: bool = True, slo: bool = False) -> str:
        """Bring one tenant to its spec; returns its phase."""
        meta = body.get("metadata") or {}
        key = f"{meta.get('namespace')}/{meta.get('name')}"
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

    async def _reconcile(self, body: Mapping[str, Any], *, renew: bool, slo: bool) -> str:
        meta = body.get("metadata") or {}
        ns, name = str(meta.get("namespace")), str(meta.get("name"))
        old_status = body.get("status") or {}
        try:
            spec = TenantSpec.from_resource(body)
        except ValueError as exc:
            status = rc.failed_status(str(exc), old_status, now_rfc3339(), int(meta.get("generation") or 0))
            await self._write_status(ns, name, status)
            if old_status.get("phase") != rc.PHASE_FAILED:
                self.event(body, "Warning", "InvalidSpec", str(exc))
            return rc.PHASE_FAILED
        tenant = TenantRef(name, ns, spec.uid)
        raw_pods = await self.kube.list_pods(ns, rc.selector(name))
        observed = [p for p in (rc.observe_pod(x) for x in raw_pods) if p is not None]
        decision = rc.decide(spec, observed, self.live_pools())

        for pod, reason, message in decision.remove:
            await self._remove_pod(body, tenant, pod, reason, message)

        replicas: dict[int, rc.ReplicaStatus] = {}
        pending: dict[int, str] = {}
        for pod in decision.keep:
            pod = await self._check_leases(body, spec, pod) if renew else pod
            replicas[pod.replica] = await self._replica_status(pod, renew=False)
        for r in decision.waiting:
            pending[r] = "waiting for the previous pod to terminate"

        if decision.place:
            placed = await self._place(body, spec, tenant, decision.place, pending)
            for pod in placed:
                replicas[pod.replica] = await self._replica_status(pod, renew=False)

        mem = self._mem(f"{ns}/{name}")
        if slo:
            await self._slo_feedback(body, spec, tenant, [p for p in decision.keep if p.replica in replicas])
        status = rc.build_status(
            spec, list(replicas.values()), pending, old_status, now_rfc3339(), mem.slo_status, mem.slo_condition
        )
        await self._write_status(ns, name, status)
        phase = str(status["phase"])
        if phase != mem.last_phase and phase != old_status.get("phase"):
            self.event(body, "Warning" if phase in (rc.PHASE_DEGRADED, rc.PHASE_FAILED) else "Normal",
                       f"Phase{phase}", f"tenant is {phase}: " + _condition_message(status, phase))
        mem.last_phase = phase
        self.metrics.peer_memory.labels(ns, name, "RESERVATION").set(
            sum(x.bytes for p in decision.keep for x in p.leases))
        return phase

    async def _write_status(self, ns: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            await self.kube.patch_custom_status(API_GROUP, API_VERSION, TENANT_PLURAL, name, {"status": status}, ns)
        except KubeError as exc:
            if exc.status != 404:
                raise

    async def _replica_status(self, pod: rc.ObservedPod, renew: bool) -> rc.ReplicaStatus:
        leases = [
            {"id": x.id, "gpu": x.gpu_uuid, "bytes": x.bytes, "kind": x.kind or "RESERVATION",
             **self._lease_facts.get(x.id, {"state": "RESERVED"})}
            for x in pod.all_leases()
        ]
        return rc.ReplicaStatus(
            replica=pod.replica, pod=pod.name, node=pod.node, gpu=pod.gpu_uuid, leases=leases,
            host_fallback=pod.fallback, ready=pod.ready and pod.phase == "Running",
            reason="no peer memory could be reserved; spilling to host memory" if pod.fallback else "",
        )

    async def _release_all(self, node: str, leases: Sequence[LeaseRef]) -> None:
        if not leases:
            return
        try:
            endpoint = self._endpoint(node)
        except ReservationError:
            return  # the node is gone; its agent (if it comes back) expires the leases by TTL
        for lease in leases:
            try:
                await self.reservations.release(endpoint, lease)
            except ReservationError as exc:
                log.warning("release failed", extra={"lease": lease.id, "error": str(exc)})

    async def _remove_pod(
        self, body: Mapping[str, Any], tenant: TenantRef, pod: rc.ObservedPod, reason: str, message: str
    ) -> None:
        """Delete the pod first, then release its leases (a crash in between leaves leases no pod
        names: the sweep's job)."""
        await self.kube.delete_pod(tenant.namespace, pod.name, uid=pod.uid)
        await self._release_all(pod.node, pod.all_leases())
        self.assignments.pop(ReplicaKey(tenant.namespace, tenant.name, pod.replica), None)
        self.event(body, "Normal" if reason == "ScaledDown" else "Warning", reason,
                   f"{message}; pod {pod.name} deleted, {len(pod.all_leases())} lease(s) released")

    async def _check_leases(self, body: Mapping[str, Any], spec: TenantSpec, pod: rc.ObservedPod) -> rc.ObservedPod:
        """Renew the replica's leases; move or drop the ones it lost."""
        if not pod.all_leases():
            return pod
        try:
            endpoint = self._endpoint(pod.node)
        except ReservationError:
            return pod
        lost: list[LeaseRef] = []
        whys: list[str] = []
        for lease in pod.all_leases():
            try:
                renewed, why = await self.reservations.renew(endpoint, lease)
            except ReservationError as exc:
                log.warning("renew failed", extra={"lease": lease.id, "error": str(exc)})
                continue
            if renewed is None:
                lost.append(lease)
                whys.append(why)
                self._lease_facts.pop(lease.id, None)
                self.event(body, "Warning", "LeaseRevoking" if "REVOKING" in why else "LeaseLost",
                           f"replica {pod.replica}: lease {lease.id} ({format_bytes(lease.bytes)} on "
                           f"{lease.gpu_uuid}) cannot be renewed: {why}")
            else:
                self._lease_facts[lease.id] = {
                    "state": state_name(renewed.state),
                    "expiresAt": dt.datetime.fromtimestamp(renewed.expires_at_ms / 1000, dt.UTC).strftime(
                        "%Y-%m-%dT%H:%M:%SZ"),
                }
        if not lost:
            return pod
        return await self.replace_lost(body, spec, pod, lost, "; ".join(whys))

    async def replace_lost(
        self, body: Mapping[str, Any], spec: TenantSpec, pod: rc.ObservedPod, lost: Sequence[LeaseRef], why: str
    ) -> rc.ObservedPod:
        """A replica lost leases (revoked, expired): reserve the same bytes on another lender GPU of
        its node; else fall back to host memory (fallback HostMemory) or re-place the replica."""
        ns = spec.namespace
        endpoint = self._endpoint(pod.node)
        lost_ids = {x.id for x in lost}
        keep_res = [x for x in pod.leases if x.id not in lost_ids]
        keep_el = [x for x in pod.elastic if x.id not in lost_ids]
        lost_res = [x for x in pod.leases if x.id in lost_ids]
        need = sum(x.bytes for x in lost_res)
        new: list[LeaseRef] = []
        holder = holder_name(ns, spec.name, pod.replica)
        if need > 0:
            view = self.pools.get(pod.node)
            exclude = [x.gpu_uuid for x in lost]
            lender = rc.choose_lender(view, pod.gpu_uuid, need, exclude) if view else None
            if lender is not None:
                try:
                    got = await self.reservations.reserve(
                        endpoint, holder=holder, tenant_uid=spec.uid, replica=pod.replica, gpu_uuid=lender,
                        size=need, priority=spec.priority, pod=f"{ns}/{pod.name}",
                    )
                    new.append(got)
                    self._debit(pod.node, lender, got.bytes)
                except ReservationError as exc:
                    log.info("no replacement lease", extra={"error": str(exc)})
        for lease in lost:
            try:
                await self.reservations.release(endpoint, lease)  # ends a REVOKING lease at once
            except ReservationError as exc:
                log.warning("release of a lost lease failed", extra={"lease": lease.id, "error": str(exc)})
        lost_desc = ", ".join(f"{x.id} ({format_bytes(x.bytes)} on {x.gpu_uuid})" for x in lost)
        if need > 0 and not new:
            if spec.fallback == "None":
                await self.kube.delete_pod(ns, pod.name, uid=pod.uid)
                await self._release_all(pod.node, keep_res + keep_el)
                self.assignments.pop(ReplicaKey(ns, spec.name, pod.replica), None)
                self.event(body, "Warning", "Replacing",
                           f"replica {pod.replica} lost {lost_desc} ({why}) and no lender on {pod.node} has "
                           f"{format_bytes(need)}; fallback is None, so its pod {pod.name} is deleted to re-place it")
                return dataclasses.replace(pod, leases=(), elastic=(), phase="Failed")
            await self.kube.patch_pod(ns, pod.name, {
                **rc.reservation_patch(pod.node, keep_res, fallback=True),
            })
            await self._patch_elastic(ns, pod.name, keep_el)
            self.event(body, "Warning", "FellBackToHostMemory",
                       f"replica {pod.replica} lost {lost_desc} ({why}); no other lender on {pod.node} has "
                       f"{format_bytes(need)}, so it spills to host memory")
            return dataclasses.replace(pod, leases=tuple(keep_res), elastic=tuple(keep_el), fallback=True)
        leases = keep_res + new
        await self.kube.patch_pod(ns, pod.name, rc.reservation_patch(pod.node, leases, fallback=pod.fallback))
        if len(keep_el) != len(pod.elastic):
            await self._patch_elastic(ns, pod.name, keep_el)
        if new:
            self.event(body, "Normal", "PeerMemoryMoved",
                       f"replica {pod.replica} lost {lost_desc} ({why}); reserved "
                       + ", ".join(f"{x.id} ({format_bytes(x.bytes)} on {x.gpu_uuid})" for x in new) + " instead")
        else:
            self.event(body, "Normal", "ElasticReleased", f"replica {pod.replica} gave back {lost_desc} ({why})")
        return dataclasses.replace(pod, leases=tuple(leases), elastic=tuple(keep_el))

    async def _patch_elastic(self, ns: str, pod: str, leases: Sequence[LeaseRef]) -> None:
        patch = {"metadata": {"annotations": {rc.ANN_ELASTIC: rc.elastic_annotation(leases)}}}
        await self.kube.patch_pod(ns, pod, patch)

    async def _place(
        self, body: Mapping[str, Any], spec: TenantSpec, tenant: TenantRef, replicas: Sequence[int],
        pending: dict[int, str],
    ) -> list[rc.ObservedPod]:
        created: list[rc.ObservedPod] = []
        async with self._place_lock:
            current = {k: v for k, v in self.assignments.items()}
            nodes = list(self.live_pools().values())
            plan = self._planner()(nodes, [spec], current)
            for r in replicas:
                key = ReplicaKey(spec.namespace, spec.name, r)
                a = plan.assignments.get(key)
                if a is None:
                    pending[r] = plan.pending.get(key) or "no node has a free GPU for it"
                    continue
                # Book it before any await so a concurrent reconcile of another tenant sees it.
                self.assignments[key] = a
                for gpu, nbytes in a.lenders:
                    self._debit(a.node, gpu, nbytes)
        mem = self._mem(f"{spec.namespace}/{spec.name}")
        for r in replicas:
            key = ReplicaKey(spec.namespace, spec.name, r)
            a = plan.assignments.get(key)
            if a is None:
                self.metrics.placements.labels(outcome="pending").inc()
                if r in pending and mem.last_pending.get(r) != pending[r]:
                    self.event(body, "Warning", "Unplaced", f"replica {r}: {pending[r]}")
                    mem.last_pending[r] = pending[r]
                continue
            mem.last_pending.pop(r, None)
            pod = await self._reserve_and_create(body, spec, tenant, a, pending)
            if pod is not None:
                created.append(pod)
        return created

    async def _reserve_and_create(
        self, body: Mapping[str, Any], spec: TenantSpec, tenant: TenantRef, a: Assignment, pending: dict[int, str]
    ) -> rc.ObservedPod | None:
        r = a.key.replica
        name = pod_name(spec.name, r)
        holder = holder_name(spec.namespace, spec.name, r)
        leases: list[LeaseRef] = []
        fallback = a.host_fallback
        reason = ""
        try:
            endpoint = self._endpoint(a.node)
            for gpu, nbytes in a.lenders:
                leases.append(await self.reservations.reserve(
                    endpoint, holder=holder, tenant_uid=spec.uid, replica=r, gpu_uuid=gpu, size=nbytes,
                    priority=spec.priority, pod=f"{spec.namespace}/{name}",
                ))
        except ReservationError as exc:
            reason = str(exc)
            if leases:
                await self._release_all(a.node, leases)
                leases = []
            if exc.code not in ("RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"):
                # The agent did not answer (or refused the call itself): no fallback, try again next resync.
                self.assignments.pop(a.key, None)
                pending[r] = f"cannot reserve at the agent of {a.node}: {reason}"
                self.metrics.placements.labels(outcome="pending").inc()
                self.event(body, "Warning", "ReservationFailed", f"replica {r}: {pending[r]}")
                return None
            if spec.fallback == "None":
                self.assignments.pop(a.key, None)
                pending[r] = f"peer memory could not be reserved: {reason}"
                self.metrics.placements.labels(outcome="pending").inc()
                self.event(body, "Warning", "ReservationFailed", f"replica {r} on {a.node}: {reason}; stays Pending")
                return None
            fallback = True
        pod = build_pod(PodPlan(
            tenant=tenant, replica=r, node=a.node, gpu_uuid=a.gpu_uuid, leases=tuple(leases),
            fallback="HostMemory" if fallback and spec.peer_request > 0 else "",
            model={"image": spec.image, "args": list(spec.args), "env": [dict(e) for e in spec.env],
                   "port": spec.port, "resources": dict(spec.resources)},
        ))
        try:
            created = await self.kube.create_pod(pod)
        except KubeError as exc:
            if exc.status == 409:
                # The pod exists already (a concurrent or earlier reconcile): it is the record; ours goes.
                existing = await self.kube.get_pod(spec.namespace, name)
                other = rc.observe_pod(existing) if existing else None
                theirs = {x.id for x in other.all_leases()} if other else set()
                await self._release_all(a.node, [x for x in leases if x.id not in theirs])
                return other
            await self._release_all(a.node, leases)
            self.assignments.pop(a.key, None)
            raise
        observed = rc.observe_pod(created)
        self.assignments[a.key] = Assignment(a.key, a.node, a.gpu_uuid, tuple((x.gpu_uuid, x.bytes) for x in leases),
                                             fallback)
        if fallback and spec.peer_request > 0:
            self.metrics.placements.labels(outcome="fallback").inc()
            self.event(body, "Warning", "FellBackToHostMemory",
                       f"replica {r} placed on {a.node} GPU {a.gpu_uuid} without peer memory"
                       + (f" ({reason})" if reason else " (no lender had room)") + "; it spills to host memory")
        else:
            self.metrics.placements.labels(outcome="placed").inc()
            lent = ", ".join(f"{x.id}: {format_bytes(x.bytes)} on {x.gpu_uuid}" for x in leases)
            self.event(body, "Normal", "Placed",
                       f"replica {r} on {a.node} GPU {a.gpu_uuid}" + (f"; reserved {lent}" if lent else "")
                       + f"; created pod {name}")
        return observed

    # -- delete (finalizer) ----------------------------------------------------------------

    async def finalize(self, body: Mapping[str, Any]) -> None:
        """The tenant is being deleted: delete its pods, release every lease it holds anywhere."""
        meta = body.get("metadata") or {}
        ns, name, uid = str(meta.get("namespace")), str(meta.get("name")), str(meta.get("uid") or "")
        async with self._lock(f"{ns}/{name}"):
            raw = await self.kube.list_pods(ns, rc.selector(name))
            released = 0
            for p in (rc.observe_pod(x) for x in raw):
                if p is None:
                    continue
                await self.kube.delete_pod(ns, p.name, uid=p.uid)
                await self._release_all(p.node, p.all_leases())
                released += len(p.all_leases())
            released += await self._sweep_holder(f"tenant:{ns}/{name}/", lambda lease: True)
            for k in [k for k in self.assignments if k.namespace == ns and k.name == name]:
                del self.assignments[k]
            self.phases.pop(f"{ns}/{name}", None)
            self._memory.pop(f"{ns}/{name}", None)
            self.metrics.set_phases(self.phases)
            self.metrics.forget_tenant(ns, name)
            self.event(body, "Normal", "Released", f"tenant deleted (uid {uid}): pods deleted, {released} lease(s) "
                       "released")

    async def _sweep_holder(self, prefix: str, orphan: Callable[[agent_pb2.Lease], bool]) -> int:
        n = 0
        for node, view in list(self.pools.items()):
            try:
                held = await self.reservations.held(view.endpoint, prefix)
            except ReservationError as exc:
                log.warning("cannot list leases", extra={"node": node, "error": str(exc)})
                continue
            for lease in held:
                if orphan(lease):
                    try:
                        if await self.reservations.release_listed(view.endpoint, lease):
                            n += 1
                    except ReservationError as exc:
                        log.warning("cannot release orphan", extra={"lease": lease.id, "error": str(exc)})
        return n

    # -- startup ---------------------------------------------------------------------------

    async def startup_sync(self) -> int:
        """Load pools and pods, then release leases whose holder no longer wants them: the tenant
        is gone (or was recreated: another uid), the replica is beyond spec.replicas, or no pod of
        the replica names the lease. Runs before any reconcile. Returns the number released."""
        for pool in await self.kube.list_custom(API_GROUP, API_VERSION, "memorypools"):
            self.pool_changed(pool)
        tenants: dict[tuple[str, str], Mapping[str, Any]] = {}
        pods_by_replica: dict[tuple[str, str, int], set[str]] = {}
        for ns in self.config.namespaces or [""]:
            for t in await self.kube.list_custom(API_GROUP, API_VERSION, TENANT_PLURAL, ns):
                m = t.get("metadata") or {}
                tenants[(str(m.get("namespace")), str(m.get("name")))] = t
            for raw in await self.kube.list_pods(ns, rc.LABEL_TENANT):
                self.pod_changed(raw)
                p = rc.observe_pod(raw)
                if p is None:
                    continue
                meta = raw.get("metadata") or {}
                key = (str(meta.get("namespace")), str((meta.get("labels") or {}).get(rc.LABEL_TENANT)), p.replica)
                pods_by_replica.setdefault(key, set()).update(x.id for x in p.all_leases())

        def orphan(lease: agent_pb2.Lease) -> bool:
            parsed = parse_holder(lease.holder)
            if parsed is None:
                return False
            ns, name, replica = parsed
            if self.config.namespaces and ns not in self.config.namespaces:
                return False
            t = tenants.get((ns, name))
            if t is None:
                return True
            uid = str((t.get("metadata") or {}).get("uid") or "")
            if uid and lease.idempotency_key and not lease.idempotency_key.startswith(uid + "/"):
                return True
            replicas = (t.get("spec") or {}).get("replicas", 1)
            if isinstance(replicas, int) and replica >= replicas:
                return True
            return lease.id not in pods_by_replica.get((ns, name, replica), set())

        released = await self._sweep_holder("tenant:", orphan)
        if released:
            log.info("startup sweep released orphaned leases", extra={"released": released})
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
        body = await self.kube.get_custom(API_GROUP, API_VERSION, TENANT_PLURAL, name, ns)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return
        async with self._lock(f"{ns}/{name}"):
            raw = await self.kube.get_pod(ns, pod_name(name, replica))
            pod = rc.observe_pod(raw) if raw else None
            if pod is None or lease.id not in {x.id for x in pod.all_leases()}:
                return
            try:
                spec = TenantSpec.from_resource(body)
            except ValueError:
                return
            lost = [x for x in pod.all_leases() if x.id == lease.id]
            why = f"{state_name(lease.state)} at the agent: {lease.reason or 'reclaimed by the lender'}"
            self.event(body, "Warning", "LeaseRevoking" if lease.state == agent_pb2.REVOKING else "LeaseLost",
                       f"replica {replica}: lease {lease.id} ({format_bytes(int(lease.bytes))} on {lease.gpu_uuid}) "
                       f"is {why}")
            await self.replace_lost(body, spec, pod, lost, why)
        await self.reconcile(body, renew=False)

    # -- SLO feedback ----------------------------------------------------------------------

    def pool_wanted(self, except_key: str) -> bool:
        """Whether other tenants want peer memory: some are not fully placed or miss their SLO."""
        for key, phase in self.phases.items():
            if key == except_key:
                continue
            if phase in (rc.PHASE_PENDING, rc.PHASE_DEGRADED) or self._mem(key).slo_missed:
                return True
        return False

    async def _slo_feedback(
        self, body: Mapping[str, Any], spec: TenantSpec, tenant: TenantRef, pods: Sequence[rc.ObservedPod]
    ) -> None:
        key = f"{spec.namespace}/{spec.name}"
        mem = self._mem(key)
        if time.monotonic() - mem.last_slo_eval < spec.window_s:
            return
        mem.last_slo_eval = time.monotonic()
        if spec.ttft_s is None and spec.tbt_s is None:
            mem.slo_condition = ("Unknown", "NoSLO", "the tenant sets no latency targets")
            mem.slo_status = {"state": "Unknown", "message": "no targets in spec.slo",
                              "lastEvaluation": now_rfc3339()}
            return
        if self.prometheus is None:
            mem.slo_condition = ("Unknown", "NoPrometheus", "the operator runs without --prometheus-url")
            mem.slo_status = {"state": "Unknown", "message": "the operator runs without --prometheus-url",
                              "lastEvaluation": now_rfc3339()}
            return
        targets = []
        if spec.ttft_s is not None:
            targets.append(slomod.SloTarget("ttft", spec.ttft_metric, spec.ttft_s))
        if spec.tbt_s is not None:
            targets.append(slomod.SloTarget("tbt", spec.tbt_metric, spec.tbt_s))
        selector = slomod.selector_for(self.config.slo_selector, spec.namespace, spec.name)
        try:
            observations = [
                await slomod.observe(self.prometheus, t, selector=selector, percentile=spec.percentile,
                                     window_s=spec.window_s)
                for t in targets
            ]
        except slomod.PrometheusError as exc:
            mem.slo_condition = ("Unknown", "PrometheusUnavailable", str(exc))
            mem.slo_status = {"state": "Unknown", "message": str(exc), "lastEvaluation": now_rfc3339()}
            self.event(body, "Warning", "SLOUnknown", str(exc))
            return
        verdict = slomod.evaluate(observations, spec.percentile, spec.attainment)
        status: dict[str, Any] = {"lastEvaluation": now_rfc3339(), "message": verdict.message}
        attainments = []
        for o in observations:
            self.metrics.slo_target.labels(spec.namespace, spec.name, o.name).set(o.target_s)
            if o.observed_s is not None:
                status[o.name] = slomod.format_seconds(o.observed_s)
                status[f"{o.name}Seconds"] = round(o.observed_s, 6)
                self.metrics.slo_observed.labels(spec.namespace, spec.name, o.name).set(o.observed_s)
            if o.attainment is not None:
                status[f"{o.name}Attainment"] = round(o.attainment, 6)
                attainments.append(o.attainment)
                self.metrics.slo_attainment.labels(spec.namespace, spec.name, o.name).set(o.attainment)
        status["requests"] = round(max((o.requests for o in observations), default=0.0), 3)
        if attainments:
            status["attainment"] = round(min(attainments), 6)
        bucket_notes = [f"{o.name} attainment read at the le={o.bucket_le:g} bucket" for o in observations
                        if o.bucket_le is not None]
        if bucket_notes:
            status["message"] = verdict.message + " (" + "; ".join(bucket_notes) + ")"
        if verdict.met is None:
            status["state"] = "Unknown"
            mem.slo_condition = ("Unknown", verdict.reason, verdict.message)
        else:
            status["met"] = verdict.met
            status["state"] = "Met" if verdict.met else "Missed"
            mem.slo_condition = ("True" if verdict.met else "False", verdict.reason, verdict.message)
        mem.slo_missed = verdict.met is False
        mem.slo_status = status
        await self._resize_elastic(body, spec, pods, verdict)

    async def _resize_elastic(
        self, body: Mapping[str, Any], spec: TenantSpec, pods: Sequence[rc.ObservedPod], verdict: slomod.SloVerdict
    ) -> None:
        key = f"{spec.namespace}/{spec.name}"
        wanted = self.pool_wanted(key)
        total_elastic = 0
        for pod in pods:
            held = pod.peer_bytes
            elastic = sum(x.bytes for x in pod.elastic)
            step = slomod.peer_memory_step(held_bytes=held, elastic_bytes=elastic, limit_bytes=spec.peer_limit,
                                           verdict=verdict, pool_wanted=wanted, step_bytes=self.config.slo_step_bytes)
            if step > 0:
                view = self.pools.get(pod.node)
                lender = rc.choose_lender(view, pod.gpu_uuid, step) if view else None
                if lender is None:
                    self.event(body, "Warning", "ElasticGrowFailed",
                               f"replica {pod.replica} misses its SLO but no lender on {pod.node} has "
                               f"{format_bytes(step)} to spare")
                    elastic_leases = list(pod.elastic)
                else:
                    try:
                        got = await self.reservations.reserve(
                            self._endpoint(pod.node), holder=holder_name(spec.namespace, spec.name, pod.replica),
                            tenant_uid=spec.uid, replica=pod.replica, gpu_uuid=lender, size=step,
                            priority=spec.priority, kind=agent_pb2.ELASTIC, pod=f"{spec.namespace}/{pod.name}",
                            key_prefix=f"elastic{len(pod.elastic) + 1}:",
                        )
                    except ReservationError as exc:
                        self.event(body, "Warning", "ElasticGrowFailed", f"replica {pod.replica}: {exc}")
                        elastic_leases = list(pod.elastic)
                    else:
                        self._debit(pod.node, lender, got.bytes)
                        elastic_leases = [*pod.elastic, got]
                        await self._patch_elastic(spec.namespace, pod.name, elastic_leases)
                        self.event(body, "Normal", "PeerMemoryGrown",
                                   f"replica {pod.replica} misses its SLO ({verdict.message}): ELASTIC lease "
                                   f"{got.id} of {format_bytes(got.bytes)} on {lender}, now "
                                   f"{format_bytes(held + got.bytes)} of {format_bytes(spec.peer_limit)}")
            elif step < 0 and pod.elastic:
                victim = pod.elastic[-1]
                await self._release_all(pod.node, [victim])
                elastic_leases = list(pod.elastic[:-1])
                await self._patch_elastic(spec.namespace, pod.name, elastic_leases)
                self.event(body, "Normal", "PeerMemoryShrunk",
                           f"replica {pod.replica} meets its SLO with slack and others want the pool: released "
                           f"ELASTIC lease {victim.id} ({format_bytes(victim.bytes)})")
            else:
                elastic_leases = list(pod.elastic)
            total_elastic += sum(x.bytes for x in elastic_leases)
        self.metrics.peer_memory.labels(spec.namespace, spec.name, "ELASTIC").set(total_elastic)

    async def close(self) -> None:
        await self.kube.close()
        await self.reservations.agents.close()
        if self.prometheus is not None:
            await self.prometheus.close()


def _condition_message(status: Mapping[str, Any], phase: str) -> str:
    for c in status.get("conditions") or []:
        if c.get("status") != "True" and c.get("type") in ("Placed", "PeerMemoryReserved"):
            return str(c.get("message") or "")
    return f"{status.get('readyReplicas', 0)} of {status.get('replicas', 0)} replicas ready"


__all__ = ["Engine", "EngineConfig", "GpuView"]
