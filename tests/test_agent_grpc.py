"""The agent's gRPC API over a real unix socket, against a real agent subprocess."""

from __future__ import annotations

import asyncio
import os
import stat

import grpc
import pytest

from spillway.agent.client import AgentClient, largest_grantable
from spillway.api.v1 import agent_pb2 as pb
from spillway.testing.agentproc import DEFAULT_TOPOLOGY, AgentProcess

GiB = 1 << 30


async def snapshot(c: AgentClient) -> tuple[list[tuple[object, ...]], list[bytes]]:
    """The pool's state, comparable before and after a rejected call."""
    inv = await c.inventory()
    gpus = [(g.uuid, g.total_bytes, g.local_used_bytes, g.local_reserved_bytes, g.headroom_bytes, g.leased_bytes,
             g.lendable_bytes) for g in inv.gpus]
    leases = [x.SerializeToString(deterministic=True) for x in await c.leases(include_ended=True)]
    return gpus, leases


async def rejected(c: AgentClient, call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    before = await snapshot(c)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    assert info.value.details(), "an error must say what to fix"
    assert await snapshot(c) == before, "a rejected call must change nothing"
    return info.value


async def test_inventory_is_simulated_and_accounted(agent: AgentProcess) -> None:
    async with agent.client() as c:
        inv = await c.inventory()
    assert inv.simulated and inv.backend == "simulated"
    assert len(inv.gpus) == 8 and len({g.uuid for g in inv.gpus}) == 8
    assert inv.granularity_bytes == 64 << 20
    g = inv.gpus[0]
    assert g.total_bytes == 81559 << 20
    # default headroom max(2 GiB, 5 %) = 5 % of 81559 MiB, rounded so lendable is whole granules
    assert g.headroom_bytes >= int(g.total_bytes * 0.05)
    assert g.leased_bytes + g.lendable_bytes + g.headroom_bytes + g.local_used_bytes == g.total_bytes
    assert len(inv.links) == 28 and all(lk.nvlink and lk.nvlink_count == 18 for lk in inv.links)


async def test_socket_mode_0660(agent: AgentProcess) -> None:
    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o660
    assert stat.S_IMODE(os.stat(agent.attach_socket).st_mode) == 0o660


async def test_acquire_renew_claim_release(agent: AgentProcess) -> None:
    async with agent.client() as c:
        inv = await c.inventory()
        got = await c.acquire("1000Mi", "tenant-a", ttl_s=30, pod="ns/p")
        x = got.lease
        assert x.bytes == 1024 << 20, "rounded up to the 64Mi granularity"
        assert x.state == pb.RESERVED and x.ttl_ms == 30_000 and got.token
        g = next(g for g in (await c.inventory()).gpus if g.uuid == x.gpu_uuid)
        g0 = next(g for g in inv.gpus if g.uuid == x.gpu_uuid)
        assert g.leased_bytes == x.bytes and g.lendable_bytes == g0.lendable_bytes - x.bytes
        renewed = await c.renew(x.id, got.token, ttl_s=120)
        assert renewed.expires_at_ms >= x.expires_at_ms + 89_000 and renewed.ttl_ms == 120_000
        claimed = await c.claim(x.id, got.token, holder="pod-b")
        assert claimed.state == pb.ACTIVE and claimed.holder == "pod-b"
        released = await c.release(x.id, got.token)
        assert released.state == pb.RELEASED
        again = await c.release(x.id, got.token)
        assert again.state == pb.RELEASED, "releasing twice is not an error"
        assert await c.leases() == []
        assert [y.id for y in await c.leases(include_ended=True)] == [x.id]


async def test_idempotent_acquire_returns_same_lease(agent: AgentProcess) -> None:
    async with agent.client() as c:
        a = await c.acquire("2Gi", "op", idempotency_key="uid-1/0")
        b = await c.acquire("2Gi", "op", idempotency_key="uid-1/0")
        assert a.lease.id == b.lease.id and a.token == b.token
        assert len(await c.leases()) == 1
        await rejected(c, c.acquire("4Gi", "op", idempotency_key="uid-1/0"), grpc.StatusCode.FAILED_PRECONDITION)


async def test_near_prefers_nvlink_then_most_lendable() -> None:
    with AgentProcess(topology=DEFAULT_TOPOLOGY.parent / "nvlink-pairs.yaml", node_name="pairs") as agent:
        async with agent.client() as c:
            inv = await c.inventory()
            u = [g.uuid for g in inv.gpus]
            # GPU1 is GPU0's only NVLink peer: chosen while it has room
            first = await c.acquire("40Gi", "b", near_gpu_uuid=u[0])
            assert first.lease.gpu_uuid == u[1]
            second = await c.acquire("40Gi", "b", near_gpu_uuid=u[0])
            assert second.lease.gpu_uuid == u[1]
            # GPU1 is now short of room: next best is the most lendable PCIe GPU (2 or 3)
            third = await c.acquire("40Gi", "b", near_gpu_uuid=u[0])
            assert third.lease.gpu_uuid in (u[2], u[3])
            assert not any(lk.nvlink for lk in inv.links if {lk.gpu_a, lk.gpu_b} == {u[0], u[2]})


async def test_permission_denied_wrong_or_missing_token(agent: AgentProcess) -> None:
    async with agent.client() as c:
        got = await c.acquire("1Gi", "t")
        for token in ("", "nope", got.token[:-1] + ("0" if got.token[-1] != "0" else "1")):
            await rejected(c, c.renew(got.lease.id, token), grpc.StatusCode.PERMISSION_DENIED)
            await rejected(c, c.release(got.lease.id, token), grpc.StatusCode.PERMISSION_DENIED)
            await rejected(c, c.claim(got.lease.id, token), grpc.StatusCode.PERMISSION_DENIED)


async def test_invalid_sizes(agent: AgentProcess) -> None:
    async with agent.client() as c:
        gpu = (await c.inventory()).gpus[0].uuid
        for size in ("0", "-1Gi", "lots", "4 GB", "", "1e3"):
            err = await rejected(c, c.acquire(size, "t"), grpc.StatusCode.INVALID_ARGUMENT)
            assert "4Gi" in err.details(), f"the message shows the accepted forms: {err.details()}"
        err = await rejected(c, c.acquire("81Gi", "t", gpu_uuid=gpu), grpc.StatusCode.INVALID_ARGUMENT)
        assert "total" in err.details()
        await rejected(c, c.acquire("1Gi", ""), grpc.StatusCode.INVALID_ARGUMENT)
        await rejected(c, c.acquire("1Gi", "t", kind=7), grpc.StatusCode.INVALID_ARGUMENT)
        await rejected(c, c.acquire("1Gi", "t", ttl_s=-1), grpc.StatusCode.INVALID_ARGUMENT)
        await rejected(c, c.reclaim(gpu, "0"), grpc.StatusCode.INVALID_ARGUMENT)
        # Larger than the GPU (and than a uint64 in the answer): refused, not an internal error.
        for huge in ("81Gi", "20E"):
            err = await rejected(c, c.reclaim(gpu, huge), grpc.StatusCode.INVALID_ARGUMENT)
            assert "total" in err.details()
        await rejected(c, c.set_gpu_local(gpu, reserved="100Gi"), grpc.StatusCode.INVALID_ARGUMENT)


async def test_resource_exhausted_names_largest(agent: AgentProcess) -> None:
    async with agent.client() as c:
        inv = await c.inventory()
        for g in inv.gpus[1:]:
            await c.acquire(str(g.lendable_bytes - 10 * GiB), "filler", gpu_uuid=g.uuid)
        g0 = inv.gpus[0]
        err = await rejected(c, c.acquire("78Gi", "t"), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert largest_grantable(err) == g0.lendable_bytes
        assert str(g0.lendable_bytes) in err.details()
        err = await rejected(c, c.acquire("11Gi", "t", gpu_uuid=inv.gpus[3].uuid), grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert largest_grantable(err) == 10 * GiB
        ok = await c.acquire(str(largest_grantable(err)), "t", gpu_uuid=inv.gpus[3].uuid)
        assert ok.lease.bytes == 10 * GiB


async def test_not_found(agent: AgentProcess) -> None:
    async with agent.client() as c:
        await rejected(c, c.renew("l-unknown", "tok"), grpc.StatusCode.NOT_FOUND)
        await rejected(c, c.release("l-unknown", "tok"), grpc.StatusCode.NOT_FOUND)
        await rejected(c, c.claim("l-unknown", "tok"), grpc.StatusCode.NOT_FOUND)
        await rejected(c, c.acquire("1Gi", "t", gpu_uuid="GPU-nope"), grpc.StatusCode.NOT_FOUND)
        await rejected(c, c.acquire("1Gi", "t", near_gpu_uuid="GPU-nope"), grpc.StatusCode.NOT_FOUND)
        await rejected(c, c.reclaim("GPU-nope", "1Gi"), grpc.StatusCode.NOT_FOUND)
        await rejected(c, c.leases(gpu_uuid="GPU-nope"), grpc.StatusCode.NOT_FOUND)
        await rejected(c, c.set_gpu_local("GPU-nope", reserved="1Gi"), grpc.StatusCode.NOT_FOUND)


async def test_ttl_expiry_returns_bytes(agent: AgentProcess) -> None:
    async with agent.client() as c:
        before = await c.inventory()
        got = await c.acquire("8Gi", "t", ttl_s=0.3)
        mid = await c.inventory()
        assert sum(g.leased_bytes for g in mid.gpus) == 8 * GiB
        await asyncio.sleep(0.8)
        (x,) = await c.leases(include_ended=True)
        assert x.state == pb.EXPIRED and x.id == got.lease.id
        after = await c.inventory()
        assert [g.lendable_bytes for g in after.gpus] == [g.lendable_bytes for g in before.gpus]
        await rejected(c, c.renew(got.lease.id, got.token), grpc.StatusCode.FAILED_PRECONDITION)


async def test_tcp_mutual_tls() -> None:
    with AgentProcess(tcp=True, node_name="tls-node") as agent:
        async with agent.tcp_client() as c:
            inv = await c.inventory()
            assert inv.node_name == "tls-node"
        # without a client certificate the TLS handshake fails
        async with AgentClient(agent.endpoint) as bare:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await bare.inventory()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
