"""Device plugin: pure rules, and the real thing against the kubelet's own device-manager code
(Go harness hack/dpconformance), a real agent subprocess (simulated GPUs) and a real
PodResources gRPC server. The cluster-backed Allocate tests are in test_deviceplugin_cluster.py."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2
from spillway.deviceplugin import HEALTHY, UNHEALTHY
from spillway.deviceplugin.pods import completed_init_containers, pod_candidates, reservation_container
from spillway.deviceplugin.resources import compute_units, gpu_capacity_units, parse_unit_id, unit_id
from spillway.testing.agentproc import AgentProcess
from tests.fixtures_deviceplugin import Kubelet, PluginProcess, PodResourcesServer

GiB = 1 << 30


# --- pure rules ---------------------------------------------------------------------------

def test_unit_ids_round_trip() -> None:
    assert parse_unit_id(unit_id("GPU-abc-1", 7)) == ("GPU-abc-1", 7)
    assert parse_unit_id("nvidia0") is None
    assert parse_unit_id("GPU-x::") is None


def test_capacity_counts_reservations_but_not_elastic_leases() -> None:
    inv = agent_pb2.Inventory(gpus=[
        agent_pb2.Gpu(uuid="A", index=0, lendable_bytes=10 * GiB + 5, leased_bytes=3 * GiB),
        agent_pb2.Gpu(uuid="B", index=1, lendable_bytes=2 * GiB, leased_bytes=4 * GiB)])
    leases = [agent_pb2.Lease(id="r", gpu_uuid="A", kind=agent_pb2.RESERVATION, bytes=3 * GiB, state=agent_pb2.ACTIVE),
              agent_pb2.Lease(id="e", gpu_uuid="B", kind=agent_pb2.ELASTIC, bytes=4 * GiB, state=agent_pb2.ACTIVE),
              agent_pb2.Lease(id="x", gpu_uuid="B", kind=agent_pb2.ELASTIC, bytes=4 * GiB, state=agent_pb2.RELEASED)]
    assert gpu_capacity_units(inv, leases, GiB) == {"A": 13, "B": 2}


def test_shrinking_pool_makes_free_units_unhealthy_first() -> None:
    units = compute_units(["A"], {"A": 4}, {"A": 6}, in_use=["A::4", "A::5"])
    health = {u.id: u.healthy for u in units}
    assert [u.id for u in units] == [f"A::{k}" for k in range(6)]
    assert health["A::4"] and health["A::5"]          # in use: kept Healthy
    assert sum(health.values()) == 4
    assert not health["A::2"] and not health["A::3"]  # free ones lost first


def test_agent_down_keeps_only_units_in_use_healthy() -> None:
    units = compute_units(["A", "B"], None, {"A": 3, "B": 2}, in_use=["B::1"])
    assert {u.id for u in units if u.healthy} == {"B::1"}
    assert len(units) == 5


def test_pod_candidates_oldest_first_skip_taken_and_finished() -> None:
    def pod(name: str, created: str, units: int, **extra: object) -> dict[str, object]:
        meta: dict[str, object] = {"name": name, "namespace": "ns", "uid": name, "resourceVersion": "1",
                                   "creationTimestamp": created, "annotations": extra.get("annotations", {})}
        return {"metadata": meta, "status": {"phase": extra.get("phase", "Pending")},
                "spec": {"containers": [{"name": "c", "resources": {"limits": {"spillway.dev/peer-hbm": str(units)}}}]}}

    pods = [pod("young", "2026-01-02T00:00:00Z", 2), pod("old", "2026-01-01T00:00:00Z", 2),
            pod("other-size", "2025-01-01T00:00:00Z", 3), pod("done", "2025-01-01T00:00:00Z", 2, phase="Failed"),
            pod("taken", "2025-01-01T00:00:00Z", 2, annotations={"spillway.dev/allocation": '{"c": {}}'})]
    got = pod_candidates(pods, 2)
    assert [p.name for p in got] == ["old", "young"]


def _multi_pod(name: str, created: str, *, init: dict[str, int] | None = None, apps: dict[str, int],
               sidecars: dict[str, int] | None = None, allocation: dict[str, object] | None = None,
               reservation: str = "") -> dict[str, object]:
    def c(n: str, units: int, **extra: object) -> dict[str, object]:
        res = {"limits": {"spillway.dev/peer-hbm": str(units)}} if units else {}
        return {"name": n, "resources": res, **extra}
    annotations: dict[str, str] = {}
    if allocation is not None:
        annotations["spillway.dev/allocation"] = json.dumps(allocation)
    if reservation:
        annotations.update({"spillway.dev/reservation": reservation, "spillway.dev/reservation-token": "t"})
    inits = [c(n, u) for n, u in (init or {}).items()] + [c(n, u, restartPolicy="Always")
                                                         for n, u in (sidecars or {}).items()]
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}", "resourceVersion": "1",
                         "creationTimestamp": created, "annotations": annotations},
            "status": {"phase": "Pending"},
            "spec": {"initContainers": inits, "containers": [c(n, u) for n, u in apps.items()]}}


def test_pod_candidates_follow_the_kubelets_container_order() -> None:
    # init containers first, then app containers, each in spec order; containers asking nothing are skipped
    pod = _multi_pod("p", "2026-01-01T00:00:00Z", init={"warm": 1, "plain": 0}, apps={"a": 2, "none": 0, "b": 3},
                     reservation="L1")
    got = pod_candidates([pod], 1)
    assert [(r.container, r.role, r.reservations) for r in got] == [("warm", "init", ())]
    assert pod_candidates([pod], 2) == []   # the kubelet asks for "warm" first
    marked = _multi_pod("p", "2026-01-01T00:00:00Z", init={"warm": 1}, apps={"a": 2, "b": 3}, reservation="L1",
                        allocation={"warm": {"result": "on_the_spot"}})
    got = pod_candidates([marked], 2)
    assert [(r.container, r.role, r.reservations) for r in got] == [("a", "app", ("L1",))]   # the reservation
    marked = _multi_pod("p", "2026-01-01T00:00:00Z", init={"warm": 1}, apps={"a": 2, "b": 3}, reservation="L1",
                        allocation={"warm": {"result": "on_the_spot"}, "a": {"result": "reservation"}})
    got = pod_candidates([marked], 3)
    assert [(r.container, r.role, r.reservations) for r in got] == [("b", "app", ())]        # claimed once
    assert pod_candidates([marked], 2) == []


def test_pod_candidates_reservation_goes_to_the_first_app_container_not_an_init_or_sidecar() -> None:
    pod = _multi_pod("p", "2026-01-01T00:00:00Z", sidecars={"proxy": 2}, apps={"server": 2}, reservation="L1")
    assert reservation_container(pod["spec"]) == "server"  # type: ignore[arg-type]
    (side,) = pod_candidates([pod], 2)
    assert (side.container, side.role, side.reservations) == ("proxy", "sidecar", ())
    # An app container that asks for nothing does not own it either.
    pod = _multi_pod("p", "2026-01-01T00:00:00Z", apps={"logger": 0, "server": 4}, reservation="L1")
    (ref,) = pod_candidates([pod], 4)
    assert (ref.container, ref.reservations) == ("server", ("L1",))


def test_pod_candidates_prefer_the_pod_under_admission_and_skip_rejected_pods() -> None:
    old = _multi_pod("old", "2026-01-01T00:00:00Z", apps={"x": 2})
    busy = _multi_pod("busy", "2026-01-03T00:00:00Z", apps={"a": 1, "b": 2},
                      allocation={"a": {"result": "on_the_spot"}})
    failed = _multi_pod("failed", "2025-01-01T00:00:00Z", apps={"a": 1, "b": 2}, allocation={"a": {"result": "error"}})
    young = _multi_pod("young", "2026-01-02T00:00:00Z", apps={"x": 2})
    assert [r.name for r in pod_candidates([old, busy, failed, young], 2)] == ["busy", "old", "young"]
    assert [r.name for r in pod_candidates([old, busy, young], 2, prefer=["ns/young"])] == ["young", "busy", "old"]


def test_completed_init_containers_are_the_ones_that_exited_zero() -> None:
    pod = _multi_pod("p", "2026-01-01T00:00:00Z", init={"ok": 1, "failing": 1, "running": 1},
                     sidecars={"proxy": 1}, apps={"a": 1})
    pod["status"] = {"initContainerStatuses": [
        {"name": "ok", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}},
        {"name": "failing", "state": {"terminated": {"exitCode": 1, "reason": "Error"}}},
        {"name": "running", "state": {"running": {}}},
        {"name": "proxy", "state": {"terminated": {"exitCode": 0}}},   # a sidecar: not an init that ended
    ]}
    assert completed_init_containers([pod]) == {("uid-p", "ok")}


# --- against the kubelet's own code ------------------------------------------------------

async def _inventory(agent: AgentProcess) -> agent_pb2.Inventory:
    async with agent.client() as c:
        return await c.inventory()


async def _leases(agent: AgentProcess) -> list[agent_pb2.Lease]:
    async with agent.client() as c:
        return await c.leases()


def test_conformance_register_list_prefer_allocate(
        stack: tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]) -> None:
    agent, plugin, kubelet, _ = stack
    reg = kubelet.wait_for(lambda e: e["event"] == "registered", 5)
    assert reg["resource"] == "spillway.dev/peer-hbm"
    assert reg["options"] == {"get_preferred_allocation_available": True, "pre_start_required": False}
    assert reg["endpoint"].endswith("/spillway-peer-hbm.sock")

    inv = asyncio.run(_inventory(agent))
    expected = {g.uuid: int(g.lendable_bytes) // GiB for g in inv.gpus}
    devices = kubelet.devices()
    per_gpu: dict[str, int] = {}
    for d in devices:
        parsed = parse_unit_id(d["id"])
        assert parsed is not None and d["health"] == HEALTHY
        per_gpu[parsed[0]] = per_gpu.get(parsed[0], 0) + 1
    assert per_gpu == expected and sum(expected.values()) > 0

    # GetPreferredAllocation keeps a pod's units on one GPU when one GPU has room.
    ids = [d["id"] for d in devices]
    gpu_b = sorted(expected)[1]
    spread = [i for i in ids if i.startswith(sorted(expected)[0])][:2] + [i for i in ids if i.startswith(gpu_b)][:6]
    pref = kubelet.preferred(spread, 5)
    assert "error" not in pref, pref
    assert len(pref["ids"]) == 5 and {parse_unit_id(i)[0] for i in pref["ids"]} == {gpu_b}  # type: ignore[index]
    must = kubelet.preferred(spread, 3, must_include=[spread[0]])
    assert spread[0] in must["ids"] and len(must["ids"]) == 3

    # Allocate without a pod source: a RESERVATION lease made on the spot, on the units' GPU.
    before = {g.uuid: g.lendable_bytes for g in inv.gpus}
    alloc = kubelet.allocate(pref["ids"])
    assert "error" not in alloc, alloc
    resp = alloc["response"]
    envs = resp["envs"]
    assert set(envs) == {"SPILLWAY_LEASE_ID", "SPILLWAY_LEASE_TOKEN", "SPILLWAY_AGENT_SOCKET", "SPILLWAY_LENDER_GPUS"}
    # The borrower gets the agent's borrower socket (its directory mounted), never the admin socket.
    assert envs["SPILLWAY_AGENT_SOCKET"] == str(agent.borrower_socket)
    assert envs["SPILLWAY_LENDER_GPUS"] == gpu_b
    assert resp["mounts"] == [{"container_path": str(agent.borrower_socket.parent),
                               "host_path": str(agent.borrower_socket.parent), "read_only": True}]
    index = next(g.index for g in inv.gpus if g.uuid == gpu_b)
    assert resp["devices"] == [{"container_path": f"/dev/nvidia{index}", "host_path": f"/dev/nvidia{index}",
                                "permissions": "rw"}]
    lease = next(x for x in asyncio.run(_leases(agent)) if x.id == envs["SPILLWAY_LEASE_ID"])
    assert lease.kind == agent_pb2.RESERVATION and lease.bytes == 5 * GiB and lease.gpu_uuid == gpu_b
    after = {g.uuid: g.lendable_bytes for g in asyncio.run(_inventory(agent)).gpus}
    assert before[gpu_b] - after[gpu_b] == 5 * GiB

    # The token is the lease's: the borrower can renew with it, on the socket it was given.
    async def renew() -> agent_pb2.Lease:
        async with AgentClient(envs["SPILLWAY_AGENT_SOCKET"]) as c:
            return await c.renew(envs["SPILLWAY_LEASE_ID"], envs["SPILLWAY_LEASE_TOKEN"])
    assert asyncio.run(renew()).id == lease.id

    # The pod-bound lease stays in the advertised capacity: still every unit Healthy.
    time.sleep(1.5)
    assert all(d["health"] == HEALTHY for d in kubelet.devices())
    assert len(kubelet.devices()) == len(devices)

    # Units that are not ours: a clear INVALID_ARGUMENT.
    bad = kubelet.allocate(["nvidia0"])
    assert "not spillway.dev/peer-hbm units" in bad["error"]

    text = plugin.metrics()
    assert 'spillway_deviceplugin_allocations_total{node="sim-node-0",result="on_the_spot"} 1.0' in text
    assert 'spillway_deviceplugin_allocations_total{node="sim-node-0",result="error"} 1.0' in text
    assert f'spillway_deviceplugin_units{{health="Healthy",node="sim-node-0"}} {float(len(devices))}' in text
    assert 'spillway_deviceplugin_agent_up{node="sim-node-0"} 1.0' in text
    assert 'spillway_deviceplugin_registrations_total{node="sim-node-0",result="ok"} 1.0' in text


def test_kubelet_restart_registers_again_within_5s(
        stack: tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer], dpconformance_bin: Path) -> None:
    _, plugin, kubelet, _ = stack
    kubelet.stop()
    # A new kubelet: it wipes the device-plugins directory and serves a new registration server.
    new = Kubelet(dpconformance_bin, plugin.kubelet_dir)
    t0 = time.monotonic()
    new.start()
    try:
        new.wait_for(lambda e: e["event"] == "registered", 5, "registration after the kubelet restart")
        assert time.monotonic() - t0 < 5
        assert len(new.devices()) > 0
    finally:
        new.stop()


def test_agent_down_makes_free_units_unhealthy_and_back(
        stack: tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]) -> None:
    agent, _plugin, kubelet, _ = stack
    n = len(kubelet.devices())
    agent.stop()
    t0 = time.monotonic()
    down = kubelet.wait_devices(lambda ds: all(d["health"] == UNHEALTHY for d in ds), 5,
                                "every unit Unhealthy after the agent stopped")
    assert len(down) == n and time.monotonic() - t0 < 5
    alloc = kubelet.allocate([down[0]["id"]])
    assert "does not answer" in alloc["error"] and "nothing was allocated" in alloc["error"]
    agent.start()
    up = kubelet.wait_devices(lambda ds: all(d["health"] == HEALTHY for d in ds), 10,
                              "every unit Healthy after the agent came back")
    assert len(up) == n


def test_cdi_strategy_names_the_lender_gpu(dpconformance_bin: Path, dp_workdir: Path, agent: AgentProcess) -> None:
    plugin = PluginProcess(dp_workdir, agent.socket, agent.node_name, extra=["--device-list-strategy", "cdi"])
    kubelet = Kubelet(dpconformance_bin, plugin.kubelet_dir).start()
    plugin.start()
    try:
        kubelet.wait_for(lambda e: e["event"] == "registered", 30, "the plugin to register")
        ids = [d["id"] for d in kubelet.devices()][:2]
        alloc = kubelet.allocate(ids)
        assert "error" not in alloc, alloc
        gpu = alloc["response"]["envs"]["SPILLWAY_LENDER_GPUS"]
        assert alloc["response"]["cdi_devices"] == [f"nvidia.com/gpu={gpu}"]
        assert alloc["response"]["devices"] == []
    finally:
        plugin.stop()
        kubelet.stop()


def test_pod_resources_names_pods_and_gone_pods_release_their_lease(
        stack: tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]) -> None:
    agent, _, kubelet, pods = stack
    ids = [d["id"] for d in kubelet.devices()][:3]
    alloc = kubelet.allocate(ids)
    assert "error" not in alloc, alloc
    lease_id = alloc["response"]["envs"]["SPILLWAY_LEASE_ID"]
    pods.set_pod("team-a/borrower-0", {"server": ids})
    pods.set_pod("team-a/unrelated", {})

    def lease() -> agent_pb2.Lease:
        async def get() -> list[agent_pb2.Lease]:
            async with agent.client() as c:
                return await c.leases(include_ended=True)
        return next(x for x in asyncio.run(get()) if x.id == lease_id)

    deadline = time.monotonic() + 10
    while lease().pod != "team-a/borrower-0":
        assert time.monotonic() < deadline, f"the lease never got its pod's name: {lease()}"
        time.sleep(0.2)
    time.sleep(1.5)  # older than the release grace, the pod still listed: kept
    assert lease().state in (agent_pb2.RESERVED, agent_pb2.ACTIVE)

    pods.remove_pod("team-a/borrower-0")
    deadline = time.monotonic() + 10
    while lease().state != agent_pb2.RELEASED:
        assert time.monotonic() < deadline, f"the gone pod's lease was not released: {lease()}"
        time.sleep(0.2)


def test_pool_shrink_turns_free_units_unhealthy_first(
        stack: tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]) -> None:
    agent, _, kubelet, pods = stack
    gpu = asyncio.run(_inventory(agent)).gpus[0]
    mine = [d["id"] for d in kubelet.devices() if d["id"].startswith(gpu.uuid + "::")]
    used = mine[5:7]  # not the lowest IDs, so "in use first" is what keeps them Healthy
    alloc = kubelet.allocate(used)
    assert "error" not in alloc, alloc
    pods.set_pod("team-b/borrower", {"server": used})

    # The GPU's own tenant keeps all but 1 GiB of what was lendable: 1 free + 2 leased = 3 units.
    g = next(x for x in asyncio.run(_inventory(agent)).gpus if x.uuid == gpu.uuid)
    keep = int(g.total_bytes - g.headroom_bytes - g.leased_bytes) - GiB

    async def shrink() -> None:
        async with agent.client() as c:
            await c.set_gpu_local(gpu.uuid, reserved=keep)
    asyncio.run(shrink())

    def three_healthy(ds: list[dict[str, str]]) -> bool:
        return sum(d["health"] == HEALTHY for d in ds if d["id"].startswith(gpu.uuid + "::")) == 3
    devices = kubelet.wait_devices(three_healthy, 5, "GPU 0 down to 3 Healthy units")
    health = {d["id"]: d["health"] for d in devices if d["id"].startswith(gpu.uuid + "::")}
    assert len(health) == len(mine)                       # IDs stay; surplus goes Unhealthy
    assert health[used[0]] == health[used[1]] == HEALTHY  # units in use are the last to go
    assert [i for i, h in health.items() if h == HEALTHY] == [mine[0], *used]


def test_allocate_without_room_fails_and_changes_nothing(
        stack: tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]) -> None:
    agent, _, kubelet, _ = stack
    inv = asyncio.run(_inventory(agent))
    most = max(int(g.lendable_bytes) // GiB for g in inv.gpus)
    ids = [d["id"] for d in kubelet.devices()][: most + 1]   # more than any one GPU can lend
    alloc = kubelet.allocate(ids)
    assert alloc["error"].startswith("rpc error: code = ResourceExhausted")
    assert "no room" in alloc["error"]
    assert asyncio.run(_leases(agent)) == []
    assert [g.lendable_bytes for g in asyncio.run(_inventory(agent)).gpus] == [g.lendable_bytes for g in inv.gpus]


def test_plugin_restart_keeps_unit_ids_and_still_releases_its_leases(
        stack: tuple[AgentProcess, PluginProcess, Kubelet, PodResourcesServer]) -> None:
    agent, plugin, kubelet, pods = stack
    before = kubelet.devices()
    ids = [d["id"] for d in before][10:12]
    alloc = kubelet.allocate(ids)
    assert "error" not in alloc, alloc
    lease_id = alloc["response"]["envs"]["SPILLWAY_LEASE_ID"]
    pods.set_pod("team-c/borrower", {"server": ids})

    with urllib.request.urlopen(f"http://127.0.0.1:{plugin.metrics_port}/readyz", timeout=5) as r:
        assert r.status == 200

    plugin.stop()
    mark = kubelet.mark()
    plugin.start()
    kubelet.wait_for(lambda e: e["event"] == "registered", 30, "registration of the restarted plugin", since=mark)
    after = kubelet.wait_devices(lambda ds: len(ds) > 0, 10, "units from the restarted plugin")
    assert after == before  # same IDs, same health

    # The restarted plugin still holds the lease's token (state dir): a gone pod's lease is released.
    pods.remove_pod("team-c/borrower")

    def state() -> int:
        return next(x.state for x in asyncio.run(_all_leases(agent)) if x.id == lease_id)
    deadline = time.monotonic() + 10
    while state() != agent_pb2.RELEASED:
        assert time.monotonic() < deadline, "the restarted plugin did not release the gone pod's lease"
        time.sleep(0.2)


async def _all_leases(agent: AgentProcess) -> list[agent_pb2.Lease]:
    async with agent.client() as c:
        return await c.leases(include_ended=True)


def test_allocate_names_the_device_node_by_minor_number_not_index(dpconformance_bin: Path, dp_workdir: Path) -> None:
    topology = Path(__file__).resolve().parents[1] / "examples" / "topologies" / "minor-shuffled.yaml"
    with AgentProcess(topology=topology, node_name="minor-node") as agent:
        plugin = PluginProcess(dp_workdir, agent.socket, agent.node_name)
        kubelet = Kubelet(dpconformance_bin, plugin.kubelet_dir).start()
        plugin.start()
        try:
            kubelet.wait_for(lambda e: e["event"] == "registered", 30, "the plugin to register")
            inv = asyncio.run(_inventory(agent))
            seen = {}
            for gpu in inv.gpus:
                ids = [d["id"] for d in kubelet.devices() if d["id"].startswith(gpu.uuid + "::")][:1]
                alloc = kubelet.allocate(ids)
                assert "error" not in alloc, alloc
                assert alloc["response"]["envs"]["SPILLWAY_LENDER_GPUS"] == gpu.uuid
                seen[gpu.index] = [d["host_path"] for d in alloc["response"]["devices"]]
                assert [d["container_path"] for d in alloc["response"]["devices"]] == seen[gpu.index]
            # minor-shuffled.yaml: index 0 -> minor 2, 1 -> 3, 2 -> 0, 3 -> 1
            assert seen == {0: ["/dev/nvidia2"], 1: ["/dev/nvidia3"], 2: ["/dev/nvidia0"], 3: ["/dev/nvidia1"]}
        except BaseException:
            print(plugin.logs()[-4000:])
            raise
        finally:
            plugin.stop()
            kubelet.stop()


@pytest.mark.gpu
def test_allocate_on_a_real_gpu_names_an_existing_device_node(dpconformance_bin: Path, dp_workdir: Path) -> None:
    from spillway.agent.inventory import nvidia_gpu_present

    if not nvidia_gpu_present():
        pytest.skip("no NVIDIA GPU on this machine")
    with AgentProcess(node_name="gpu-node", extra_args=["--backend", "nvml"]) as agent:
        plugin = PluginProcess(dp_workdir, agent.socket, agent.node_name)
        kubelet = Kubelet(dpconformance_bin, plugin.kubelet_dir).start()
        plugin.start()
        try:
            kubelet.wait_for(lambda e: e["event"] == "registered", 30, "the plugin to register")
            healthy = [d["id"] for d in kubelet.devices() if d["health"] == HEALTHY]
            if not healthy:
                pytest.fail("the real GPU offers no lendable unit (is it full?)")
            alloc = kubelet.allocate(healthy[:1])
            assert "error" not in alloc, alloc
            spec = alloc["response"]["devices"][0]
            assert Path(spec["host_path"]).is_char_device(), spec
            inv = asyncio.run(_inventory(agent))
            assert not inv.simulated
            gpu = next(g for g in inv.gpus if g.uuid == alloc["response"]["envs"]["SPILLWAY_LENDER_GPUS"])
            # The driver's device node for that GPU: /dev/nvidia<minor>, char major 195 (not the NVML index).
            assert gpu.HasField("minor_number")
            assert spec["host_path"] == f"/dev/nvidia{gpu.minor_number}"
            rdev = os.stat(spec["host_path"]).st_rdev
            assert (os.major(rdev), os.minor(rdev)) == (195, gpu.minor_number)
        finally:
            plugin.stop()
            kubelet.stop()


def test_cli_rejects_bad_flags_with_a_clear_message() -> None:
    from spillway.cli import build_parser
    from spillway.deviceplugin.cli import build_config

    parser = build_parser()
    base = ["deviceplugin", "--node-name", "n1", "--no-kubernetes"]
    with pytest.raises(SystemExit, match="--unit: size 'lots' is not a quantity"):
        build_config(parser.parse_args([*base, "--unit", "lots"]))
    with pytest.raises(SystemExit, match="must be an absolute path"):
        build_config(parser.parse_args([*base, "--agent-socket", "agent.sock"]))
    with pytest.raises(SystemExit, match="--node-name"):
        build_config(parser.parse_args(["deviceplugin", "--node-name", ""]))
    with pytest.raises(SystemExit, match="not a duration"):
        build_config(parser.parse_args([*base, "--sync-interval", "often"]))
    config = build_config(parser.parse_args([*base, "--unit", "512Mi", "--device-list-strategy", "cdi"]))
    assert config.unit_bytes == 512 << 20 and config.cdi and not config.use_kubernetes
