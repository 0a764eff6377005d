"""NodePrepareResources / NodeUnprepareResources: a claim's consumed capacity becomes a lease.

Prepare reads the claim from the API server (the kubelet sends only namespace, name and
UID), takes each allocation result of this driver on this node (device = lender GPU,
`consumedCapacity.memory` = bytes) and acquires a lease of that size on that GPU at the
agent, idempotent by the claim UID (`dra/<claim uid>/<request>/<share id>`): a prepare
repeated after a restart of this plugin, or of the agent (its lease table persists), gets the
same lease and token, never a second one. The lease is claimed (ACTIVE, holder
`claim:<namespace>/<name>`, the pod that reserved the claim). The leases and tokens are kept
in the plugin's state directory (spillway.deviceplugin.state, the device plugin's record) so
they are renewed while prepared and released at unprepare, also after a restart.

The container gets one CDI device per claim, `peer-hbm.spillway.dev/claim=<claim uid>`: the
lease environment (the device plugin's, `lease_env`), a read-only mount of the agent socket's
directory and the lender GPUs' device nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from spillway.api.dra.v1 import api_pb2
from spillway.api.v1 import agent_pb2
from spillway.deviceplugin.allocator import lease_env
from spillway.deviceplugin.resources import LIVE_STATES, ResourceManager, device_node
from spillway.deviceplugin.state import Allocation, AllocationStore
from spillway.dra import CAPACITY, DRIVER, LEASE_KEY_PREFIX
from spillway.dra.metrics import Metrics
from spillway.dra.slices import gpu_of_device
from spillway.units import QuantityError, format_bytes, parse_quantity

log = logging.getLogger(__name__)

CDI_VERSION = "0.6.0"
CDI_KIND = f"{DRIVER}/claim"
RESULT = "dra"
_UID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class PrepareError(Exception):
    """A claim that cannot be prepared; the message goes to the kubelet (and the pod's events)."""


@dataclass(frozen=True)
class PrepareConfig:
    node: str
    agent_socket: str              # the agent's admin socket: the driver's own calls
    borrower_socket: str           # the agent's borrower socket, as the borrower sees it
    borrower_socket_host_dir: str  # its directory on the host (mounted into the borrower)
    cdi_dir: Path                  # where the container runtime reads CDI specs (/var/run/cdi)
    lease_ttl_s: float = 0.0       # 0: the agent's default
    rpc_timeout_s: float = 10.0


@dataclass(frozen=True)
class Share:
    """One allocation result of this driver in a claim: `bytes` of `device` for `request`."""
    request: str
    pool: str
    device: str
    share_id: str
    bytes: int

    @property
    def key_suffix(self) -> str:
        return f"{self.request}/{self.share_id or self.device}"


def claim_shares(claim: dict[str, Any], node: str) -> list[Share]:
    """This driver's allocation results of a claim object, checked (pure)."""
    meta = claim.get("metadata", {})
    where = f"ResourceClaim {meta.get('namespace')}/{meta.get('name')}"
    allocation = (claim.get("status") or {}).get("allocation")
    if not allocation:
        raise PrepareError(f"{where} is not allocated (the scheduler allocates it before the pod starts)")
    shares = []
    for r in (allocation.get("devices") or {}).get("results") or []:
        if r.get("driver") != DRIVER:
            continue
        if r.get("pool") != node:
            raise PrepareError(f"{where}: device {r.get('device')} is in pool {r.get('pool')}, not this node's "
                               f"({node}); it is prepared by the node that publishes it")
        consumed = (r.get("consumedCapacity") or {}).get(CAPACITY)
        if consumed is None:
            raise PrepareError(f"{where}: the allocation of device {r.get('device')} has no consumedCapacity."
                               f"{CAPACITY}: the scheduler must run with the DRAConsumableCapacity feature gate "
                               "(beta, on by default since Kubernetes 1.36)")
        try:
            nbytes = parse_quantity(str(consumed))
        except QuantityError as exc:
            raise PrepareError(f"{where}: consumed {CAPACITY} {consumed!r}: {exc}") from exc
        shares.append(Share(request=str(r.get("request", "")), pool=str(r.get("pool")), device=str(r.get("device")),
                            share_id=str(r.get("shareID") or ""), bytes=nbytes))
    if not shares:
        raise PrepareError(f"{where} has no device of driver {DRIVER} allocated")
    return shares


def claim_pod(claim: dict[str, Any]) -> str:
    """"namespace/name" of the pod that reserved the claim (the first), or ""."""
    ns = claim.get("metadata", {}).get("namespace", "")
    for ref in (claim.get("status") or {}).get("reservedFor") or []:
        if ref.get("resource") == "pods" and ref.get("name"):
            return f"{ns}/{ref['name']}"
    return ""


def cdi_device_id(claim_uid: str) -> str:
    return f"{CDI_KIND}={claim_uid}"


def cdi_spec(claim_uid: str, env: dict[str, str], device_nodes: Iterable[str], socket_dir: str,
             host_socket_dir: str) -> dict[str, Any]:
    """The CDI spec of one claim (https://github.com/cncf-tags/container-device-interface, spec 0.6)."""
    return {
        "cdiVersion": CDI_VERSION,
        "kind": CDI_KIND,
        "devices": [{
            "name": claim_uid,
            "containerEdits": {
                "env": [f"{k}={v}" for k, v in sorted(env.items())],
                "deviceNodes": [{"path": p, "hostPath": p, "permissions": "rw"} for p in dict.fromkeys(device_nodes)],
                "mounts": [{"hostPath": host_socket_dir, "containerPath": socket_dir,
                            "options": ["ro", "nosuid", "nodev", "bind"]}],
            },
        }],
    }


class ClaimSource:
    """Reads ResourceClaims from the API server (the synchronous client, in a thread)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.api: Any = client.ResourceV1Api(api_client)

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.api.read_namespaced_resource_claim(name, namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        body: dict[str, Any] = json.loads(resp.data)
        return body


class Preparer:
    def __init__(self, config: PrepareConfig, resources: ResourceManager, claims: ClaimSource,
                 store: AllocationStore, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics(config.node)
        self.resources = resources
        self.claims = claims
        self.store = store
        self._lock = asyncio.Lock()

    # --- records ---------------------------------------------------------------------
    def record(self, claim_uid: str) -> Allocation | None:
        for a in self.store.all():
            if a.result == RESULT and a.pod_uid == claim_uid:
                return a
        return None

    def cdi_path(self, claim_uid: str) -> Path:
        return self.config.cdi_dir / f"{DRIVER}-{claim_uid}.json"

    # --- prepare ----------------------------------------------------------------------
    async def prepare(self, claim: api_pb2.Claim) -> api_pb2.NodePrepareResourceResponse:
        t0 = time.monotonic()
        try:
            if not _UID.match(claim.uid) or not claim.name or not claim.namespace:
                raise PrepareError(f"claim {claim.namespace}/{claim.name} (uid {claim.uid!r}): namespace, name and a "
                                   "UID are required")
            async with self._lock:
                devices = await self._prepare(claim)
        except PrepareError as exc:
            log.warning("prepare failed", extra={"claim": f"{claim.namespace}/{claim.name}", "uid": claim.uid,
                                                 "error": str(exc)})
            self.metrics.prepared(False, time.monotonic() - t0)
            return api_pb2.NodePrepareResourceResponse(error=str(exc))
        self.metrics.prepared(True, time.monotonic() - t0)
        return api_pb2.NodePrepareResourceResponse(devices=devices)

    async def _prepare(self, ref: api_pb2.Claim) -> list[api_pb2.Device]:
        name = f"{ref.namespace}/{ref.name}"
        try:
            obj = await asyncio.to_thread(self.claims.read, ref.namespace, ref.name)
        except Exception as exc:
            raise PrepareError(f"cannot read ResourceClaim {name} from the API server: {exc}") from exc
        if obj is None:
            raise PrepareError(f"ResourceClaim {name} does not exist")
        if obj.get("metadata", {}).get("uid") != ref.uid:
            raise PrepareError(f"ResourceClaim {name} has UID {obj.get('metadata', {}).get('uid')}, not {ref.uid}: "
                               "it was deleted and made again")
        shares = claim_shares(obj, self.config.node)
        pod = claim_pod(obj)
        inventory = self.resources.inventory
        if inventory is None or not self.resources.agent_up:
            raise PrepareError(self._agent_down(self.resources.agent_error or "not contacted yet"))
        leases: list[agent_pb2.Lease] = []
        tokens: list[str] = []
        nodes: list[str] = []
        client = self.resources.client()
        holder = f"claim:{name}"
        try:
            for share in shares:
                gpu = gpu_of_device(inventory, share.device)
                if gpu is None:
                    raise PrepareError(f"ResourceClaim {name}: device {share.device} is not a GPU of the agent on "
                                       f"node {self.config.node} (any more)")
                key = f"{LEASE_KEY_PREFIX}{ref.uid}/{share.key_suffix}"
                resp = await self._rpc(client.acquire(
                    str(share.bytes), holder, kind=agent_pb2.RESERVATION, gpu_uuid=gpu.uuid,
                    ttl_s=self.config.lease_ttl_s, idempotency_key=key, pod=pod), name, share)
                lease = await self._rpc(client.claim(resp.lease.id, resp.token, holder=holder, pod=pod), name, share)
                leases.append(lease)
                tokens.append(resp.token)
                nodes.append(device_node(gpu))
        except PrepareError:
            # Nothing half-done: give back what this call got (a retry gets new leases).
            if self.record(ref.uid) is None:
                await self._release(leases, tokens)
            raise
        env = lease_env(leases, tokens, self.config.borrower_socket)
        socket_dir = os.path.dirname(self.config.borrower_socket)
        spec = cdi_spec(ref.uid, env, nodes, socket_dir, self.config.borrower_socket_host_dir)
        try:
            _write_json(self.cdi_path(ref.uid), spec)
            record = Allocation(
                lease_ids=[lease.id for lease in leases], tokens=tokens,
                device_ids=[f"{s.pool}/{s.device}" for s in shares], gpu_uuids=[lease.gpu_uuid for lease in leases],
                result=RESULT, pod=pod, container=name, pod_uid=ref.uid,  # DRA: the claim and its UID
                ttl_s=max((lease.ttl_ms for lease in leases), default=0) / 1000.0)
            old = self.record(ref.uid)
            if old is not None:
                self.store.remove(old)
            self.store.add(record)
        except OSError as exc:
            raise PrepareError(f"ResourceClaim {name}: cannot write the CDI spec or the lease record ({exc})") from exc
        log.info("prepared", extra={"claim": name, "uid": ref.uid, "pod": pod,
                                    "leases": ",".join(lease.id for lease in leases),
                                    "bytes": ",".join(format_bytes(int(lease.bytes)) for lease in leases),
                                    "lender_gpus": ",".join(lease.gpu_uuid for lease in leases)})
        cdi = [cdi_device_id(ref.uid)]
        return [api_pb2.Device(request_names=[s.request], pool_name=s.pool, device_name=s.device,
                               cdi_device_ids=cdi if i == 0 else [], share_id=s.share_id or None)
                for i, s in enumerate(shares)]

    async def _rpc(self, call: Any, name: str, share: Share) -> Any:
        try:
            return await asyncio.wait_for(call, self.config.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise PrepareError(self._agent_down(f"{code.name}: {exc.details()}")) from exc
            raise PrepareError(f"ResourceClaim {name}: the agent refused a lease of {format_bytes(share.bytes)} on "
                               f"device {share.device}: {code.name}: {exc.details()}") from exc
        except (TimeoutError, OSError) as exc:
            raise PrepareError(self._agent_down(str(exc) or "no answer in time")) from exc

    def _agent_down(self, reason: str) -> str:
        return (f"the Spillway agent at {self.config.agent_socket} on node {self.config.node} does not answer "
                f"({reason}); nothing was prepared")

    async def _release(self, leases: Iterable[agent_pb2.Lease], tokens: Iterable[str]) -> list[str]:
        """Release leases; returns the errors (an unknown or ended lease is not one)."""
        errors = []
        client = self.resources.client()
        for lease, token in zip(leases, tokens, strict=True):
            try:
                await asyncio.wait_for(client.release(lease.id, token), self.config.rpc_timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION):
                    errors.append(f"lease {lease.id}: {exc.code().name}: {exc.details()}")
            except (TimeoutError, OSError) as exc:
                errors.append(self._agent_down(str(exc) or "no answer in time"))
        return errors

    # --- unprepare --------------------------------------------------------------------
    async def unprepare(self, claim: api_pb2.Claim) -> api_pb2.NodeUnprepareResourceResponse:
        async with self._lock:
            record = self.record(claim.uid)
            if record is not None:
                leases = [agent_pb2.Lease(id=i) for i in record.lease_ids]
                errors = await self._release(leases, record.tokens)
            else:
                errors = await self._release_unrecorded(claim)
            if errors:
                message = f"claim {claim.namespace}/{claim.name}: " + "; ".join(errors)
                log.warning("unprepare failed", extra={"uid": claim.uid, "error": message})
                self.metrics.unprepared(False)
                return api_pb2.NodeUnprepareResourceResponse(error=message)
            if record is not None:
                self.store.remove(record)
            self.cdi_path(claim.uid).unlink(missing_ok=True)
        log.info("unprepared", extra={"claim": f"{claim.namespace}/{claim.name}", "uid": claim.uid,
                                      "leases": ",".join(record.lease_ids) if record else ""})
        self.metrics.unprepared(True)
        return api_pb2.NodeUnprepareResourceResponse()

    async def _release_unrecorded(self, claim: api_pb2.Claim) -> list[str]:
        """Leases of the claim that the record lost (a crash between acquire and record): the
        idempotent Acquire hands their tokens back to this caller, then they are released."""
        prefix = f"{LEASE_KEY_PREFIX}{claim.uid}/"
        client = self.resources.client()
        try:
            live = [lease for lease in await asyncio.wait_for(client.leases(), self.config.rpc_timeout_s)
                    if lease.idempotency_key.startswith(prefix) and lease.state in LIVE_STATES]
            errors = []
            for lease in live:
                resp = await asyncio.wait_for(client.acquire(
                    str(lease.bytes), lease.holder, kind=lease.kind, gpu_uuid=lease.gpu_uuid,
                    idempotency_key=lease.idempotency_key), self.config.rpc_timeout_s)
                errors += await self._release([resp.lease], [resp.token])
            return errors
        except grpc.aio.AioRpcError as exc:
            return [f"{exc.code().name}: {exc.details()}"]
        except (TimeoutError, OSError) as exc:
            return [self._agent_down(str(exc) or "no answer in time")]

    # --- renewal ----------------------------------------------------------------------
    async def renew_forever(self, default_ttl_s: float = 60.0) -> None:
        """Renew the prepared claims' leases at a third of their TTL."""
        while True:
            records = [a for a in self.store.all() if a.result == RESULT]
            ttl = min((a.ttl_s for a in records if a.ttl_s > 0), default=default_ttl_s)
            now = time.time()
            client = self.resources.client()
            for a in records:
                if a.ttl_s and now - a.renewed_at < a.ttl_s / 3:
                    continue
                for lease_id, token in zip(a.lease_ids, a.tokens, strict=True):
                    with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError, OSError):
                        await asyncio.wait_for(client.renew(lease_id, token), self.config.rpc_timeout_s)
                a.renewed_at = now
                with contextlib.suppress(OSError):
                    self.store.update(a)
            await asyncio.sleep(max(0.2, ttl / 6))


def _write_json(path: Path, body: dict[str, Any]) -> None:
    """Write atomically (a runtime never reads half a spec)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".spillway-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
