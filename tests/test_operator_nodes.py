"""The operator's view of Nodes against the real API server: its own list-and-watch sees a node
appear, get cordoned, go NotReady-free again and be deleted; without permission to list Nodes it
says so and goes by MemoryPool heartbeats alone. The MemoryPool is a plain object as an agent
would publish it (no agent is needed for the verdicts)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from spillway.operator.agents import AgentPool, Agents
from spillway.operator.apiserver import ApiServer
from spillway.operator.engine import Engine, EngineConfig
from spillway.operator.metrics import OperatorMetrics
from spillway.testing.cluster import Cluster

pytestmark = [pytest.mark.cluster]

GIB = 1 << 30


def memorypool(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "spillway.dev/v1alpha1", "kind": "MemoryPool",
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "status": {"node": name, "agentEndpoint": "127.0.0.1:1", "simulated": True,
                   "heartbeat": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "gpus": [{"uuid": f"{name}-g0", "index": 0, "totalBytes": 80 * GIB, "lendableBytes": 70 * GIB}]},
    }


async def engine_for(kubeconfig: str, events: list[tuple[str, str, str]]) -> Engine:
    def event(body: Any, type_: str, reason: str, message: str) -> None:
        events.append((body["metadata"]["name"], reason, message))

    return Engine(kube=await ApiServer.connect(kubeconfig), agents=Agents(AgentPool()),
                  metrics=OperatorMetrics(), config=EngineConfig(pool_stale_s=60.0), event=event)


async def until(check: Callable[[], bool], what: str, within_s: float = 30.0) -> None:
    for _ in range(int(within_s * 10)):
        if check():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"timed out after {within_s:g}s waiting for {what}")


def test_node_watch_follows_cordon_and_delete(cluster: Cluster) -> None:
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    events: list[tuple[str, str, str]] = []

    async def go() -> None:
        engine = await engine_for(str(cluster.kubeconfig), events)
        engine.pool_changed(memorypool(name))
        assert await engine.cluster.list_nodes()
        task = asyncio.create_task(engine.cluster.watch_nodes(retry_s=0.5))
        try:
            # A pool whose Node does not exist yet is lost (its agent publishes for a deleted node).
            assert "no Node object" in engine.lost_reasons()[name]
            assert name not in engine.live_pools() and name not in engine.placeable_pools()
            await asyncio.to_thread(cluster.add_node, name, {"nvidia.com/gpu": "1"})
            await until(lambda: name in engine.placeable_pools(), "the new Ready node to be placeable")
            assert engine.lost_reasons() == {}
            await asyncio.to_thread(cluster.kubectl, "cordon", name)
            await until(lambda: name not in engine.placeable_pools(), "the cordoned node to take no replica")
            assert name in engine.live_pools()  # its running replicas stay
            assert engine.cluster.verdicts()[name] == ("", "is cordoned (unschedulable)")
            await asyncio.to_thread(cluster.kubectl, "uncordon", name)
            await until(lambda: name in engine.placeable_pools(), "the uncordoned node to be placeable again")
            await asyncio.to_thread(cluster.remove_node, name)
            await until(lambda: name not in engine.live_pools(), "the deleted node to be lost")
            assert engine.cluster.node_gone(name)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await engine.close()

    try:
        asyncio.run(go())
    finally:
        cluster.kubectl("delete", "node", name, "--ignore-not-found", "--wait=false", check=False)
    said = [reason for pool, reason, _ in events if pool == name]
    # One event per change: lost (no Node), placeable, unplaceable (cordon), placeable, lost (deleted).
    assert said == ["NodeLost", "NodePlaceable", "NodeUnplaceable", "NodePlaceable", "NodeLost"]


def test_without_permission_to_list_nodes_it_warns_and_goes_by_heartbeats(
    cluster: Cluster, k8s_namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    cluster.kubectl("create", "serviceaccount", "no-nodes", "-n", k8s_namespace)
    kubeconfig = cluster.kubeconfig_for_service_account(k8s_namespace, "no-nodes")
    name = f"gpu-{uuid.uuid4().hex[:6]}"
    events: list[tuple[str, str, str]] = []

    async def go() -> None:
        engine = await engine_for(str(kubeconfig), events)
        engine.pool_changed(memorypool(name))
        try:
            with caplog.at_level(logging.WARNING, logger="spillway.operator.cluster"):
                assert not await engine.cluster.list_nodes()
            assert engine.cluster.nodes is None and not engine.cluster.node_gone(name)
            assert name in engine.placeable_pools()  # no Node facts: a fresh heartbeat is enough
        finally:
            await engine.close()

    asyncio.run(go())
    assert any("cannot list Nodes" in r.getMessage() for r in caplog.records)
    assert events == []
