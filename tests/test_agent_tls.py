"""Reaching an agent by IP while TLS checks a fixed name in its certificate.

A real agent subprocess (simulated GPUs) serves gRPC over TCP with mutual TLS; its server
certificate names only `spillway-agent.example` (no IP, no localhost). Clients dial
127.0.0.1 (and [::1]) and verify that name through `server_name` (the CLI's
`--tls-server-name`, the operator's `--agent-server-name`): with it they are answered;
without it, or with a name the certificate does not carry, the handshake is refused
(UNAVAILABLE, "Hostname Verification Check failed").
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2
from spillway.operator.agents import AgentError, AgentPool, Agents, Tls
from spillway.pki import TlsFiles, write_mtls_dir
from spillway.testing.agentproc import AgentProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
NAME = "spillway-agent.example"
MISMATCH = "Hostname Verification Check failed"


@dataclass
class TlsAgent:
    proc: AgentProcess
    v4: str  # 127.0.0.1:PORT
    v6: str  # [::1]:PORT
    client_tls: TlsFiles
    server_tls: TlsFiles


@pytest.fixture(scope="module")
def tls_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsAgent]:
    server, client = write_mtls_dir(tmp_path_factory.mktemp("mtls"), server_names=[NAME])
    port = free_port()
    creds = ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", str(server.ca)]
    # "[::]" listens on both families on Linux (dual stack), so one port serves both loopbacks.
    proc = AgentProcess(node_name="tls-node", extra_args=["--listen", f"[::]:{port}", *creds])
    proc.start()
    try:
        yield TlsAgent(proc, f"127.0.0.1:{port}", f"[::1]:{port}", client, server)
    finally:
        proc.cleanup()


async def _inventory(target: str, tls: TlsFiles | None, server_name: str | None) -> agent_pb2.Inventory:
    async with AgentClient(target, tls=tls, server_name=server_name, timeout=20) as c:
        return await c.inventory()


def _refusal(target: str, tls: TlsFiles, server_name: str | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        asyncio.run(_inventory(target, tls, server_name))
    return info.value


def test_the_certificate_names_only_the_fixed_name(tls_agent: TlsAgent) -> None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(tls_agent.server_tls.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [NAME]
    assert san.get_values_for_type(x509.IPAddress) == []


@pytest.mark.parametrize("family", ["v4", "v6"])
def test_dialled_by_ip_verified_against_the_server_name(tls_agent: TlsAgent, family: str) -> None:
    target = getattr(tls_agent, family)

    async def go() -> tuple[str, int]:
        async with AgentClient(target, tls=tls_agent.client_tls, server_name=NAME, timeout=20) as c:
            inv = await c.inventory()
            got = await c.acquire("1Gi", "tls-test", kind=agent_pb2.ELASTIC, ttl_s=30)
            released = await c.release(got.lease.id, got.token)
            return inv.node_name, int(released.state)

    node, state = asyncio.run(go())
    assert node == "tls-node"
    assert state == agent_pb2.RELEASED


@pytest.mark.parametrize("server_name", [None, "", "spillway-agent", "other.example", "127.0.0.1"])
def test_refused_without_the_name_or_with_a_wrong_one(tls_agent: TlsAgent, server_name: str | None) -> None:
    err = _refusal(tls_agent.v4, tls_agent.client_tls, server_name)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert MISMATCH in (err.details() or ""), err.details()


def test_a_name_from_another_ca_is_still_refused(tls_agent: TlsAgent, tmp_path: Path) -> None:
    """The override changes which name is checked, not whom the client trusts: a client that
    trusts another CA is refused even with the right name."""
    _, stranger = write_mtls_dir(tmp_path, server_names=[NAME])
    err = _refusal(tls_agent.v4, stranger, NAME)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert MISMATCH not in (err.details() or "")


def test_server_name_without_tls_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="give tls=TlsFiles"):
        AgentClient("127.0.0.1:1", server_name=NAME)


def test_operator_agent_pool_passes_the_server_name(tls_agent: TlsAgent) -> None:
    """The operator's agent client (AgentPool + Agents) reaches the agent by IP with the name."""
    t = tls_agent.client_tls

    gpu = asyncio.run(_inventory(tls_agent.v4, t, NAME)).gpus[0].uuid

    async def go(server_name: str) -> str:
        agents = Agents(AgentPool(Tls(str(t.cert), str(t.key), str(t.ca), server_name)), timeout_s=20)
        try:
            ref = await agents.acquire(tls_agent.v4, holder="tenant:tls/t", tenant_uid="uid-tls", replica=0,
                                       gpu_uuid=gpu, size=1 << 30)
            await agents.release(tls_agent.v4, ref)
            return ref.id
        finally:
            await agents.pool.close()

    assert asyncio.run(go(NAME)).startswith("l-")
    with pytest.raises(AgentError) as info:
        asyncio.run(go(""))
    assert info.value.code == "UNAVAILABLE" and MISMATCH in str(info.value)


# --- the command lines -------------------------------------------------------------------------


def spillway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spillway", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, cwd=ROOT)


def _tls_flags(t: TlsFiles) -> list[str]:
    return ["--tls-cert", str(t.cert), "--tls-key", str(t.key), "--tls-ca", str(t.ca)]


def test_cli_tls_server_name(tls_agent: TlsAgent) -> None:
    flags = ["--target", tls_agent.v4, *_tls_flags(tls_agent.client_tls)]
    ok = spillway("pool", "show", *flags, "--tls-server-name", NAME, "-o", "json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["node_name"] == "tls-node"

    bad = spillway("pool", "show", *flags)
    assert bad.returncode == 1
    assert "does not name '127.0.0.1'" in bad.stderr and "--tls-server-name" in bad.stderr, bad.stderr
    wrong = spillway("lease", "list", *flags, "--tls-server-name", "other.example")
    assert wrong.returncode == 1
    assert "does not name 'other.example'" in wrong.stderr, wrong.stderr


def test_cli_tls_server_name_needs_a_tls_target(tls_agent: TlsAgent) -> None:
    r = spillway("pool", "show", "--socket", str(tls_agent.proc.socket), "--tls-server-name", NAME)
    assert r.returncode == 2
    assert "--tls-server-name applies to --target HOST:PORT" in r.stderr
    r = spillway("pool", "show", "--target", tls_agent.v4, "--tls-server-name", NAME)
    assert r.returncode == 2 and "--tls-server-name applies" in r.stderr


def test_operator_agent_server_name_needs_tls() -> None:
    r = spillway("operator", "--agent-server-name", NAME, "--metrics-port", "0", "--health-port", "-1")
    assert r.returncode != 0
    assert "--agent-server-name checks the agents' TLS certificates" in r.stderr, r.stderr


# --- the operator, end to end ----------------------------------------------------------------


@pytest.mark.cluster
@pytest.mark.slow
def test_operator_reserves_at_agents_known_by_ip_with_the_server_name(cluster: Any, k8s_namespace: str) -> None:
    """The operator (subprocess, real kube-apiserver) reads an agent's MemoryPool endpoint
    (127.0.0.1:PORT), dials it and checks the certificate against --agent-server-name: the
    tenant's reservation is made at the agent. Without the flag the same operator is refused by
    the handshake and says so."""
    from spillway.testing.cluster import wait_until
    from spillway.testing.sandbox import Sandbox

    ns = k8s_namespace
    sb = Sandbox(cluster)
    sb.start()
    node = f"tls-{uuid.uuid4().hex[:5]}"
    try:
        # Agents whose certificate names only NAME (not 127.0.0.1, which they advertise).
        sb.server_tls, sb.client_tls = write_mtls_dir(sb.workdir / "tls-named", server_names=[NAME])
        sb.add_gpu_nodes([node])
        endpoint = sb.agents[node].endpoint
        assert endpoint.startswith("127.0.0.1:")
        watch = ("--namespace", ns, "--resync-interval", "5s", "--lease-ttl", "60s")

        async def holders() -> list[str]:
            async with AgentClient(endpoint, tls=sb.client_tls, server_name=NAME, timeout=20) as c:
                return [x.holder for x in await c.leases()]

        sb.start_operator((*watch, "--agent-server-name", NAME))
        cluster.apply(_tenant("named"), ns)
        wait_until(lambda: any(h.startswith(f"tenant:{ns}/named/") for h in asyncio.run(holders())), timeout=120,
                   what="the operator's reservation at the agent")

        sb.start_operator(watch)  # the same operator without the name: refused by the handshake
        cluster.apply(_tenant("unnamed"), ns)
        wait_until(lambda: MISMATCH in sb.operator_log.read_text(), timeout=120,
                   what="the operator to report the name mismatch")
        assert not any(h.startswith(f"tenant:{ns}/unnamed/") for h in asyncio.run(holders()))
        cluster.kubectl("delete", "inferencetenant", "--all", "-n", ns, "--wait=false", check=False)
    finally:
        print(sb.logs())
        sb.stop()
        cluster.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "memorypool", node, "--ignore-not-found", "--wait=false", check=False)


def _tenant(name: str) -> dict[str, Any]:
    return {"apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceTenant", "metadata": {"name": name},
            "spec": {"replicas": 1, "model": {"image": "spillway/toy-server:0.1.0", "memory": "40Gi", "port": 8000},
                     "peerMemory": {"request": "4Gi", "limit": "4Gi", "fallback": "None"}}}


def start_tcp_agent(node: str, server: TlsFiles) -> tuple[AgentProcess, str]:
    """A started agent serving mutual TLS on 127.0.0.1 with these files; (process, "host:port")."""
    port = free_port()
    proc = AgentProcess(node_name=node, extra_args=[
        "--listen", f"127.0.0.1:{port}", "--tls-cert", str(server.cert), "--tls-key", str(server.key),
        "--tls-ca", str(server.ca)])
    proc.start()
    return proc, f"127.0.0.1:{port}"


def test_a_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    """cert-manager renews the Secret in place: new connections get the new certificate, a key
    that does not match its certificate (a rotation seen half-way) is refused and the previous
    pair stays in use, and the agent process is the same throughout."""
    from spillway.pki import make_ca

    ca = make_ca("rotation-ca")
    ca_path = ca.write(tmp_path)
    live = ca.issue_files(tmp_path, "server", "spillway-agent", [NAME], client=False, server=True)
    client = ca.issue_files(tmp_path, "client", "spillway-client", client=True, server=False)
    client_tls = TlsFiles(client.cert, client.key, ca_path)
    proc, target = start_tcp_agent("rotate-node", TlsFiles(live.cert, live.key, ca_path))
    renamed = "renamed-agent.example"
    try:
        pid = proc.proc.pid if proc.proc else None
        assert asyncio.run(_inventory(target, client_tls, NAME)).node_name == "rotate-node"
        assert MISMATCH in _refusal(target, client_tls, renamed).details()

        (tmp_path / "next").mkdir()
        new = ca.issue_files(tmp_path / "next", "server", "spillway-agent", [renamed], client=False, server=True)
        os.replace(new.key, live.key)  # half a rotation: the new key under the old certificate
        assert asyncio.run(_inventory(target, client_tls, NAME)).node_name == "rotate-node"  # old pair kept
        assert "cannot be used; keeping the previous certificate" in proc.log_path.read_text()

        os.replace(new.cert, live.cert)  # the rotation completes
        assert asyncio.run(_inventory(target, client_tls, renamed)).node_name == "rotate-node"
        assert MISMATCH in _refusal(target, client_tls, NAME).details()
        assert "TLS certificate reloaded" in proc.log_path.read_text()
        assert proc.proc is not None and proc.proc.pid == pid and proc.proc.poll() is None  # no restart
    finally:
        proc.cleanup()


def test_the_operator_picks_up_a_renewed_client_certificate(tmp_path: Path) -> None:
    """The agent trusts only the new CA. The operator's pool starts with a client certificate from
    the old one (refused), its files are replaced in place (as a Secret volume is), and the same
    pool, without a restart, reaches the agent with the new certificate."""
    from spillway.pki import make_ca

    old_ca, new_ca = make_ca("old-ca"), make_ca("new-ca")
    ca_path = new_ca.write(tmp_path)
    server = new_ca.issue_files(tmp_path, "server", "spillway-agent", [NAME], client=False, server=True)
    op_dir = tmp_path / "operator"
    op_dir.mkdir()
    client = old_ca.issue_files(op_dir, "tls", "spillway-operator", client=True, server=False)
    proc, endpoint = start_tcp_agent("renew-node", TlsFiles(server.cert, server.key, ca_path))

    async def go() -> None:
        pool = AgentPool(Tls(str(client.cert), str(client.key), str(ca_path), server_name=NAME))
        pool.RECHECK_S = 0.0
        try:
            first = pool.client(endpoint)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await first.inventory()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert pool.client(endpoint) is first  # nothing changed: the same client
            (tmp_path / "next").mkdir()
            renewed = new_ca.issue_files(tmp_path / "next", "tls", "spillway-operator", client=True, server=False)
            os.replace(renewed.key, client.key)
            os.replace(renewed.cert, client.cert)
            second = pool.client(endpoint)
            assert second is not first and pool.renewals == 1
            assert (await second.inventory()).node_name == "renew-node"
        finally:
            await pool.close()

    try:
        asyncio.run(go())
    finally:
        proc.cleanup()


def test_only_the_named_client_certificates_are_admitted(tmp_path: Path) -> None:
    """`--tls-client-name`: a certificate the same CA signed for another name (another node's
    agent, a stray client) is PERMISSION_DENIED on every call and changes nothing; the named one
    is admitted with the admin role."""
    from spillway.pki import make_ca

    ca = make_ca("spillway-ca")
    ca_path = ca.write(tmp_path)
    server = ca.issue_files(tmp_path, "server", "spillway-agent", ("localhost", "127.0.0.1"), client=False, server=True)
    operator = ca.issue_files(tmp_path, "operator", "spillway-operator", client=True, server=False)
    stranger = ca.issue_files(tmp_path, "stranger", "spillway-agent-node-7", client=True, server=False)
    port = free_port()
    creds = ["--tls-cert", str(server.cert), "--tls-key", str(server.key), "--tls-ca", str(ca_path)]
    with AgentProcess(node_name="named", extra_args=["--listen", f"127.0.0.1:{port}", *creds,
                                                     "--tls-client-name", "spillway-operator"]) as agent:
        async def go() -> None:
            async with AgentClient(f"127.0.0.1:{port}", tls=TlsFiles(stranger.cert, stranger.key, ca_path),
                                   timeout=20) as bad, agent.client() as local:
                before = await local.leases()
                for call in (bad.inventory(), bad.acquire("1Gi", "stray"), bad.leases()):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    details = info.value.details() or ""
                    assert "spillway-agent-node-7" in details and "spillway-operator" in details, details
                assert await local.leases() == before
            async with AgentClient(f"127.0.0.1:{port}", tls=TlsFiles(operator.cert, operator.key, ca_path),
                                   timeout=20) as good:
                got = await good.acquire("1Gi", "tenant:x", idempotency_key="uid/0")
                assert any(x.id == got.lease.id for x in await good.leases())  # admin: it may list
                await good.release(got.lease.id, got.token)

        asyncio.run(go())


def test_client_names_need_a_listener(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "spillway", "agent", "--socket", str(tmp_path / "a.sock"),
                        "--tls-client-name", "spillway-operator"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 2 and "--tls-client-name" in r.stderr and "--listen" in r.stderr, r.stderr
