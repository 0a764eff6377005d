"""The operator's pure decisions: pod manifests, pod sorting, lender choice, status."""

from __future__ import annotations

from typing import Any

from spillway.operator import pods as P
from spillway.operator import reconcile as rc
from spillway.operator.model import GpuView, NodeHealth, NodeView, TenantSpec, node_verdict

GIB = 1 << 30


def tenant_body(replicas: int = 2, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "spillway.dev/v1alpha1",
        "kind": "InferenceTenant",
        "metadata": {"name": "chat", "namespace": "team-a", "uid": "uid-1", "generation": 3},
        "spec": {
            "replicas": replicas,
            "model": {"image": "toy:1", "memory": "40Gi", "port": 8000, "args": ["--x"],
                      "resources": {"requests": {"cpu": "2"}}},
            "peerMemory": {"request": "20Gi", "limit": "40Gi", "fallback": "HostMemory"},
            **spec,
        },
    }


def node(name: str = "gpu-0", lendable: tuple[int, ...] = (60, 60, 10, 70)) -> NodeView:
    gpus = tuple(
        GpuView(uuid=f"{name}-g{i}", index=i, name="H100", total=80 * GIB, local_used=0, local_reserved=0,
                headroom=0, leased=0, lendable=lend * GIB)
        for i, lend in enumerate(lendable)
    )
    links = frozenset(frozenset((f"{name}-g0", f"{name}-g{i}")) for i in (1, 2))
    return NodeView(name=name, endpoint="127.0.0.1:1", simulated=True, gpus=gpus, nvlink=links)


def test_pod_is_deterministic_pinned_owned_and_annotated() -> None:
    leases = (P.LeaseRef("l1", "t1", "g1", 16 * GIB), P.LeaseRef("l2", "t2", "g2", 4 * GIB + 1))
    plan = P.PodPlan(P.TenantRef("chat", "team-a", "uid-1"), 1, "gpu-0", {"image": "toy:1", "port": 8000,
                     "env": {"A": "1"}, "resources": {"requests": {"cpu": "2"}}}, gpu_uuid="g0", leases=leases)
    pod = P.build_pod(plan)
    assert pod == P.build_pod(plan)
    assert pod["metadata"]["name"] == "chat-1"
    owner = pod["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("InferenceTenant", "uid-1", True)
    term = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["nodeSelectorTerms"][0]["matchExpressions"][0] == {
        "key": "kubernetes.io/hostname", "operator": "In", "values": ["gpu-0"]}
    assert "nodeName" not in pod["spec"]
    res = pod["spec"]["containers"][0]["resources"]
    assert res["limits"] == {"nvidia.com/gpu": "1", "spillway.dev/peer-hbm": "21"}  # ceil(20 GiB + 1 B)
    assert res["requests"]["cpu"] == "2"
    ann = pod["metadata"]["annotations"]
    assert ann["spillway.dev/reservation"] == "l1,l2"
    assert ann["spillway.dev/reservation-token"] == "t1,t2"
    assert ann["spillway.dev/reservation-node"] == "gpu-0"
    assert ann["spillway.dev/lender-gpus"] == "g1,g2"
    assert pod["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]
    observed = P.observe_pod(pod)
    assert observed is not None
    assert observed.replica == 1 and observed.node == "gpu-0" and observed.gpu_uuid == "g0"
    assert [(x.id, x.token, x.gpu_uuid, x.bytes) for x in observed.leases] == [
        ("l1", "t1", "g1", 16 * GIB), ("l2", "t2", "g2", 4 * GIB + 1)]


def test_fallback_pod_asks_for_no_peer_memory() -> None:
    plan = P.PodPlan(P.TenantRef("chat", "team-a", "u"), 0, "gpu-0", {"image": "toy:1"}, fallback="HostMemory")
    pod = P.build_pod(plan)
    assert "spillway.dev/peer-hbm" not in pod["spec"]["containers"][0]["resources"]["limits"]
    assert pod["metadata"]["annotations"]["spillway.dev/fallback"] == "HostMemory"
    observed = P.observe_pod(pod)
    assert observed is not None and observed.fallback and observed.leases == ()


def test_holder_and_idempotency_key_round_trip() -> None:
    holder = P.holder_name("team-a", "chat", 3)
    assert P.parse_holder(holder) == ("team-a", "chat", 3)
    assert P.parse_holder("pod:team-a/chat-3") is None
    assert P.parse_holder("tenant:a/b/x") is None
    assert P.idempotency_key("u", 1, "g") == "u/1/g"
    assert P.idempotency_key("u", 1, "g", 2) == "u/1/g/2"


def observed(replica: int, node: str = "gpu-0", **kw: Any) -> P.ObservedPod:
    base: dict[str, Any] = {"replica": replica, "name": f"chat-{replica}", "uid": f"p{replica}", "node": node,
                            "gpu_uuid": f"{node}-g0", "leases": (), "phase": "Running", "ready": True,
                            "tenant_uid": "uid-1"}
    base.update(kw)
    return P.ObservedPod(**base)


def test_decide_keeps_places_and_removes() -> None:
    spec = TenantSpec.from_resource(tenant_body(replicas=3))
    nodes = {"gpu-0": node()}
    d = rc.decide(spec, [observed(0), observed(1, node="gone"), observed(4), observed(2, terminating=True)], nodes)
    assert [p.replica for p in d.keep] == [0]
    assert sorted((p.replica, reason) for p, reason, _ in d.remove) == [(1, "NodeLost"), (4, "ScaledDown")]
    assert d.place == ()  # 1 goes first, 2 waits for its old pod
    assert d.waiting == (2,)
    d2 = rc.decide(spec, [observed(0)], nodes)
    assert d2.place == (1, 2)
    d3 = rc.decide(spec, [observed(0, tenant_uid="old"), observed(1, phase="Failed")], nodes)
    assert sorted(reason for _, reason, _ in d3.remove) == ["PodFailed", "StalePod"]


def test_choose_lender_prefers_nvlink_then_headroom() -> None:
    n = node()
    assert rc.choose_lender(n, "gpu-0-g0", 20 * GIB) == "gpu-0-g1"  # NVLink peer with room (g3 has more, no NVLink)
    assert rc.choose_lender(n, "gpu-0-g0", 20 * GIB, exclude=["gpu-0-g1"]) == "gpu-0-g3"
    assert rc.choose_lender(n, "gpu-0-g0", 75 * GIB) is None


def test_status_phases_and_conditions() -> None:
    spec = TenantSpec.from_resource(tenant_body(replicas=2))
    lease = {"id": "l1", "gpu": "g1", "bytes": 20 * GIB, "kind": "RESERVATION", "state": "RESERVED"}
    r0 = rc.ReplicaStatus(0, "chat-0", "gpu-0", "g0", [lease], ready=True)
    r1 = rc.ReplicaStatus(1, "chat-1", "gpu-0", "g2", [dict(lease, id="l2")], ready=False)
    s = rc.build_status(spec, [r0, r1], {}, {}, "2026-01-01T00:00:00Z")
    assert s["phase"] == "Placing" and s["replicas"] == 2 and s["readyReplicas"] == 1
    assert s["selector"] == "spillway.dev/tenant=chat" and s["peerMemory"] == "40Gi"
    conds = {c["type"]: c for c in s["conditions"]}
    assert conds["Placed"]["status"] == "True" and conds["PeerMemoryReserved"]["status"] == "True"
    assert conds["Ready"]["status"] == "False" and conds["SLOMet"]["status"] == "Unknown"
    r1.ready = True
    s2 = rc.build_status(spec, [r0, r1], {}, s, "2026-01-01T00:01:00Z")
    assert s2["phase"] == "Running"
    conds2 = {c["type"]: c for c in s2["conditions"]}
    assert conds2["Ready"]["lastTransitionTime"] == "2026-01-01T00:01:00Z"
    assert conds2["Placed"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # unchanged status keeps its time
    fb = rc.ReplicaStatus(1, "chat-1", "gpu-0", "g2", [], host_fallback=True, ready=True, reason="no room")
    s3 = rc.build_status(spec, [r0, fb], {}, s2, "t")
    assert s3["phase"] == "Degraded"
    assert {c["type"]: c for c in s3["conditions"]}["PeerMemoryReserved"]["reason"] == "HostMemoryFallback"
    s4 = rc.build_status(spec, [r0], {1: "no node has a free GPU"}, s3, "t")
    assert s4["phase"] == "Degraded"
    assert "no node has a free GPU" in {c["type"]: c for c in s4["conditions"]}["Placed"]["message"]
    assert rc.build_status(spec, [], {0: "x", 1: "x"}, {}, "t")["phase"] == "Pending"
    failed = rc.failed_status("bad spec", {}, "t", 3)
    assert failed["phase"] == "Failed" and failed["conditions"][0]["message"] == "bad spec"


def test_elastic_annotation_round_trip() -> None:
    leases = [P.LeaseRef("e1", "t", "g3", GIB, "ELASTIC", "k")]
    ann = {P.ANN_ELASTIC: P.elastic_annotation(leases)}
    assert P.parse_elastic(ann) == tuple(leases)
    assert P.parse_elastic({P.ANN_ELASTIC: "not json"}) == ()


def test_pod_records_what_its_own_gpu_keeps() -> None:
    plan = P.PodPlan(P.TenantRef("chat", "team-a", "u"), 0, "gpu-0", {"image": "toy:1"}, gpu_uuid="g0",
                     local_bytes=40 * GIB)
    pod = P.build_pod(plan)
    assert pod["metadata"]["annotations"][P.ANN_LOCAL] == str(40 * GIB)
    obs = P.observe_pod(pod)
    assert obs is not None and obs.local_bytes == 40 * GIB
    # A pod made before the annotation existed, or a garbled value, reads as 0 (the reconcile rewrites it).
    pod["metadata"]["annotations"][P.ANN_LOCAL] = "40Gi"
    obs2 = P.observe_pod(pod)
    assert obs2 is not None and obs2.local_bytes == 0
    assert P.local_bytes(40 * GIB, True, 80 * GIB) == 40 * GIB
    assert P.local_bytes(40 * GIB, False, 80 * GIB) == 80 * GIB  # lending: false keeps the whole GPU
    assert P.local_bytes(40 * GIB, False, 0) == 40 * GIB  # GPU unknown: at least the model


def node_obj(name: str, ready: str = "True", since: str = "2026-01-01T00:00:00Z", cordoned: bool = False) -> dict[
        str, Any]:
    return {"metadata": {"name": name}, "spec": {"unschedulable": True} if cordoned else {},
            "status": {"conditions": [{"type": "MemoryPressure", "status": "False"},
                                      {"type": "Ready", "status": ready, "lastTransitionTime": since}]}}


def test_node_verdict_lost_unplaceable_or_fine() -> None:
    t0 = NodeHealth.from_node(node_obj("n", since="2026-01-01T00:00:00Z")).since
    assert t0 > 0
    ok = NodeHealth.from_node(node_obj("n"))
    assert (ok.name, ok.ready, ok.unschedulable) == ("n", True, False)
    assert node_verdict(ok, t0 + 1000, 60) == ("", "")
    lost, unplaceable = node_verdict(None, t0, 60)
    assert "no Node object" in lost and unplaceable == ""
    not_ready = NodeHealth.from_node(node_obj("n", ready="Unknown"))
    assert node_verdict(not_ready, t0 + 30, 60) == ("", "is NotReady")  # within the grace: no new replicas only
    assert "NotReady" in node_verdict(not_ready, t0 + 61, 60)[0]  # longer: lost, replicas move
    assert "NotReady" in node_verdict(not_ready, t0 + 1, 0)[0]  # no grace
    fresh = NodeHealth.from_node({"metadata": {"name": "n"}, "status": {}})  # no Ready condition yet
    assert node_verdict(fresh, t0 + 1e6, 60) == ("", "is NotReady")
    cordoned = NodeHealth.from_node(node_obj("n", cordoned=True))
    assert node_verdict(cordoned, t0 + 1000, 60) == ("", "is cordoned (unschedulable)")


def test_decide_says_why_a_node_is_lost() -> None:
    spec = TenantSpec.from_resource(tenant_body(replicas=2))
    d = rc.decide(spec, [observed(0), observed(1, node="gone")], {"gpu-0": node()},
                  {"gone": "has no Node object (the node was deleted while its agent still publishes)"})
    [(pod, reason, message)] = d.remove
    assert (pod.replica, reason) == (1, "NodeLost") and "has no Node object" in message
    assert d.place == ()  # replica 1 is re-placed on the next pass, once its pod is gone


def test_status_shows_elastic_bytes_per_replica_and_in_all() -> None:
    spec = TenantSpec.from_resource(tenant_body(replicas=2))
    res = {"id": "l1", "gpu": "g1", "bytes": 20 * GIB, "kind": "RESERVATION", "state": "RESERVED"}
    el = {"id": "e1", "gpu": "g3", "bytes": 2 * GIB, "kind": "ELASTIC", "state": "RESERVED"}
    r0 = rc.ReplicaStatus(0, "chat-0", "gpu-0", "g0", [res, el], ready=True)
    r1 = rc.ReplicaStatus(1, "chat-1", "gpu-0", "g2", [dict(res, id="l2")], ready=True)
    s = rc.build_status(spec, [r0, r1], {}, {}, "t")
    assert [p["elasticBytes"] for p in s["placements"]] == [2 * GIB, 0]
    assert s["elasticBytes"] == 2 * GIB and s["peerMemoryBytes"] == 42 * GIB
