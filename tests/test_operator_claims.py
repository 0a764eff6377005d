"""The operator's ResourceClaims (allocation dra) as pure rules: what a replica's claim says, how
its pod lists it, what an existing claim is worth, which lender an allocation names. The cluster
side (kube-scheduler allocating them, a killed operator) is tests/test_operator_dra_cluster.py."""

from __future__ import annotations

import json
from typing import Any

from spillway.contract import POD_CLAIM_REF, claim_name
from spillway.dra import DRIVER
from spillway.dra.slices import device_name
from spillway.operator import reconcile as rc
from spillway.operator.claims import build_claim, fits, is_orphan_claim, lenders_of, observe_claim, round_up
from spillway.operator.model import Assignment, GpuView, NodeView, ReplicaKey
from spillway.operator.pods import PodPlan, TenantRef, build_pod, observe_pod

GIB = 1 << 30
GRANULE = 64 << 20
T = TenantRef("llm", "ns", "uid-1")


def gpu(i: int) -> GpuView:
    return GpuView(f"GPU-{i}", i, "H100", 80 * GIB, 0, 0, 0, 0, 70 * GIB)


def node() -> NodeView:
    """GPUs 0-1 and 2-3 are NVLink pairs; GPU-0 reaches GPU-2 only over PCIe."""
    pairs = frozenset({frozenset({"GPU-0", "GPU-1"}), frozenset({"GPU-2", "GPU-3"})})
    return NodeView("n1", "127.0.0.1:1", True, tuple(gpu(i) for i in range(4)), pairs, granularity=GRANULE)


def selectors(req: dict[str, Any]) -> list[str]:
    return [s["cel"]["expression"] for s in req["exactly"]["selectors"]]


def test_a_replica_claim_pins_its_lenders_and_names_the_nvlink_domain_of_its_gpu() -> None:
    a = Assignment(ReplicaKey("ns", "llm", 2), "n1", "GPU-0", (("GPU-1", 8 * GIB + 1), ("GPU-2", 4 * GIB)))
    c = build_claim(T, node(), a)
    meta = c["metadata"]
    assert meta["name"] == claim_name("llm", 2) == "llm-2-peer-hbm" and meta["namespace"] == "ns"
    assert meta["labels"]["spillway.dev/tenant"] == "llm" and meta["labels"]["spillway.dev/replica"] == "2"
    assert meta["ownerReferences"][0]["uid"] == "uid-1" and meta["ownerReferences"][0]["controller"] is True
    first, second = c["spec"]["devices"]["requests"]
    assert (first["name"], second["name"]) == ("peer-hbm", "peer-hbm-1")
    # The NVLink peer: its UUID and the domain of the replica's GPU (the lowest UUID of the pair).
    assert selectors(first) == [f'device.attributes["{DRIVER}"].nvlinkDomain == "GPU-0"',
                                f'device.attributes["{DRIVER}"].uuid == "GPU-1"']
    # A lender reached over PCIe: its UUID alone.
    assert selectors(second) == [f'device.attributes["{DRIVER}"].uuid == "GPU-2"']
    # Sizes rounded up to the agents' granule (the request policy refuses anything else).
    assert first["exactly"]["capacity"]["requests"]["memory"] == str(8 * GIB + GRANULE)
    assert second["exactly"]["capacity"]["requests"]["memory"] == str(4 * GIB)
    assert round_up(1, GRANULE) == GRANULE and round_up(5, 0) == 5
    seen = observe_claim(c)
    assert (seen.replica, seen.tenant_uid, seen.node, seen.gpu_uuid) == (2, "uid-1", "n1", "GPU-0")
    assert seen.requested == 12 * GIB + GRANULE and not seen.allocated
    # What was planned, for an operator that restarts before kube-scheduler allocates it.
    assert seen.planned == a.lenders and lenders_of(seen, {}) == a.lenders


def allocated(c: dict[str, Any], pool: str, device: str, nbytes: int, *, deleting: bool = False) -> dict[str, Any]:
    c = json.loads(json.dumps(c))
    c["metadata"]["uid"] = "claim-uid"
    if deleting:
        c["metadata"]["deletionTimestamp"] = "2026-11-30T00:00:00Z"
    c["status"] = {"allocation": {"devices": {"results": [
        {"driver": DRIVER, "pool": pool, "device": device, "request": "peer-hbm",
         "consumedCapacity": {"memory": str(nbytes)}}]}}, "reservedFor": [{"name": "llm-2", "resource": "pods"}]}
    return c


def test_an_existing_claim_is_taken_only_when_it_serves_the_plan_and_names_its_lender() -> None:
    a = Assignment(ReplicaKey("ns", "llm", 2), "n1", "GPU-0", (("GPU-1", 8 * GIB),))
    wanted = observe_claim(build_claim(T, node(), a))
    assert fits(observe_claim(build_claim(T, node(), a)), wanted)
    here = observe_claim(allocated(build_claim(T, node(), a), "n1", device_name("GPU-1"), 8 * GIB))
    assert fits(here, wanted) and here.reserved and here.allocated_bytes == 8 * GIB
    assert lenders_of(here, {"n1": node()}) == (("GPU-1", 8 * GIB),)
    assert lenders_of(here, {}) == ((device_name("GPU-1"), 8 * GIB),)   # pool unknown: the device name
    other_node = observe_claim(allocated(build_claim(T, node(), a), "n2", "gpu-x", 8 * GIB))
    going = observe_claim(allocated(build_claim(T, node(), a), "n1", device_name("GPU-1"), 8 * GIB, deleting=True))
    bigger = observe_claim(build_claim(T, node(), Assignment(a.key, "n1", "GPU-0", (("GPU-1", 16 * GIB),))))
    other_gpu = observe_claim(build_claim(T, node(), Assignment(a.key, "n1", "GPU-3", (("GPU-2", 8 * GIB),))))
    earlier = observe_claim(build_claim(TenantRef("llm", "ns", "uid-0"), node(), a))
    other_lender = observe_claim(build_claim(T, node(), Assignment(a.key, "n1", "GPU-0", (("GPU-2", 8 * GIB),))))
    for bad in (other_node, going, bigger, other_gpu, earlier, other_lender):
        assert not fits(bad, wanted), bad
    tenants = {("ns", "llm"): rc.TenantFacts("uid-1", 3)}
    assert not is_orphan_claim(wanted, tenants)
    assert is_orphan_claim(wanted, {("ns", "llm"): rc.TenantFacts("uid-1", 2)})      # scaled down
    assert is_orphan_claim(earlier, tenants)                                          # earlier tenant
    assert is_orphan_claim(wanted, {})                                                # tenant gone


def test_the_pod_lists_its_claim_instead_of_units_and_lease_annotations() -> None:
    plan = PodPlan(tenant=T, replica=2, node="n1", gpu_uuid="GPU-0", claim="llm-2-peer-hbm",
                   model={"image": "m:1", "resources": {"limits": {"spillway.dev/peer-hbm": "9"}}})
    pod = build_pod(plan)
    assert pod["spec"]["resourceClaims"] == [{"name": POD_CLAIM_REF, "resourceClaimName": "llm-2-peer-hbm"}]
    res = pod["spec"]["containers"][0]["resources"]
    assert res["claims"] == [{"name": POD_CLAIM_REF}] and "spillway.dev/peer-hbm" not in res["limits"]
    ann = pod["metadata"]["annotations"]
    assert not [k for k in ann if k.startswith("spillway.dev/reservation") or k.startswith("spillway.dev/lender")]
    pod["metadata"]["uid"] = "pod-uid"
    seen = observe_pod(pod)
    assert seen is not None and seen.claim == "llm-2-peer-hbm" and seen.namespace == "ns" and seen.node == "n1"
    # The pod names no lenders: its assignment keeps the claim's (planned or allocated) on the same node.
    prev = Assignment(ReplicaKey("ns", "llm", 2), "n1", "GPU-0", (("GPU-1", 8 * GIB),),
                      claim_lenders=(("GPU-1", 8 * GIB),))
    again = rc.assignment_of("ns", "llm", seen, prev)
    assert again.lenders == again.claim_lenders == (("GPU-1", 8 * GIB),)
    moved = rc.assignment_of("ns", "llm", seen, Assignment(prev.key, "n2", "GPU-0", prev.lenders,
                                                           claim_lenders=prev.lenders))
    assert moved.lenders == ()
    # A device-plugin pod is as before.
    plain = build_pod(PodPlan(tenant=T, replica=0, node="n1", model={"image": "m:1"}))
    assert "resourceClaims" not in plain["spec"] and "spillway.dev/reservation" in plain["metadata"]["annotations"]
