"""Pod attribution through the kubelet PodResources API.

Every `interval_s` the plugin lists which pods hold which `spillway.dev/peer-hbm` units
(`/var/lib/kubelet/pod-resources/kubelet.sock`, `v1.PodResourcesLister/List`) and, for each
lease it handed out (its `AllocationStore`):
- puts the pod's name on the lease at the agent (`Claim(pod=...)`) where it was not known;
- renews the lease (a third of its TTL before it would run out) while the pod exists;
- releases the lease once its pod is gone (after `grace_s`, so an Allocate whose pod the
  kubelet has not listed yet is not mistaken for a gone pod);
- releases an init container's lease once that init container has completed (pod status from
  the Kubernetes API; PodResources does not list init containers): the app containers that
  reuse its units have leases of their own.
The units that pods hold also tell the resource manager which units are in use.
When the PodResources API does not answer, nothing is released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import grpc

from spillway.api.podresources.v1 import api_pb2, api_pb2_grpc
from spillway.deviceplugin import RESOURCE_NAME
from spillway.deviceplugin.pods import ROLE_INIT, PodSourceError
from spillway.deviceplugin.resources import ResourceManager
from spillway.deviceplugin.state import Allocation, AllocationStore

log = logging.getLogger(__name__)


async def list_pod_units(socket: Path | str, resource: str = RESOURCE_NAME, timeout_s: float = 5.0
                         ) -> dict[str, dict[str, list[str]]]:
    """{"namespace/name": {container: [unit IDs]}} for every pod the kubelet lists (pods
    without units of `resource` included, with no containers, so their presence is known)."""
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        resp = await stub.List(api_pb2.ListPodResourcesRequest(), timeout=timeout_s)
    out: dict[str, dict[str, list[str]]] = {}
    for pod in resp.pod_resources:
        containers = out.setdefault(f"{pod.namespace}/{pod.name}", {})
        for c in pod.containers:
            ids = [i for d in c.devices if d.resource_name == resource for i in d.device_ids]
            if ids:
                containers[c.name] = ids
    return out


class Attributor:
    def __init__(
        self,
        socket: Path | str,
        resources: ResourceManager,
        store: AllocationStore,
        *,
        interval_s: float = 5.0,
        grace_s: float = 30.0,
        rpc_timeout_s: float = 5.0,
        completed_inits: Callable[[], Awaitable[set[tuple[str, str]]]] | None = None,
    ) -> None:
        self.socket = socket
        self.completed_inits = completed_inits
        self.resources = resources
        self.store = store
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.rpc_timeout_s = rpc_timeout_s
        self.last_error = ""
        self._warned = False

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except Exception:  # keep attributing; a bug in one round must not stop the plugin
                log.exception("pod attribution round failed")
            await asyncio.sleep(self.interval_s)

    async def sync_once(self) -> None:
        try:
            pods = await list_pod_units(self.socket, timeout_s=self.rpc_timeout_s)
        except (grpc.aio.AioRpcError, OSError) as exc:
            rpc = isinstance(exc, grpc.aio.AioRpcError)
            self.last_error = f"{exc.code().name}: {exc.details()}" if rpc else str(exc)  # type: ignore[union-attr]
            if not self._warned:
                log.warning("the kubelet PodResources API does not answer; no lease is released meanwhile",
                            extra={"socket": str(self.socket), "error": self.last_error})
                self._warned = True
            return
        self.last_error, self._warned = "", False
        now = time.time()
        owner_of_unit = {i: pod for pod, cs in pods.items() for ids in cs.values() for i in ids}
        fresh = [a for a in self.store.all() if now - a.created_at < self.grace_s]
        self.resources.set_in_use(set(owner_of_unit) | {i for a in fresh for i in a.device_ids})
        if not self.resources.agent_up:
            return
        done = await self._completed_inits()
        for alloc in self.store.all():
            if alloc.role == ROLE_INIT and (alloc.pod_uid, alloc.container) in done:
                await self._release(alloc, "released the lease of an init container that completed")
                continue
            owner = alloc.pod if alloc.pod in pods else ""
            if not owner:
                owners = {owner_of_unit[i] for i in alloc.device_ids if i in owner_of_unit}
                owner = owners.pop() if len(owners) == 1 and not alloc.pod else ""
            if owner:
                await self._keep(alloc, owner, now)
            elif now - alloc.created_at >= self.grace_s:
                await self._release(alloc)

    async def _keep(self, alloc: Allocation, pod: str, now: float) -> None:
        client = self.resources.client()
        try:
            if alloc.pod != pod:
                for lease_id, token in zip(alloc.lease_ids, alloc.tokens, strict=True):
                    await asyncio.wait_for(client.claim(lease_id, token, pod=pod), self.rpc_timeout_s)
                alloc = replace(alloc, pod=pod)
                self.store.update(alloc)
                log.info("lease attributed to its pod", extra={"leases": alloc.key, "pod": pod})
            if alloc.ttl_s > 0 and now - alloc.renewed_at >= alloc.ttl_s / 3:
                for lease_id, token in zip(alloc.lease_ids, alloc.tokens, strict=True):
                    await asyncio.wait_for(client.renew(lease_id, token), self.rpc_timeout_s)
                self.store.update(replace(alloc, renewed_at=now))
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                # An init container's client releases its lease when it exits: expected, not a warning.
                (log.info if alloc.role == ROLE_INIT else log.warning)(
                    "a pod's lease ended at the agent; forgetting it", extra={
                        "leases": alloc.key, "pod": pod, "container": alloc.container,
                        "error": f"{exc.code().name}: {exc.details()}"})
                self.store.remove(alloc)
            else:
                log.warning("could not update a pod's lease", extra={
                    "leases": alloc.key, "pod": pod, "error": f"{exc.code().name}: {exc.details()}"})
        except (TimeoutError, OSError) as exc:
            log.warning("could not update a pod's lease", extra={"leases": alloc.key, "error": str(exc)})

    async def _completed_inits(self) -> set[tuple[str, str]]:
        """(pod uid, container) of completed init containers holding one of our leases."""
        if self.completed_inits is None or not any(a.role == ROLE_INIT and a.pod_uid for a in self.store.all()):
            return set()
        try:
            return await self.completed_inits()
        except PodSourceError as exc:
            log.warning("cannot read init container states; their leases stay for now", extra={"error": str(exc)})
            return set()

    async def _release(self, alloc: Allocation, why: str = "released the lease of a pod that is gone") -> None:
        client = self.resources.client()
        for lease_id, token in zip(alloc.lease_ids, alloc.tokens, strict=True):
            try:
                await asyncio.wait_for(client.release(lease_id, token), self.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    log.warning("could not release the lease of a gone pod; retrying", extra={
                        "lease": lease_id, "error": f"{exc.code().name}: {exc.details()}"})
                    return
            except (TimeoutError, OSError) as exc:
                log.warning("could not release the lease of a gone pod; retrying", extra={
                    "lease": lease_id, "error": str(exc)})
                return
        self.store.remove(alloc)
        self.resources.kick()
        log.info(why, extra={"leases": alloc.key, "pod": alloc.pod or "?", "container": alloc.container})
