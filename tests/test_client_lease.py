"""spillway.client against a real agent (subprocess, simulated GPUs, real unix sockets).

No GPU here, so the peer tier is the CPU arena labelled simulated-cpu; the lease, the PID
attach, renewals, Watch-pushed revocation and expiry are all the agent's real behaviour."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2
from spillway.client import HostMemory, LeaseUnavailable, OutOfPeerMemory, PeerMemory
from spillway.testing.agentproc import AgentProcess

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]


def call(agent: AgentProcess, fn: Callable[[AgentClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with agent.client() as c:
            return await fn(c)

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # works from sync and async tests alike
        return pool.submit(asyncio.run, go()).result()


def first_gpu(agent: AgentProcess) -> str:
    inv = call(agent, lambda c: c.inventory())
    assert inv.simulated, "these tests expect the simulated backend"
    return str(inv.gpus[0].uuid)


def lease_of(agent: AgentProcess, lease_id: str) -> agent_pb2.Lease:
    for lease in call(agent, lambda c: c.leases(include_ended=True)):
        if lease.id == lease_id:
            return lease
    raise AssertionError(f"agent does not know lease {lease_id}")


def acquire_env(agent: AgentProcess, size: str = "64Mi", ttl_s: float = 30.0) -> tuple[dict[str, str], str]:
    gpu = first_gpu(agent)
    got = call(agent, lambda c: c.acquire(size, "tenant-b", gpu_uuid=gpu, ttl_s=ttl_s))
    env = {
        "SPILLWAY_LEASE_ID": got.lease.id,
        "SPILLWAY_LEASE_TOKEN": got.token,
        "SPILLWAY_AGENT_SOCKET": str(agent.socket),
        "SPILLWAY_LENDER_GPUS": gpu,
    }
    return env, gpu


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_from_env_claims_attaches_the_pid_and_round_trips_blocks(agent: AgentProcess) -> None:
    env, gpu = acquire_env(agent)
    with PeerMemory.from_env(env, holder="llm-0", pod="ns/llm-0") as pm:
        assert pm.device_kind == "simulated-cpu" and "tier=simulated-cpu" in repr(pm)
        lease = lease_of(agent, env["SPILLWAY_LEASE_ID"])
        assert lease.state == agent_pb2.ACTIVE
        assert lease.pid == os.getpid() and lease.holder == "llm-0" and lease.pod == "ns/llm-0"
        gen = torch.Generator().manual_seed(3)
        blocks = [torch.randn(4096 + 7 * i, generator=gen).half() for i in range(200)]
        pm.put([("seq", i) for i in range(200)], blocks).synchronize()
        got = pm.get([("seq", i) for i in range(200)]).result()
        assert [digest(t) for t in got] == [digest(b) for b in blocks]
        s = pm.stats()
        assert s.blocks_peer == 200 and s.lender_gpu == gpu and s.leased_bytes == 64 << 20
        assert 0 < s.peer_used_bytes <= s.peer_capacity_bytes == s.leased_bytes
    lease = lease_of(agent, env["SPILLWAY_LEASE_ID"])
    assert lease.state == agent_pb2.RELEASED  # close gives the lease back


def test_no_lease_in_the_environment_means_host_memory_or_a_clear_error() -> None:
    pm = PeerMemory.from_env({})
    assert isinstance(pm, HostMemory) and pm.device_kind in ("host-pinned", "host-pageable")
    pm.put(["a"], [torch.arange(10)])
    assert torch.equal(pm.get(["a"]).result()[0], torch.arange(10))
    with pytest.raises(LeaseUnavailable, match=r"request spillway\.dev/peer-hbm"):
        PeerMemory.from_env({}, fallback="None")
    with pytest.raises(LeaseUnavailable, match="SPILLWAY_LEASE_TOKEN, SPILLWAY_AGENT_SOCKET is not"):
        PeerMemory.from_env({"SPILLWAY_LEASE_ID": "l-1"})


def test_a_wrong_token_is_refused_and_nothing_is_allocated(agent: AgentProcess) -> None:
    env, _ = acquire_env(agent)
    env["SPILLWAY_LEASE_TOKEN"] = "not-the-token"
    with pytest.raises(Exception, match="PERMISSION_DENIED"):
        PeerMemory.from_env(env)
    assert lease_of(agent, env["SPILLWAY_LEASE_ID"]).state == agent_pb2.RESERVED


def test_the_lease_is_renewed_while_in_use(agent: AgentProcess) -> None:
    env, _ = acquire_env(agent, ttl_s=2.0)
    with PeerMemory.from_env(env) as pm:
        first = lease_of(agent, env["SPILLWAY_LEASE_ID"])
        for i in range(10):  # in use for well past the TTL
            pm.put([i], [torch.full((1 << 16,), i, dtype=torch.uint8)])
            time.sleep(0.5)
        lease = lease_of(agent, env["SPILLWAY_LEASE_ID"])
        assert lease.state == agent_pb2.ACTIVE
        assert lease.holder == "tenant-b"  # no holder given: the lease keeps the one it had
        assert lease.expires_at_ms > first.expires_at_ms + 2000
        assert pm.stats().renewals >= 4
        assert all(int(t[0]) == i for i, t in enumerate(pm.get(list(range(10))).result()))


def test_the_byte_budget_is_never_exceeded(agent: AgentProcess) -> None:
    env, _ = acquire_env(agent, size="64Mi")
    with PeerMemory.from_env(env) as pm:
        blocks = [torch.full((1 << 20,), i, dtype=torch.uint8) for i in range(64)]
        pm.put(list(range(64)), blocks)
        assert pm.stats().peer_used_bytes == 64 << 20 == pm.stats().leased_bytes
        with pytest.raises(OutOfPeerMemory, match="does not fit in the leased memory: 64Mi of 64Mi in use"):
            pm.put(["one-more"], [torch.zeros(1, dtype=torch.uint8)])
        assert "one-more" not in pm and len(pm) == 64
        assert [digest(t) for t in pm.get(list(range(64))).result()] == [digest(b) for b in blocks]


def test_revocation_under_load_loses_nothing_and_finishes_before_the_deadline(agent: AgentProcess) -> None:
    env, gpu = acquire_env(agent, size="64Mi")
    pm = PeerMemory.from_env(env)
    written: dict[str, str] = {}
    tiers: set[str] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        gen = torch.Generator().manual_seed(11)
        n = 0
        try:
            while not stop.is_set():
                keys = [f"b{n + j}" for j in range(16)]
                blocks = [torch.randint(0, 255, (32 << 10,), dtype=torch.uint8, generator=gen) for _ in keys]
                try:
                    pm.put(keys, blocks).synchronize()
                except OutOfPeerMemory:  # a full lease: drop the oldest batch, as a server would
                    old = [f"b{n - 1024 + j}" for j in range(16)]
                    pm.evict(old, missing_ok=True)
                    for k in old:
                        written.pop(k, None)
                    continue
                written.update({k: digest(b) for k, b in zip(keys, blocks, strict=True)})
                tiers.add(pm.tier_of(keys[0]))
                n += 16
        except BaseException as exc:  # pragma: no cover - asserted below
            errors.append(exc)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(written) >= 2000, 60, "the writer to fill most of the lease")
        resp = call(agent, lambda c: c.reclaim(gpu, "64Mi", reason="lender needs it", deadline_s=4.0))
        assert [x.id for x in resp.revoking] == [env["SPILLWAY_LEASE_ID"]]
        rec = wait_for(
            lambda: pm.revocation if pm.revocation and pm.revocation.released_at else None,
            10,
            "the client to move its blocks and release",
        )
        n_after = len(written)
        wait_for(lambda: len(written) > n_after + 64, 30, "puts to go on into host memory after the revocation")
    finally:
        stop.set()
        t.join(timeout=30)
    assert not errors, errors
    assert rec.on_time and not rec.error and rec.blocks > 0
    assert rec.released_at <= rec.deadline
    lease = lease_of(agent, env["SPILLWAY_LEASE_ID"])
    assert lease.state == agent_pb2.RELEASED  # given back in time, not REVOKED at the deadline
    assert tiers == {"simulated-cpu", "host-pageable"}
    assert pm.device_kind == "host-pageable" and pm.stats().blocks_peer == 0
    keys = sorted(written)
    assert [digest(x) for x in pm.get(keys).result()] == [written[k] for k in keys]
    pm.close()


BORROWER = """
import sys, time, torch
from spillway.client import PeerMemory
pm = PeerMemory.from_env(holder="victim", renew_ttl_s=3.0)
pm.put(["x"], [torch.ones(1 << 20)])
print("ready", pm.stats().renewals, flush=True)
time.sleep(600)
"""


def test_the_lease_expires_after_the_borrower_is_killed(agent: AgentProcess) -> None:
    env, _ = acquire_env(agent, ttl_s=60.0)  # room for the child to import torch; it renews with a 3 s TTL
    child_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    proc = subprocess.Popen([sys.executable, "-c", BORROWER], env=child_env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), f"borrower did not start: {line!r}"
        time.sleep(4.0)  # longer than the TTL: the child's renewals keep it alive
        lease = lease_of(agent, env["SPILLWAY_LEASE_ID"])
        assert lease.state == agent_pb2.ACTIVE and lease.pid == proc.pid
        proc.kill()  # SIGKILL: no release, no goodbye
        proc.wait(10)
        killed_at = time.time()
        ended = wait_for(
            lambda: (x := lease_of(agent, env["SPILLWAY_LEASE_ID"])).state == agent_pb2.EXPIRED and x,
            15,
            "the agent to expire the dead borrower's lease",
        )
        assert ended.ended_at_ms / 1000 - killed_at < 3.0 + 3.0  # within the TTL (+ the agent's sweep period)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_acquire_grows_with_an_elastic_lease(agent: AgentProcess) -> None:
    gpu = first_gpu(agent)
    with PeerMemory.acquire(str(agent.socket), "128Mi", holder="llm-1", near_gpu_uuid=gpu) as pm:
        lease = lease_of(agent, pm.lease_id)
        assert lease.kind == agent_pb2.ELASTIC and lease.bytes == 128 << 20 and lease.state == agent_pb2.ACTIVE
        assert lease.gpu_uuid != gpu  # "near" a borrower GPU means a peer of it
        pm.put(["k"], [torch.arange(1000)])
        assert torch.equal(pm.get(["k"]).result()[0], torch.arange(1000))
    assert lease_of(agent, pm.lease_id).state == agent_pb2.RELEASED


def two_lender_env(agent: AgentProcess, size: str = "64Mi") -> tuple[dict[str, str], list[str], list[str]]:
    """The device plugin's form for a pod whose peer memory comes from two lender GPUs:
    comma-separated ids and tokens, in the order of SPILLWAY_LENDER_GPUS."""
    inv = call(agent, lambda c: c.inventory())
    gpus = [str(inv.gpus[1].uuid), str(inv.gpus[2].uuid)]
    got = [call(agent, lambda c, g=g: c.acquire(size, "tenant-c", gpu_uuid=g, ttl_s=30.0)) for g in gpus]
    ids = [g.lease.id for g in got]
    env = {
        "SPILLWAY_LEASE_ID": ",".join(ids),
        "SPILLWAY_LEASE_TOKEN": ",".join(g.token for g in got),
        "SPILLWAY_AGENT_SOCKET": str(agent.socket),
        "SPILLWAY_LENDER_GPUS": ",".join(gpus),
    }
    return env, ids, gpus


def test_two_lenders_hold_one_store_and_a_revocation_moves_only_its_own_blocks(agent: AgentProcess) -> None:
    env, ids, gpus = two_lender_env(agent)
    pm = PeerMemory.from_env(env, holder="llm-2")
    try:
        for lease_id in ids:
            lease = lease_of(agent, lease_id)
            assert lease.state == agent_pb2.ACTIVE and lease.pid == os.getpid() and lease.holder == "llm-2"
        s = pm.stats()
        assert s.lease_id == ",".join(ids) and s.lender_gpu == ",".join(gpus)
        assert s.leased_bytes == s.peer_capacity_bytes == 128 << 20 and s.lease_state == "ACTIVE,ACTIVE"
        # 96 MiB of 2 MiB blocks: more than one 64 MiB lease holds, so both arenas are used
        gen = torch.Generator().manual_seed(5)
        blocks = {f"k{i}": torch.randint(0, 255, (2 << 20,), dtype=torch.uint8, generator=gen) for i in range(48)}
        keys = list(blocks)
        for i in range(0, 48, 8):
            pm.put(keys[i : i + 8], [blocks[k] for k in keys[i : i + 8]]).synchronize()
        assert all(pm.tier_of(k) == "simulated-cpu" for k in keys)
        with pytest.raises(OutOfPeerMemory):  # 128 MiB leased, 96 used: 17 x 2 MiB more do not fit
            pm.put([f"x{i}" for i in range(17)], [torch.ones(2 << 20, dtype=torch.uint8)] * 17)
        assert len(pm) == 48  # the refused batch left nothing behind

        resp = call(agent, lambda c: c.reclaim(gpus[1], "64Mi", reason="second lender needs it", deadline_s=4.0))
        assert [x.id for x in resp.revoking] == [ids[1]]
        wait_for(lambda: pm.revocations[1] is not None and pm.revocations[1].released_at, 10,
                 "the client to move the second lease's blocks and release it")
        rec = pm.revocations[1]
        assert rec is not None and rec.on_time and not rec.error and 0 < rec.blocks < 48
        assert pm.revocations[0] is None and pm.revocation is rec
        assert lease_of(agent, ids[1]).state == agent_pb2.RELEASED
        assert lease_of(agent, ids[0]).state == agent_pb2.ACTIVE  # the first lender is untouched
        s = pm.stats()
        assert s.blocks_peer == 48 - rec.blocks and s.blocks_host == rec.blocks
        assert s.peer_capacity_bytes == 64 << 20 and pm.device_kind == "simulated-cpu"
        got = pm.get(keys).result()
        assert [digest(t) for t in got] == [digest(blocks[k]) for k in keys]  # nothing lost
        first = next(k for k in keys if pm.tier_of(k) == "simulated-cpu")
        pm.evict([first])
        pm.put(["after"], [torch.ones(1 << 20, dtype=torch.uint8)]).synchronize()  # the first lease still takes puts
        assert pm.tier_of("after") == "simulated-cpu"
    finally:
        pm.close()
    assert lease_of(agent, ids[0]).state == agent_pb2.RELEASED


def test_mismatched_lease_and_token_lists_are_refused_before_any_claim(agent: AgentProcess) -> None:
    env, ids, _ = two_lender_env(agent)
    env["SPILLWAY_LEASE_TOKEN"] = env["SPILLWAY_LEASE_TOKEN"].split(",")[0]
    with pytest.raises(LeaseUnavailable, match=r"2 lease id.* but 1 token"):
        PeerMemory.from_env(env)
    for lease_id in ids:
        lease = lease_of(agent, lease_id)
        assert lease.pid == 0 and lease.holder == "tenant-c"  # not claimed, not attached
