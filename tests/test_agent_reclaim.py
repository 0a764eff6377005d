"""Watch stream and reclaim, over a real socket: REVOKING reaches the holder within 50 ms;
release before the deadline ends RELEASED, no release ends REVOKED at the deadline."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2 as pb
from spillway.testing.agentproc import DEFAULT_TOPOLOGY, AgentProcess

GiB = 1 << 30


async def next_lease_event(it: AsyncIterator[pb.WatchEvent], lease_id: str, state: int,
                           within: float = 10.0) -> pb.WatchEvent:
    async def go() -> pb.WatchEvent:
        async for ev in it:
            if ev.kind == pb.WatchEvent.LEASE and ev.lease.id == lease_id and ev.lease.state == state:
                return ev
        raise AssertionError("stream ended")

    return await asyncio.wait_for(go(), within)


async def test_watch_starts_with_snapshot(agent: AgentProcess) -> None:
    async with agent.client() as c:
        got = await c.acquire("1Gi", "a")
        it = c.watch()
        first = await asyncio.wait_for(it.__anext__(), 10)
        assert first.kind == pb.WatchEvent.SNAPSHOT
        assert [x.id for x in first.leases] == [got.lease.id] and len(first.inventory.gpus) == 8
        second = await c.acquire("2Gi", "b")
        ev = await next_lease_event(it, second.lease.id, pb.RESERVED)
        assert ev.lease.bytes == 2 * GiB and ev.sequence > first.sequence
        cap = await asyncio.wait_for(it.__anext__(), 10)
        assert cap.kind == pb.WatchEvent.CAPACITY
        assert [g.uuid for g in cap.inventory.gpus] == [second.lease.gpu_uuid]
        await it.aclose()


async def test_watch_single_lease_needs_token(agent: AgentProcess) -> None:
    async with agent.client() as c:
        got = await c.acquire("1Gi", "a")
        it = c.watch(got.lease.id, "wrong")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(it.__anext__(), 10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_reclaim_notifies_within_50ms_and_release_ends_released(agent: AgentProcess) -> None:
    async with agent.client() as c, agent.client() as admin:
        gpu = (await c.inventory()).gpus[2].uuid
        res = await c.acquire("10Gi", "holder", gpu_uuid=gpu, kind=pb.RESERVATION)
        el = await c.acquire("4Gi", "elastic", gpu_uuid=gpu, kind=pb.ELASTIC)
        it = c.watch(res.lease.id, res.token)
        assert (await asyncio.wait_for(it.__anext__(), 10)).kind == pb.WatchEvent.SNAPSHOT
        # 4Gi is covered by the ELASTIC lease alone; 6Gi more takes the reservation too
        latencies = []
        t0 = time.perf_counter()
        r = await admin.reclaim(gpu, "6Gi", reason="tenant grows", deadline_s=5)
        assert [x.id for x in r.revoking] == [el.lease.id, res.lease.id], "ELASTIC goes first"
        assert r.revoking_bytes == 14 * GiB and r.requested_bytes == 6 * GiB
        ev = await next_lease_event(it, res.lease.id, pb.REVOKING)
        latencies.append(time.perf_counter() - t0)
        assert ev.lease.reason == "tenant grows" and ev.lease.revoke_deadline_ms > 0
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await c.renew(res.lease.id, res.token)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        released = await c.release(res.lease.id, res.token)
        assert released.state == pb.RELEASED
        ev = await next_lease_event(it, res.lease.id, pb.RELEASED)
        assert "before the revoke deadline" in ev.lease.reason
        await it.aclose()
        # Measured from the Reclaim call in the client to the event in the holder's stream.
        assert latencies[0] < 0.050, f"REVOKING reached the holder after {latencies[0] * 1000:.1f} ms"


async def test_unreleased_lease_is_revoked_at_deadline(agent: AgentProcess) -> None:
    async with agent.client() as c:
        gpu = (await c.inventory()).gpus[0].uuid
        got = await c.acquire("8Gi", "stubborn", gpu_uuid=gpu)
        it = c.watch()
        assert (await asyncio.wait_for(it.__anext__(), 10)).kind == pb.WatchEvent.SNAPSHOT
        t0 = time.perf_counter()
        await c.reclaim(gpu, "1Gi", deadline_s=0.4)
        ev = await next_lease_event(it, got.lease.id, pb.REVOKED)
        waited = time.perf_counter() - t0
        assert 0.35 <= waited < 2.0, f"REVOKED after {waited:.3f} s, deadline was 0.4 s"
        assert ev.lease.id == got.lease.id and "revoke deadline" in ev.lease.reason
        assert ev.lease.ended_at_ms >= ev.lease.revoke_deadline_ms
        g = next(g for g in (await c.inventory()).gpus if g.uuid == gpu)
        assert g.leased_bytes == 0
        await it.aclose()


async def test_local_growth_reclaims(agent: AgentProcess) -> None:
    async with agent.client() as c:
        g = (await c.inventory()).gpus[5]
        low = await c.acquire("20Gi", "low", gpu_uuid=g.uuid, priority=1)
        high = await c.acquire("20Gi", "high", gpu_uuid=g.uuid, priority=5)
        it = c.watch()
        await asyncio.wait_for(it.__anext__(), 10)
        # the GPU's own tenant now reserves 40Gi: total 79.6Gi - 4Gi headroom - 40Gi leaves room for one lease
        updated = await c.set_gpu_local(g.uuid, reserved="40Gi")
        assert updated.local_reserved_bytes == 40 * GiB
        ev = await next_lease_event(it, low.lease.id, pb.REVOKING)
        assert "own tenant" in ev.lease.reason
        live = {x.id: x.state for x in await c.leases()}
        assert live == {low.lease.id: pb.REVOKING, high.lease.id: pb.RESERVED}, "lower priority goes first"
        inv = await c.inventory()
        gg = next(x for x in inv.gpus if x.uuid == g.uuid)
        local = min(max(gg.local_reserved_bytes, gg.local_used_bytes), gg.total_bytes - gg.leased_bytes)
        assert gg.leased_bytes + gg.lendable_bytes + gg.headroom_bytes + local == gg.total_bytes
        assert gg.lendable_bytes == 0
        await it.aclose()


async def test_simulated_use_and_sighup(tmp_path: Path) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text(DEFAULT_TOPOLOGY.read_text())
    with AgentProcess(topology=topo, node_name="hup") as a:
        async with a.client() as c:
            g = (await c.inventory()).gpus[0]
            got = await c.acquire("30Gi", "t", gpu_uuid=g.uuid)
            gpu = await c.set_gpu_local(g.uuid, simulated_used="10Gi")
            assert gpu.local_used_bytes == 10 * GiB
            assert (await c.leases())[0].state == pb.RESERVED
            # the file now says GPU 0's tenant uses 60Gi: SIGHUP re-reads it, which reclaims
            topo.write_text(topo.read_text().replace("{index: 0, name: NVIDIA H100 80GB HBM3, memory: 81559Mi, "
                                                     "localUsed: 0}", "{index: 0, name: NVIDIA H100 80GB HBM3, "
                                                     "memory: 81559Mi, localUsed: 60Gi}"))
            a.signal(signal.SIGHUP)
            for _ in range(100):
                inv = await c.inventory()
                if inv.gpus[0].local_used_bytes == 60 * GiB:
                    break
                await asyncio.sleep(0.05)
            assert inv.gpus[0].local_used_bytes == 60 * GiB
            assert (await c.leases())[0].state == pb.REVOKING
            await c.release(got.lease.id, got.token)


async def test_metrics_exposed(agent: AgentProcess) -> None:
    async with agent.client() as c:
        gpu = (await c.inventory()).gpus[1].uuid
        got = await c.acquire("1Gi", "m", gpu_uuid=gpu)
        it = c.watch(got.lease.id, got.token)
        await asyncio.wait_for(it.__anext__(), 10)
        await c.reclaim(gpu, "1Gi", deadline_s=5)
        await next_lease_event(it, got.lease.id, pb.REVOKING)
        await c.release(got.lease.id, got.token)
        await it.aclose()
        with pytest.raises(grpc.aio.AioRpcError):
            await c.acquire("0", "m")

    def fetch(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}{path}", timeout=10) as r:
            return r.status, r.read().decode()

    status, text = await asyncio.to_thread(fetch, "/metrics")
    assert status == 200
    node = 'node="sim-node-0"'
    for line in (
        f'spillway_agent_info{{backend="simulated",{node},simulated="true",version="0.1.0"}} 1.0',
        f'spillway_lease_operations_total{{code="OK",method="Acquire",{node}}} 1.0',
        f'spillway_lease_operations_total{{code="INVALID_ARGUMENT",method="Acquire",{node}}} 1.0',
        f'spillway_reclaims_total{{{node},trigger="api"}} 1.0',
        f'spillway_revocations_total{{{node},outcome="released"}} 1.0',
        f'spillway_reclaim_notify_seconds_count{{{node}}} 1.0',
        f'spillway_leases{{kind="ELASTIC",{node},state="ACTIVE"}} 0.0',
    ):
        assert line in text, line
    assert f'spillway_gpu_memory_leased_bytes{{UUID="{gpu}",gpu="1",{node},simulated="true"}} 0.0' in text
    for name in ("spillway_gpu_memory_total_bytes", "spillway_gpu_memory_local_used_bytes",
                 "spillway_gpu_memory_local_reserved_bytes", "spillway_gpu_memory_headroom_bytes",
                 "spillway_gpu_memory_lendable_bytes", "spillway_lease_operation_duration_seconds_bucket",
                 "spillway_lease_expiries_total", "spillway_agent_heartbeat_timestamp_seconds"):
        assert name in text, name
    assert (await asyncio.to_thread(fetch, "/readyz"))[0] == 200


async def test_many_watchers_and_client_disconnects_do_not_hurt(agent: AgentProcess) -> None:
    async with agent.client() as c:
        streams = [c.watch() for _ in range(20)]
        for s in streams:
            assert (await asyncio.wait_for(s.__anext__(), 10)).kind == pb.WatchEvent.SNAPSHOT
        for s in streams[:10]:
            await s.aclose()
        got = await c.acquire("1Gi", "x")
        for s in streams[10:]:
            await next_lease_event(s, got.lease.id, pb.RESERVED)
            await s.aclose()
    async with AgentClient(str(agent.socket)) as c2:
        assert len(await c2.leases()) == 1
