"""The resource manager: which `spillway.dev/peer-hbm` units exist and whether they are healthy.

Units come from the node agent's pool. Each GPU g offers `capacity_g` units:

    capacity_g = floor((lendable_g + bytes of live RESERVATION leases on g) / unit)

Lendable memory is free to lend now; RESERVATION leases are pod-bound, so the scheduler
already counts them through the pods' requests and they stay in the advertised capacity;
ELASTIC leases are not pod requests, so they reduce it.

Unit IDs are `<gpu uuid>::<k>` (k = 0, 1, ...): stable across restarts of the plugin and of the
agent. A unit, once advertised, stays in the list for the life of the process; when the pool
shrinks the surplus goes Unhealthy, free units first (units in use by pods stay Healthy as
long as the GPU's capacity covers them). While the agent does not answer, every free unit is
Unhealthy; units in use stay Healthy (their pods keep running).

`compute_units` is the pure rule; `ResourceManager` feeds it from the agent (GetInventory and
ListLeases, refreshed on every Watch event and on a timer) and tells ListAndWatch streams
when the list changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2
from spillway.deviceplugin import HEALTHY, UNHEALTHY
from spillway.metrics import HttpEndpoint
from spillway.units import plain_int

log = logging.getLogger(__name__)

UNIT_SEPARATOR = "::"
LIVE_STATES = frozenset({agent_pb2.RESERVED, agent_pb2.ACTIVE, agent_pb2.REVOKING})


def unit_id(gpu_uuid: str, k: int) -> str:
    return f"{gpu_uuid}{UNIT_SEPARATOR}{k}"


def parse_unit_id(device_id: str) -> tuple[str, int] | None:
    """(gpu uuid, k) of a unit ID, or None when the ID is not one of ours."""
    gpu, sep, k = device_id.rpartition(UNIT_SEPARATOR)
    unit = plain_int(k)
    if not sep or not gpu or unit is None:
        return None
    return gpu, unit


@dataclass(frozen=True)
class Unit:
    id: str
    gpu_uuid: str
    k: int
    healthy: bool

    @property
    def health(self) -> str:
        return HEALTHY if self.healthy else UNHEALTHY


def gpu_capacity_units(
    inventory: agent_pb2.Inventory, leases: Iterable[agent_pb2.Lease], unit_bytes: int
) -> dict[str, int]:
    """Units each GPU can back: its lendable bytes plus its live RESERVATION leases, per unit.

    Computed as lendable + leased - live ELASTIC leases, so the inventory alone (consistent per
    GPU) carries the RESERVATION bytes: a lease made between reading the inventory and the
    lease list cannot be counted twice."""
    elastic: dict[str, int] = {}
    for lease in leases:
        if lease.kind == agent_pb2.ELASTIC and lease.state in LIVE_STATES:
            elastic[lease.gpu_uuid] = elastic.get(lease.gpu_uuid, 0) + int(lease.bytes)
    return {g.uuid: max(0, int(g.lendable_bytes) + int(g.leased_bytes) - elastic.get(g.uuid, 0)) // unit_bytes
            for g in inventory.gpus}


def compute_units(
    gpu_order: Iterable[str],
    capacity: Mapping[str, int] | None,
    known: Mapping[str, int],
    in_use: Iterable[str],
) -> list[Unit]:
    """The unit list for the kubelet.

    gpu_order: GPU UUIDs in index order. capacity: units per GPU, or None while the agent is
    unreachable. known: units per GPU advertised so far (the list never shrinks). in_use: unit
    IDs allocated to pods.
    """
    used: dict[str, set[int]] = {}
    for device_id in in_use:
        parsed = parse_unit_id(device_id)
        if parsed:
            used.setdefault(parsed[0], set()).add(parsed[1])
    units: list[Unit] = []
    order = list(gpu_order)
    order += sorted(g for g in set(known) | set(used) if g not in order)
    for gpu in order:
        busy = used.get(gpu, set())
        count = max(known.get(gpu, 0), (capacity or {}).get(gpu, 0), max(busy, default=-1) + 1)
        budget = len(busy) if capacity is None else capacity.get(gpu, 0)
        # In-use units first (lowest k first), then free ones, until the GPU's capacity is spent.
        healthy: set[int] = set()
        for k in sorted(busy) + [k for k in range(count) if k not in busy]:
            if len(healthy) >= budget:
                break
            healthy.add(k)
        units.extend(Unit(unit_id(gpu, k), gpu, k, k in healthy) for k in range(count))
    return units


def device_node(gpu: agent_pb2.Gpu) -> str:
    """/dev/nvidia<minor number>: the driver names device nodes by minor number, which can differ
    from the NVML index. An agent that does not report the minor number: its index."""
    return f"/dev/nvidia{gpu.minor_number if gpu.HasField('minor_number') else gpu.index}"


class AgentMetrics(Protocol):
    """What the resource manager reports (the device plugin's and the DRA driver's metrics)."""

    def set_units(self, healthy: int, unhealthy: int) -> None: ...

    def set_agent_up(self, up: bool) -> None: ...


class ResourceManager:
    """Keeps the unit list in step with the agent; ListAndWatch streams wait on `changed`."""

    def __init__(
        self,
        agent_socket: str,
        unit_bytes: int,
        metrics: AgentMetrics,
        *,
        poll_s: float = 1.0,
        rpc_timeout_s: float = 2.0,
    ) -> None:
        self.agent_socket = agent_socket
        self.unit_bytes = unit_bytes
        self.metrics = metrics
        self.poll_s = poll_s
        self.rpc_timeout_s = rpc_timeout_s
        self.inventory: agent_pb2.Inventory | None = None
        self.leases: dict[str, agent_pb2.Lease] = {}
        self.agent_up = False
        self.agent_error = "not contacted yet"
        self._client: AgentClient | None = None
        self._known: dict[str, int] = {}
        self._in_use: set[str] = set()
        self._units: list[Unit] = []
        self._version = 0
        self._changed = asyncio.Event()   # set (and replaced) whenever the unit list changes
        self._kick = asyncio.Event()
        self._first = asyncio.Event()

    # --- what others read -------------------------------------------------------------
    @property
    def units(self) -> list[Unit]:
        return list(self._units)

    @property
    def version(self) -> int:
        return self._version

    def gpu(self, uuid: str) -> agent_pb2.Gpu | None:
        for g in self.inventory.gpus if self.inventory else ():
            if g.uuid == uuid:
                return g
        return None

    def device_node(self, uuid: str) -> str | None:
        """The lender GPU's device node, /dev/nvidia<minor> (None for a GPU the agent does not list)."""
        gpu = self.gpu(uuid)
        return None if gpu is None else device_node(gpu)

    def client(self) -> AgentClient:
        """The agent client (made on first use, remade after the agent was unreachable)."""
        if self._client is None:
            self._client = AgentClient(self.agent_socket)
        return self._client

    async def wait_changed(self, seen: int) -> int:
        """Wait until the unit list differs from version `seen`; return the new version."""
        while self._version == seen:
            await self._changed.wait()
        return self._version

    async def wait_first(self, within_s: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), within_s)
        return self._first.is_set()

    async def run_with(self, jobs: Callable[[], dict[str, Coroutine[Any, Any, None]]], http: HttpEndpoint | None,
                       port: int | None, host: str) -> None:
        """A node component's main loop (the device plugin, the DRA driver): its metrics endpoint
        (`http` on `port`, None: none), this follower of the agent, and once the agent has
        answered (or 5 s passed: units in use are listed meanwhile and turn Healthy when it
        answers) the component's own `jobs` by name; the first that fails ends them all."""
        if http is not None and port is not None:
            log.info("metrics endpoint", extra={"port": await http.start(port, host)})
        tasks = [asyncio.create_task(self.run(), name="resources")]
        try:
            await self.wait_first(5.0)
            tasks += [asyncio.create_task(job, name=name) for name, job in jobs().items()]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if http is not None:
                await http.stop()

    def set_in_use(self, ids: Iterable[str]) -> None:
        """The unit IDs allocated to pods (PodResources plus fresh Allocate calls)."""
        self._in_use = set(ids)
        self._recompute()

    def add_in_use(self, ids: Iterable[str]) -> None:
        self._in_use |= set(ids)
        self._recompute()

    def kick(self) -> None:
        """Refresh from the agent now (after this process changed the pool)."""
        self._kick.set()

    # --- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch(), name="agent-watch")
        try:
            while True:
                await self.refresh()
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), self.poll_s)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self._drop_client()

    async def refresh(self) -> None:
        """Read inventory and leases from the agent; on failure mark the agent down."""
        try:
            client = self.client()
            inventory = await asyncio.wait_for(client.inventory(), self.rpc_timeout_s)
            leases = await asyncio.wait_for(client.leases(), self.rpc_timeout_s)
        except (grpc.aio.AioRpcError, OSError, TimeoutError) as exc:
            self._set_down(_describe(exc))
            await self._drop_client()
            return
        self.inventory = inventory
        self.leases = {lease.id: lease for lease in leases}
        if not self.agent_up:
            log.info("agent answers", extra={"agent": self.agent_socket, "gpus": len(inventory.gpus),
                                             "simulated": inventory.simulated})
        self.agent_up = True
        self.agent_error = ""
        self.metrics.set_agent_up(True)
        self._recompute()
        self._first.set()

    async def _watch(self) -> None:
        """Any Watch event means the pool may have changed: refresh at once."""
        while True:
            try:
                async for _ in self.client().watch():
                    self._kick.set()
            except (grpc.aio.AioRpcError, OSError) as exc:
                log.debug("agent watch ended", extra={"error": _describe(exc)})
            self._kick.set()
            await asyncio.sleep(self.poll_s / 2)

    def _set_down(self, reason: str) -> None:
        if self.agent_up or self.agent_error != reason:
            log.warning("agent unreachable: free units go Unhealthy",
                        extra={"agent": self.agent_socket, "error": reason})
        self.agent_up = False
        self.agent_error = reason
        self.metrics.set_agent_up(False)
        self._recompute()
        self._first.set()

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    def _recompute(self) -> None:
        order: list[str] = []
        capacity: dict[str, int] | None = None
        if self.inventory is not None:
            order = [g.uuid for g in sorted(self.inventory.gpus, key=lambda g: g.index)]
        if self.agent_up and self.inventory is not None:
            capacity = gpu_capacity_units(self.inventory, self.leases.values(), self.unit_bytes)
        units = compute_units(order, capacity, self._known, self._in_use)
        for u in units:
            self._known[u.gpu_uuid] = max(self._known.get(u.gpu_uuid, 0), u.k + 1)
        healthy = sum(u.healthy for u in units)
        self.metrics.set_units(healthy, len(units) - healthy)
        if [(u.id, u.healthy) for u in units] != [(u.id, u.healthy) for u in self._units]:
            self._units = units
            self._version += 1
            log.info("units changed", extra={"units": len(units), "healthy": healthy, "version": self._version})
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return str(exc) or type(exc).__name__
