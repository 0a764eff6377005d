"""GPU device node minor numbers in the inventory: the simulated backend (index by default,
`minor:` in the topology file), bad values explained, and the real agent's Inventory message
(`Gpu.minor_number`). The NVML backend's reading is checked on a real GPU where one is present."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from spillway.agent.inventory import SimulatedBackend, nvidia_gpu_present
from spillway.api.v1 import agent_pb2
from spillway.deviceplugin.resources import device_node
from spillway.testing.agentproc import AgentProcess

TOPOLOGIES = Path(__file__).resolve().parents[1] / "examples" / "topologies"


def test_simulated_minor_defaults_to_the_index() -> None:
    inv = SimulatedBackend(TOPOLOGIES / "dgx-h100.yaml", "n1").read()
    assert [g.minor for g in inv.gpus] == [g.index for g in inv.gpus] == list(range(8))


def test_simulated_minor_from_the_topology_file() -> None:
    inv = SimulatedBackend(TOPOLOGIES / "minor-shuffled.yaml", "n1").read()
    assert inv.simulated
    assert [(g.index, g.minor) for g in inv.gpus] == [(0, 2), (1, 3), (2, 0), (3, 1)]


def test_device_node_prefers_the_minor_number_over_the_index() -> None:
    assert device_node(agent_pb2.Gpu(index=1, minor_number=3)) == "/dev/nvidia3"
    assert device_node(agent_pb2.Gpu(index=1, minor_number=0)) == "/dev/nvidia0"   # 0 is a real minor
    assert device_node(agent_pb2.Gpu(index=1)) == "/dev/nvidia1"                   # an agent that does not say


async def _inventory(agent: AgentProcess) -> agent_pb2.Inventory:
    async with agent.client() as c:
        return await c.inventory()


def test_agent_reports_minor_numbers() -> None:
    with AgentProcess(topology=TOPOLOGIES / "minor-shuffled.yaml", node_name="minor-node") as agent:
        inv = asyncio.run(_inventory(agent))
    assert inv.simulated
    assert [(g.index, g.HasField("minor_number"), g.minor_number) for g in inv.gpus] == [
        (0, True, 2), (1, True, 3), (2, True, 0), (3, True, 1)]


@pytest.mark.gpu
def test_nvml_minor_numbers_name_real_device_nodes() -> None:
    if not nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU on this machine")
    from spillway.agent.inventory import NvmlBackend

    backend = NvmlBackend("gpu-node")
    try:
        inv = backend.read()
    finally:
        backend.close()
    for g in inv.gpus:
        assert g.minor >= 0, g
        st = os.stat(f"/dev/nvidia{g.minor}")
        assert os.minor(st.st_rdev) == g.minor and os.major(st.st_rdev) == 195, (g, st)
