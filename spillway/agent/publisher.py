"""Keeps this node's MemoryPool object current from the agent's Watch stream.

`run_publisher` follows the agent (first event SNAPSHOT, then LEASE and CAPACITY events) and
writes the cluster-scoped MemoryPool named after the node, through the status subresource:
at once on a significant change (a lease appears, changes state or ends; a GPU's lendable
memory moves by more than one pool unit), other changes at most every `min_interval_s`, and a
heartbeat at least every `heartbeat_s` (10 s). Kubernetes calls run in a worker thread
(the `kubernetes` client is synchronous); credentials come from $KUBECONFIG or the pod's
service account.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from spillway.api.v1 import agent_pb2
from spillway.contract import GROUP, GROUP_VERSION, POOL_KIND, POOL_PLURAL, VERSION, format_time
from spillway.units import format_bytes

log = logging.getLogger(__name__)

PLURAL = POOL_PLURAL
HEARTBEAT_S = 10.0
LIVE_STATES = (agent_pb2.RESERVED, agent_pb2.ACTIVE, agent_pb2.REVOKING)
DEFAULT_UNIT = 1 << 30


def _rfc3339(ms: float) -> str:
    return format_time(ms / 1000.0)


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
        from kubernetes.client.exceptions import ApiException

        self._ensure()
        try:
            self.api.patch_cluster_custom_object_status(GROUP, VERSION, PLURAL, self.node_name, {"status": status})
        except ApiException as exc:
            if exc.status == 404:  # deleted under us: create it again next time
                self._exists = False
            raise


def _custom_objects_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_kube_config()
    except Exception:  # no kubeconfig: try the pod's service account
        config.load_incluster_config()
    return client.CustomObjectsApi()


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


async def run_publisher(
    agent_target: str,
    node_name: str,
    endpoint: str,
    *,
    tls: Any = None,
    min_interval_s: float = 2.0,
    heartbeat_s: float = HEARTBEAT_S,
    writer: MemoryPoolWriter | None = None,
) -> None:
    """Keep the MemoryPool `node_name` current from the agent at `agent_target`; runs until cancelled."""
    state = _PoolState()
    follower = asyncio.create_task(_follow(agent_target, tls, state), name="publisher-watch")
    try:
        if writer is None:
            writer = await asyncio.to_thread(MemoryPoolWriter, node_name)
        last: dict[str, Any] | None = None
        last_at = float("-inf")
        while True:
            now = time.monotonic()
            pending_minor = state.inventory is not None and last is not None and _without_heartbeat(
                build_status(state.inventory, state.leases.values(), endpoint)
            ) != _without_heartbeat(last)
            wait = heartbeat_s - (now - last_at)
            if pending_minor:
                wait = min(wait, min_interval_s - (now - last_at))
            if wait > 0:
                try:
                    await asyncio.wait_for(state.changed.wait(), timeout=wait)
                except TimeoutError:
                    pass
            state.changed.clear()
            if state.inventory is None:
                continue
            status = build_status(state.inventory, state.leases.values(), endpoint)
            now = time.monotonic()
            due = now - last_at >= heartbeat_s
            minor = last is None or _without_heartbeat(status) != _without_heartbeat(last)
            if not (due or significant(last, status) or (minor and now - last_at >= min_interval_s)):
                continue
            try:
                await asyncio.to_thread(writer.write, status)
                last, last_at = status, time.monotonic()
            except Exception as exc:  # API server away: keep going, retry soon
                log.warning("MemoryPool write failed", extra={"node": node_name, "error": str(exc)})
                await asyncio.sleep(min(min_interval_s, 2.0))
                state.changed.set()
    finally:
        follower.cancel()
        try:
            await follower
        except (asyncio.CancelledError, Exception):
            pass
