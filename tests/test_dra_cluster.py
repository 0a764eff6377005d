"""The DRA driver on the real control plane: kube-apiserver, etcd, kube-scheduler, kwok nodes,
real agents (simulated GPUs) and real `spillway dra` processes.

Two kwok nodes, each with an agent (two 40 GiB GPUs joined by NVLink) and a driver: node A's
driver runs the kubelet plugin too (its sockets in a temporary kubelet directory), node B's
only publishes. The DeviceClass and the request-policy admission come from the chart.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from spillway.api.dra.v1 import api_pb2 as dra_pb2
from spillway.api.dra.v1 import api_pb2_grpc as dra_grpc
from spillway.api.pluginregistration.v1 import api_pb2 as reg_pb2
from spillway.api.pluginregistration.v1 import api_pb2_grpc as reg_grpc
from spillway.api.v1 import agent_pb2
from spillway.deviceplugin import ENV_AGENT_SOCKET, ENV_LEASE_ID, ENV_LEASE_TOKEN, ENV_LENDER_GPUS
from spillway.dra import CAPACITY, DRIVER
from spillway.dra.claims import borrower_claim
from spillway.dra.slices import capacities, device_name, slice_name
from spillway.testing.agentproc import REPO_ROOT, AgentProcess, free_port
from spillway.testing.cluster import Cluster, wait_until
from spillway.testing.sandbox import dra_class_manifest
from tests.fixtures_deviceplugin import Kubelet, build_harness

GI = 1 << 30
LEASE_TTL_S = 20
TOPOLOGY = """\
name: dra-test
driverVersion: simulated-550.90.07
gpus:
  - {index: 0, name: NVIDIA H100 NVL, memory: 40Gi, localUsed: 0}
  - {index: 1, name: NVIDIA H100 NVL, memory: 40Gi, localUsed: 0}
nvlink:
  groups: [[0, 1]]
  linksPerGpu: 12
"""
KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}
CDI_KIND = re.compile(r"^[a-z0-9][a-z0-9.-]*/[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
CDI_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.:-]*$")


@dataclass
class DraNode:
    name: str
    agent: AgentProcess
    workdir: Path
    kubelet_plugin: bool
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = 0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    @property
    def dra_socket(self) -> Path:
        return self.workdir / "plugins" / DRIVER / "dra.sock"

    @property
    def reg_socket(self) -> Path:
        return self.workdir / "registry" / f"{DRIVER}-reg.sock"

    @property
    def cdi_dir(self) -> Path:
        return self.workdir / "cdi"

    def start(self, kubeconfig: Path) -> None:
        cmd = [sys.executable, "-m", "spillway", "dra", "--node-name", self.name,
               "--agent-socket", str(self.agent.socket), "--kubeconfig", str(kubeconfig),
               "--registry-dir", str(self.workdir / "registry"), "--plugins-dir", str(self.workdir / "plugins"),
               "--cdi-dir", str(self.cdi_dir), "--state-dir", str(self.workdir / "state"),
               "--metrics-port", str(self.metrics_port or free_port()), "--metrics-address", "127.0.0.1"]
        if not self.kubelet_plugin:
            cmd.append("--publish-only")
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with open(self.workdir / "dra.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def log(self) -> str:
        path = self.workdir / "dra.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _pool(agent: AgentProcess) -> tuple[agent_pb2.Inventory, list[agent_pb2.Lease]]:
    async with agent.client() as c:
        return await c.inventory(), await c.leases()


def expected_capacity(agent: AgentProcess) -> dict[str, int]:
    """What the slice must say: from the agent's own pool (lending GPUs only)."""
    inv, leases = run(_pool(agent))
    granule = int(inv.granularity_bytes)
    return {device_name(u): v for u, v in capacities(inv, leases).items() if v >= granule}


def published(cluster: Cluster, node: str) -> dict[str, Any] | None:
    r = cluster.kubectl("get", "resourceslice", slice_name(node), "-o", "json", check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def published_capacity(cluster: Cluster, node: str) -> dict[str, int] | None:
    obj = published(cluster, node)
    if obj is None:
        return None
    return {d["name"]: _bytes(d["capacity"][CAPACITY]["value"]) for d in obj["spec"]["devices"]}


def _bytes(q: str) -> int:
    from spillway.units import parse_quantity

    return parse_quantity(q)


@pytest.fixture(scope="module")
def dra(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[DraNode]]:
    base = tmp_path_factory.mktemp("dra")
    topo = base / "topology.yaml"
    topo.write_text(TOPOLOGY)
    chart = dra_class_manifest(cluster)
    cluster.kubectl("apply", "-f", "-", input=chart)
    # The admission policy takes effect once the API server has compiled it.
    probe = json.dumps(claim("default", "probe", "1"))
    wait_until(lambda: cluster.kubectl("create", "--dry-run=server", "-f", "-", input=probe,
                                       check=False).returncode != 0, timeout=30, what="the admission policy")
    nodes: list[DraNode] = []
    try:
        for i, plugin in enumerate((True, False)):
            name = f"dra-{'ab'[i]}-{uuid.uuid4().hex[:5]}"
            cluster.add_node(name, {"cpu": "64", "memory": "512Gi"})
            work = Path(f"/tmp/spw-dra-{uuid.uuid4().hex[:6]}")   # short: unix socket paths
            (work / "agent").mkdir(parents=True)
            # A short lease TTL: the driver must renew what it prepared.
            agent = AgentProcess(topology=topo, node_name=name, workdir=work / "agent",
                                 extra_args=["--default-ttl", f"{LEASE_TTL_S}s"]).start()
            node = DraNode(name, agent, work, plugin, metrics_port=free_port())
            nodes.append(node)
            node.start(cluster.kubeconfig)
        for node in nodes:
            wait_until(lambda n=node: published_capacity(cluster, n.name) == expected_capacity(n.agent),
                       timeout=60, what=f"the ResourceSlice of {node.name}")
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None and node.proc.poll() is not None:
                print(f"--- spillway dra on {node.name} exited:\n{node.log()}")
            node.stop()
            node.agent.cleanup()
            shutil.rmtree(node.workdir, ignore_errors=True)
            cluster.kubectl("delete", "node", node.name, "--wait=false", check=False)
        # The chart's cluster-scoped objects go too: a Helm release later in the session owns them.
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=chart, check=False)


def test_slices_match_the_pools_and_follow_a_change(cluster: Cluster, dra: list[DraNode]) -> None:
    for node in dra:
        obj = published(cluster, node.name)
        assert obj is not None
        spec = obj["spec"]
        assert spec["driver"] == DRIVER and spec["nodeName"] == node.name and spec["pool"]["name"] == node.name
        inv, _ = run(_pool(node.agent))
        granule = int(inv.granularity_bytes)
        assert len(spec["devices"]) == 2
        for dev, gpu in zip(spec["devices"], sorted(inv.gpus, key=lambda g: g.index), strict=True):
            attrs = dev["attributes"]
            assert attrs["uuid"]["string"] == gpu.uuid and attrs["index"]["int"] == gpu.index
            assert attrs["node"]["string"] == node.name and attrs["simulated"]["bool"] is True
            assert attrs["nvlinkDomain"]["string"] == min(g.uuid for g in inv.gpus)   # one NVLink pair
            assert dev["allowMultipleAllocations"] is True
            cap = dev["capacity"][CAPACITY]
            assert _bytes(cap["value"]) == int(gpu.lendable_bytes) + int(gpu.leased_bytes)
            rng = cap["requestPolicy"]["validRange"]
            assert (_bytes(rng["min"]), _bytes(rng["step"]), _bytes(rng["max"])) == (granule, granule,
                                                                                      _bytes(cap["value"]))
        assert published_capacity(cluster, node.name) == expected_capacity(node.agent)

    # GPU 0 of node B: its own tenant grows by 30 GiB: it publishes 30 GiB less, within seconds.
    b = dra[1]
    inv, _ = run(_pool(b.agent))
    gpu = min(inv.gpus, key=lambda g: g.index)
    before = published_capacity(cluster, b.name)
    assert before is not None

    async def set_local(size: str) -> None:
        async with b.agent.client() as c:
            await c.set_gpu_local(gpu.uuid, reserved=size)

    run(set_local("30Gi"))
    try:
        after = wait_until(lambda: (c := published_capacity(cluster, b.name)) != before and c, timeout=10,
                           what="the slice to follow the pool")
        assert after == expected_capacity(b.agent)
        assert after[device_name(gpu.uuid)] < before[device_name(gpu.uuid)]
        # All of the GPU taken by its tenant: it no longer lends, and its device goes.
        run(set_local("40Gi"))
        gone = wait_until(lambda: (c := published_capacity(cluster, b.name)) is not None
                          and device_name(gpu.uuid) not in c and c, timeout=10, what="the device to go")
        assert gone == expected_capacity(b.agent)
    finally:
        run(set_local("0"))
        wait_until(lambda: published_capacity(cluster, b.name) == before, timeout=10, what="the slice to recover")


def claim(ns: str, name: str, memory: str | None) -> dict[str, Any]:
    exactly: dict[str, Any] = {"deviceClassName": DRIVER}
    if memory is not None:
        exactly["capacity"] = {"requests": {CAPACITY: memory}}
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"devices": {"requests": [{"name": "peer-hbm", "exactly": exactly}]}}}


def pod(ns: str, name: str, claim_name: str, node: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "tolerations": [KWOK_TOLERATION],
        "containers": [{"name": "server", "image": "registry.example/server:1",
                        "resources": {"claims": [{"name": "hbm"}]}}],
        "resourceClaims": [{"name": "hbm", "resourceClaimName": claim_name}],
    }
    if node:
        spec["nodeSelector"] = {"kubernetes.io/hostname": node}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def apply(cluster: Cluster, *objs: dict[str, Any]) -> None:
    cluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def allocation(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    obj = cluster.get_json("resourceclaim", name, "-n", ns)
    alloc: dict[str, Any] | None = (obj.get("status") or {}).get("allocation")
    return alloc


def test_claims_are_scheduled_onto_lenders_with_room_sharing_devices(
        cluster: Cluster, dra: list[DraNode], k8s_namespace: str) -> None:
    ns = k8s_namespace
    sizes = ["8Gi", "16Gi", "8Gi", "16Gi", "8Gi", "16Gi"]   # 72 GiB: 6 claims on 4 devices of 38 GiB
    objs = []
    for i, size in enumerate(sizes):
        objs += [claim(ns, f"c{i}", size), pod(ns, f"p{i}", f"c{i}")]
    apply(cluster, *objs)
    nodes = {n.name for n in dra}

    def all_bound() -> list[dict[str, Any]] | None:
        pods = cluster.get_json("pods", "-n", ns)["items"]
        return pods if len(pods) == len(sizes) and all(p["spec"].get("nodeName") for p in pods) else None

    pods = wait_until(all_bound, timeout=60, what="every pod to be scheduled")
    assert {p["spec"]["nodeName"] for p in pods} <= nodes
    used: dict[tuple[str, str], int] = {}
    claims_per_device: dict[tuple[str, str], int] = {}
    for i, size in enumerate(sizes):
        alloc = allocation(cluster, ns, f"c{i}")
        assert alloc is not None
        (result,) = alloc["devices"]["results"]
        assert result["driver"] == DRIVER and result["pool"] in nodes and result.get("shareID")
        assert _bytes(result["consumedCapacity"][CAPACITY]) == _bytes(size)
        p = next(p for p in pods if p["metadata"]["name"] == f"p{i}")
        assert p["spec"]["nodeName"] == result["pool"]     # the pod runs where its lender is
        key = (result["pool"], result["device"])
        used[key] = used.get(key, 0) + _bytes(size)
        claims_per_device[key] = claims_per_device.get(key, 0) + 1
    assert max(claims_per_device.values()) >= 2            # several claims share one device
    for (node, device), total in used.items():
        cap = published_capacity(cluster, node)
        assert cap is not None and total <= cap[device]
    # Give the devices back for the tests that follow (a deleted claim is deallocated).
    cluster.kubectl("delete", "pods,resourceclaims", "--all", "-n", ns, "--grace-period=0", "--force", timeout=60)


def test_a_claim_that_fits_nowhere_leaves_its_pod_pending(
        cluster: Cluster, dra: list[DraNode], k8s_namespace: str) -> None:
    ns = k8s_namespace
    apply(cluster, claim(ns, "huge", "64Gi"), pod(ns, "huge", "huge"))

    def unschedulable() -> dict[str, Any] | None:
        p = cluster.get_json("pod", "huge", "-n", ns)
        cond = next((c for c in p.get("status", {}).get("conditions", []) if c["type"] == "PodScheduled"), None)
        return cond if cond and cond["status"] == "False" and cond.get("reason") == "Unschedulable" else None

    cond = wait_until(unschedulable, timeout=30, what="the scheduler to give up on the pod")
    assert "cannot allocate all claims" in cond["message"]
    assert cluster.get_json("pod", "huge", "-n", ns)["status"]["phase"] == "Pending"
    assert allocation(cluster, ns, "huge") is None


def test_a_claim_picks_an_nvlink_peer_or_a_named_lender(
        cluster: Cluster, dra: list[DraNode], k8s_namespace: str) -> None:
    """CEL selectors on the slices' attributes: the borrower's NVLink domain, or one lender UUID."""
    ns = k8s_namespace
    b = dra[1]
    inv, _ = run(_pool(b.agent))
    domain = min(g.uuid for g in inv.gpus)               # node B's GPUs: one NVLink pair
    lender = max(inv.gpus, key=lambda g: g.index)
    objs = []
    for i in range(3):
        objs += [borrower_claim(ns, f"near{i}", 4 * GI, nvlink_domain=domain), pod(ns, f"near{i}", f"near{i}")]
    objs += [borrower_claim(ns, "named", "2Gi", lender_uuid=lender.uuid), pod(ns, "named", "named")]
    objs += [borrower_claim(ns, "nowhere", "2Gi", nvlink_domain="GPU-no-such-domain"), pod(ns, "nowhere", "nowhere")]
    apply(cluster, *objs)
    for i in range(3):
        alloc = wait_until(lambda i=i: allocation(cluster, ns, f"near{i}"), timeout=30, what=f"claim near{i}")
        (r,) = alloc["devices"]["results"]
        assert r["pool"] == b.name and r["device"] in {device_name(g.uuid) for g in inv.gpus}
    alloc = wait_until(lambda: allocation(cluster, ns, "named"), timeout=30, what="the named lender's claim")
    assert alloc["devices"]["results"][0]["device"] == device_name(lender.uuid)
    p = wait_until(lambda: (x := cluster.get_json("pod", "nowhere", "-n", ns)) and any(
        c["type"] == "PodScheduled" and c["status"] == "False" for c in x["status"].get("conditions", [])) and x,
        timeout=30, what="the pod of a claim no device matches to stay Pending")
    assert p["status"]["phase"] == "Pending" and allocation(cluster, ns, "nowhere") is None
    cluster.kubectl("delete", "pods,resourceclaims", "--all", "-n", ns, "--grace-period=0", "--force", timeout=60)


@pytest.mark.parametrize(("memory", "message"), [
    ("100Mi", "must be a whole number of the agents' granule (64Mi = 67108864 bytes), at least one: "
              "request(s) peer-hbm asks for 100Mi"),
    ("32Mi", "peer-hbm asks for 32Mi"),
    (None, "request(s) peer-hbm of device class peer-hbm.spillway.dev must ask for capacity.requests.memory"),
])
def test_a_claim_that_breaks_the_request_policy_is_refused(
        cluster: Cluster, dra: list[DraNode], k8s_namespace: str, memory: str | None, message: str) -> None:
    r = cluster.kubectl("create", "-f", "-", input=json.dumps(claim(k8s_namespace, "bad", memory)), check=False)
    assert r.returncode != 0
    assert "ValidatingAdmissionPolicy 'peer-hbm.spillway.dev-requests'" in r.stderr
    assert message in r.stderr, r.stderr
    assert cluster.kubectl("get", "resourceclaim", "bad", "-n", k8s_namespace, check=False).returncode != 0


# --- the kubelet side ----------------------------------------------------------------------


class DraKubelet(Kubelet):
    """The kubelet's plugin manager and DRA manager (Go harness hack/draconformance)."""

    REPLIES = ("prepare", "unprepare")

    def __init__(self, binary: Path, registry_dir: Path, state_dir: Path, kubeconfig: Path, node: str) -> None:
        super().__init__(binary, state_dir)
        self.registry_dir = registry_dir
        self.kubeconfig = kubeconfig
        self.node = node

    def arguments(self) -> list[str]:
        return ["--registry-dir", str(self.registry_dir), "--state-dir", str(self.dir),
                "--kubeconfig", str(self.kubeconfig), "--node", self.node]

    def prepare(self, ns: str, pod: str) -> dict[str, Any]:
        return self._command({"cmd": "prepare", "namespace": ns, "pod": pod}, timeout=90)

    def unprepare(self, ns: str, pod: str) -> dict[str, Any]:
        return self._command({"cmd": "unprepare", "namespace": ns, "pod": pod}, timeout=90)


@pytest.fixture(scope="module")
def draconformance_bin() -> Path:
    return build_harness(REPO_ROOT / "hack" / "draconformance", "SPILLWAY_DRACONFORMANCE_BIN")


def claim_leases(agent: AgentProcess, claim_uid: str) -> list[agent_pb2.Lease]:
    async def go() -> list[agent_pb2.Lease]:
        async with agent.client() as c:
            return [lease for lease in await c.leases(include_ended=True)
                    if lease.idempotency_key.startswith(f"dra/{claim_uid}/")]
    result: list[agent_pb2.Lease] = run(go())
    return result


def check_cdi_spec(path: Path, claim_uid: str) -> dict[str, str]:
    spec = json.loads(path.read_text())
    assert spec["cdiVersion"] == "0.6.0" and CDI_KIND.match(spec["kind"]) and spec["kind"] == f"{DRIVER}/claim"
    (device,) = spec["devices"]
    assert device["name"] == claim_uid and CDI_NAME.match(device["name"])
    edits = device["containerEdits"]
    env = dict(e.split("=", 1) for e in edits["env"])
    assert all(n["path"].startswith("/dev/nvidia") for n in edits["deviceNodes"]) and edits["deviceNodes"]
    assert all(os.path.isabs(m["hostPath"]) and os.path.isabs(m["containerPath"]) for m in edits["mounts"])
    return env


def test_kubelet_dra_manager_prepares_a_claim_as_one_lease_across_a_kill(
        cluster: Cluster, dra: list[DraNode], k8s_namespace: str, draconformance_bin: Path,
        tmp_path: Path) -> None:
    a = dra[0]
    ns = k8s_namespace
    kubelet = DraKubelet(draconformance_bin, a.workdir / "registry", tmp_path / "kubelet-1", cluster.kubeconfig,
                         a.name).start()
    try:
        # The kubelet's plugin watcher finds the registration socket and registers the driver.
        reg = kubelet.wait_for(lambda e: e["event"] == "registered", 30, "the driver's registration")
        assert (reg["driver"], reg["endpoint"], reg["versions"]) == (DRIVER, str(a.dra_socket), ["v1.DRAPlugin"])
        # A starting kubelet deletes its node's slices; the driver writes its slice again.
        wait_until(lambda: published_capacity(cluster, a.name) == expected_capacity(a.agent), timeout=30,
                   what="the slice after the kubelet's start")

        apply(cluster, claim(ns, "kv", "12Gi"), pod(ns, "kv", "kv", node=a.name))
        alloc = wait_until(lambda: allocation(cluster, ns, "kv"), timeout=30, what="the claim to be allocated")
        (result,) = alloc["devices"]["results"]
        uid = cluster.get_json("resourceclaim", "kv", "-n", ns)["metadata"]["uid"]
        wait_until(lambda: (cluster.get_json("resourceclaim", "kv", "-n", ns).get("status") or {}).get(
            "reservedFor"), timeout=30, what="the pod to reserve the claim")

        reply = kubelet.prepare(ns, "kv")
        assert "error" not in reply, reply
        assert reply["cdi"] == {"server": [f"{DRIVER}/claim={uid}"]}
        (lease,) = [x for x in claim_leases(a.agent, uid) if x.state == agent_pb2.ACTIVE]
        assert lease.bytes == 12 * GI and device_name(lease.gpu_uuid) == result["device"]
        assert lease.pod == f"{ns}/kv" and lease.holder == f"claim:{ns}/kv"
        env = check_cdi_spec(a.cdi_dir / f"{DRIVER}-{uid}.json", uid)
        assert env[ENV_LEASE_ID] == lease.id and env[ENV_LENDER_GPUS] == lease.gpu_uuid
        # The borrower gets the agent's borrower socket (leases by token only), never the admin one.
        assert env[ENV_AGENT_SOCKET] == str(a.agent.borrower_socket) and env[ENV_LEASE_TOKEN]
        mounts = json.loads((a.cdi_dir / f"{DRIVER}-{uid}.json").read_text())["devices"][0]["containerEdits"]["mounts"]
        assert [m["hostPath"] for m in mounts] == [str(a.agent.borrower_socket.parent)], mounts
        # The driver renews what it prepared (at a third of the TTL), so it never expires.
        renewed = wait_until(lambda: [x for x in claim_leases(a.agent, uid)
                                      if x.state == agent_pb2.ACTIVE and x.expires_at_ms > lease.expires_at_ms],
                             timeout=LEASE_TTL_S, what="the driver to renew the lease")
        assert [x.id for x in renewed] == [lease.id]
    finally:
        kubelet.stop()

    # The plugin dies by SIGKILL and starts again; a kubelet that lost its checkpoint prepares
    # the pod again: the same lease, never two.
    a.kill()
    a.start(cluster.kubeconfig)
    kubelet = DraKubelet(draconformance_bin, a.workdir / "registry", tmp_path / "kubelet-2", cluster.kubeconfig,
                         a.name).start()
    try:
        kubelet.wait_for(lambda e: e["event"] == "registered", 30, "the restarted driver's registration")
        again = wait_until(lambda: (r := kubelet.prepare(ns, "kv")) and "error" not in r and r, timeout=30,
                           what="a prepare after the restart")
        assert again["cdi"] == {"server": [f"{DRIVER}/claim={uid}"]}
        live = [x for x in claim_leases(a.agent, uid) if x.state in (agent_pb2.RESERVED, agent_pb2.ACTIVE)]
        assert [x.id for x in live] == [lease.id]
        assert check_cdi_spec(a.cdi_dir / f"{DRIVER}-{uid}.json", uid)[ENV_LEASE_TOKEN] == env[ENV_LEASE_TOKEN]
        text = a.metrics()
        assert f'spillway_dra_prepares_total{{node="{a.name}",result="ok"}} 1.0' in text
        assert f'spillway_dra_agent_up{{node="{a.name}"}} 1.0' in text
        assert f'spillway_dra_devices{{node="{a.name}"}} 2.0' in text

        # Unprepare gives the memory back.
        reply = kubelet.unprepare(ns, "kv")
        assert "error" not in reply, reply
        (ended,) = claim_leases(a.agent, uid)
        assert ended.state == agent_pb2.RELEASED
        assert not (a.cdi_dir / f"{DRIVER}-{uid}.json").exists()
    finally:
        kubelet.stop()


def test_plugin_refuses_what_it_cannot_prepare_and_survives_a_wiped_directory(
        cluster: Cluster, dra: list[DraNode], k8s_namespace: str) -> None:
    """Over the plugin's own sockets, as the kubelet calls them: registration, then the DRA API."""
    a = dra[0]
    with grpc.insecure_channel(f"unix:{a.reg_socket}") as ch:
        info = reg_grpc.RegistrationStub(ch).GetInfo(reg_pb2.InfoRequest(), timeout=5)
    assert (info.type, info.name, list(info.supported_versions)) == ("DRAPlugin", DRIVER, ["v1.DRAPlugin"])
    bad = dra_pb2.Claim(namespace=k8s_namespace, name="nosuch", uid=str(uuid.uuid4()))
    with grpc.insecure_channel(f"unix:{info.endpoint}") as ch:
        stub = dra_grpc.DRAPluginStub(ch)
        resp = stub.NodePrepareResources(dra_pb2.NodePrepareResourcesRequest(claims=[bad]), timeout=20)
        assert f"ResourceClaim {k8s_namespace}/nosuch does not exist" in resp.claims[bad.uid].error
        # Unpreparing what was never prepared is no error (the kubelet may repeat it).
        un = stub.NodeUnprepareResources(dra_pb2.NodeUnprepareResourcesRequest(claims=[bad]), timeout=20)
        assert un.claims[bad.uid].error == ""
    assert claim_leases(a.agent, bad.uid) == []

    # A restarting kubelet may wipe its plugin directories: the driver serves both sockets anew.
    def stamp(path: Path) -> tuple[int, int] | None:
        return (st.st_ino, st.st_ctime_ns) if (st := path.stat() if path.exists() else None) else None

    old = stamp(a.reg_socket)
    a.reg_socket.unlink()
    a.dra_socket.unlink()
    wait_until(lambda: stamp(a.dra_socket) and stamp(a.reg_socket) not in (None, old), timeout=10,
               what="the sockets to be served again")
    with grpc.insecure_channel(f"unix:{a.reg_socket}") as ch:
        assert reg_grpc.RegistrationStub(ch).GetInfo(reg_pb2.InfoRequest(), timeout=5).name == DRIVER


# --- the chart -----------------------------------------------------------------------------


def test_chart_runs_the_driver_with_only_what_it_needs(cluster: Cluster, k8s_namespace: str) -> None:
    """dra.enabled renders a DaemonSet whose command line the real CLI parses, and an account that
    may write ResourceSlices and read claims and nodes, and nothing else that matters."""
    import yaml

    from spillway.cli import build_parser

    ns = k8s_namespace
    text = cluster.helm("template", "sw", str(REPO_ROOT / "charts" / "spillway"), "-n", ns,
                        "--set", "dra.enabled=true", "--show-only", "templates/dra-daemonset.yaml").stdout
    objs = [o for o in yaml.safe_load_all(text) if o]
    assert sorted(o["kind"] for o in objs) == ["ClusterRole", "ClusterRoleBinding", "DaemonSet", "ServiceAccount"]
    ds = next(o for o in objs if o["kind"] == "DaemonSet")
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    argv = [a.replace("$(NODE_NAME)", "gpu-0") for a in container["args"]]
    args = build_parser().parse_args(argv)
    assert (args.command, args.node_name, args.agent_socket) == ("dra", "gpu-0", "/run/spillway/agent.sock")
    assert not args.publish_only
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {args.registry_dir, args.plugins_dir, args.cdi_dir, os.path.dirname(args.agent_socket)} <= mounts
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=text)
    try:
        sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]["name"]
        user = f"system:serviceaccount:{ns}:{sa}"

        def can(*what: str) -> bool:
            return cluster.kubectl("auth", "can-i", *what, as_user=user, check=False).stdout.strip() == "yes"

        assert can("create", "resourceslices.resource.k8s.io") and can("delete", "resourceslices.resource.k8s.io")
        assert can("get", "resourceclaims.resource.k8s.io", "-n", "default") and can("get", "nodes")
        assert not can("update", "resourceclaims.resource.k8s.io", "-n", "default")
        assert not can("get", "secrets", "-n", ns) and not can("delete", "nodes") and not can("create", "pods")
    finally:
        for o in objs:
            if o["kind"].startswith("ClusterRole"):
                cluster.kubectl("delete", o["kind"].lower(), o["metadata"]["name"], "--ignore-not-found", check=False)
