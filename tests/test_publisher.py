"""MemoryPool publisher: pure status building, and a real agent publishing to the real API server."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from spillway.agent.publisher import (
    HEARTBEAT_LABEL,
    StaleWatchdog,
    build_status,
    lease_expired,
    pool_conditions,
    significant,
)
from spillway.api.v1 import agent_pb2
from spillway.operator.model import NodeView
from spillway.testing.agentproc import AgentProcess
from spillway.testing.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
GI = 1 << 30


def _inventory(lendable: int = 70 * GI) -> agent_pb2.Inventory:
    inv = agent_pb2.Inventory(node_name="n1", backend="simulated", simulated=True, granularity_bytes=64 << 20)
    for i, uuid in enumerate(("GPU-a", "GPU-b")):
        inv.gpus.add(
            uuid=uuid,
            index=i,
            name="H100 (simulated)",
            total_bytes=80 * GI,
            headroom_bytes=4 * GI,
            lendable_bytes=lendable if i == 0 else 76 * GI,
            leased_bytes=76 * GI - lendable if i == 0 else 0,
        )
    inv.links.add(gpu_a="GPU-a", gpu_b="GPU-b", nvlink=True, nvlink_count=18)
    inv.links.add(gpu_a="GPU-b", gpu_b="GPU-a", nvlink=True, nvlink_count=18)
    return inv


def _lease(state: int = agent_pb2.RESERVED) -> agent_pb2.Lease:
    return agent_pb2.Lease(
        id="l1",
        holder="ns/t#0",
        kind=agent_pb2.RESERVATION,
        gpu_uuid="GPU-a",
        bytes=6 * GI,
        state=state,
        expires_at_ms=1_800_000_000_000,
    )


def test_build_status_shape_and_totals() -> None:
    status = build_status(_inventory(), [_lease(), _lease(agent_pb2.RELEASED)], "10.0.0.1:7443", now_ms=0)
    assert status["totals"] == {
        "gpus": 2,
        "totalBytes": 160 * GI,
        "lendableBytes": 146 * GI,
        "leasedBytes": 6 * GI,
        "total": "160Gi",
        "lendable": "146Gi",
        "leased": "6Gi",
        "leases": 1,
    }
    assert status["links"] == [{"a": "GPU-a", "b": "GPU-b", "nvlink": True, "count": 18}]
    assert [x["state"] for x in status["leases"]] == ["RESERVED"]
    assert status["leases"][0]["kind"] == "RESERVATION"
    assert status["heartbeat"] == "1970-01-01T00:00:00Z"
    # The operator reads exactly what the publisher writes.
    node = NodeView.from_memorypool({"metadata": {"name": "n1"}, "status": status})
    assert node.endpoint == "10.0.0.1:7443" and node.nvlinked("GPU-a", "GPU-b")
    assert node.gpus[0].lendable == 70 * GI and node.gpus[0].leased == 6 * GI


def test_significant_changes() -> None:
    base = build_status(_inventory(), [_lease()], "e")
    assert significant(None, base)
    assert not significant(base, build_status(_inventory(), [_lease()], "e"))
    assert significant(base, build_status(_inventory(), [_lease(agent_pb2.ACTIVE)], "e"))
    assert significant(base, build_status(_inventory(), [], "e"))
    # one 64Mi unit is noise; more is news
    assert not significant(base, build_status(_inventory(70 * GI - (64 << 20)), [_lease()], "e"))
    assert significant(base, build_status(_inventory(69 * GI), [_lease()], "e"))


def _pool(cluster: Cluster, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", "memorypool", name, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else None


async def _until(pred: Any, within_s: float, what: str) -> Any:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(pred)
        if value:
            return value
        await asyncio.sleep(0.3)
    raise AssertionError(f"timed out after {within_s}s waiting for {what}")


@pytest.mark.cluster
async def test_agent_publishes_memorypool(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "crd/memorypools.spillway.dev", "--timeout=60s")
    node = f"pub-{int(time.time() * 1000) % 10**8}"
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    agent = AgentProcess(node_name=node, extra_args=["--publish", "--advertise-endpoint", "10.1.2.3:7443"])
    agent.start()
    try:
        async with agent.client() as client:
            inv = await client.inventory()
            pool = await _until(
                lambda: (p := _pool(cluster, node)) and p.get("status", {}).get("gpus") and p,
                60,
                "the MemoryPool to appear",
            )
            status = pool["status"]
            assert status["node"] == node and status["simulated"] is True
            assert status["agentEndpoint"] == "10.1.2.3:7443"
            assert [g["uuid"] for g in status["gpus"]] == [g.uuid for g in inv.gpus]
            assert [g["lendableBytes"] for g in status["gpus"]] == [g.lendable_bytes for g in inv.gpus]
            assert status["totals"]["gpus"] == len(inv.gpus)
            view = NodeView.from_memorypool(pool)
            assert len(view.gpus) == len(inv.gpus) and view.nvlinked(inv.gpus[0].uuid, inv.gpus[1].uuid)

            # A lease shows up within a few seconds.
            t0 = time.monotonic()
            got = await client.acquire("8Gi", "ns/tenant#0", gpu_uuid=inv.gpus[2].uuid)
            pool = await _until(
                lambda: (
                    (p := _pool(cluster, node))
                    and any(x["id"] == got.lease.id for x in p["status"].get("leases", []))
                    and p
                ),
                10,
                "the lease in the MemoryPool",
            )
            latency = time.monotonic() - t0
            assert latency < 5.0, latency
            lease = next(x for x in pool["status"]["leases"] if x["id"] == got.lease.id)
            assert lease["bytes"] == 8 * GI and lease["state"] == "RESERVED" and lease["gpu"] == inv.gpus[2].uuid
            gpu2 = next(g for g in pool["status"]["gpus"] if g["uuid"] == inv.gpus[2].uuid)
            assert gpu2["leasedBytes"] == 8 * GI

            # Released: gone from the pool again.
            await client.release(got.lease.id, got.token)
            await _until(lambda: (p := _pool(cluster, node)) and not p["status"].get("leases"), 10, "the release")

            # The heartbeat is the Lease named after the node (the agent's namespace: "default"
            # here, run by hand), renewed every 10 s; the pool is Ready.
            lease = _lease_obj(cluster, node)
            assert lease["metadata"]["labels"][HEARTBEAT_LABEL] == "memorypool"
            assert lease["spec"]["holderIdentity"] == node and lease["spec"]["leaseDurationSeconds"] == 40
            assert _pool(cluster, node)["status"]["heartbeatLease"] == {"namespace": "default", "name": node}
            beat = lease["spec"]["renewTime"]
            await _until(lambda: _lease_obj(cluster, node)["spec"]["renewTime"] != beat, 15, "a Lease renewal")
            cluster.kubectl("wait", "--for=condition=Ready", f"memorypool/{node}", "--timeout=30s")
            table = cluster.kubectl("get", "memorypool", node).stdout
            head, cols = table.splitlines()[0].split(), table.splitlines()[1].split()
            assert head[:7] == ["NAME", "GPUS", "TOTAL", "LENDABLE", "LEASED", "READY", "SIMULATED"], table
            assert cols[1] == str(len(inv.gpus)) and cols[5] == "True" and cols[6] == "true", (
                table,
                _pool(cluster, node),
                agent.logs()[-3000:],
            )
            wide = cluster.kubectl("get", "memorypool", node, "-o", "wide").stdout.splitlines()
            assert wide[0].split()[-4:] == ["LEASES", "BACKEND", "ENDPOINT", "HEARTBEAT"], wide
            assert wide[1].split()[-4:-1] == ["0", "simulated", "10.1.2.3:7443"], wide
    finally:
        agent.stop()
        agent.cleanup()
        cluster.kubectl("delete", "memorypool", node, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "lease", node, "-n", "default", "--ignore-not-found", check=False)


def _lease_obj(cluster: Cluster, name: str, namespace: str = "default") -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", "lease", name, "-n", namespace, "-o", "json").stdout)


def _kube_apis(cluster: Cluster) -> tuple[Any, Any]:
    from kubernetes import client, config

    api = config.new_client_from_config(str(cluster.kubeconfig))
    return client.CoordinationV1Api(api), client.CustomObjectsApi(api)


@pytest.mark.cluster
async def test_a_stopped_or_dead_agent_turns_its_pool_not_ready(cluster: Cluster,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """kubectl wait sees Ready; a SIGTERM marks the pool AgentStopped at once; a SIGKILLed agent's
    Lease runs out and the watchdog (here in the test, as an agent runs it) marks it Stale."""
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "crd/memorypools.spillway.dev", "--timeout=60s")
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    stamp = int(time.time() * 1000) % 10**8
    ns = cluster.create_namespace(f"pub-hb-{stamp}")
    monkeypatch.setenv("POD_NAMESPACE", ns)
    stopped, killed = f"stop-{stamp}", f"kill-{stamp}"
    agents = {n: AgentProcess(node_name=n, extra_args=["--publish", "--advertise-endpoint", "10.1.2.3:7443"])
              for n in (stopped, killed)}
    try:
        for a in agents.values():
            a.start()
        for n in agents:
            await _until(lambda n=n: _pool(cluster, n), 60, f"MemoryPool {n}")  # kubectl wait needs it to exist
            cluster.kubectl("wait", "--for=condition=Ready", f"memorypool/{n}", "--timeout=60s")
            conditions = {c["type"]: c for c in _pool(cluster, n)["status"]["conditions"]}
            assert conditions["Ready"]["reason"] == "Publishing" and conditions["Stale"]["status"] == "False"
            assert _lease_obj(cluster, n, ns)["spec"]["holderIdentity"] == n

        agents[stopped].stop()  # SIGTERM: the agent says so on its way out
        cluster.kubectl("wait", "--for=condition=Ready=false", f"memorypool/{stopped}", "--timeout=10s")
        ready = next(c for c in _pool(cluster, stopped)["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "AgentStopped"

        agents[killed].kill()  # SIGKILL: nothing said; its Lease is no longer renewed
        coord, custom = _kube_apis(cluster)
        watchdog = StaleWatchdog("watchdog-test", ns, coord, custom)
        assert watchdog.step() == [], "nothing is stale while every Lease is fresh"
        later = time.time() + 41  # past the Lease's 40 s (waiting for real would take 40 s)
        marked = watchdog.step(now=later)
        assert killed in marked and stopped in marked
        cluster.kubectl("wait", "--for=condition=Ready=false", f"memorypool/{killed}", "--timeout=5s")
        cluster.kubectl("wait", "--for=condition=Stale", f"memorypool/{killed}", "--timeout=5s")
        ready = next(c for c in _pool(cluster, killed)["status"]["conditions"] if c["type"] == "Ready")
        assert ready["reason"] == "HeartbeatExpired" and f"{ns}/{killed}" in ready["message"]
        assert watchdog.step(now=later + 1) == [], "a pool already marked is not written again"
        # Another agent does not take over the watchdog while its holder renews it.
        assert not StaleWatchdog("second", ns, coord, custom).lead(now=later + 2)
        assert StaleWatchdog("second", ns, coord, custom).lead(now=later + 60), "an expired holder is replaced"

        # The agent comes back: Ready again.
        agents[killed].start()
        cluster.kubectl("wait", "--for=condition=Ready", f"memorypool/{killed}", "--timeout=60s")
        cluster.kubectl("wait", "--for=condition=Stale=false", f"memorypool/{killed}", "--timeout=5s")
    finally:
        for n, a in agents.items():
            a.stop()
            a.cleanup()
            cluster.kubectl("delete", "memorypool", n, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_conditions_keep_their_transition_time_and_leases_expire() -> None:
    first = pool_conditions(True, "Publishing", "ok", stale=False, now=1000.0)
    assert [(c["type"], c["status"]) for c in first] == [("Ready", "True"), ("Stale", "False")]
    again = pool_conditions(True, "Publishing", "ok", stale=False, now=2000.0, previous=first)
    assert again == first  # no transition: the time stays
    down = pool_conditions(False, "HeartbeatExpired", "gone", stale=True, now=3000.0, previous=first)
    assert [(c["status"], c["lastTransitionTime"]) for c in down] == [
        ("False", "1970-01-01T00:50:00Z"), ("True", "1970-01-01T00:50:00Z")]
    spec = {"renewTime": "1970-01-01T00:00:10.000000Z", "leaseDurationSeconds": 40}
    assert not lease_expired(spec, 50.0) and lease_expired(spec, 50.5)
    assert lease_expired({}, 0.0), "a Lease never renewed has expired"


def test_capacity_events_merge_by_gpu() -> None:
    from spillway.agent.publisher import _PoolState

    state = _PoolState()
    state.apply(agent_pb2.WatchEvent(kind=agent_pb2.WatchEvent.SNAPSHOT, inventory=_inventory(), leases=[_lease()]))
    only_a = agent_pb2.Inventory(node_name="n1")
    only_a.gpus.add(uuid="GPU-a", index=0, total_bytes=80 * GI, lendable_bytes=10 * GI)
    state.apply(agent_pb2.WatchEvent(kind=agent_pb2.WatchEvent.CAPACITY, inventory=only_a))
    assert state.inventory is not None
    assert [(g.uuid, g.lendable_bytes) for g in state.inventory.gpus] == [("GPU-a", 10 * GI), ("GPU-b", 76 * GI)]
    state.apply(agent_pb2.WatchEvent(kind=agent_pb2.WatchEvent.LEASE, lease=_lease(agent_pb2.EXPIRED)))
    assert state.leases == {}
