"""The operator placing replicas through ResourceClaims (allocation dra), on the real control plane:
kube-apiserver, etcd, controller manager, kube-scheduler, two kwok nodes standing for DGX H100s
(8 simulated GPUs on NVSwitch each), one real agent per node, one real `spillway dra
--publish-only` per node and the chart's DeviceClass. The operator runs with the default
`--allocation auto` and picks dra; kube-scheduler allocates the claims on the slices.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spillway.dra import CAPACITY, DRIVER
from spillway.dra.slices import device_name
from spillway.operator.apiserver import ApiServer
from spillway.operator.claims import choose_allocation
from spillway.testing.cluster import Cluster, wait_until
from spillway.testing.sandbox import REPO_ROOT, Sandbox
from spillway.units import parse_quantity
from tests.test_operator_cluster import agent_leases, events_of, get_tenant, pods_of, tenant, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

EXAMPLES = REPO_ROOT / "examples" / "tenants"


def allocation_mode(cluster: Cluster) -> tuple[str, str]:
    async def go() -> tuple[str, str]:
        kube = await ApiServer.connect(str(cluster.kubeconfig))
        try:
            return await choose_allocation(kube, "auto")
        finally:
            await kube.close()

    return asyncio.run(go())


@pytest.fixture(scope="module")
def sandbox(cluster: Cluster) -> Iterator[Sandbox]:
    sb = Sandbox(cluster)
    sb.start()
    tag = uuid.uuid4().hex[:5]
    nodes = sb.add_gpu_nodes([f"dgx-dra-{tag}-0", f"dgx-dra-{tag}-1"])
    manifest = ""
    try:
        # Without the DeviceClass, auto is the device plugin (the other operator tests run so).
        mode, why = allocation_mode(cluster)
        assert mode == "deviceplugin" and "DeviceClass peer-hbm.spillway.dev does not exist" in why
        manifest = sb.start_dra(nodes)
        assert allocation_mode(cluster)[0] == "dra"
        sb.start_operator()
        wait_until(lambda: "allocation dra" in sb.operator_log.read_text(), timeout=30,
                   what="the operator to log its allocation mode")
        yield sb
    finally:
        print(sb.logs())
        sb.stop()
        cluster.kubectl("delete", "node", *sb.agents, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "memorypools", *sb.agents, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "resourceslices", "--all", "--wait=false", check=False)
        if manifest:
            cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=manifest, check=False)


def claims_of(cluster: Cluster, ns: str, name: str | None = None) -> dict[str, dict[str, Any]]:
    args = ["resourceclaims", "-n", ns] + (["-l", f"spillway.dev/tenant={name}"] if name else [])
    return {c["metadata"]["name"]: c for c in cluster.get_json(*args)["items"]}


def slice_devices(cluster: Cluster, node: str) -> dict[str, dict[str, Any]]:
    items = cluster.get_json("resourceslices")["items"]
    return {d["name"]: d for s in items if s["spec"].get("nodeName") == node for d in s["spec"]["devices"]}


def gpu_uuids(sb: Sandbox, node: str) -> list[str]:
    return [g["uuid"] for g in sb.pools()[node]["status"]["gpus"]]


def borrowers(docs: list[dict[str, Any]]) -> dict[str, int]:
    return {d["metadata"]["name"]: d["spec"].get("replicas", 1) for d in docs
            if (d["spec"].get("peerMemory") or {}).get("request")}


def test_auto_picks_dra_and_the_example_tenants_get_claims_allocated_on_nvlink_peers(
    cluster: Cluster, sandbox: Sandbox, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    docs = [d for p in sorted(EXAMPLES.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
    for d in docs:
        cluster.apply(yaml.safe_dump(d), ns)
    for d in docs:
        wait_phase(cluster, sandbox, ns, d["metadata"]["name"], "Running", timeout=180)
    want = borrowers(docs)
    assert want, "the examples have borrowers"
    claims = claims_of(cluster, ns)
    assert sorted(claims) == sorted(f"{t}-{r}-peer-hbm" for t, n in want.items() for r in range(n))
    # No lease at any agent: the claims hold the reservations.
    assert not any(agent_leases(sandbox, f"tenant:{ns}/").values())

    for name, replicas in want.items():
        t = get_tenant(cluster, ns, name)
        request = parse_quantity(t["spec"]["peerMemory"]["request"])
        placements = {p["replica"]: p for p in t["status"]["placements"]}
        assert t["status"]["peerMemoryBytes"] >= request * replicas
        pods = {p["metadata"]["name"]: p for p in pods_of(cluster, ns, name)}
        for r in range(replicas):
            c = claims[f"{name}-{r}-peer-hbm"]
            pod = pods[f"{name}-{r}"]
            node = pod["spec"]["nodeName"]
            own = pod["metadata"]["annotations"]["spillway.dev/gpu"]
            # The pod lists the claim instead of peer-hbm units and reservation annotations.
            ref = {"name": "peer-memory", "resourceClaimName": c["metadata"]["name"]}
            assert pod["spec"]["resourceClaims"] == [ref]
            res = pod["spec"]["containers"][0]["resources"]
            assert res["claims"] == [{"name": "peer-memory"}]
            assert "spillway.dev/peer-hbm" not in res.get("limits", {})
            assert not {"spillway.dev/reservation", "spillway.dev/lender-bytes"} & set(pod["metadata"]["annotations"])
            # Owned by the tenant (garbage-collected with it), labelled like the pod.
            assert c["metadata"]["ownerReferences"][0]["uid"] == t["metadata"]["uid"]
            assert c["metadata"]["labels"]["spillway.dev/replica"] == str(r)
            # The selectors name the planned lender, an NVLink peer of the replica's GPU (its domain).
            (req,) = c["spec"]["devices"]["requests"]
            exprs = [s["cel"]["expression"] for s in req["exactly"]["selectors"]]
            devices = slice_devices(cluster, node)
            (planned,) = [e.split("==")[1].strip().strip('"') for e in exprs if ".uuid ==" in e]
            (domain,) = [json.loads(e.split("==")[1]) for e in exprs if ".nvlinkDomain ==" in e]
            assert planned != own and domain == min(g for g in gpu_uuids(sandbox, node))  # NVSwitch: one domain
            assert parse_quantity(req["exactly"]["capacity"]["requests"][CAPACITY]) == request
            # Allocated by kube-scheduler on the pod's node, on that lender.
            (result,) = c["status"]["allocation"]["devices"]["results"]
            assert result["driver"] == DRIVER and result["pool"] == node and result["device"] == device_name(planned)
            assert parse_quantity(result["consumedCapacity"][CAPACITY]) == request
            assert c["status"]["reservedFor"][0]["name"] == pod["metadata"]["name"]
            if result["device"] in devices:   # a lender may since have lent all it has (its device goes)
                assert devices[result["device"]]["attributes"]["nvlinkDomain"]["string"] == domain
            # The tenant's status reports the allocated lender and bytes.
            p = placements[r]
            assert p["claim"] == c["metadata"]["name"] and p["node"] == node
            assert p["lenders"] == [{"gpu": planned, "bytes": request}]
            assert [(x["id"], x["state"], x["kind"]) for x in p["leases"]] == [(c["metadata"]["name"], "ALLOCATED",
                                                                                "RESERVATION")]

    # Scale a borrower down: its claim goes with its pod.
    cluster.kubectl("scale", "inferencetenant/llama-70b-chat", "-n", ns, "--replicas=1")
    wait_until(lambda: "llama-70b-chat-1-peer-hbm" not in claims_of(cluster, ns, "llama-70b-chat"), timeout=60,
               what="the scaled-down replica's claim to go")
    assert "llama-70b-chat-0-peer-hbm" in claims_of(cluster, ns, "llama-70b-chat")
    # Deleting the tenants deletes their claims.
    cluster.kubectl("delete", "inferencetenants", "--all", "-n", ns, "--timeout=90s", timeout=120)
    wait_until(lambda: not claims_of(cluster, ns), timeout=60, what="the claims to go with their tenants")


def test_operator_killed_mid_placement_makes_no_claim_twice(
    cluster: Cluster, sandbox: Sandbox, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    rng = random.Random(7)
    names = ["kv-a", "kv-b"]
    created: dict[str, str] = {}  # claim name -> uid, as first seen

    def note_claims() -> None:
        for name, c in claims_of(cluster, ns).items():
            created.setdefault(name, c["metadata"]["uid"])

    for n in names:
        cluster.apply(tenant(n, replicas=3, memory="30Gi", request="6Gi"), ns)
    for _ in range(3):
        time.sleep(rng.uniform(0.3, 2.5))
        sandbox.kill_operator()
        note_claims()
        sandbox.start_operator(wait_ready=False)
    sandbox.wait_operator_ready()
    for n in names:
        wait_phase(cluster, sandbox, ns, n, "Running", timeout=180)
    note_claims()
    claims = claims_of(cluster, ns)
    assert sorted(claims) == sorted(f"{n}-{r}-peer-hbm" for n in names for r in range(3))
    # Each claim is the one first created (found again by name, not made twice), unless the
    # restarted operator planned its replica on another lender and said so (ClaimReplaced), and
    # is allocated for the one pod of its replica.
    replaced = " ".join(e["message"] for n in names for e in events_of(cluster, ns, n)
                        if e["reason"] == "ClaimReplaced")
    for name, c in claims.items():
        assert c["metadata"]["uid"] == created[name] or f"ResourceClaim {name} " in replaced, f"{name} was made again"
        assert c["status"]["allocation"] and [x["name"] for x in c["status"]["reservedFor"]] == [
            name.removesuffix("-peer-hbm")]
    # Scale down and kill at once: the claims of the gone replicas do not stay behind.
    cluster.kubectl("scale", "inferencetenant/kv-a", "-n", ns, "--replicas=1")
    time.sleep(rng.uniform(0.1, 1.0))
    sandbox.kill_operator()
    sandbox.start_operator()
    wait_until(lambda: sorted(claims_of(cluster, ns, "kv-a")) == ["kv-a-0-peer-hbm"], timeout=90,
               what="kv-a's scaled-down claims to go")
    assert not any(agent_leases(sandbox, f"tenant:{ns}/").values())
    cluster.kubectl("delete", "inferencetenants", "--all", "-n", ns, "--timeout=90s", timeout=120)
    wait_until(lambda: not claims_of(cluster, ns), timeout=60, what="the claims to go")


def test_chart_sets_the_allocation_flag(cluster: Cluster) -> None:
    out = cluster.helm("template", "spillway", str(Path(REPO_ROOT) / "charts" / "spillway"),
                       "--set", "operator.allocation=dra", "--show-only", "templates/operator.yaml").stdout
    assert "--allocation=dra" in out
    bad = cluster.helm("template", "spillway", str(Path(REPO_ROOT) / "charts" / "spillway"),
                       "--set", "operator.allocation=claims", check=False)
    assert bad.returncode != 0 and "allocation" in bad.stderr
