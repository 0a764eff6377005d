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
import json
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
    POOL_PLURAL,
    TENANT_PLURAL,
    Assignment,
    GpuView,
    NodeHealth,
    NodeView,
    Plan,
    ReplicaKey,
    TenantSpec,
    node_verdict,
)
from spillway.operator.pods import (
    ANN_LOCAL,
    LeaseRef,
    PodPlan,
    TenantRef,
    build_pod,
    holder_name,
    local_bytes,
    parse_holder,
    pod_name,
)
from spillway.operator.reservations import ReservationError, Reservations, state_name
from spillway.units import format_bytes

log = logging.getLogger(__name__)

# On a MemoryPool: {GPU UUID: bytes} of the local reservations this operator set at that node's
# agent (SetGpuLocal reserved). Written before a reservation is set and narrowed after one is
# cleared, so a restarted operator knows which reservations are its own to recompute.
ANN_POOL_LOCAL = "spillway.dev/operator-local-reserved"
LOCAL_RESEND_S = 30.0  # re-send a local reservation the published pool still does not show after this long

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
        # Kubernetes Nodes by name; None until listed (or when the operator may not list them):
        # then every live MemoryPool counts as placeable.
        self.nodes: dict[str, NodeHealth] | None = None
        self._nodes_rv = ""
        self._pool_refs: dict[str, dict[str, Any]] = {}  # pool name -> {apiVersion, kind, metadata} for events
        self._pool_said: dict[str, str] = {}  # pool name -> the last verdict posted as an event
        self._local_record: dict[str, dict[str, int]] = {}  # pool name -> ANN_POOL_LOCAL
        self._local: dict[ReplicaKey, tuple[str, str, int]] = {}  # replica -> (node, own GPU, bytes it keeps)
        self._local_sent: dict[tuple[str, str], tuple[int, float]] = {}  # (node, gpu) -> (bytes, monotonic)
        self._node_locks: dict[str, asyncio.Lock] = {}
        if self.config.prometheus_url and self.prometheus is None:
            self.prometheus = slomod.PrometheusClient(self.config.prometheus_url)

    # -- inputs kept current by the watches ------------------------------------------------

    def pool_changed(self, body: Mapping[str, Any]) -> None:
        try:
            view = NodeView.from_memorypool(body)
        except ValueError as exc:
            log.warning("ignoring MemoryPool", extra={"error": str(exc)})
            return
        meta = body.get("metadata") or {}
        self._pool_refs[view.name] = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "MemoryPool",
            "metadata": {"name": meta.get("name"), "uid": meta.get("uid")},
        }
        self._local_record[view.name] = _parse_local_record((meta.get("annotations") or {}).get(ANN_POOL_LOCAL))
        if view.gpus and view.endpoint:
            self.pools[view.name] = view

    def pool_verdicts(self) -> dict[str, tuple[str, str]]:
        """(lost, unplaceable) reasons for every pool that is not fully usable (see
        `model.node_verdict`); a pool whose heartbeat is stale is lost. Posts an Event on the
        MemoryPool when its verdict changes."""
        limit = self.config.pool_stale_s
        now = time.time()
        out: dict[str, tuple[str, str]] = {}
        for name, view in self.pools.items():
            if limit > 0 and view.heartbeat and now - view.heartbeat > limit:
                verdict = (f"has no live MemoryPool (its agent has not published for more than {limit:g}s)", "")
            elif self.nodes is not None:
                verdict = node_verdict(self.nodes.get(name), now, limit)
            else:
                verdict = ("", "")
            if verdict != ("", ""):
                out[name] = verdict
            self._say_pool(name, verdict)
        return out

    def _say_pool(self, name: str, verdict: tuple[str, str]) -> None:
        lost, unplaceable = verdict
        said = self._pool_said.get(name, "")
        now_says = lost or unplaceable
        if now_says == said:
            return
        self._pool_said[name] = now_says
        ref = self._pool_refs.get(name)
        if ref is None:
            return
        if lost:
            self.event(ref, "Warning", "NodeLost", f"node {name} {lost}: not placeable; its replicas are re-placed "
                       "on other nodes")
        elif unplaceable:
            self.event(ref, "Warning", "NodeUnplaceable", f"node {name} {unplaceable}: no new replica is placed "
                       "there; running ones stay")
        else:
            self.event(ref, "Normal", "NodePlaceable", f"node {name} is Ready and schedulable again")

    def live_pools(self) -> dict[str, NodeView]:
        """The pools whose node is not lost (heartbeat fresh, Node present, not NotReady for long):
        the replicas there keep running."""
        return self.live_and_lost()[0]

    def live_and_lost(self) -> tuple[dict[str, NodeView], dict[str, str]]:
        """`live_pools()` and `lost_reasons()` from one pass over the verdicts."""
        verdicts = self.pool_verdicts()
        lost = {n: v[0] for n, v in verdicts.items() if v[0]}
        return {n: v for n, v in self.pools.items() if n not in lost}, lost

    def placeable_pools(self) -> dict[str, NodeView]:
        """The live pools that may take new replicas (node Ready and not cordoned)."""
        bad = self.pool_verdicts()
        return {n: v for n, v in self.pools.items() if n not in bad}

    def lost_reasons(self) -> dict[str, str]:
        return self.live_and_lost()[1]

    def pool_deleted(self, name: str) -> None:
        self.pools.pop(name, None)
        self._pool_said.pop(name, None)

    # -- Nodes -------------------------------------------------------------------------------

    def node_gone(self, node: str) -> bool:
        """The Node object is known to be deleted (False while Nodes are not known)."""
        return self.nodes is not None and bool(node) and node not in self.nodes

    def node_changed(self, body: Mapping[str, Any], deleted: bool = False) -> None:
        health = NodeHealth.from_node(body)
        if self.nodes is None or not health.name:
            return
        if deleted:
            self.nodes.pop(health.name, None)
        else:
            self.nodes[health.name] = health

    async def list_nodes(self) -> bool:
        """(Re)load every Node; False when the operator may not list Nodes (then Node facts are
        not used: every live MemoryPool counts as placeable)."""
        try:
            items, rv = await self.kube.list_nodes()
        except KubeError as exc:
            if exc.status in (401, 403):
                if self.nodes is not None or not self._nodes_rv:
                    log.warning("cannot list Nodes: deleted, NotReady and cordoned nodes are not detected (grant "
                                "the operator get/list/watch on nodes)", extra={"error": str(exc)[:300]})
                self.nodes, self._nodes_rv = None, "forbidden"
                return False
            raise
        self.nodes = {h.name: h for h in (NodeHealth.from_node(x) for x in items) if h.name}
        self._nodes_rv = rv
        return True

    async def watch_nodes(self, retry_s: float = 2.0) -> None:
        """Keep `nodes` current (list, then watch; list again when the watch is too old). Runs
        until cancelled."""
        while True:
            try:
                if not self._nodes_rv or self._nodes_rv == "forbidden" or self.nodes is None:
                    if not await self.list_nodes():
                        await asyncio.sleep(60.0)
                        continue
                async for ev in self.kube.watch("/api/v1/nodes", self._nodes_rv):
                    obj = ev.get("object") or {}
                    kind = ev.get("type")
                    if kind == "ERROR":
                        self._nodes_rv = ""  # 410 Gone and friends: list again
                        break
                    rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
                    if rv:
                        self._nodes_rv = rv
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self.node_changed(obj, deleted=kind == "DELETED")
            except asyncio.CancelledError:
                raise
            except KubeError as exc:
                if exc.status == 410:
                    self._nodes_rv = ""
                    continue
                log.info("node watch ended; retrying", extra={"error": str(exc)[:200]})
                self._nodes_rv = "" if exc.status else self._nodes_rv
                await asyncio.sleep(retry_s)
            except Exception as exc:  # a broken stream: reconnect
                log.info("node watch ended; retrying", extra={"error": str(exc)[:200]})
                await asyncio.sleep(retry_s)

    # -- tenant pods ---------------------------------------------------------------------------

    def pod_changed(self, body: Mapping[str, Any], deleted: bool = False) -> str | None:
        """Keep assignments and local reservations current; returns the node whose local
        reservations changed (to sync), else None."""
        meta = body.get("metadata") or {}
        tenant = (meta.get("labels") or {}).get(rc.LABEL_TENANT)
        p = rc.observe_pod(body)
        if not tenant or p is None:
            return None
        key = ReplicaKey(str(meta.get("namespace")), str(tenant), p.replica)
        if deleted:
            current = self.assignments.get(key)
            if current is not None and current.node == p.node:
                del self.assignments[key]
        else:
            self.assignments[key] = rc.assignment_of(key.namespace, key.name, p)
        return self._note_local(key, p, deleted)

    def _note_local(self, key: ReplicaKey, p: rc.ObservedPod, deleted: bool = False) -> str | None:
        before = self._local.get(key)
        if deleted:
            if before is None or before[0] != p.node:
                return None
            del self._local[key]
            return p.node
        after = (p.node, p.gpu_uuid, p.local_bytes)
        if not p.gpu_uuid or p.local_bytes <= 0:
            self._local.pop(key, None)
            return p.node if before is not None else None
        self._local[key] = after
        if before == after:
            return None
        if before is not None and before[0] != p.node:
            return before[0]  # rare: a new pod of the replica on another node; the old node syncs on its timer
        return p.node

    def local_wanted(self, node: str) -> dict[str, int]:
        """{GPU: bytes} the node's GPUs must keep for the replicas placed on them (recomputed from
        the pods that exist, never counted up or down)."""
        out: dict[str, int] = {}
        for n, gpu, nbytes in self._local.values():
            if n == node:
                out[gpu] = out.get(gpu, 0) + nbytes
        return out

    async def sync_local(self, node: str) -> None:
        """Make the agent's local reservations on `node` match the replicas placed there
        (SetGpuLocal reserved), on every GPU this operator manages there (ANN_POOL_LOCAL)."""
        lock = self._node_locks.setdefault(node, asyncio.Lock())
        async with lock:
            view = self.pools.get(node)
            if view is None or not view.endpoint:
                return
            gpus = {g.uuid: g for g in view.gpus}
            record = dict(self._local_record.get(node, {}))
            wanted = {g: b for g, b in self.local_wanted(node).items() if g in gpus}
            targets = {g: wanted.get(g, 0) for g in set(record) | set(wanted) if g in gpus}
            widened = {**record, **{g: b for g, b in targets.items() if b > 0}}
            if widened != record:
                await self._write_local_record(node, widened)
            now = time.monotonic()
            unset: set[str] = set()
            for gpu, nbytes in sorted(targets.items()):
                published = gpus[gpu].local_reserved
                sent = self._local_sent.get((node, gpu))
                if published == nbytes and (sent is None or sent[0] == nbytes):
                    continue
                if sent is not None and sent[0] == nbytes and now - sent[1] < LOCAL_RESEND_S:
                    continue  # sent; the agent publishes it with its next beat
                try:
                    await self.reservations.set_local(view.endpoint, gpu, nbytes)
                except ReservationError as exc:
                    unset.add(gpu)
                    log.warning("cannot set the local reservation", extra={"node": node, "gpu": gpu,
                                                                          "bytes": nbytes, "error": str(exc)})
                    continue
                self._local_sent[(node, gpu)] = (nbytes, now)
                log.info("local reservation set", extra={"node": node, "gpu": gpu, "reserved": format_bytes(nbytes)})
            # Ours from now on: what is reserved for a replica, and what could not be cleared yet.
            narrowed = {g: b for g, b in targets.items() if b > 0}
            narrowed.update({g: widened[g] for g in unset if targets[g] == 0 and g in widened})
            if narrowed != widened:
                await self._write_local_record(node, narrowed)

    async def _write_local_record(self, node: str, record: Mapping[str, int]) -> None:
        value = json.dumps(dict(sorted(record.items())), separators=(",", ":")) if record else None
        try:
            await self.kube.patch_custom(API_GROUP, API_VERSION, POOL_PLURAL, node,
                                         {"metadata": {"annotations": {ANN_POOL_LOCAL: value}}})
        except KubeError as exc:
            if exc.status != 404:
                raise
        self._local_record[node] = dict(record)


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
        for p in observed:
            if p.terminating and self.node_gone(p.node):
                # Deleted before its Node went (or by someone else): only the pod GC would end it.
                await self.kube.delete_pod(ns, p.name, uid=p.uid, grace_s=0)
        decision = rc.decide(spec, observed, *self.live_and_lost())
        touched: set[str] = set()  # nodes whose local reservations may have changed

        for pod, reason, message in decision.remove:
            await self._remove_pod(body, tenant, pod, reason, message)

        replicas: dict[int, rc.ReplicaStatus] = {}
        pending: dict[int, str] = {}
        kept: dict[int, rc.ObservedPod] = {}
        for pod in decision.keep:
            pod = await self._keep_local(spec, pod)
            pod = await self._check_leases(body, spec, pod) if renew else pod
            if self._note_local(ReplicaKey(ns, name, pod.replica), pod):
                touched.add(pod.node)
            if pod.phase != "Failed":
                kept[pod.replica] = pod
            replicas[pod.replica] = await self._replica_status(pod, renew=False)
        for r in decision.waiting:
            pending[r] = "waiting for the previous pod to terminate"

        if decision.place:
            placed = await self._place(body, spec, tenant, decision.place, pending)
            for pod in placed:
                self._note_local(ReplicaKey(ns, name, pod.replica), pod)
                touched.add(pod.node)
                replicas[pod.replica] = await self._replica_status(pod, renew=False)

        mem = self._mem(f"{ns}/{name}")
        if slo:
            for pod in await self._slo_feedback(body, spec, tenant, list(kept.values())):
                replicas[pod.replica] = await self._replica_status(pod, renew=False)
        for node in sorted(touched):
            try:
                await self.sync_local(node)
            except Exception as exc:  # the timer on the node's MemoryPool tries again
                log.warning("local reservation sync failed", extra={"node": node, "error": str(exc)[:300]})
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

    def _local_for(self, spec: TenantSpec, node: str, gpu: str) -> int:
        view = self.pools.get(node)
        g = view.gpu(gpu) if view is not None else None
        return local_bytes(spec.memory, spec.lending, g.total if g is not None else 0)

    async def _keep_local(self, spec: TenantSpec, pod: rc.ObservedPod) -> rc.ObservedPod:
        """A kept pod's ANN_LOCAL follows the spec (model.memory or lending changed, or a pod made
        before the annotation existed)."""
        if not pod.gpu_uuid:
            return pod
        want = self._local_for(spec, pod.node, pod.gpu_uuid)
        if want == pod.local_bytes:
            return pod
        await self.kube.patch_pod(spec.namespace, pod.name, {"metadata": {"annotations": {ANN_LOCAL: str(want)}}})
        return dataclasses.replace(pod, local_bytes=want)

    async def _write_status(self, ns: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            await self.kube.patch_custom(API_GROUP, API_VERSION, TENANT_PLURAL, name, {"status": status}, ns,
                                         subresource="status")
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
        names: the sweep's job). A pod whose Node object is gone is deleted at once (grace 0): no
        kubelet will ever confirm it, and its replica's new pod has the same name."""
        await self.kube.delete_pod(tenant.namespace, pod.name, uid=pod.uid,
                                   grace_s=0 if self.node_gone(pod.node) else None)
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
            nodes = list(self.placeable_pools().values())
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
            local_bytes=self._local_for(spec, a.node, a.gpu_uuid),
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
        self.assignments[a.key] = dataclasses.replace(a, lenders=tuple((x.gpu_uuid, x.bytes) for x in leases),
                                                      host_fallback=fallback)
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
        await self.list_nodes()
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

        # A lease younger than half its TTL may be another operator's reservation whose pod is
        # being created right now (a second replica starting beside the active one under kopf
        # peering): leave it. Nobody renews a real orphan, so the agent expires it by TTL anyway.
        young_ms = self.config.lease_ttl_s * 500
        now_ms = time.time() * 1000

        def orphan(lease: agent_pb2.Lease) -> bool:
            parsed = parse_holder(lease.holder)
            if parsed is None:
                return False
            if lease.created_at_ms and now_ms - lease.created_at_ms < young_ms:
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
    ) -> list[rc.ObservedPod]:
        """Evaluate the SLO (at most once per window) and resize ELASTIC leases; returns the pods
        whose ELASTIC leases changed, as they are now."""
        key = f"{spec.namespace}/{spec.name}"
        mem = self._mem(key)
        if time.monotonic() - mem.last_slo_eval < spec.window_s:
            return []
        mem.last_slo_eval = time.monotonic()
        if spec.ttft_s is None and spec.tbt_s is None:
            mem.slo_condition = ("Unknown", "NoSLO", "the tenant sets no latency targets")
            mem.slo_status = {"state": "Unknown", "message": "no targets in spec.slo",
                              "lastEvaluation": now_rfc3339()}
            return []
        if self.prometheus is None:
            mem.slo_condition = ("Unknown", "NoPrometheus", "the operator runs without --prometheus-url")
            mem.slo_status = {"state": "Unknown", "message": "the operator runs without --prometheus-url",
                              "lastEvaluation": now_rfc3339()}
            return []
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
            return []
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
        return await self._resize_elastic(body, spec, pods, verdict)

    async def _resize_elastic(
        self, body: Mapping[str, Any], spec: TenantSpec, pods: Sequence[rc.ObservedPod], verdict: slomod.SloVerdict
    ) -> list[rc.ObservedPod]:
        key = f"{spec.namespace}/{spec.name}"
        wanted = self.pool_wanted(key)
        total_elastic = 0
        changed: list[rc.ObservedPod] = []
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
            if tuple(elastic_leases) != pod.elastic:
                changed.append(dataclasses.replace(pod, elastic=tuple(elastic_leases)))
        self.metrics.peer_memory.labels(spec.namespace, spec.name, "ELASTIC").set(total_elastic)
        return changed

    async def close(self) -> None:
        await self.kube.close()
        await self.reservations.agents.close()
        if self.prometheus is not None:
            await self.prometheus.close()


def _parse_local_record(raw: Any) -> dict[str, int]:
    try:
        value = json.loads(raw) if raw else {}
        return {str(k): int(v) for k, v in value.items()} if isinstance(value, dict) else {}
    except (ValueError, TypeError):
        return {}


def _condition_message(status: Mapping[str, Any], phase: str) -> str:
    for c in status.get("conditions") or []:
        if c.get("status") != "True" and c.get("type") in ("Placed", "PeerMemoryReserved"):
            return str(c.get("message") or "")
    return f"{status.get('readyReplicas', 0)} of {status.get('replicas', 0)} replicas ready"


__all__ = ["Engine", "EngineConfig", "GpuView"]
