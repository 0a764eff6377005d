"""The DRA driver's rules against a real agent (simulated GPUs), no control plane: what the
ResourceSlice says for a pool, and which allocation results a claim gives the plugin."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from spillway.api.v1 import agent_pb2
from spillway.dra import CAPACITY, DRIVER
from spillway.dra.prepare import PrepareError, cdi_device_id, claim_pod, claim_shares
from spillway.dra.slices import build_devices, build_slice, capacity_of, device_name, nvlink_domains
from spillway.testing.agentproc import AgentProcess

GI = 1 << 30
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


async def _pool(agent: AgentProcess) -> tuple[agent_pb2.Inventory, list[agent_pb2.Lease]]:
    async with agent.client() as c:
        return await c.inventory(), await c.leases()


def test_devices_follow_the_pool(agent: AgentProcess) -> None:
    async def go() -> None:
        inv, leases = await _pool(agent)
        node = inv.node_name
        granule = int(inv.granularity_bytes)
        devices = build_devices(node, inv, leases)
        gpus = sorted(inv.gpus, key=lambda g: g.index)
        assert [d["name"] for d in devices] == [device_name(g.uuid) for g in gpus]
        assert all(DNS_LABEL.match(d["name"]) and len(d["name"]) <= 63 for d in devices)
        assert capacity_of(devices) == {device_name(g.uuid): int(g.lendable_bytes) for g in gpus}
        d0 = devices[0]
        assert d0["allowMultipleAllocations"] is True
        policy = d0["capacity"][CAPACITY]["requestPolicy"]
        assert policy["default"] == str(granule)
        assert policy["validRange"] == {"min": str(granule), "max": d0["capacity"][CAPACITY]["value"],
                                        "step": str(granule)}
        body = build_slice(node, devices, 3)
        assert body["spec"]["pool"] == {"name": node, "generation": 3, "resourceSliceCount": 1}
        assert body["spec"]["driver"] == DRIVER

        g0, g1 = gpus[0], gpus[1]
        async with agent.client() as c:
            # A lease for a DRA claim stays in the capacity (the scheduler counts its claim);
            # any other lease (the operator's reservation) leaves it.
            dra = await c.acquire("8Gi", "claim:ns/a", gpu_uuid=g0.uuid, idempotency_key="dra/uid-1/r/s")
            other = await c.acquire("4Gi", "tenant-x", gpu_uuid=g1.uuid)
            inv2, leases2 = await _pool(agent)
            caps = capacity_of(build_devices(node, inv2, leases2))
            assert caps[device_name(g0.uuid)] == int(g0.lendable_bytes)
            assert caps[device_name(g1.uuid)] == int(g1.lendable_bytes) - 4 * GI
            # The lender's own tenant grows: less to publish; all of it: no device at all.
            await c.set_gpu_local(g1.uuid, reserved="20Gi")
            inv3, leases3 = await _pool(agent)
            g1now = next(g for g in inv3.gpus if g.uuid == g1.uuid)
            caps = capacity_of(build_devices(node, inv3, leases3))
            assert caps[device_name(g1.uuid)] == int(g1now.lendable_bytes) < int(g1.lendable_bytes) - 4 * GI
            await c.set_gpu_local(g1.uuid, reserved=str(int(g1.total_bytes)))
            inv4, leases4 = await _pool(agent)
            assert device_name(g1.uuid) not in capacity_of(build_devices(node, inv4, leases4))
            await c.release(dra.lease.id, dra.token)
            await c.release(other.lease.id, other.token)

    asyncio.run(go())


def test_nvlink_domains_follow_the_links() -> None:
    inv = agent_pb2.Inventory(gpus=[agent_pb2.Gpu(uuid=f"GPU-{i}", index=i) for i in range(4)], links=[
        agent_pb2.PeerLink(gpu_a="GPU-0", gpu_b="GPU-1", nvlink=True),
        agent_pb2.PeerLink(gpu_a="GPU-2", gpu_b="GPU-3", nvlink=True),
        agent_pb2.PeerLink(gpu_a="GPU-1", gpu_b="GPU-2", nvlink=False),
    ])
    domain, peers = nvlink_domains(inv)
    assert domain == {"GPU-0": "GPU-0", "GPU-1": "GPU-0", "GPU-2": "GPU-2", "GPU-3": "GPU-2"}
    assert peers == {"GPU-0": [1], "GPU-1": [0], "GPU-2": [3], "GPU-3": [2]}


def _claim(results: list[dict[str, Any]], reserved: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "c", "uid": "u"},
            "status": {"allocation": {"devices": {"results": results}}, "reservedFor": reserved or []}}


def test_claim_shares_take_this_drivers_results_on_this_node() -> None:
    ours = {"driver": DRIVER, "pool": "n1", "device": "gpu-a", "request": "r", "shareID": "s-1",
            "consumedCapacity": {CAPACITY: "8Gi"}}
    other = {"driver": "gpu.nvidia.com", "pool": "n1", "device": "gpu-0", "request": "g"}
    (share,) = claim_shares(_claim([other, ours]), "n1")
    assert (share.device, share.bytes, share.share_id, share.request) == ("gpu-a", 8 * GI, "s-1", "r")
    assert claim_pod(_claim([ours], [{"resource": "pods", "name": "p"}])) == "ns/p"
    assert cdi_device_id("u") == f"{DRIVER}/claim=u"


@pytest.mark.parametrize(("claim", "message"), [
    ({"metadata": {"namespace": "ns", "name": "c"}, "status": {}}, "is not allocated"),
    (_claim([{"driver": DRIVER, "pool": "n2", "device": "d", "consumedCapacity": {CAPACITY: "1Gi"}}]),
     "is in pool n2, not this node's (n1)"),
    (_claim([{"driver": DRIVER, "pool": "n1", "device": "d"}]), "DRAConsumableCapacity"),
    (_claim([{"driver": DRIVER, "pool": "n1", "device": "d", "consumedCapacity": {CAPACITY: "lots"}}]),
     "consumed memory 'lots'"),
    (_claim([{"driver": "other", "pool": "n1", "device": "d"}]), f"no device of driver {DRIVER}"),
])
def test_claim_shares_refuse_what_cannot_be_prepared(claim: dict[str, Any], message: str) -> None:
    with pytest.raises(PrepareError, match=re.escape(message)):
        claim_shares(claim, "n1")
