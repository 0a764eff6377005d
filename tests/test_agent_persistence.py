"""Persistence across restarts and kill -9, against a real agent subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import grpc

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2 as pb
from spillway.testing.agentproc import AgentProcess

GiB = 1 << 30


def check_invariant(inv: pb.Inventory, leases: list[pb.Lease]) -> None:
    by_gpu: dict[str, int] = {}
    ids = [x.id for x in leases]
    assert len(ids) == len(set(ids)), "a lease id appears twice"
    for x in leases:
        if x.state in (pb.RESERVED, pb.ACTIVE, pb.REVOKING):
            by_gpu[x.gpu_uuid] = by_gpu.get(x.gpu_uuid, 0) + x.bytes
    for g in inv.gpus:
        assert g.leased_bytes == by_gpu.get(g.uuid, 0)
        local = min(max(g.local_reserved_bytes, g.local_used_bytes), g.total_bytes - g.leased_bytes)
        assert g.leased_bytes + g.lendable_bytes + g.headroom_bytes + local == g.total_bytes
        # no byte granted twice: leases never exceed what the GPU could lend
        assert g.leased_bytes <= g.total_bytes - g.headroom_bytes - local


async def test_restart_restores_leases_and_tokens(agent: AgentProcess) -> None:
    async with agent.client() as c:
        keep = await c.acquire("3Gi", "keep", ttl_s=600, idempotency_key="k1")
        await c.claim(keep.lease.id, keep.token, pod="ns/p")
        short = await c.acquire("5Gi", "short", ttl_s=0.5)
        gone = await c.acquire("1Gi", "gone", ttl_s=600)
        await c.release(gone.lease.id, gone.token)
        before = await c.inventory()
    agent.stop()
    await asyncio.sleep(0.8)  # `short` runs out while the agent is down
    agent.start()
    async with agent.client() as c:
        live = await c.leases()
        assert [(x.id, x.state, x.pod) for x in live] == [(keep.lease.id, pb.ACTIVE, "ns/p")]
        ended = {x.id: x.state for x in await c.leases(include_ended=True)}
        assert ended[short.lease.id] == pb.EXPIRED and ended[gone.lease.id] == pb.RELEASED
        # the token still works, and the idempotency key still names the lease
        await c.renew(keep.lease.id, keep.token)
        again = await c.acquire("3Gi", "keep", ttl_s=600, idempotency_key="k1")
        assert again.lease.id == keep.lease.id and again.token == keep.token
        inv = await c.inventory()
        check_invariant(inv, await c.leases(include_ended=True))
        g = next(g for g in inv.gpus if g.uuid == keep.lease.gpu_uuid)
        assert g.leased_bytes == 3 * GiB
        assert sum(g.leased_bytes for g in inv.gpus) == 3 * GiB
        assert sum(g.leased_bytes for g in before.gpus) == 8 * GiB


async def test_kill9_under_200_concurrent_clients(agent: AgentProcess) -> None:
    """200 clients acquire and release at random; the agent is killed with SIGKILL mid-run.
    Every lease whose Acquire was answered (and not released) is there after the restart."""
    answered: dict[str, str] = {}  # lease id -> token, Acquire answered
    released: set[str] = set()  # Release answered
    release_sent: set[str] = set()
    stop = asyncio.Event()
    enough = asyncio.Event()
    errors: list[str] = []

    async def worker(i: int) -> None:
        rnd = random.Random(i)
        async with AgentClient(str(agent.socket)) as c:
            mine: list[str] = []
            while not stop.is_set():
                try:
                    if mine and rnd.random() < 0.5:
                        lid = mine.pop(rnd.randrange(len(mine)))
                        release_sent.add(lid)
                        await c.release(lid, answered[lid])
                        released.add(lid)
                    else:
                        got = await c.acquire(f"{rnd.choice((64, 128, 256))}Mi", f"w{i}", ttl_s=600)
                        answered[got.lease.id] = got.token
                        if len(answered) >= 600:
                            enough.set()
                        mine.append(got.lease.id)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                          grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                        errors.append(f"{exc.code()}: {exc.details()}")
                    return
                await asyncio.sleep(0)

    tasks = [asyncio.create_task(worker(i)) for i in range(200)]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(enough.wait(), 60)
    agent.kill()
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    assert not errors, errors[:5]
    assert len(answered) >= 600, f"only {len(answered)} acquires answered in 60 s"

    agent.start()
    async with agent.client() as c:
        all_leases = await c.leases(include_ended=True)
        inv = await c.inventory()
    state = {x.id: x.state for x in all_leases}
    missing = [lid for lid in answered if lid not in state]
    assert not missing, f"{len(missing)} answered acquires lost, e.g. {missing[:3]}"
    for lid in answered:
        if lid in released:
            assert state[lid] == pb.RELEASED, lid
        elif lid not in release_sent:
            assert state[lid] == pb.RESERVED, lid
    check_invariant(inv, all_leases)
    assert sum(g.leased_bytes for g in inv.gpus) == sum(
        x.bytes for x in all_leases if x.state == pb.RESERVED)


def test_checkpoints_run_beside_commits_and_lose_nothing(tmp_path: Path) -> None:
    """The store never checkpoints inside a commit (SQLite's default would, with an fsync on the
    answer's path); a checkpoint from another thread while commits go on keeps every row."""
    import threading

    from spillway.agent.pool import Event, Kind, Lease, State
    from spillway.agent.store import Store

    store = Store(tmp_path / "leases.db")
    assert store.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0

    def lease(i: int) -> Lease:
        return Lease(id=f"l-{i}", holder="h", kind=Kind.RESERVATION, gpu_uuid="GPU-x", bytes=64 << 20, priority=0,
                     state=State.ACTIVE, created_at_ms=i, expires_at_ms=10**13, ttl_ms=60_000, token_hash="t", seq=i)

    for i in range(300):
        store.apply([Event("lease", lease=lease(i), time_ms=i)])
    wal = tmp_path / "leases.db-wal"
    assert wal.stat().st_size > 300 * 4096 // 2  # nothing folded in by a commit
    assert store.commits == 300

    stop = threading.Event()
    rounds: list[tuple[int, int, int]] = []

    def checkpointer() -> None:
        while not stop.is_set():
            rounds.append(store.checkpoint())

    t = threading.Thread(target=checkpointer)
    t.start()
    try:
        for i in range(300, 1300):
            store.apply([Event("lease", lease=lease(i), time_ms=i)])
            if i % 3 == 0:
                store.apply([Event("forget", lease=lease(i - 300), time_ms=i)])
    finally:
        stop.set()
        t.join()
    assert rounds and any(done > 0 for _, _, done in rounds)
    store.close()  # a final TRUNCATE checkpoint
    assert not wal.exists() or wal.stat().st_size == 0
    leases, _ = Store(tmp_path / "leases.db").load()
    forgotten = {f"l-{i - 300}" for i in range(300, 1300) if i % 3 == 0}
    assert {x.id for x in leases} == {f"l-{i}" for i in range(1300)} - forgotten
