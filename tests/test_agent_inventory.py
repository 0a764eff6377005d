"""Inventory backends: the simulated topologies, the pure NVML translation functions, and the
NVML backend itself on a real GPU (skipped only where no NVIDIA GPU is present)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spillway.agent.inventory import (
    InventoryError,
    NvmlBackend,
    ProcessFacts,
    SimulatedBackend,
    local_used_bytes,
    nvidia_gpu_present,
    nvlink_peers,
    p2p_status_name,
    simulated_uuid,
)
from spillway.agent.pool import Pool

TOPOLOGIES = Path(__file__).resolve().parents[1] / "examples" / "topologies"
GiB = 1 << 30


@pytest.mark.parametrize(("name", "gpus", "nvlink_pairs", "total"), [
    ("dgx-h100.yaml", 8, 28, 81559 << 20),
    ("dgx-a100.yaml", 8, 28, 80 * GiB),
    ("pcie-4gpu.yaml", 4, 0, 46068 << 20),
    ("nvlink-pairs.yaml", 4, 2, 95830 << 20),
])
def test_topologies(name: str, gpus: int, nvlink_pairs: int, total: int) -> None:
    inv = SimulatedBackend(TOPOLOGIES / name, "n1").read()
    assert inv.simulated and inv.backend == "simulated"
    assert len(inv.gpus) == gpus and all(g.total_bytes == total for g in inv.gpus)
    assert sum(lk.nvlink for lk in inv.links) == nvlink_pairs
    assert len(inv.links) == gpus * (gpus - 1) // 2


def test_simulated_uuids_are_per_node() -> None:
    a = SimulatedBackend(TOPOLOGIES / "dgx-h100.yaml", "node-a").read()
    a2 = SimulatedBackend(TOPOLOGIES / "dgx-h100.yaml", "node-a").read()
    b = SimulatedBackend(TOPOLOGIES / "dgx-h100.yaml", "node-b").read()
    assert [g.uuid for g in a.gpus] == [g.uuid for g in a2.gpus]
    assert not {g.uuid for g in a.gpus} & {g.uuid for g in b.gpus}
    assert a.gpus[3].uuid == simulated_uuid("node-a", 3) and a.gpus[3].uuid.startswith("GPU-")


def test_bad_topologies_are_explained(tmp_path: Path) -> None:
    cases = {
        "x: 1\n": "gpus",
        "gpus:\n  - {index: 0, memory: 10Gi, localUsed: 20Gi}\n": "exceeds",
        "gpus:\n  - {index: 1, memory: 10Gi}\n": "indexes",
        "gpus:\n  - {index: 0, memory: 10Gi}\nnvlink: {groups: [[0, 3]]}\n": "index 3",
        "gpus:\n  - {index: 0, memory: 10Gi}\npcieP2P: maybe\n": "NOT_SUPPORTED",
        "gpus: [": "cannot read",
        # device node minor numbers (a topology may set them; they default to the index)
        "gpus:\n  - {index: 0, minor: 1, memory: 10Gi}\n  - {index: 1, memory: 10Gi}\n": "minor numbers .1, 1. repeat",
        "gpus:\n  - {index: 0, minor: -1, memory: 10Gi}\n": "minor: -1",
        "gpus:\n  - {index: 0, minor: two, memory: 10Gi}\n": "whole number",
        "gpus:\n  - {index: zero, memory: 10Gi}\n": "index: 'zero'",
    }
    for text, needle in cases.items():
        p = tmp_path / "t.yaml"
        p.write_text(text)
        with pytest.raises(InventoryError, match=needle):
            SimulatedBackend(p, "n")


def test_pure_nvml_translation() -> None:
    assert p2p_status_name(0) == "P2P_OK"
    assert p2p_status_name(4) == "P2P_DISABLED_BY_REGKEY"
    assert p2p_status_name(99) == "P2P_UNKNOWN"
    procs = [ProcessFacts(10, 5 * GiB), ProcessFacts(11, 3 * GiB)]
    assert local_used_bytes(9 * GiB, procs, {11}) == 6 * GiB
    assert local_used_bytes(9 * GiB, procs, set()) == 9 * GiB
    assert local_used_bytes(1 * GiB, procs, {10, 11}) == 0
    bus = {"1b:00.0": "GPU-a", "43:00.0": "GPU-b"}
    assert nvlink_peers(["00000000:1B:00.0", None, "0000:1b:00.0", "00000000:43:00.0"], bus) == {"GPU-a": 2,
                                                                                                "GPU-b": 1}
    assert nvlink_peers(["00000000:C1:00.0"] * 18, bus) == {"switch": 18}


def test_borrower_processes_are_not_local_use(tmp_path: Path) -> None:
    be = SimulatedBackend(TOPOLOGIES / "dgx-h100.yaml", "n")
    g = be.read().gpus[0]
    be.set_simulated_used(g.uuid, 10 * GiB)
    be.set_simulated_process(g.uuid, 4242, 6 * GiB)
    pool = Pool(be.read(), clock_ms=lambda: 0, key=b"k" * 32)
    assert pool.view(g.uuid).local_used == 16 * GiB
    pool.update_inventory(be.read(), {g.uuid: {4242}})
    assert pool.view(g.uuid).local_used == 10 * GiB


@pytest.mark.gpu
def test_nvml_backend_on_a_real_gpu() -> None:
    if not nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU on this machine")
    be = NvmlBackend("gpu-node")
    try:
        inv = be.read()
    finally:
        be.close()
    assert not inv.simulated and inv.backend == "nvml" and inv.driver_version
    assert inv.gpus, "NVML sees at least one GPU"
    for g in inv.gpus:
        assert g.uuid.startswith("GPU-") and g.total_bytes > 0 and 0 <= g.used_bytes <= g.total_bytes
        assert all(p.pid > 0 for p in g.processes)
    n = len(inv.gpus)
    assert len(inv.links) == n * (n - 1) // 2
    print("nvml saw:", [(g.index, g.name, g.total_bytes, g.used_bytes) for g in inv.gpus],
          [(lk.gpu_a[:12], lk.gpu_b[:12], lk.nvlink, lk.nvlink_count, lk.p2p_read) for lk in inv.links])
