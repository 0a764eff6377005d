"""The operator's client of the node agents: one `AgentClient` per agent endpoint (TCP, mutual
TLS, `AgentPool`), and the lease calls the operator makes there (`Agents`), for every lease kind
(RESERVATION and ELASTIC), and the local reservation of a GPU (SetGpuLocal).

Every Acquire carries an idempotency key (`<tenant uid>/<replica>/<lender gpu uuid>`), so a retry
after a crash gets the same lease and token back instead of a second one. When the lease that a
key names has already ended (released, expired, revoked), the next attempt appends `/2`, `/3`...
(`pods.idempotency_key`): walking that chain from 1 is itself idempotent.

Leases the operator finds at an agent without their token (the startup sweep) are released by
replaying their Acquire with the same idempotency key, which returns the token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from spillway.agent.client import AgentClient, largest_grantable
from spillway.api.v1 import agent_pb2
from spillway.contract import HOLDER_PREFIX
from spillway.operator.pods import LeaseRef, idempotency_key
from spillway.pki import TlsFiles, tls_signature

log = logging.getLogger(__name__)

LIVE_STATES = frozenset({agent_pb2.RESERVED, agent_pb2.ACTIVE, agent_pb2.REVOKING})
MAX_ATTEMPTS = 32


class AgentError(RuntimeError):
    """An agent refused or could not be reached; `code` is the gRPC status code name."""

    def __init__(self, message: str, code: str = "UNAVAILABLE", largest_grantable: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.largest_grantable = largest_grantable


@dataclass(frozen=True)
class Tls:
    """Client certificate, key and CA for the agents' mutual TLS (paths)."""

    cert: str
    key: str
    ca: str
    # The name the agents' certificates carry, checked instead of the dialled host (empty: the host).
    server_name: str = ""


def kind_name(kind: int) -> str:
    return str(agent_pb2.LeaseKind.Name(kind))


def state_name(state: int) -> str:
    return str(agent_pb2.LeaseState.Name(state))


def _error(exc: grpc.aio.AioRpcError, what: str, endpoint: str) -> AgentError:
    code = exc.code().name if exc.code() is not None else "UNKNOWN"
    try:
        largest = largest_grantable(exc)
    except (TypeError, ValueError):
        largest = None
    return AgentError(f"{what} at agent {endpoint}: {code}: {exc.details()}", code, largest)


class AgentPool:
    """One client per agent endpoint, created on first use and kept until the operator's TLS
    files change (a renewed client certificate): then new clients are made with the new files,
    and the old ones close once their calls in flight are done."""

    RECHECK_S = 5.0  # how often the TLS files are looked at (a stat of three files)
    CLOSE_GRACE_S = 30.0

    def __init__(self, tls: Tls | None = None) -> None:
        self.tls = tls
        self._files = TlsFiles(tls.cert, tls.key, tls.ca) if tls else None
        self._clients: dict[str, AgentClient] = {}
        self._signature = self._read_signature()
        self._checked = time.monotonic()
        self._closing: set[asyncio.Task[None]] = set()
        self.renewals = 0  # how many times new TLS files were picked up

    def _read_signature(self) -> tuple[tuple[int, int, int], ...]:
        return tls_signature(self._files) if self._files else ()

    def _recheck_tls(self) -> None:
        now = time.monotonic()
        if self._files is None or now - self._checked < self.RECHECK_S:
            return
        self._checked = now
        sig = self._read_signature()
        if sig == self._signature:
            return
        self._signature = sig
        self.renewals += 1
        old, self._clients = list(self._clients.values()), {}
        log.info("TLS files changed: new agent connections use them", extra={"cert": self._files.cert,
                                                                               "open_clients": len(old)})
        for c in old:
            task = asyncio.get_running_loop().create_task(c.close(self.CLOSE_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def client(self, endpoint: str) -> AgentClient:
        self._recheck_tls()
        c = self._clients.get(endpoint)
        if c is None:
            server_name = self.tls.server_name if self.tls else ""
            c = AgentClient(endpoint, tls=self._files, server_name=server_name or None)
            self._clients[endpoint] = c
        return c

    async def drop(self, endpoint: str) -> None:
        c = self._clients.pop(endpoint, None)
        if c is not None:
            await c.close()

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            try:
                await c.close()
            except Exception:  # closing is best effort
                log.debug("closing an agent client failed", exc_info=True)


class Agents:
    """Acquire, renew and release tenant replicas' leases (RESERVATION and ELASTIC) at the node
    agents; set a GPU's local reservation; follow an agent's events."""

    def __init__(self, pool: AgentPool, *, ttl_s: float = 120.0, timeout_s: float = 10.0) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s

    async def _call(self, endpoint: str, what: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _error(exc, what, endpoint) from exc
        except (TimeoutError, OSError) as exc:
            raise AgentError(f"{what} at agent {endpoint}: {exc or 'timed out'}") from exc

    async def acquire(
        self,
        endpoint: str,
        *,
        holder: str,
        tenant_uid: str,
        replica: int,
        gpu_uuid: str,
        size: int,
        priority: int = 0,
        kind: int = agent_pb2.RESERVATION,
        pod: str = "",
        key_prefix: str = "",
    ) -> LeaseRef:
        """A live lease of `size` bytes on `gpu_uuid` for the replica: the one its idempotency key
        already names, else a new one."""
        client = self.pool.client(endpoint)
        for attempt in range(1, MAX_ATTEMPTS + 1):
            key = idempotency_key(tenant_uid, replica, key_prefix + gpu_uuid, attempt)
            resp = await self._call(
                endpoint,
                f"acquire {size} bytes on {gpu_uuid} for {holder}",
                client.acquire(
                    size, holder, kind=kind, gpu_uuid=gpu_uuid, ttl_s=self.ttl_s, priority=priority,
                    idempotency_key=key, pod=pod,
                ),
            )
            lease = resp.lease
            if lease.state in LIVE_STATES and lease.state != agent_pb2.REVOKING:
                return LeaseRef(
                    lease.id, resp.token, lease.gpu_uuid or gpu_uuid, int(lease.bytes), kind_name(kind), key
                )
            if lease.state == agent_pb2.REVOKING:
                # The lender wants it back: let it go and try the next key.
                await self.release(endpoint, LeaseRef(lease.id, resp.token, lease.gpu_uuid, int(lease.bytes)))
        raise AgentError(f"acquire for {holder} on {gpu_uuid}: {MAX_ATTEMPTS} ended leases under its key")

    async def renew(self, endpoint: str, lease: LeaseRef) -> tuple[agent_pb2.Lease | None, str]:
        """(the renewed lease, ""), or (None, why) when it has ended or is being revoked: the
        replica lost it."""
        client = self.pool.client(endpoint)
        try:
            renewed = await self._call(endpoint, f"renew {lease.id}", client.renew(lease.id, lease.token, self.ttl_s))
        except AgentError as exc:
            if exc.code in ("NOT_FOUND", "FAILED_PRECONDITION"):
                return None, str(exc)
            raise
        if renewed.state not in LIVE_STATES or renewed.state == agent_pb2.REVOKING:
            return None, f"lease {lease.id} is {state_name(renewed.state)}"
        return renewed, ""

    async def release(self, endpoint: str, lease: LeaseRef) -> None:
        """Give a lease back; an unknown or already ended lease is not an error."""
        client = self.pool.client(endpoint)
        try:
            await self._call(endpoint, f"release {lease.id}", client.release(lease.id, lease.token))
        except AgentError as exc:
            if exc.code not in ("NOT_FOUND",):
                raise

    async def release_listed(self, endpoint: str, lease: agent_pb2.Lease) -> bool:
        """Release a lease known only from ListLeases (no token): replay its Acquire with the same
        idempotency key to get the token back. False when that is not possible (no key)."""
        if not lease.idempotency_key:
            return False
        client = self.pool.client(endpoint)
        resp = await self._call(
            endpoint,
            f"recover the token of {lease.id}",
            client.acquire(
                int(lease.bytes), lease.holder, kind=lease.kind, gpu_uuid=lease.gpu_uuid,
                ttl_s=self.ttl_s, priority=lease.priority, idempotency_key=lease.idempotency_key, pod=lease.pod,
            ),
        )
        if resp.lease.id != lease.id:
            # The key now names another lease (the first one ended meanwhile): that one is ours too.
            log.info("replayed acquire returned another lease", extra={"lease": lease.id, "got": resp.lease.id})
        await self.release(endpoint, LeaseRef(resp.lease.id, resp.token, resp.lease.gpu_uuid, int(resp.lease.bytes)))
        return True

    async def held(self, endpoint: str, holder_prefix: str = HOLDER_PREFIX) -> list[agent_pb2.Lease]:
        """Live leases at an agent whose holder starts with `holder_prefix`."""
        client = self.pool.client(endpoint)
        leases = await self._call(endpoint, "list leases", client.leases())
        return [x for x in leases if x.holder.startswith(holder_prefix) and x.state in LIVE_STATES]

    async def set_local(self, endpoint: str, gpu_uuid: str, reserved: int) -> agent_pb2.Gpu:
        """Set the memory `gpu_uuid` keeps for its own tenant (the agent never lends it; growing
        it reclaims leases on that GPU when needed)."""
        client = self.pool.client(endpoint)
        gpu: agent_pb2.Gpu = await self._call(endpoint, f"set the local reservation of {gpu_uuid}",
                                              client.set_gpu_local(gpu_uuid, reserved=reserved))
        return gpu

    async def watch(self, endpoint: str) -> AsyncIterator[agent_pb2.WatchEvent]:
        """The agent's event stream (first event: SNAPSHOT)."""
        client = self.pool.client(endpoint)
        async for event in client.watch():
            yield event
