"""The attach socket: the agent learns a borrower's PID from SO_PEERCRED."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spillway.agent.attach import AttachError, attach
from spillway.api.v1 import agent_pb2 as pb
from spillway.testing.agentproc import AgentProcess

ROOT = Path(__file__).resolve().parents[1]


async def wait_pid(agent: AgentProcess, lease_id: str, pid: int) -> pb.Lease:
    async with agent.client() as c:
        for _ in range(200):
            (x,) = [y for y in await c.leases(include_ended=True) if y.id == lease_id]
            if x.pid == pid:
                return x
            await asyncio.sleep(0.025)
    raise AssertionError(f"lease {lease_id} never showed pid {pid} (last {x.pid})")


async def test_attach_records_peer_pid_and_clears_on_close(agent: AgentProcess) -> None:
    async with agent.client() as c:
        got = await c.acquire("1Gi", "borrower")
    # a separate process attaches: the agent must see *its* PID, not ours
    code = textwrap.dedent(f"""
        import sys, time
        from spillway.agent.attach import attach
        a = attach({str(agent.socket)!r}, {got.lease.id!r}, {got.token!r})
        print(a.pid, a.gpu_uuid, flush=True)
        sys.stdin.readline()
        a.close()
    """)
    child = await asyncio.to_thread(subprocess.Popen, [sys.executable, "-c", code], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert child.stdout is not None and child.stdin is not None
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 30)
        pid_seen, gpu = line.split()
        assert int(pid_seen) == child.pid and gpu == got.lease.gpu_uuid
        x = await wait_pid(agent, got.lease.id, child.pid)
        assert x.pid == child.pid
        child.stdin.write("\n")
        child.stdin.flush()
        await asyncio.to_thread(child.wait, 30)
        await wait_pid(agent, got.lease.id, 0)
    finally:
        child.kill()
        child.wait()


async def test_attach_refuses_wrong_token_and_unknown_lease(agent: AgentProcess) -> None:
    async with agent.client() as c:
        got = await c.acquire("1Gi", "borrower")
    with pytest.raises(AttachError) as info:
        await asyncio.to_thread(attach, agent.socket, got.lease.id, "wrong")
    assert info.value.code == "PERMISSION_DENIED"
    with pytest.raises(AttachError) as info:
        await asyncio.to_thread(attach, agent.socket, "l-none", "x")
    assert info.value.code == "NOT_FOUND"
    a = await asyncio.to_thread(attach, agent.socket, got.lease.id, got.token)
    try:
        assert a.pid == os.getpid()
    finally:
        a.close()


async def test_attach_garbage_does_not_hurt(agent: AgentProcess) -> None:
    r, w = await asyncio.open_unix_connection(str(agent.attach_socket))
    w.write(b"\x00\xffnot json\n")
    await w.drain()
    reply = await asyncio.wait_for(r.readline(), 10)
    assert b"INVALID_ARGUMENT" in reply
    w.close()
    async with agent.client() as c:
        assert len((await c.inventory()).gpus) == 8


async def test_attachment_does_not_survive_kill9(agent: AgentProcess) -> None:
    async with agent.client() as c:
        got = await c.acquire("1Gi", "borrower")
    a = await asyncio.to_thread(attach, agent.socket, got.lease.id, got.token)
    try:
        await wait_pid(agent, got.lease.id, os.getpid())
        agent.kill()
        agent.start()
        async with agent.client() as c:
            (x,) = await c.leases()
        assert x.id == got.lease.id and x.pid == 0, "a restarted agent forgets PIDs: borrowers re-attach"
    finally:
        a.close()
