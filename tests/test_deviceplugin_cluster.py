"""Device plugin Allocate against the real kube-apiserver (kwok node, real pods): the
operator's reservation claimed, a pod without one, an expired reservation, and two pending
pods with the same unit count. The kubelet side is the kubelet's own device-manager code
(hack/dpconformance); the agent is a real subprocess (simulated GPUs)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from spillway.api.v1 import agent_pb2
from spillway.deviceplugin.resources import parse_unit_id
from spillway.testing.agentproc import AgentProcess
from spillway.testing.cluster import Cluster
from tests.fixtures_deviceplugin import Kubelet, PluginProcess, PodResourcesServer

pytestmark = pytest.mark.cluster

GiB = 1 << 30


class Stack:
    def __init__(self, cluster: Cluster, namespace: str, node: str, agent: AgentProcess, plugin: PluginProcess,
                 kubelet: Kubelet) -> None:
        self.cluster, self.namespace, self.node = cluster, namespace, node
        self.agent, self.plugin, self.kubelet = agent, plugin, kubelet
        self.podresources: PodResourcesServer | None = None

    def run(self, fn: Callable[[Any], Any]) -> Any:
        async def go() -> Any:
            async with self.agent.client() as c:
                return await fn(c)
        return asyncio.run(go())

    def reserve(self, size: str, gpu: str, replica: int, ttl_s: float = 0.0) -> agent_pb2.AcquireResponse:
        """What the operator does: a RESERVATION under its holder name, before the pod exists."""
        return self.run(lambda c: c.acquire(size, f"tenant:{self.namespace}/llm/{replica}", kind=agent_pb2.RESERVATION,
                                            gpu_uuid=gpu, ttl_s=ttl_s, idempotency_key=f"uid/{replica}/{gpu}"))

    def leases(self) -> dict[str, agent_pb2.Lease]:
        return {x.id: x for x in self.run(lambda c: c.leases(include_ended=True))}

    def gpus(self) -> list[agent_pb2.Gpu]:
        return list(self.run(lambda c: c.inventory()).gpus)

    def reservation_annotations(self, grants: Sequence[agent_pb2.AcquireResponse]) -> dict[str, str]:
        """The operator's reservation annotations: one comma-separated entry per lease in each."""
        if not grants:
            return {}
        return {"spillway.dev/reservation": ",".join(g.lease.id for g in grants),
                "spillway.dev/reservation-token": ",".join(g.token for g in grants),
                "spillway.dev/reservation-node": self.node,
                "spillway.dev/lender-gpus": ",".join(g.lease.gpu_uuid for g in grants)}

    def pod(self, name: str, units: int, *grants: agent_pb2.AcquireResponse) -> None:
        """A pod as the operator makes it: one comma-separated entry per lease in each annotation."""
        annotations = self.reservation_annotations(grants)
        self.cluster.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "annotations": annotations},
            "spec": {"nodeName": self.node, "containers": [{
                "name": "server", "image": "registry.example/llm:1",
                "resources": {"limits": {"spillway.dev/peer-hbm": str(units)}}}]},
        })

    def multi_pod(self, name: str, containers: dict[str, int], init: dict[str, int] | None = None,
                  *grants: agent_pb2.AcquireResponse, sidecars: dict[str, int] | None = None) -> None:
        """A pod with several containers (name -> units), init containers first as the kubelet sees them."""
        annotations = self.reservation_annotations(grants)

        def c(n: str, units: int) -> dict[str, Any]:
            return {"name": n, "image": "registry.example/llm:1",
                    "resources": {"limits": {"spillway.dev/peer-hbm": str(units)}}}
        self.cluster.apply({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": self.namespace, "annotations": annotations},
            "spec": {"nodeName": self.node,
                     "initContainers": [c(n, u) for n, u in (init or {}).items()]
                     + [{**c(n, u), "restartPolicy": "Always"} for n, u in (sidecars or {}).items()],
                     "containers": [c(n, u) for n, u in containers.items()]},
        })

    def wait_lease(self, lease_id: str, state: int, timeout: float = 20) -> agent_pb2.Lease:
        deadline = time.monotonic() + timeout
        while True:
            lease = self.leases()[lease_id]
            if lease.state == state:
                return lease
            assert time.monotonic() < deadline, (
                f"lease {lease_id} stayed {agent_pb2.LeaseState.Name(lease.state)}, "
                f"not {agent_pb2.LeaseState.Name(state)}; plugin log:\n{self.plugin.logs()[-3000:]}")
            time.sleep(0.2)

    def allocation(self, name: str) -> dict[str, Any]:
        pod = self.cluster.get_json("pod", name, "-n", self.namespace)
        value: dict[str, Any] = json.loads(pod["metadata"].get("annotations", {}).get("spillway.dev/allocation", "{}"))
        return value

    def units_on(self, gpu: str, n: int) -> list[str]:
        ids = [d["id"] for d in self.kubelet.devices() if d["health"] == "Healthy"]
        return [i for i in ids if (parse_unit_id(i) or ("", 0))[0] == gpu][:n]


@pytest.fixture
def stack(cluster: Cluster, k8s_namespace: str, kwok_nodes: Callable[..., str], dpconformance_bin: Path,
          dp_workdir: Path, agent: AgentProcess) -> Iterator[Stack]:
    node = kwok_nodes({"spillway.dev/peer-hbm": "600", "nvidia.com/gpu": "8"}, prefix="gpu")
    plugin = PluginProcess(dp_workdir, agent.socket, node, kubeconfig=cluster.kubeconfig)
    pods = PodResourcesServer(plugin.pod_resources)
    kubelet = Kubelet(dpconformance_bin, plugin.kubelet_dir).start()
    plugin.start()
    try:
        kubelet.wait_for(lambda e: e["event"] == "registered", 30, "the plugin to register")
        st = Stack(cluster, k8s_namespace, node, agent, plugin, kubelet)
        st.podresources = pods
        yield st
    except BaseException:
        print(plugin.logs()[-6000:])
        raise
    finally:
        plugin.stop()
        kubelet.stop()
        pods.stop()


def test_allocate_claims_the_operators_reservation(stack: Stack) -> None:
    gpu = stack.gpus()[3].uuid
    grant = stack.reserve("3Gi", gpu, 0)
    stack.pod("llm-0", 3, grant)
    available = [d["id"] for d in stack.kubelet.devices()]
    # The pod's reservation is on GPU 3: the preferred units are GPU 3's.
    pref = stack.kubelet.preferred(available, 3)
    assert {parse_unit_id(i)[0] for i in pref["ids"]} == {gpu}  # type: ignore[index]
    before = {g.uuid: g.lendable_bytes for g in stack.gpus()}

    alloc = stack.kubelet.allocate(pref["ids"])
    assert "error" not in alloc, alloc
    envs = alloc["response"]["envs"]
    assert envs["SPILLWAY_LEASE_ID"] == grant.lease.id
    assert envs["SPILLWAY_LEASE_TOKEN"] == grant.token
    assert envs["SPILLWAY_LENDER_GPUS"] == gpu
    lease = stack.leases()[grant.lease.id]
    assert lease.state == agent_pb2.ACTIVE
    assert lease.pod == f"{stack.namespace}/llm-0"
    assert lease.holder == f"tenant:{stack.namespace}/llm/0"   # the operator still finds its lease
    assert len(stack.leases()) == 1                            # nothing leased on the spot
    assert {g.uuid: g.lendable_bytes for g in stack.gpus()} == before
    mark = stack.allocation("llm-0")["server"]
    assert mark["result"] == "reservation" and mark["leases"] == [grant.lease.id]
    assert 'result="reservation"} 1.0' in stack.plugin.metrics()


def test_allocate_without_a_reservation_leases_for_the_pod(stack: Stack) -> None:
    stack.pod("plain", 2)
    gpu = stack.gpus()[1].uuid
    alloc = stack.kubelet.allocate(stack.units_on(gpu, 2))
    assert "error" not in alloc, alloc
    envs = alloc["response"]["envs"]
    lease = stack.leases()[envs["SPILLWAY_LEASE_ID"]]
    assert lease.kind == agent_pb2.RESERVATION and lease.bytes == 2 * GiB and lease.gpu_uuid == gpu
    assert lease.pod == f"{stack.namespace}/plain"
    assert stack.allocation("plain")["server"]["result"] == "on_the_spot"


def test_allocate_with_an_expired_reservation_fails_and_changes_nothing(stack: Stack) -> None:
    gpu = stack.gpus()[2].uuid
    grant = stack.reserve("2Gi", gpu, 0, ttl_s=1.0)
    deadline = time.monotonic() + 15
    while stack.leases()[grant.lease.id].state != agent_pb2.EXPIRED:
        assert time.monotonic() < deadline, "the 1 s reservation never expired"
        time.sleep(0.2)
    stack.pod("late", 2, grant)
    before_gpus = {g.uuid: g.lendable_bytes for g in stack.gpus()}
    before_leases = {k: v.state for k, v in stack.leases().items()}

    alloc = stack.kubelet.allocate(stack.units_on(gpu, 2))
    assert "error" in alloc
    assert f"reservation {grant.lease.id} of pod {stack.namespace}/late" in alloc["error"]
    assert "EXPIRED" in alloc["error"]  # the agent's own word for the lease's state
    assert {g.uuid: g.lendable_bytes for g in stack.gpus()} == before_gpus
    assert {k: v.state for k, v in stack.leases().items()} == before_leases
    mark = stack.allocation("late")["server"]
    assert mark["result"] == "error" and "expired" in mark["message"]


def test_two_pending_pods_same_size_oldest_first_no_double_take(stack: Stack) -> None:
    gpus = stack.gpus()
    first = stack.reserve("2Gi", gpus[4].uuid, 0)
    second = stack.reserve("2Gi", gpus[5].uuid, 1)
    # Names sort the other way round from age, so only the creation time can order them.
    stack.pod("zz-older", 2, first)
    time.sleep(1.1)  # creationTimestamp has a resolution of one second
    stack.pod("aa-newer", 2, second)

    a = stack.kubelet.allocate(stack.units_on(gpus[4].uuid, 2))
    b = stack.kubelet.allocate(stack.units_on(gpus[5].uuid, 2))
    assert "error" not in a and "error" not in b, (a, b)
    assert a["response"]["envs"]["SPILLWAY_LEASE_ID"] == first.lease.id
    assert b["response"]["envs"]["SPILLWAY_LEASE_ID"] == second.lease.id
    leases = stack.leases()
    assert leases[first.lease.id].pod == f"{stack.namespace}/zz-older"
    assert leases[second.lease.id].pod == f"{stack.namespace}/aa-newer"
    # A third Allocate of the same size finds no pod left: it does not take either reservation.
    c = stack.kubelet.allocate(stack.units_on(gpus[6].uuid, 2))
    assert "error" not in c
    assert c["response"]["envs"]["SPILLWAY_LEASE_ID"] not in (first.lease.id, second.lease.id)


def test_allocate_claims_every_lease_of_a_two_lender_reservation(stack: Stack) -> None:
    gpus = stack.gpus()
    a = stack.reserve("2Gi", gpus[0].uuid, 0)
    b = stack.reserve("1Gi", gpus[7].uuid, 0)
    stack.pod("wide", 3, a, b)
    alloc = stack.kubelet.allocate(stack.units_on(gpus[0].uuid, 3))
    assert "error" not in alloc, alloc
    resp = alloc["response"]
    assert resp["envs"]["SPILLWAY_LEASE_ID"] == f"{a.lease.id},{b.lease.id}"
    assert resp["envs"]["SPILLWAY_LEASE_TOKEN"] == f"{a.token},{b.token}"
    assert resp["envs"]["SPILLWAY_LENDER_GPUS"] == f"{gpus[0].uuid},{gpus[7].uuid}"
    assert [d["host_path"] for d in resp["devices"]] == [f"/dev/nvidia{g.minor_number}" for g in (gpus[0], gpus[7])]
    leases = stack.leases()
    for g in (a, b):
        assert leases[g.lease.id].state == agent_pb2.ACTIVE
        assert leases[g.lease.id].pod == f"{stack.namespace}/wide"


def test_two_app_containers_each_get_their_own_lease_the_first_claims_the_reservation(stack: Stack) -> None:
    gpus = stack.gpus()
    grant = stack.reserve("2Gi", gpus[2].uuid, 0)
    # An older pod whose only container asks as many units as duo's second container: the
    # second Allocate still belongs to duo, whose admission is under way.
    stack.pod("rival", 3)
    time.sleep(1.1)  # creationTimestamp has a resolution of one second
    stack.multi_pod("duo", {"server": 2, "helper": 3}, None, grant)

    a = stack.kubelet.allocate(stack.units_on(gpus[2].uuid, 2))
    b = stack.kubelet.allocate(stack.units_on(gpus[5].uuid, 3))
    assert "error" not in a and "error" not in b, (a, b)
    assert a["response"]["envs"]["SPILLWAY_LEASE_ID"] == grant.lease.id
    assert a["response"]["envs"]["SPILLWAY_LEASE_TOKEN"] == grant.token
    helper_id = b["response"]["envs"]["SPILLWAY_LEASE_ID"]
    assert helper_id != grant.lease.id
    leases = stack.leases()
    helper = leases[helper_id]
    assert helper.bytes == 3 * GiB and helper.gpu_uuid == gpus[5].uuid and helper.state == agent_pb2.RESERVED
    assert helper.pod == f"{stack.namespace}/duo" and helper.holder == f"pod:{stack.namespace}/duo"
    assert b["response"]["envs"]["SPILLWAY_LENDER_GPUS"] == gpus[5].uuid
    assert [d["host_path"] for d in b["response"]["devices"]] == [f"/dev/nvidia{gpus[5].minor_number}"]
    assert leases[grant.lease.id].pod == f"{stack.namespace}/duo"
    mark = stack.allocation("duo")
    assert mark["server"]["result"] == "reservation" and mark["server"]["leases"] == [grant.lease.id]
    assert mark["helper"]["result"] == "on_the_spot" and mark["helper"]["leases"] == [helper_id]
    assert stack.allocation("rival") == {}  # untouched: its own Allocate is still to come
    c = stack.kubelet.allocate(stack.units_on(gpus[6].uuid, 3))
    assert "error" not in c, c
    assert stack.leases()[c["response"]["envs"]["SPILLWAY_LEASE_ID"]].pod == f"{stack.namespace}/rival"


def test_init_container_lease_ends_when_it_completes_app_containers_keep_theirs_nothing_leaks(stack: Stack) -> None:
    gpus = stack.gpus()
    before = {g.uuid: g.lendable_bytes for g in stack.gpus()}
    grant = stack.reserve("2Gi", gpus[1].uuid, 0)
    stack.pod("rival", 2)   # older, as large as the app container that reuses the init container's unit
    time.sleep(1.1)
    stack.multi_pod("warm", {"server": 2, "helper": 1}, {"prep": 1}, grant)
    ns = stack.namespace

    # The kubelet: the init container first; the first app container gets the init container's
    # unit again (devicesToReuse) and one more; then the other app container.
    prep_units = stack.units_on(gpus[1].uuid, 1)
    server_units = prep_units + [i for i in stack.units_on(gpus[1].uuid, 3) if i not in prep_units][:1]
    helper_units = stack.units_on(gpus[4].uuid, 1)
    assert stack.podresources is not None
    stack.podresources.set_pod(f"{ns}/warm", {"server": server_units, "helper": helper_units})
    p = stack.kubelet.allocate(prep_units)
    s = stack.kubelet.allocate(server_units)
    h = stack.kubelet.allocate(helper_units)
    assert "error" not in p and "error" not in s and "error" not in h, (p, s, h)

    prep_id = p["response"]["envs"]["SPILLWAY_LEASE_ID"]
    helper_id = h["response"]["envs"]["SPILLWAY_LEASE_ID"]
    assert s["response"]["envs"]["SPILLWAY_LEASE_ID"] == grant.lease.id   # the app container claims it
    assert len({prep_id, helper_id, grant.lease.id}) == 3
    leases = stack.leases()
    assert leases[prep_id].bytes == 1 * GiB and leases[prep_id].pod == f"{ns}/warm"
    assert leases[helper_id].bytes == 1 * GiB and leases[helper_id].pod == f"{ns}/warm"
    mark = stack.allocation("warm")
    assert {k: (v["result"], v["role"]) for k, v in mark.items()} == {
        "prep": ("on_the_spot", "init"), "server": ("reservation", "app"), "helper": ("on_the_spot", "app")}
    assert stack.allocation("rival") == {}

    # kwok reports the init container Completed: the plugin releases its lease; the others stay.
    stack.wait_lease(prep_id, agent_pb2.RELEASED)
    time.sleep(1.5)  # past --release-grace: the app containers' leases are kept while PodResources lists the pod
    leases = stack.leases()
    assert leases[grant.lease.id].state == agent_pb2.ACTIVE       # claimed
    assert leases[helper_id].state == agent_pb2.RESERVED          # made on the spot; ACTIVE once attached

    # The pod goes: every lease it had is released and the pool is whole again.
    stack.podresources.remove_pod(f"{ns}/warm")
    stack.cluster.kubectl("delete", "pod", "warm", "-n", ns, "--wait=false")
    for lease_id in (grant.lease.id, helper_id):
        stack.wait_lease(lease_id, agent_pb2.RELEASED)
    deadline = time.monotonic() + 10
    while {g.uuid: g.lendable_bytes for g in stack.gpus()} != before:
        assert time.monotonic() < deadline, "the pool did not get its bytes back"
        time.sleep(0.2)


def test_sidecar_keeps_its_lease_while_the_pod_runs(stack: Stack) -> None:
    gpus = stack.gpus()
    grant = stack.reserve("2Gi", gpus[6].uuid, 0)
    stack.multi_pod("side", {"server": 2}, None, grant, sidecars={"proxy": 1})
    ns = stack.namespace
    proxy_units = stack.units_on(gpus[3].uuid, 1)
    server_units = stack.units_on(gpus[6].uuid, 2)
    assert stack.podresources is not None
    stack.podresources.set_pod(f"{ns}/side", {"proxy": proxy_units, "server": server_units})
    p = stack.kubelet.allocate(proxy_units)     # the kubelet asks for the sidecar first
    s = stack.kubelet.allocate(server_units)
    assert "error" not in p and "error" not in s, (p, s)
    proxy_id = p["response"]["envs"]["SPILLWAY_LEASE_ID"]
    assert s["response"]["envs"]["SPILLWAY_LEASE_ID"] == grant.lease.id   # not the sidecar's
    assert proxy_id != grant.lease.id
    mark = stack.allocation("side")
    assert {k: (v["result"], v["role"]) for k, v in mark.items()} == {
        "proxy": ("on_the_spot", "sidecar"), "server": ("reservation", "app")}
    time.sleep(2.0)  # several sync rounds past --release-grace: a running sidecar's lease stays
    leases = stack.leases()
    assert leases[proxy_id].state == agent_pb2.RESERVED and leases[proxy_id].pod == f"{ns}/side"
    assert leases[grant.lease.id].state == agent_pb2.ACTIVE
