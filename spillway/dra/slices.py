"""The node's ResourceSlice: one device per GPU that lends, with consumable `memory`.

A device's capacity is what the scheduler may hand out on that GPU:

    memory_g = lendable_g + bytes of live leases on g made for DRA claims

Lendable memory is free now; leases of DRA claims are already counted by the scheduler as
its claims' consumed capacity, so they stay in the capacity (the scheduler subtracts every
allocated claim's consumption). Other leases (the operator's reservations, ELASTIC growth)
reduce it. Computed as `lendable + leased - other live leases` so the inventory alone
carries the DRA bytes (a lease made between reading the inventory and the lease list is
never counted twice). A GPU whose own tenant grows lends less and publishes less; a GPU
with less than one granule to lend is left out.

Each device has `allowMultipleAllocations: true` (many claims share it) and a request
policy from the agent's granularity: default and minimum one granule, steps of one
granule, at most the capacity. `build_slice` is the pure rule; `SlicePublisher` keeps the
object in the API server equal to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from spillway.api.v1 import agent_pb2
from spillway.deviceplugin.resources import LIVE_STATES, ResourceManager
from spillway.dra import CAPACITY, DRIVER, LEASE_KEY_PREFIX
from spillway.dra.metrics import Metrics

log = logging.getLogger(__name__)

API_VERSION = "resource.k8s.io/v1"
MAX_NAME = 63                        # a device name is a DNS label
MAX_ATTRIBUTE_STRING = 64            # the API server's limit on a string attribute


def device_name(gpu_uuid: str) -> str:
    """The device's name: the GPU UUID as a DNS label ("GPU-5f3c..." -> "gpu-5f3c...")."""
    name = re.sub(r"[^a-z0-9-]+", "-", gpu_uuid.lower()).strip("-")[:MAX_NAME].rstrip("-")
    return name or "gpu"


def slice_name(node: str) -> str:
    return f"{node}-{DRIVER}"[:253]


def dra_lease(lease: agent_pb2.Lease) -> bool:
    return lease.idempotency_key.startswith(LEASE_KEY_PREFIX)


def capacities(inventory: agent_pb2.Inventory, leases: Iterable[agent_pb2.Lease]) -> dict[str, int]:
    """Bytes each GPU offers to DRA claims (see the module docstring)."""
    other: dict[str, int] = {}
    for lease in leases:
        if lease.state in LIVE_STATES and not dra_lease(lease):
            other[lease.gpu_uuid] = other.get(lease.gpu_uuid, 0) + int(lease.bytes)
    g_bytes = max(int(inventory.granularity_bytes), 1)
    out = {}
    for g in inventory.gpus:
        value = max(0, int(g.lendable_bytes) + int(g.leased_bytes) - other.get(g.uuid, 0))
        out[g.uuid] = value - value % g_bytes
    return out


def nvlink_domains(inventory: agent_pb2.Inventory) -> tuple[dict[str, str], dict[str, list[int]]]:
    """Per GPU: its NVLink domain (`domains_of`) and the indices of its NVLink peers."""
    index = {g.uuid: g.index for g in inventory.gpus}
    pairs = [(x.gpu_a, x.gpu_b) for x in inventory.links if x.nvlink]
    peers = _peers(index, pairs)
    return domains_of(index, pairs), {u: sorted(index[p] for p in ps) for u, ps in peers.items()}


def _peers(uuids: Iterable[str], pairs: Iterable[tuple[str, str]]) -> dict[str, set[str]]:
    peers: dict[str, set[str]] = {u: set() for u in uuids}
    for a, b in pairs:
        if a in peers and b in peers and a != b:
            peers[a].add(b)
            peers[b].add(a)
    return peers


def domains_of(uuids: Iterable[str], nvlink_pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Per GPU UUID: its NVLink domain, the lowest UUID of its NVLink-connected set (itself
    included), the `nvlinkDomain` attribute of its device. The operator computes the same from a
    MemoryPool to select an NVLink peer of a replica's GPU."""
    peers = _peers(uuids, nvlink_pairs)
    domain: dict[str, str] = {}
    for start in sorted(peers):
        if start in domain:
            continue
        seen, todo = {start}, [start]
        while todo:
            for p in peers[todo.pop()]:
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        for u in seen:
            domain[u] = min(seen)
    return domain


def _q(n: int) -> str:
    return str(int(n))


def build_devices(node: str, inventory: agent_pb2.Inventory, leases: Iterable[agent_pb2.Lease]) -> list[dict[str, Any]]:
    granule = max(int(inventory.granularity_bytes), 1)
    caps = capacities(inventory, leases)
    domain, peers = nvlink_domains(inventory)
    devices = []
    for g in sorted(inventory.gpus, key=lambda g: g.index):
        value = caps.get(g.uuid, 0)
        if value < granule:
            continue
        peer_list = ",".join(map(str, peers.get(g.uuid, [])))
        attributes: dict[str, dict[str, Any]] = {
            "uuid": {"string": g.uuid[:MAX_ATTRIBUTE_STRING]},
            "index": {"int": int(g.index)},
            "node": {"string": node[:MAX_ATTRIBUTE_STRING]},
            "simulated": {"bool": bool(inventory.simulated)},
            "productName": {"string": g.name[:MAX_ATTRIBUTE_STRING]},
            "nvlinkDomain": {"string": domain.get(g.uuid, g.uuid)[:MAX_ATTRIBUTE_STRING]},
        }
        if peer_list and len(peer_list) <= MAX_ATTRIBUTE_STRING:
            attributes["nvlinkPeers"] = {"string": peer_list}
        devices.append({
            "name": device_name(g.uuid),
            "allowMultipleAllocations": True,
            "attributes": attributes,
            "capacity": {CAPACITY: {
                "value": _q(value),
                "requestPolicy": {
                    "default": _q(granule),
                    "validRange": {"min": _q(granule), "max": _q(value), "step": _q(granule)},
                },
            }},
        })
    return devices


def build_slice(node: str, devices: list[dict[str, Any]], generation: int,
                owner: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ResourceSlice object (one slice per node: the pool is the node)."""
    meta: dict[str, Any] = {
        "name": slice_name(node),
        "labels": {"app.kubernetes.io/part-of": "spillway", "app.kubernetes.io/component": "dra"},
    }
    if owner:  # the Node: the slice goes when the node goes
        meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": owner["name"],
                                    "uid": owner["uid"], "controller": True}]
    return {
        "apiVersion": API_VERSION,
        "kind": "ResourceSlice",
        "metadata": meta,
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": int(generation), "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def gpu_of_device(inventory: agent_pb2.Inventory, name: str) -> agent_pb2.Gpu | None:
    for g in inventory.gpus:
        if device_name(g.uuid) == name:
            return g
    return None


class SliceApi:
    """The ResourceSlice calls (the synchronous `kubernetes` client; run in a thread)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.resource: Any = client.ResourceV1Api(api_client)
        self.core: Any = client.CoreV1Api(api_client)

    def node_owner(self, node: str) -> dict[str, str] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            n = self.core.read_node(node)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {"name": node, "uid": n.metadata.uid}

    def read(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            obj = self.resource.read_resource_slice(name, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        import json

        body: dict[str, Any] = json.loads(obj.data)
        return body

    def write(self, body: dict[str, Any], resource_version: str | None) -> None:
        name = body["metadata"]["name"]
        if resource_version is None:
            self.resource.create_resource_slice(body)
        else:
            body = {**body, "metadata": {**body["metadata"], "resourceVersion": resource_version}}
            self.resource.replace_resource_slice(name, body)

    def delete(self, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.resource.delete_resource_slice(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


class SlicePublisher:
    """Keeps the node's ResourceSlice equal to `build_devices` of the agent's pool.

    Follows the resource manager (the agent's Watch stream and a poll); writes only when the
    devices change, with a new pool generation each time. While the agent does not answer
    the slice keeps its last devices (allocated claims stay valid; new claims may still
    fail at prepare with a clear message)."""

    def __init__(self, node: str, resources: ResourceManager, api: SliceApi, *, interval_s: float = 0.5,
                 retry_s: float = 2.0, resync_s: float = 5.0, metrics: Metrics | None = None) -> None:
        self.node = node
        self.metrics = metrics
        self.resources = resources
        self.api = api
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.resync_s = resync_s
        self.devices: list[dict[str, Any]] | None = None   # as last written
        self.generation = 0
        self.writes = 0
        self.error = ""
        self._checked_at = 0.0

    def desired(self) -> list[dict[str, Any]] | None:
        inv = self.resources.inventory
        if inv is None or not self.resources.agent_up:
            return None
        return build_devices(self.node, inv, self.resources.leases.values())

    async def sync(self) -> bool:
        """Write the slice if it differs from the pool, or if it is gone (a starting kubelet
        deletes its node's slices; so may a person); True when it is current."""
        devices = self.desired()
        if devices is None:
            return False
        unchanged = devices == self.devices
        if unchanged and time.monotonic() - self._checked_at < self.resync_s:
            return True
        try:
            await asyncio.to_thread(self._write, devices, unchanged)
        except Exception as exc:  # the API server is down or refuses: log, retry later
            self.error = str(exc)
            log.warning("cannot write the ResourceSlice", extra={"node": self.node, "error": self.error[:500]})
            if self.metrics is not None:
                self.metrics.write_failed()
            return False
        self.error = ""
        self._checked_at = time.monotonic()
        return True

    def _write(self, devices: list[dict[str, Any]], only_if_missing: bool = False) -> None:
        name = slice_name(self.node)
        current = self.api.read(name)
        if only_if_missing and current is not None:
            return
        if only_if_missing:
            log.info("the ResourceSlice is gone: writing it again", extra={"node": self.node})
        generation = self.generation + 1
        if current is not None:
            generation = max(generation, int(current["spec"]["pool"].get("generation", 0)) + 1)
        body = build_slice(self.node, devices, generation, self.api.node_owner(self.node))
        self.api.write(body, current["metadata"]["resourceVersion"] if current else None)
        self.generation = generation
        self.devices = devices
        self.writes += 1
        if self.metrics is not None:
            self.metrics.published(capacity_of(devices))
        log.info("ResourceSlice written", extra={
            "node": self.node, "generation": generation, "devices": len(devices),
            "memory": ",".join(f"{d['name']}={d['capacity'][CAPACITY]['value']}" for d in devices)})

    async def run(self) -> None:
        seen = -1
        while True:
            ok = await self.sync()
            # A change of the pool bumps the resource manager's version (units of one granule);
            # the poll catches what it does not show (NVLink, names) and retries failed writes.
            with contextlib.suppress(TimeoutError):
                seen = await asyncio.wait_for(self.resources.wait_changed(seen),
                                              self.interval_s if ok else self.retry_s)

    def remove(self) -> None:
        self.api.delete(slice_name(self.node))


def capacity_of(devices: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """{device name: memory capacity} of a slice's devices (for status and tests)."""
    return {d["name"]: int(d["capacity"][CAPACITY]["value"]) for d in devices}
