"""MemoryPool publisher: pure status building, and a real agent publishing to the real API server."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from spillway.agent.publisher import build_status, significant
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

            # Released: gone from the pool again; the heartbeat moves on.
            beat = pool["status"]["heartbeat"]
            await client.release(got.lease.id, got.token)
            await _until(lambda: (p := _pool(cluster, node)) and not p["status"].get("leases"), 10, "the release")
            await _until(lambda: (p := _pool(cluster, node)) and p["status"]["heartbeat"] != beat, 25, "a heartbeat")
            table = cluster.kubectl("get", "memorypool", node).stdout
            cols = table.splitlines()[1].split()
            assert cols[1] == str(len(inv.gpus)) and cols[5] == "true", (
                table,
                _pool(cluster, node),
                agent.logs()[-3000:],
            )
    finally:
        agent.stop()
        agent.cleanup()
        cluster.kubectl("delete", "memorypool", node, "--ignore-not-found", check=False)


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
