"""Allocate through the kubelet's own device-manager code (hack/dpconformance) against a real
agent: the plugin hands out only units it advertised, each once, with the documented codes,
and a refused Allocate leaves the agent's pool as it was."""

from __future__ import annotations

import asyncio

from spillway.api.v1 import agent_pb2
from spillway.testing.agentproc import AgentProcess
from tests.fixtures_deviceplugin import Kubelet, PluginProcess, PodResourcesServer

Stack = tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]


async def _leases(agent: AgentProcess) -> list[agent_pb2.Lease]:
    async with agent.client() as c:
        return await c.leases(include_ended=True)


def test_allocate_refuses_units_it_never_advertised_duplicates_and_too_many(stack: Stack) -> None:
    agent, _plugin, kubelet, _ = stack
    ids = [d["id"] for d in kubelet.devices()]
    gpu0 = ids[0].rsplit("::", 1)[0]
    cases = [
        (["GPU-nope::0"], "InvalidArgument", "not spillway.dev/peer-hbm units this plugin advertised"),
        ([f"{gpu0}::100000"], "InvalidArgument", "not spillway.dev/peer-hbm units this plugin advertised"),
        ([ids[0], ids[0]], "InvalidArgument", "device IDs repeat"),
        ([ids[0], ids[1], ids[0]], "InvalidArgument", "device IDs repeat"),
        (["G" * 100_000 + "::0"], "InvalidArgument", "longer than 256 characters"),
        (ids[:100], "ResourceExhausted", "more than the largest GPU"),
    ]
    for request, code, fragment in cases:
        alloc = kubelet.allocate(request)
        error = alloc.get("error", "")
        assert f"code = {code}" in error and fragment in error, (request[:2], alloc)
        assert len(error) < 1000, len(error)  # a few IDs quoted, each cut short
    assert asyncio.run(_leases(agent)) == []
    # The kubelet's ordinary request still works.
    alloc = kubelet.allocate(ids[:2])
    assert "error" not in alloc, alloc
    assert [x.bytes for x in asyncio.run(_leases(agent))] == [2 << 30]
