"""Allocate and GetPreferredAllocation.

Allocate: find the pod (see `pods`), mark it, then either claim its reservation at the agent
(annotations written by the operator: lease ids and tokens) or, for a pod without one, acquire
a RESERVATION lease on the spot; answer with the lease in the borrower's environment, a mount
of the agent's borrower socket directory (never the admin socket's) and the lender GPU's
device node (or CDI name). Only units this plugin advertised are accepted, each once. A request that
cannot be served fails with a message that says why and changes nothing at the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from spillway.api.deviceplugin.v1beta1 import api_pb2
from spillway.api.v1 import agent_pb2
from spillway.deviceplugin import (
    ANN_NODE,
    ANN_RESERVATION,
    ANN_TOKEN,
    ENV_AGENT_SOCKET,
    ENV_LEASE_ID,
    ENV_LEASE_TOKEN,
    ENV_LENDER_GPUS,
)
from spillway.deviceplugin.metrics import Metrics
from spillway.deviceplugin.pods import ROLE_APP, ROLE_INIT, PodRef, PodSource, PodSourceError
from spillway.deviceplugin.resources import LIVE_STATES, ResourceManager, parse_unit_id
from spillway.deviceplugin.state import Allocation, AllocationStore
from spillway.units import format_bytes

log = logging.getLogger(__name__)

MARK_ATTEMPTS = 5
MAX_DEVICE_ID = 256  # characters; longer IDs are refused before anything else looks at them


def _ids_shown(ids: list[str], n: int = 3) -> str:
    """A few of `ids` for a message, each cut short (an Allocate may carry thousands of long IDs)."""
    shown = ", ".join(repr(i if len(i) <= 60 else i[:60] + "...") for i in ids[:n])
    return shown + (f" and {len(ids) - n} more" if len(ids) > n else "")


class AllocationError(Exception):
    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class AllocatorConfig:
    node: str
    agent_socket: str              # the agent's admin socket (the plugin's own calls)
    borrower_socket: str           # the agent's borrower socket, as the borrower sees it
    borrower_socket_host_dir: str  # its directory on the host (mounted into the borrower)
    unit_bytes: int
    cdi: bool = False
    lease_ttl_s: float = 0.0       # on-the-spot leases; 0: the agent's default
    rpc_timeout_s: float = 10.0


@dataclass(frozen=True)
class Grant:
    leases: tuple[agent_pb2.Lease, ...]
    tokens: tuple[str, ...]
    result: str


def lease_env(leases: Sequence[agent_pb2.Lease], tokens: Sequence[str], agent_socket: str) -> dict[str, str]:
    """The borrower's environment for its leases (read by spillway.client): the device plugin's
    Allocate and the DRA driver's CDI spec give the same."""
    return {
        ENV_LEASE_ID: ",".join(lease.id for lease in leases),
        ENV_LEASE_TOKEN: ",".join(tokens),
        ENV_AGENT_SOCKET: agent_socket,
        ENV_LENDER_GPUS: ",".join(lease.gpu_uuid for lease in leases),
    }


class Allocator:
    def __init__(
        self,
        config: AllocatorConfig,
        resources: ResourceManager,
        pods: PodSource | None,
        store: AllocationStore,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.resources = resources
        self.pods = pods
        self.store = store
        self.metrics = metrics
        self._lock = asyncio.Lock()

    # --- Allocate ---------------------------------------------------------------------
    async def allocate(self, device_ids: list[str]) -> api_pb2.ContainerAllocateResponse:
        t0 = time.monotonic()
        async with self._lock:
            try:
                response, result = await self._allocate(list(device_ids))
            except AllocationError as exc:
                self.metrics.allocation("error", time.monotonic() - t0)
                log.warning("allocate failed", extra={"units": len(device_ids), "error": exc.message})
                raise
        self.metrics.allocation(result, time.monotonic() - t0)
        return response

    async def _allocate(self, ids: list[str]) -> tuple[api_pb2.ContainerAllocateResponse, str]:
        self._check_ids(ids)
        if not self.resources.agent_up:
            raise AllocationError(self._agent_down(self.resources.agent_error), grpc.StatusCode.UNAVAILABLE)
        self._check_fits(ids)
        pod = await self._take_pod(ids)
        try:
            if pod is not None and pod.reservations:
                grant = await self._claim(pod)
            else:
                grant = await self._on_the_spot(ids, pod)
            try:
                response = self._response(grant)
            except AllocationError:
                if grant.result == "on_the_spot":
                    await self._release(grant)
                raise
        except AllocationError as exc:
            if pod is not None and self.pods is not None:
                with contextlib.suppress(PodSourceError):
                    await self.pods.update_mark(pod, {"result": "error", "units": len(ids), "message": exc.message})
            raise
        record = Allocation(
            lease_ids=[lease.id for lease in grant.leases], tokens=list(grant.tokens), device_ids=ids,
            gpu_uuids=[lease.gpu_uuid for lease in grant.leases], result=grant.result,
            pod=pod.key if pod else "", container=pod.container if pod else "",
            role=pod.role if pod else ROLE_APP, pod_uid=pod.uid if pod else "",
            ttl_s=max((lease.ttl_ms for lease in grant.leases), default=0) / 1000.0)
        try:
            self.store.add(record)
        except OSError as exc:
            # Without the record nobody could release the lease when the pod goes: give it back.
            if grant.result == "on_the_spot":
                await self._release(grant)
            message = f"cannot record the lease in the state directory ({exc}); nothing was allocated"
            if pod is not None and self.pods is not None:
                with contextlib.suppress(PodSourceError):
                    await self.pods.update_mark(pod, {"result": "error", "units": len(ids), "message": message})
            raise AllocationError(message, grpc.StatusCode.INTERNAL) from exc
        self.resources.add_in_use(ids)
        self.resources.kick()
        if pod is not None and self.pods is not None:
            try:
                await self.pods.update_mark(pod, {"result": grant.result, "units": len(ids), "role": pod.role,
                                                  "leases": [lease.id for lease in grant.leases]})
            except PodSourceError as exc:
                log.warning("allocated, but could not record it on the pod", extra={"pod": pod.key, "error": str(exc)})
        log.info("allocated", extra={
            "pod": pod.key if pod else "", "container": pod.container if pod else "",
            "role": pod.role if pod else "", "units": len(ids),
            "result": grant.result, "leases": ",".join(lease.id for lease in grant.leases),
            "lender_gpus": ",".join(lease.gpu_uuid for lease in grant.leases)})
        return response, grant.result

    def _check_ids(self, ids: list[str]) -> None:
        """Only units this plugin advertised, each once (INVALID_ARGUMENT otherwise)."""
        if not ids:
            raise AllocationError("the request names no spillway.dev/peer-hbm units", grpc.StatusCode.INVALID_ARGUMENT)
        long_ids = [i for i in ids if len(i) > MAX_DEVICE_ID]
        if long_ids:
            raise AllocationError(f"{len(long_ids)} device IDs are longer than {MAX_DEVICE_ID} characters "
                                  f"({_ids_shown(long_ids, 1)}): not spillway.dev/peer-hbm units of this plugin",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        repeated = [i for i, n in Counter(ids).items() if n > 1]
        if repeated:
            raise AllocationError(f"device IDs repeat ({_ids_shown(repeated)}): each unit can be allocated once",
                                  grpc.StatusCode.INVALID_ARGUMENT)
        advertised = {u.id for u in self.resources.units}
        foreign = [i for i in ids if i not in advertised]
        if foreign:
            raise AllocationError(f"device IDs {_ids_shown(foreign)} are not spillway.dev/peer-hbm units this plugin "
                                  f"advertised on node {self.config.node}", grpc.StatusCode.INVALID_ARGUMENT)

    def _check_fits(self, ids: list[str]) -> None:
        """More units than the largest GPU holds cannot be leased anywhere: RESOURCE_EXHAUSTED."""
        inventory = self.resources.inventory
        biggest = max((int(g.total_bytes) for g in inventory.gpus), default=0) if inventory else 0
        size = len(ids) * self.config.unit_bytes
        if inventory is not None and size > biggest:
            raise AllocationError(f"no room: {len(ids)} units ({format_bytes(size)}) are more than the largest GPU of "
                                  f"node {self.config.node} holds ({format_bytes(biggest)}); a lease comes from one "
                                  "GPU", grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def _take_pod(self, ids: list[str]) -> PodRef | None:
        if self.pods is None:
            return None
        units = len(ids)
        # The kubelet hands an app container units of its pod's init containers first (they have
        # finished by the time it starts): units recorded for an init container name the pod.
        wanted = set(ids)
        reusing = {a.pod for a in self.store.all() if a.role == ROLE_INIT and a.pod and wanted & set(a.device_ids)}
        for _ in range(MARK_ATTEMPTS):
            try:
                candidates = await self.pods.candidates(units, reusing)
                if not candidates:
                    log.warning("no pod on this node waits for these units; leasing without a pod name",
                                extra={"node": self.config.node, "units": units})
                    return None
                if await self.pods.mark(candidates[0], {"result": "pending", "units": units}):
                    return candidates[0]
            except PodSourceError as exc:
                raise AllocationError(f"{exc}; nothing was allocated", grpc.StatusCode.UNAVAILABLE) from exc
        raise AllocationError(f"the pods of node {self.config.node} kept changing while marking one for "
                              f"{units} units; nothing was allocated", grpc.StatusCode.ABORTED)

    async def _claim(self, pod: PodRef) -> Grant:
        node = self.config.node
        if pod.reservation_node and pod.reservation_node != node:
            raise AllocationError(f"pod {pod.key}: its reservation ({ANN_NODE}) is at node {pod.reservation_node}'s "
                                  f"agent, but the pod runs on node {node}")
        if len(pod.tokens) != len(pod.reservations):
            raise AllocationError(f"pod {pod.key}: annotation {ANN_TOKEN} has {len(pod.tokens)} tokens for "
                                  f"{len(pod.reservations)} leases in {ANN_RESERVATION}")
        client = self.resources.client()
        leases: list[agent_pb2.Lease] = []
        for lease_id, token in zip(pod.reservations, pod.tokens, strict=True):
            try:
                lease = await asyncio.wait_for(client.claim(lease_id, token, pod=pod.key), self.config.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise AllocationError(self._claim_error(pod, lease_id, exc), exc.code()) from exc
            except (TimeoutError, OSError) as exc:
                raise AllocationError(self._agent_down(str(exc) or "no answer in time"),
                                      grpc.StatusCode.UNAVAILABLE) from exc
            if lease.state not in LIVE_STATES:
                raise AllocationError(f"reservation {lease_id} of pod {pod.key} is "
                                      f"{agent_pb2.LeaseState.Name(lease.state)}, not live: the operator must "
                                      "reserve again (recreate the pod)")
            leases.append(lease)
        granted = sum(int(lease.bytes) for lease in leases)
        if -(-granted // self.config.unit_bytes) != pod.units:
            log.warning("the pod's unit count does not match its reservation", extra={
                "pod": pod.key, "units": pod.units, "reserved": format_bytes(granted)})
        return Grant(tuple(leases), tuple(pod.tokens), "reservation")

    def _claim_error(self, pod: PodRef, lease_id: str, exc: grpc.aio.AioRpcError) -> str:
        code, details = exc.code(), exc.details() or ""
        what = f"reservation {lease_id} of pod {pod.key}"
        if code == grpc.StatusCode.NOT_FOUND:
            return (f"{what} is unknown to the agent on node {self.config.node} (it expired and was forgotten, "
                    f"or was made at another node's agent): {details}")
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return f"{what} cannot be claimed (expired or released?): {details}"
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return f"{what}: the token in annotation {ANN_TOKEN} is not that lease's token: {details}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return self._agent_down(f"{code.name}: {details}")
        return f"{what}: the agent refused the claim: {code.name}: {details}"

    async def _on_the_spot(self, ids: list[str], pod: PodRef | None) -> Grant:
        size = len(ids) * self.config.unit_bytes
        client = self.resources.client()
        holder = f"pod:{pod.key}" if pod else f"deviceplugin:{self.config.node}"
        key = f"deviceplugin/{pod.uid}/{pod.container}" if pod else ""
        # The GPU most of the units belong to first, then wherever the agent finds room.
        counts = Counter(g for g, _ in (parse_unit_id(i) or ("", 0) for i in ids))
        first = counts.most_common(1)[0][0] if counts else ""
        attempts = [first, ""] if first and self.resources.gpu(first) is not None else [""]
        last: grpc.aio.AioRpcError | None = None
        for gpu in attempts:
            try:
                resp = await asyncio.wait_for(client.acquire(
                    str(size), holder, kind=agent_pb2.RESERVATION, gpu_uuid=gpu, ttl_s=self.config.lease_ttl_s,
                    idempotency_key=key, pod=pod.key if pod else ""), self.config.rpc_timeout_s)
                return Grant((resp.lease,), (resp.token,), "on_the_spot")
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    last = exc
                    continue
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise AllocationError(self._agent_down(f"{exc.code().name}: {exc.details()}"),
                                          grpc.StatusCode.UNAVAILABLE) from exc
                raise AllocationError(f"the agent refused a lease of {format_bytes(size)}: "
                                      f"{exc.code().name}: {exc.details()}", exc.code()) from exc
            except (TimeoutError, OSError) as exc:
                raise AllocationError(self._agent_down(str(exc) or "no answer in time"),
                                      grpc.StatusCode.UNAVAILABLE) from exc
        whom = f"pod {pod.key}" if pod else "a pod this plugin could not identify"
        raise AllocationError(f"no room: {len(ids)} units ({format_bytes(size)}) for {whom} do not fit on any one "
                              f"GPU of node {self.config.node}: {last.details() if last else ''}",
                              grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def _release(self, grant: Grant) -> None:
        client = self.resources.client()
        for lease, token in zip(grant.leases, grant.tokens, strict=True):
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError, OSError):
                await asyncio.wait_for(client.release(lease.id, token), self.config.rpc_timeout_s)

    def _agent_down(self, reason: str) -> str:
        return (f"the Spillway agent at {self.config.agent_socket} on node {self.config.node} does not answer "
                f"({reason}); nothing was allocated")

    def _response(self, grant: Grant) -> api_pb2.ContainerAllocateResponse:
        socket_dir = os.path.dirname(self.config.borrower_socket)
        resp = api_pb2.ContainerAllocateResponse(
            envs=lease_env(grant.leases, grant.tokens, self.config.borrower_socket),
            mounts=[api_pb2.Mount(container_path=socket_dir, host_path=self.config.borrower_socket_host_dir,
                                  read_only=True)],
        )
        for uuid in dict.fromkeys(lease.gpu_uuid for lease in grant.leases):
            if self.config.cdi:
                resp.cdi_devices.append(api_pb2.CDIDevice(name=f"nvidia.com/gpu={uuid}"))
                continue
            path = self.resources.device_node(uuid)
            if path is None:
                raise AllocationError(f"lender GPU {uuid} is not in the agent's inventory of node {self.config.node}")
            resp.devices.append(api_pb2.DeviceSpec(container_path=path, host_path=path, permissions="rw"))
        return resp

    # --- GetPreferredAllocation -------------------------------------------------------
    async def preferred(self, available: list[str], must_include: list[str], size: int) -> list[str]:
        """Keep a pod's units together: its reservation's GPUs first, then the fewest GPUs."""
        chosen = list(dict.fromkeys(must_include))
        need = size - len(chosen)
        if need <= 0:
            return chosen
        by_gpu: dict[str, list[tuple[int, str]]] = {}
        for device_id in dict.fromkeys(available):
            parsed = parse_unit_id(device_id)
            if parsed and device_id not in chosen:
                by_gpu.setdefault(parsed[0], []).append((parsed[1], device_id))
        first: list[str] = list(await self._pod_gpus(size))
        first += [p[0] for p in (parse_unit_id(i) for i in chosen) if p]

        def rank(gpu: str) -> tuple[int, int, int]:
            if gpu in first:
                return (0, first.index(gpu), 0)
            n = len(by_gpu[gpu])
            # One GPU that fits the rest (the tightest one), else the largest first.
            return (1, 0, n) if n >= need else (2, 0, -n)

        for gpu in sorted(by_gpu, key=rank):
            for _, device_id in sorted(by_gpu[gpu]):
                if need == 0:
                    break
                chosen.append(device_id)
                need -= 1
        return chosen

    async def _pod_gpus(self, units: int) -> tuple[str, ...]:
        """Lender GPUs of the pod that will most likely get this allocation (read only)."""
        if self.pods is None:
            return ()
        try:
            candidates = await self.pods.candidates(units)
        except PodSourceError as exc:
            log.debug("preferred allocation without pod hints", extra={"error": str(exc)})
            return ()
        if not candidates:
            return ()
        pod = candidates[0]
        gpus = [self.resources.leases[r].gpu_uuid for r in pod.reservations if r in self.resources.leases]
        return tuple(dict.fromkeys(gpus + list(pod.lender_gpus)))
