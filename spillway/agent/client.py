"""Async client of the agent's gRPC API (grpc.aio).

    async with AgentClient("/run/spillway/agent.sock") as agent:
        got = await agent.acquire("4Gi", "tenant-a", kind=agent_pb2.ELASTIC)
        await agent.release(got.lease.id, got.token)

`target` is a unix socket path, "unix:///path", or "host:port" (TCP with mutual TLS: pass
`tls=TlsFiles(cert, key, ca)`). With `server_name`, TLS checks the agent's certificate against
that name instead of the dialled host, so an agent reached by IP ("10.1.2.3:7443") can carry a
fixed name ("spillway-agent") in its certificate (unix sockets carry no TLS: it is unused there).
Errors surface as grpc.aio.AioRpcError (.code(), .details()).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, cast

import grpc

from spillway.api.v1 import agent_pb2, agent_pb2_grpc
from spillway.contract import TRAILER_LARGEST_GRANTABLE
from spillway.pki import TlsFiles

LARGEST_METADATA = TRAILER_LARGEST_GRANTABLE


def channel_target(target: str) -> tuple[str, bool]:
    """(gRPC target, is_unix)."""
    if target.startswith("unix:"):
        return target, True
    if target.startswith("/") or target.startswith(".") or ":" not in target:
        return f"unix:{target}", True
    return target, False


def largest_grantable(err: grpc.aio.AioRpcError) -> int | None:
    """The largest size the agent could grant, from a RESOURCE_EXHAUSTED error's trailers."""
    for k, v in err.trailing_metadata() or ():
        if k == LARGEST_METADATA:
            return int(v)
    return None


class AgentClient:
    def __init__(self, target: str, *, tls: TlsFiles | None = None, server_name: str | None = None,
                 timeout: float | None = 30.0) -> None:
        self.timeout = timeout  # per unary call, seconds
        self.target, unix = channel_target(str(target))
        options: list[tuple[str, Any]] = [("grpc.enable_retries", 0)]
        if server_name and tls is None:
            raise ValueError(f"server_name {server_name!r} checks the agent's TLS certificate: give tls=TlsFiles(...)")
        if server_name and not unix:
            # The name TLS verifies (and sends as SNI and :authority) instead of the dialled host.
            options.append(("grpc.ssl_target_name_override", server_name))
        if unix or tls is None:
            self.channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(root_certificates=tls.ca.read_bytes(),
                                                 private_key=tls.key.read_bytes(),
                                                 certificate_chain=tls.cert.read_bytes())
            self.channel = grpc.aio.secure_channel(self.target, creds, options=options)
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; with `grace`, calls in flight get that many seconds to finish."""
        await self.channel.close(grace)

    async def inventory(self) -> agent_pb2.Inventory:
        return await self.stub.GetInventory(agent_pb2.GetInventoryRequest(), timeout=self.timeout)

    async def acquire(
        self,
        size: str | int,
        holder: str,
        *,
        kind: int | str = agent_pb2.RESERVATION,
        gpu_uuid: str = "",
        near_gpu_uuid: str = "",
        ttl_s: float = 0.0,
        priority: int = 0,
        idempotency_key: str = "",
        pod: str = "",
    ) -> agent_pb2.AcquireResponse:
        req = agent_pb2.AcquireRequest(size=str(size), holder=holder, kind=cast(Any, kind), gpu_uuid=gpu_uuid,
                                       near_gpu_uuid=near_gpu_uuid, ttl_ms=round(ttl_s * 1000), priority=priority,
                                       idempotency_key=idempotency_key, pod=pod)
        return await self.stub.Acquire(req, timeout=self.timeout)

    async def renew(self, lease_id: str, token: str, ttl_s: float = 0.0) -> agent_pb2.Lease:
        return await self.stub.Renew(agent_pb2.RenewRequest(lease_id=lease_id, token=token,
                                                            ttl_ms=round(ttl_s * 1000)), timeout=self.timeout)

    async def release(self, lease_id: str, token: str) -> agent_pb2.Lease:
        return await self.stub.Release(agent_pb2.ReleaseRequest(lease_id=lease_id, token=token), timeout=self.timeout)

    async def claim(self, lease_id: str, token: str, holder: str = "", pod: str = "") -> agent_pb2.Lease:
        return await self.stub.Claim(agent_pb2.ClaimRequest(lease_id=lease_id, token=token, holder=holder, pod=pod),
                                     timeout=self.timeout)

    async def leases(self, holder: str = "", include_ended: bool = False, gpu_uuid: str = "") -> list[agent_pb2.Lease]:
        """Every lease that matches (the agent answers a page at a time; this follows the pages)."""
        out: list[agent_pb2.Lease] = []
        token = ""
        while True:
            resp = await self.stub.ListLeases(agent_pb2.ListLeasesRequest(
                holder=holder, include_ended=include_ended, gpu_uuid=gpu_uuid, page_token=token), timeout=self.timeout)
            out.extend(resp.leases)
            token = resp.next_page_token
            if not token:
                return out

    async def watch(self, lease_id: str = "", token: str = "") -> AsyncGenerator[agent_pb2.WatchEvent, None]:
        """The agent's events; the first is one SNAPSHOT (its pages joined here)."""
        call = self.stub.Watch(agent_pb2.WatchRequest(lease_id=lease_id, token=token))
        snapshot: agent_pb2.WatchEvent | None = None
        try:
            async for ev in call:
                if ev.kind == agent_pb2.WatchEvent.SNAPSHOT:
                    if snapshot is None:
                        snapshot = ev
                    else:
                        snapshot.leases.extend(ev.leases)
                        snapshot.sequence = ev.sequence
                    if ev.snapshot_more:
                        continue
                    snapshot.snapshot_more = False
                    ev, snapshot = snapshot, None
                yield ev
        finally:
            call.cancel()

    async def reclaim(self, gpu_uuid: str, size: str | int, reason: str = "",
                      deadline_s: float = 0.0) -> agent_pb2.ReclaimResponse:
        req = agent_pb2.ReclaimRequest(gpu_uuid=gpu_uuid, size=str(size), reason=reason,
                                       deadline_ms=round(deadline_s * 1000))
        return await self.stub.Reclaim(req, timeout=self.timeout)

    async def set_gpu_local(self, gpu_uuid: str, reserved: str | int | None = None,
                            simulated_used: str | int | None = None) -> agent_pb2.Gpu:
        req = agent_pb2.SetGpuLocalRequest(gpu_uuid=gpu_uuid)
        if reserved is not None:
            req.reserved = str(reserved)
        if simulated_used is not None:
            req.simulated_used = str(simulated_used)
        return await self.stub.SetGpuLocal(req, timeout=self.timeout)
