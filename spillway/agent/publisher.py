"""Keeps this node's MemoryPool object current from the agent's Watch stream.

`run_publisher` follows the agent (first event SNAPSHOT, then LEASE and CAPACITY events) and
writes the cluster-scoped MemoryPool named after the node, through the status subresource:
at once on a significant change (a lease appears, changes state or ends; a GPU's lendable
memory moves by more than one pool unit), other changes at most every `min_interval_s`, and
otherwise every `status_refresh_s` (10 s; the chart sets 30 s). The heartbeat proper is a small
coordination.k8s.io/v1 Lease named after the node in the agent's namespace, renewed every
`heartbeat_s` (10 s), as the kubelet does for Nodes: the 13 KB status is not rewritten for it.

The status carries two conditions: Ready (True while the agent publishes; False with reason
AgentStopped when it stops, HeartbeatExpired when its Lease ran out) and Stale (True when the
Lease ran out). An agent cannot say that it is dead, so the agents elect one of themselves
(a Lease named `WATCHDOG_LEASE`) to mark the pools whose heartbeat Lease expired
(`mark_stale_pools`). Kubernetes calls run in a worker thread (the `kubernetes` client is
synchronous); credentials come from $KUBECONFIG or the pod's service account.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spillway.api.v1 import agent_pb2
from spillway.contract import GROUP, GROUP_VERSION, POOL_KIND, POOL_PLURAL, VERSION, format_time
from spillway.units import format_bytes

log = logging.getLogger(__name__)

PLURAL = POOL_PLURAL
HEARTBEAT_S = 10.0
# The status is rewritten at least this often even when nothing changed: the operator still
# reads status.heartbeat (its --pool-stale-after, 60 s by default), so this must stay below
# that until the operator reads the heartbeat Lease (then minutes will do). The agent's
# --status-refresh sets it; the chart sets 30 s.
STATUS_REFRESH_S = 10.0
# A heartbeat Lease not renewed for this long has expired (the kubelet's Node leases: 40 s).
LEASE_DURATION_S = 40
WATCHDOG_LEASE = "spillway-memorypool-watchdog"
HEARTBEAT_LABEL = "spillway.dev/heartbeat"  # value "memorypool" on the agents' heartbeat Leases
SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
LIVE_STATES = (agent_pb2.RESERVED, agent_pb2.ACTIVE, agent_pb2.REVOKING)
DEFAULT_UNIT = 1 << 30


def _rfc3339(ms: float) -> str:
    return format_time(ms / 1000.0)


def _micro_time(t: float) -> str:
    """A Kubernetes MicroTime (Lease renewTime) for Unix time `t`."""
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_k8s_time(value: Any) -> float | None:
    """Unix time of a Time/MicroTime as the API server (or the kubernetes client) returns it."""
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def own_namespace() -> str:
    """The agent's namespace, where its heartbeat Lease lives: $POD_NAMESPACE, else the pod's
    service account namespace, else "default" (an agent run by hand with a kubeconfig)."""
    ns = os.environ.get("POD_NAMESPACE", "").strip()
    if ns:
        return ns
    try:
        return SA_NAMESPACE_FILE.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True)
class Condition:
    """One entry of status.conditions (the Kubernetes convention)."""

    type: str
    status: str  # "True", "False" or "Unknown"
    reason: str
    message: str
    last_transition: float  # Unix time

    def to_dict(self) -> dict[str, str]:
        return {"type": self.type, "status": self.status, "reason": self.reason, "message": self.message,
                "lastTransitionTime": _rfc3339(self.last_transition * 1000)}


def pool_conditions(ready: bool, reason: str, message: str, *, stale: bool, now: float,
                    previous: Iterable[Mapping[str, Any]] = ()) -> list[dict[str, str]]:
    """Ready and Stale for a pool; a condition whose status did not change keeps its
    lastTransitionTime from `previous` (the conditions the object has now)."""
    before = {str(c.get("type")): c for c in previous if isinstance(c, Mapping)}
    out = []
    for cond in (Condition("Ready", str(ready), reason, message, now),
                 Condition("Stale", str(stale), reason if stale else "HeartbeatCurrent",
                           message if stale else "the agent renews its heartbeat Lease", now)):
        d = cond.to_dict()
        old = before.get(cond.type)
        if old and old.get("status") == d["status"] and old.get("lastTransitionTime"):
            d["lastTransitionTime"] = str(old["lastTransitionTime"])
        out.append(d)
    return out


def lease_expired(spec: Mapping[str, Any], now: float) -> bool:
    """Has a Lease (its spec as a dict: renewTime, leaseDurationSeconds) run out at `now`?"""
    renewed = _parse_k8s_time(spec.get("renewTime") or spec.get("renew_time"))
    duration = spec.get("leaseDurationSeconds") or spec.get("lease_duration_seconds") or LEASE_DURATION_S
    return renewed is None or now > renewed + float(duration)


def build_status(
    inventory: agent_pb2.Inventory, leases: Iterable[agent_pb2.Lease], endpoint: str, *, now_ms: float | None = None
) -> dict[str, Any]:
    """The MemoryPool status for an agent's inventory and live leases (pure)."""
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    gpus = []
    for g in inventory.gpus:
        gpus.append(
            {
                "uuid": g.uuid,
                "index": g.index,
                "name": g.name,
                "totalBytes": g.total_bytes,
                "localUsedBytes": g.local_used_bytes,
                "localReservedBytes": g.local_reserved_bytes,
                "headroomBytes": g.headroom_bytes,
                "lendableBytes": g.lendable_bytes,
                "leasedBytes": g.leased_bytes,
                "lendable": format_bytes(g.lendable_bytes),
            }
        )
    seen: set[tuple[str, str]] = set()
    links = []
    for link in inventory.links:
        a, b = sorted((link.gpu_a, link.gpu_b))
        if a == b or (a, b) in seen:
            continue
        seen.add((a, b))
        links.append({"a": a, "b": b, "nvlink": link.nvlink, "count": link.nvlink_count})
    live = sorted((x for x in leases if x.state in LIVE_STATES), key=lambda x: x.id)
    total = sum(g.total_bytes for g in inventory.gpus)
    lendable = sum(g.lendable_bytes for g in inventory.gpus)
    leased = sum(g.leased_bytes for g in inventory.gpus)
    status: dict[str, Any] = {
        "node": inventory.node_name,
        "simulated": inventory.simulated,
        "backend": inventory.backend,
        "agentEndpoint": endpoint,
        "agentVersion": inventory.agent_version,
        "driverVersion": inventory.driver_version,
        "granularityBytes": inventory.granularity_bytes,
        "heartbeat": _rfc3339(now_ms),
        "gpus": gpus,
        "links": links,
        "totals": {
            "gpus": len(gpus),
            "totalBytes": total,
            "lendableBytes": lendable,
            "leasedBytes": leased,
            "total": format_bytes(total),
            "lendable": format_bytes(lendable),
            "leased": format_bytes(leased),
            "leases": len(live),
        },
        "leases": [
            {
                "id": x.id,
                "holder": x.holder,
                "pod": x.pod,
                "gpu": x.gpu_uuid,
                "bytes": x.bytes,
                "kind": agent_pb2.LeaseKind.Name(x.kind),
                "state": agent_pb2.LeaseState.Name(x.state),
                "expiresAt": _rfc3339(x.expires_at_ms) if x.expires_at_ms else None,
            }
            for x in live
        ],
    }
    if inventory.captured_at_ms:
        status["capturedAt"] = _rfc3339(inventory.captured_at_ms)
    for lease in status["leases"]:
        if lease["expiresAt"] is None:
            del lease["expiresAt"]
    return status


def significant(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Must `new` be written at once (not rate limited)?

    Yes for the first write, a lease that appeared, ended or changed state, a GPU that came or
    went, and a GPU whose lendable memory moved by more than one pool unit.
    """
    if old is None:
        return True
    if {(x["id"], x["state"]) for x in old.get("leases", [])} != {(x["id"], x["state"]) for x in new["leases"]}:
        return True
    unit = int(new.get("granularityBytes") or DEFAULT_UNIT)
    before = {g["uuid"]: g["lendableBytes"] for g in old.get("gpus", [])}
    after = {g["uuid"]: g["lendableBytes"] for g in new["gpus"]}
    if before.keys() != after.keys():
        return True
    return any(abs(after[u] - before[u]) > unit for u in after)


def _without_heartbeat(status: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in status.items() if k not in ("heartbeat", "capturedAt")}


class _PoolState:
    """What the Watch stream has told us so far."""

    def __init__(self) -> None:
        self.inventory: agent_pb2.Inventory | None = None
        self.leases: dict[str, agent_pb2.Lease] = {}
        self.changed = asyncio.Event()
        self.force = False  # write the status at the next turn, changed or not

    def apply(self, ev: agent_pb2.WatchEvent) -> None:
        if ev.kind == agent_pb2.WatchEvent.SNAPSHOT:
            self.inventory = ev.inventory
            self.leases = {x.id: x for x in ev.leases}
        elif ev.kind == agent_pb2.WatchEvent.CAPACITY:
            # A CAPACITY event carries only the GPUs whose accounting changed: merge them in.
            if ev.HasField("inventory") and self.inventory is not None:
                changed = {g.uuid: g for g in ev.inventory.gpus}
                merged = agent_pb2.Inventory()
                merged.CopyFrom(self.inventory)
                for g in merged.gpus:
                    if g.uuid in changed:
                        g.CopyFrom(changed.pop(g.uuid))
                merged.gpus.extend(changed.values())
                if ev.inventory.captured_at_ms:
                    merged.captured_at_ms = ev.inventory.captured_at_ms
                self.inventory = merged
        elif ev.kind == agent_pb2.WatchEvent.LEASE:
            if ev.lease.state in LIVE_STATES:
                self.leases[ev.lease.id] = ev.lease
            else:
                self.leases.pop(ev.lease.id, None)
        self.changed.set()


class MemoryPoolWriter:
    """Creates the node's MemoryPool if missing and writes its status (synchronous; run in a thread)."""

    def __init__(self, node_name: str, api: Any = None) -> None:
        self.node_name = node_name
        self.api = api if api is not None else _custom_objects_api()
        self._exists = False

    def _ensure(self) -> None:
        from kubernetes.client.exceptions import ApiException

        if self._exists:
            return
        try:
            self.api.get_cluster_custom_object(GROUP, VERSION, PLURAL, self.node_name)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {
                "apiVersion": GROUP_VERSION,
                "kind": POOL_KIND,
                "metadata": {"name": self.node_name, "labels": {"app.kubernetes.io/part-of": "spillway"}},
                "spec": {},
            }
            try:
                self.api.create_cluster_custom_object(GROUP, VERSION, PLURAL, body)
                log.info("created MemoryPool", extra={"node": self.node_name})
            except ApiException as exc2:
                if exc2.status != 409:
                    raise
        self._exists = True

    def write(self, status: Mapping[str, Any]) -> None:
        """Merge `status` into the pool's status (a list such as conditions is replaced whole)."""
        from kubernetes.client.exceptions import ApiException

        self._ensure()
        try:
            self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, self.node_name, {"status": status})
        except ApiException as exc:
            if exc.status == 404:  # deleted under us: create it again next time
                self._exists = False
            raise


class HeartbeatLease:
    """The agent's heartbeat: a coordination.k8s.io/v1 Lease named after the node in the agent's
    namespace, renewed every `HEARTBEAT_S` (synchronous; run in a thread)."""

    def __init__(self, node_name: str, namespace: str, api: Any = None, duration_s: int = LEASE_DURATION_S) -> None:
        self.node_name, self.namespace, self.duration_s = node_name, namespace, duration_s
        self.api = api if api is not None else _coordination_api()

    def renew(self, now: float | None = None) -> None:
        from kubernetes.client.exceptions import ApiException

        now = time.time() if now is None else now
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": self.duration_s,
                "renewTime": _micro_time(now)}
        try:
            self.api.patch_namespaced_lease(self.node_name, self.namespace, {"spec": spec})
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node_name, "namespace": self.namespace,
                             "labels": {HEARTBEAT_LABEL: "memorypool", "app.kubernetes.io/part-of": "spillway"}},
                "spec": {**spec, "acquireTime": _micro_time(now)}}
        try:
            self.api.create_namespaced_lease(self.namespace, body)
            log.info("created heartbeat Lease", extra={"node": self.node_name, "namespace": self.namespace})
        except ApiException as exc:
            if exc.status != 409:  # made meanwhile: the next renewal patches it
                raise


def _read_json(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A kubernetes client read as plain JSON (times stay the strings the API server sent)."""
    import json

    resp = call(*args, _preload_content=False, **kwargs)
    return json.loads(resp.data)


def mark_stale_pools(coord: Any, custom: Any, namespace: str, now: float | None = None) -> list[str]:
    """Mark Ready=False, Stale=True on every MemoryPool whose agent's heartbeat Lease (in
    `namespace`) expired and that is not marked so yet; returns the pools marked."""
    from kubernetes.client.exceptions import ApiException

    now = time.time() if now is None else now
    leases = _read_json(coord.list_namespaced_lease, namespace, label_selector=f"{HEARTBEAT_LABEL}=memorypool")
    marked = []
    for lease in leases.get("items") or []:
        spec = lease.get("spec") or {}
        node = str(spec.get("holderIdentity") or lease["metadata"]["name"])
        if not lease_expired(spec, now):
            continue
        try:
            pool = custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, node)
        except ApiException as exc:
            if exc.status == 404:
                continue
            raise
        previous = (pool.get("status") or {}).get("conditions") or []
        ready: dict[str, Any] = next((c for c in previous if c.get("type") == "Ready"), {})
        if ready.get("status") == "False" and ready.get("reason") == "HeartbeatExpired":
            continue
        renewed = spec.get("renewTime") or "never"
        message = (f"heartbeat Lease {namespace}/{lease['metadata']['name']} last renewed {renewed} "
                   f"(expires after {spec.get('leaseDurationSeconds') or LEASE_DURATION_S}s): the agent is down "
                   "or cannot reach the API server; this status is out of date")
        conditions = pool_conditions(False, "HeartbeatExpired", message, stale=True, now=now, previous=previous)
        custom.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, node, {"status": {"conditions": conditions}})
        log.warning("MemoryPool marked stale", extra={"node": node, "renewed": renewed})
        marked.append(node)
    return marked


class StaleWatchdog:
    """One agent at a time (leader by the Lease `WATCHDOG_LEASE`) marks the pools whose heartbeat
    expired: a dead agent cannot mark its own (synchronous; run in a thread)."""

    def __init__(self, identity: str, namespace: str, coord: Any, custom: Any,
                 duration_s: int = LEASE_DURATION_S) -> None:
        self.identity, self.namespace, self.duration_s = identity, namespace, duration_s
        self.coord, self.custom = coord, custom

    def lead(self, now: float | None = None) -> bool:
        """Take or renew the watchdog Lease; False when another live agent holds it."""
        from kubernetes.client.exceptions import ApiException

        now = time.time() if now is None else now
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": self.duration_s, "renewTime": _micro_time(now)}
        try:
            lease = _read_json(self.coord.read_namespaced_lease, WATCHDOG_LEASE, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": WATCHDOG_LEASE, "namespace": self.namespace,
                                 "labels": {"app.kubernetes.io/part-of": "spillway"}},
                    "spec": {**spec, "acquireTime": _micro_time(now), "leaseTransitions": 0}}
            try:
                self.coord.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as exc2:
                if exc2.status == 409:
                    return False
                raise
        old = lease.get("spec") or {}
        if old.get("holderIdentity") != self.identity:
            if not lease_expired(old, now):
                return False
            spec["acquireTime"] = _micro_time(now)
            spec["leaseTransitions"] = int(old.get("leaseTransitions") or 0) + 1
        lease["spec"] = {**old, **spec}
        try:  # replace carries resourceVersion: of two agents taking it at once, one gets 409
            self.coord.replace_namespaced_lease(WATCHDOG_LEASE, self.namespace, lease)
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def step(self, now: float | None = None) -> list[str]:
        """One round: lead, and if leading, mark the stale pools."""
        if not self.lead(now):
            return []
        return mark_stale_pools(self.coord, self.custom, self.namespace, now)


def _load_config() -> None:
    from kubernetes import config

    try:
        config.load_kube_config()
    except Exception:  # no kubeconfig: try the pod's service account
        config.load_incluster_config()


def _custom_objects_api() -> Any:
    from kubernetes import client

    _load_config()
    return client.CustomObjectsApi()


def _coordination_api() -> Any:
    from kubernetes import client

    _load_config()
    return client.CoordinationV1Api()


async def _follow(agent_target: str, tls: Any, state: _PoolState) -> None:
    """Follow the agent's Watch stream for ever, reconnecting with backoff."""
    from spillway.agent.client import AgentClient

    delay = 0.5
    while True:
        try:
            async with AgentClient(agent_target, tls=tls) as client:
                async for ev in client.watch():
                    state.apply(ev)
                    delay = 0.5
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any stream failure: reconnect
            log.warning("agent watch failed; reconnecting", extra={"target": agent_target, "error": str(exc)})
        await asyncio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def _heartbeat(lease: HeartbeatLease, watchdog: StaleWatchdog | None, period_s: float,
                     state: _PoolState) -> None:
    """Renew the heartbeat Lease every `period_s`; then, if this agent leads, mark stale pools."""
    failing = False
    while True:
        try:
            await asyncio.to_thread(lease.renew)
            if failing:  # back after an outage: the watchdog may have marked us stale meanwhile
                state.force = True
                state.changed.set()
            failing = False
        except Exception as exc:
            failing = True
            log.warning("heartbeat Lease renewal failed", extra={"node": lease.node_name, "error": str(exc)})
        if watchdog is not None:
            try:
                await asyncio.to_thread(watchdog.step)
            except Exception as exc:
                log.warning("stale-pool watchdog failed", extra={"error": str(exc)})
        await asyncio.sleep(period_s)


async def run_publisher(
    agent_target: str,
    node_name: str,
    endpoint: str,
    *,
    tls: Any = None,
    min_interval_s: float = 2.0,
    heartbeat_s: float = HEARTBEAT_S,
    status_refresh_s: float = STATUS_REFRESH_S,
    namespace: str | None = None,
    writer: MemoryPoolWriter | None = None,
    lease: HeartbeatLease | None = None,
    watchdog: StaleWatchdog | None = None,
) -> None:
    """Keep the MemoryPool `node_name` current from the agent at `agent_target`, and its
    heartbeat Lease (in `namespace`, default `own_namespace()`) renewed; runs until cancelled,
    then marks the pool Ready=False (AgentStopped)."""
    namespace = namespace or own_namespace()
    state = _PoolState()
    follower = asyncio.create_task(_follow(agent_target, tls, state), name="publisher-watch")
    beat: asyncio.Task[None] | None = None
    started = time.time()
    lease_ref = {"namespace": namespace, "name": node_name}
    ready = pool_conditions(True, "Publishing", f"the agent publishes this pool and renews its heartbeat Lease "
                            f"{namespace}/{node_name}", stale=False, now=started)
    last: dict[str, Any] | None = None
    try:
        if writer is None:
            writer = await asyncio.to_thread(MemoryPoolWriter, node_name)
        if lease is None:
            lease = await asyncio.to_thread(HeartbeatLease, node_name, namespace)
        if watchdog is None:
            watchdog = StaleWatchdog(node_name, namespace, lease.api, writer.api)
        beat = asyncio.create_task(_heartbeat(lease, watchdog, heartbeat_s, state), name="publisher-heartbeat")

        def current() -> dict[str, Any]:
            assert state.inventory is not None
            status = build_status(state.inventory, state.leases.values(), endpoint)
            status["heartbeatLease"] = lease_ref
            status["conditions"] = ready
            return status

        last_at = float("-inf")
        while True:
            now = time.monotonic()
            pending_minor = state.inventory is not None and last is not None and _without_heartbeat(
                current()) != _without_heartbeat(last)
            wait = status_refresh_s - (now - last_at)
            if pending_minor:
                wait = min(wait, min_interval_s - (now - last_at))
            if wait > 0 and not (state.force and state.inventory is not None):
                try:
                    await asyncio.wait_for(state.changed.wait(), timeout=wait)
                except TimeoutError:
                    pass
            state.changed.clear()
            if state.inventory is None:
                continue
            if state.force:  # back after an outage: Ready again from now
                ready = pool_conditions(True, "Publishing", ready[0]["message"], stale=False, now=time.time())
            status = current()
            now = time.monotonic()
            due = now - last_at >= status_refresh_s or state.force
            minor = last is None or _without_heartbeat(status) != _without_heartbeat(last)
            if not (due or significant(last, status) or (minor and now - last_at >= min_interval_s)):
                continue
            try:
                await asyncio.to_thread(writer.write, status)
                last, last_at = status, time.monotonic()
                state.force = False
            except Exception as exc:  # API server away: keep going, retry soon
                log.warning("MemoryPool write failed", extra={"node": node_name, "error": str(exc)})
                await asyncio.sleep(min(min_interval_s, 2.0))
                state.changed.set()
    finally:
        for task in (follower, beat):
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if writer is not None and last is not None:
            stopped = pool_conditions(False, "AgentStopped", "the agent stopped (it marks its pool so on the way out)",
                                      stale=False, now=time.time(), previous=ready)
            try:  # best effort, on the way out: a few seconds at most
                await asyncio.wait_for(asyncio.to_thread(writer.write, {"conditions": stopped}), timeout=3.0)
            except (asyncio.CancelledError, Exception) as exc:
                log.warning("could not mark the MemoryPool stopped", extra={"node": node_name, "error": str(exc)})
