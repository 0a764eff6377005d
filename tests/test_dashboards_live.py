"""Every dashboard query returns data from a real Prometheus that scrapes a running system:
the real control plane (kube-apiserver, scheduler, a kwok GPU node), an agent on it
(simulated GPUs: the only stand-in), the device plugin registered with the kubelet's own
registration code (hack/dpconformance) and answering Allocate, the operator reconciling a
tenant whose SLO feedback reads a model-server stand-in's latency histograms, and lease
traffic that exercises reclaims, revocations, expiries and errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from spillway.agent.client import AgentClient
from spillway.api.v1 import agent_pb2
from spillway.deviceplugin import HEALTHY
from spillway.testing.agentproc import free_port
from spillway.testing.cluster import Cluster, wait_until
from spillway.testing.sandbox import Sandbox
from tests.fixtures_deviceplugin import Kubelet, PluginProcess, PodResourcesServer
from tests.fixtures_prometheus import HistogramServer, PrometheusProcess
from tests.test_dashboards import concrete, dashboards, panels

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TTFT_SHARES = {0.05: 0.2, 0.1: 0.3, 0.25: 0.3, 0.5: 0.15, 1.0: 0.05}
TBT_SHARES = {0.01: 0.6, 0.025: 0.39, 0.05: 0.01}


class MetricsSandbox(Sandbox):
    """The operator's sandbox, with each agent's metrics on a port we know."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        self.agent_metrics: dict[str, int] = {}

    def agent_command(self, a: Any, topology: Path) -> list[str]:
        cmd = super().agent_command(a, topology)
        port = self.agent_metrics.setdefault(a.node, free_port())
        cmd[cmd.index("--metrics-port") + 1] = str(port)
        return [*cmd, "--revoke-deadline", "1s"]


@pytest.fixture
def system(cluster: Cluster, k8s_namespace: str, prometheus: PrometheusProcess, histogram_server: HistogramServer,
           dpconformance_bin: Path, dp_workdir: Path) -> Iterator[dict[str, Any]]:
    sb = MetricsSandbox(cluster)
    sb.start()
    node = f"dash-{uuid.uuid4().hex[:5]}"
    plugin = kubelet = pods = None
    try:
        sb.add_gpu_nodes([node])
        prometheus.add_target(f"127.0.0.1:{sb.agent_metrics[node]}", {"component": "agent"})
        histogram_server.set_histogram("vllm:time_to_first_token_seconds", TTFT_SHARES, per_second=200)
        histogram_server.set_histogram("vllm:inter_token_latency_seconds", TBT_SHARES, per_second=2000)
        prometheus.add_target(histogram_server.address, {"namespace": k8s_namespace, "pod": "slow-0"})
        sb.start_operator(["--resync-interval", "3s", "--lease-ttl", "60s", "--prometheus-url", prometheus.url,
                           "--slo-step", "2Gi"])
        prometheus.add_target(f"127.0.0.1:{sb.operator_metrics_port}", {"component": "operator"})

        plugin = PluginProcess(dp_workdir, sb.agents[node].socket, node)
        pods = PodResourcesServer(plugin.pod_resources)
        kubelet = Kubelet(dpconformance_bin, plugin.kubelet_dir).start()
        plugin.start()
        kubelet.wait_for(lambda e: e["event"] == "registered", 60, "the device plugin to register")
        prometheus.add_target(f"127.0.0.1:{plugin.metrics_port}", {"component": "deviceplugin"})
        yield {"sandbox": sb, "node": node, "kubelet": kubelet, "namespace": k8s_namespace}
    except BaseException:
        print(sb.logs())
        if plugin is not None:
            print(plugin.logs()[-4000:])
        raise
    finally:
        if plugin is not None:
            plugin.stop()
        if kubelet is not None:
            kubelet.stop()
        if pods is not None:
            pods.stop()
        sb.stop()
        cluster.kubectl("delete", "node", node, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "memorypool", node, "--ignore-not-found", "--wait=false", check=False)


async def lease_traffic(socket: Path) -> None:
    """Acquires, claims, renewals, a failing call, an expiry, and two reclaims: one whose holder
    releases in time (released) and one whose holder does not (revoked after the deadline)."""
    async with AgentClient(str(socket)) as c:
        inv = await c.inventory()
        gpu = inv.gpus[-1].uuid
        for i in range(3):
            got = await c.acquire("1Gi", f"dash-{i}", kind=agent_pb2.RESERVATION, gpu_uuid=gpu, ttl_s=120)
            await c.claim(got.lease.id, got.token, pod=f"ns/pod-{i}")
            await c.renew(got.lease.id, got.token, ttl_s=120)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await c.release(got.lease.id, "not-the-token")
        await c.acquire("1Gi", "dash-expiring", kind=agent_pb2.ELASTIC, gpu_uuid=gpu, ttl_s=1)

        for release in (True, False):
            got = await c.acquire("2Gi", f"dash-elastic-{release}", kind=agent_pb2.ELASTIC, gpu_uuid=gpu, ttl_s=120)
            stream = c.watch(got.lease.id, got.token)
            first = await stream.__anext__()
            assert first.kind == agent_pb2.WatchEvent.SNAPSHOT
            resp = await c.reclaim(gpu, "2Gi", reason="dashboard test", deadline_s=1.0)
            assert got.lease.id in {lease.id for lease in resp.revoking}
            async for ev in stream:
                if ev.kind == agent_pb2.WatchEvent.LEASE and ev.lease.id == got.lease.id \
                        and ev.lease.state == agent_pb2.REVOKING:
                    break
            if release:
                await c.release(got.lease.id, got.token)
            await stream.aclose()  # type: ignore[attr-defined]
        await asyncio.sleep(2.5)  # the unreleased one passes its deadline; the 1 s lease expires


def test_every_dashboard_query_returns_data(system: dict[str, Any], cluster: Cluster,
                                            prometheus: PrometheusProcess) -> None:
    sb: MetricsSandbox = system["sandbox"]
    ns, node = system["namespace"], system["node"]
    # A tenant that misses its TTFT target: the operator places it, reserves, reads the SLO.
    tenant = {
        "apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceTenant", "metadata": {"name": "slow"},
        "spec": {"replicas": 1, "lending": True,
                 "model": {"image": "spillway/toy-server:0.1.0", "memory": "40Gi", "port": 8000},
                 "peerMemory": {"request": "4Gi", "limit": "8Gi", "fallback": "HostMemory"},
                 "slo": {"ttft": "200ms", "tbt": "25ms", "percentile": 99, "attainment": 0.95, "window": "8s"}},
    }
    cluster.apply(tenant, ns)
    kubelet: Kubelet = system["kubelet"]
    # Two rounds: a labelled series is born at its first observation, so rate() sees an
    # increase only from the second round on (once Prometheus has scraped the first).
    for round_ in range(2):
        asyncio.run(lease_traffic(sb.agents[node].socket))
        ids = [d["id"] for d in kubelet.devices() if d["health"] == HEALTHY][2 * round_:2 * round_ + 2]
        alloc = kubelet.allocate(ids)
        assert "error" not in alloc, alloc
        if round_ == 0:
            for metric in ("spillway_reclaim_notify_seconds_count",
                           "spillway_deviceplugin_allocate_duration_seconds_count"):
                prometheus.wait_for_series(f'{metric}{{node="{node}"}}', timeout=60)
            time.sleep(2)

    found = [(name, p["title"], t["expr"]) for name, b in dashboards().items() for p in panels(b) for t in p["targets"]]
    variables = [(name, v["name"], v["query"]["query"]) for name, b in dashboards().items()
                 for v in b["templating"]["list"] if v["type"] == "query"]

    def empty() -> list[str]:
        missing = []
        for name, title, expr in found:
            result = prometheus.query(concrete(expr))
            values = [float(r["value"][1]) for r in result]  # type: ignore[index]
            if not values or all(math.isnan(v) for v in values):
                missing.append(f"{name} / {title}: {expr}")
        for name, var, definition in variables:
            metric = definition[len("label_values("):].rsplit(",", 1)[0]
            if not prometheus.query(concrete(metric)):
                missing.append(f"{name} variable {var}: {definition}")
        return missing

    last: list[str] = []

    def all_have_data() -> bool:
        nonlocal last
        last = empty()
        return not last

    try:
        wait_until(all_have_data, timeout=180, interval=3, what="every dashboard query to return data")
    except TimeoutError:
        pytest.fail("queries without data:\n" + "\n".join(last) + "\n" + sb.logs()[-3000:])
    # The figures are the running system's: the node, the tenant and a simulated backend.
    info = prometheus.query(f'spillway_agent_info{{node="{node}"}}')
    assert info and info[0]["metric"]["simulated"] == "true"  # type: ignore[index]
    slo = prometheus.query(f'spillway_tenant_slo_target_seconds{{namespace="{ns}", tenant="slow", slo="ttft"}}')
    assert slo and float(slo[0]["value"][1]) == pytest.approx(0.2)  # type: ignore[index]
    print(json.dumps({"queries": len(found), "variables": len(variables), "at": time.time()}))
