"""Operator scale: 500 InferenceTenants on 100 kwok nodes x 8 simulated GPUs, all Running, timed;
side by side, in the same run and on the same nodes, kube-scheduler binding 500 plain GPU pods,
and the same 500 tenants placed through the device plugin path (RESERVATION leases and
`spillway.dev/peer-hbm` units) and then through DRA (one ResourceClaim per borrower, allocated by
kube-scheduler on the nodes' ResourceSlices; the operator's `--allocation auto` picks it once the
DeviceClass exists).

    python -m benchmarks scale            # or: python -m benchmarks.bench_scale [--nodes 100 --tenants 500]
                                          #     [--allocation both|deviceplugin|dra]

100 agent processes do not fit a 2-core machine, so the agents run in-process, 10 per helper
process (10 helpers for 100 nodes): real agent services (each its own pool, gRPC server on its own
TCP port with mutual TLS, and its own MemoryPool publisher) sharing one event loop per helper.
(One helper for all 100 stalled after about 20 agents on this machine.) The GPUs are simulated
(dgx-h100 topology). 100 `spillway dra` processes do not fit either: each node's ResourceSlice is
the driver's own `build_slice` of that node's agent pool (read over gRPC) when the DRA phase
starts, written once (kwok nodes run no kubelet, so no claim is prepared into a lease and the
slices would not change).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


# --- the helper process: many agents on one event loop ------------------------------------


async def _agents_host(spec: dict[str, Any]) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    from spillway.agent.server import Agent, AgentConfig
    from spillway.pki import TlsFiles

    # Each publisher writes its MemoryPool from a worker thread: give the 100 of them enough threads.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=len(spec["agents"]) + 8))
    tls = TlsFiles(spec["tls"]["cert"], spec["tls"]["key"], spec["tls"]["ca"])
    agents = []
    for a in spec["agents"]:
        cfg = AgentConfig(
            backend="simulated", topology=Path(spec["topology"]), node_name=a["node"], socket=Path(a["socket"]),
            listen=a["endpoint"], tls=tls, state_dir=None, metrics_port=None, refresh_s=5.0,
            publish=True, advertise_endpoint=a["endpoint"],
        )
        agent = Agent(cfg)
        await agent.start()
        agents.append(agent)
    return agents


# --- the benchmark -------------------------------------------------------------------------


def _tenants(n: int) -> str:
    """Half borrowers (60Gi model + 8Gi of peer memory), half lenders (16Gi model), priorities mixed."""
    items = []
    for i in range(n):
        borrower = i % 2 == 0
        spec: dict[str, Any] = {
            "replicas": 1,
            "priority": (i % 3) * 10,
            "model": {"image": "spillway/toy-server:0.1.0", "memory": "60Gi" if borrower else "16Gi"},
        }
        if borrower:
            spec["peerMemory"] = {"request": "8Gi", "limit": "8Gi", "fallback": "HostMemory"}
        items.append({"apiVersion": "spillway.dev/v1alpha1", "kind": "InferenceTenant",
                      "metadata": {"name": f"t{i:04d}"}, "spec": spec})
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def _plain_pods(n: int) -> str:
    items = [{
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i:04d}", "labels": {"bench": "plain"}},
        "spec": {"containers": [{"name": "m", "image": "spillway/toy-server:0.1.0",
                                 "resources": {"limits": {"nvidia.com/gpu": "1"}}}],
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
    } for i in range(n)]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def _count(cluster: Any, *args: str, jsonpath: str) -> list[str]:
    out = cluster.kubectl("get", *args, "-o", f"jsonpath={jsonpath}", check=False, timeout=120).stdout
    return out.split()


def _wait_count(cluster: Any, want: int, timeout: float, *args: str, jsonpath: str, value: str) -> float:
    t0 = time.monotonic()
    while True:
        got = sum(1 for x in _count(cluster, *args, jsonpath=jsonpath) if x == value)
        if got >= want:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"only {got} of {want} reached {value} in {timeout:.0f} s")
        time.sleep(1.0)


def _print_stragglers(cluster: Any, ns: str) -> None:
    """Which tenants did not get to Running, and what the operator said about them."""
    items = json.loads(cluster.kubectl("get", "inferencetenants", "-n", ns, "-o", "json", timeout=120).stdout)
    for it in items["items"]:
        st = it.get("status") or {}
        if st.get("phase") == "Running":
            continue
        name = it["metadata"]["name"]
        conds = {c.get("type"): f"{c.get('status')} {c.get('reason', '')}: {c.get('message', '')}"
                 for c in st.get("conditions") or []}
        print(f"  not Running: {name} phase={st.get('phase')} replicas={st.get('replicas')} {conds}", flush=True)
        ev = cluster.kubectl("get", "events", "-n", ns, "--field-selector", f"involvedObject.name={name}",
                             "--sort-by=.lastTimestamp", "-o", "custom-columns=REASON:.reason,MSG:.message",
                             check=False, timeout=60).stdout.strip().splitlines()[-4:]
        for line in ev:
            print(f"    {line[:300]}", flush=True)


async def _slices(endpoints: dict[str, str], tls: Any) -> list[dict[str, Any]]:
    """Each node's ResourceSlice as `spillway dra` would publish it from its agent's pool now."""
    from spillway.agent.client import AgentClient
    from spillway.dra.slices import build_devices, build_slice

    out = []
    for node, endpoint in endpoints.items():
        async with AgentClient(endpoint, tls=tls) as c:
            out.append(build_slice(node, build_devices(node, await c.inventory(), await c.leases()), 1))
    return out


def _tenants_running(cluster: Any, ns: str, tenants: int, timeout: float) -> float:
    """Create the tenants in `ns`; the seconds from the create until all are Running."""
    cluster.create_namespace(ns)
    t0 = time.monotonic()
    cluster.kubectl("create", "-n", ns, "-f", "-", input=_tenants(tenants), timeout=300)
    try:
        _wait_count(cluster, tenants, timeout, "inferencetenants", "-n", ns,
                    jsonpath="{.items[*].status.phase}", value="Running")
    except TimeoutError:
        _print_stragglers(cluster, ns)
        raise
    return time.monotonic() - t0


def run(nodes: int, tenants: int, timeout: float, per_helper: int = 10,
        allocation: str = "both") -> dict[str, float]:
    from spillway.testing.cluster import wait_until
    from spillway.testing.sandbox import H100_LABELS, Sandbox, dra_class_manifest, free_port

    results: dict[str, float] = {}
    sb = Sandbox()
    helpers: list[subprocess.Popen[bytes]] = []
    endpoints: dict[str, str] = {}
    try:
        t0 = time.monotonic()
        sb.start()
        cluster = sb.cluster
        assert cluster is not None
        results["cluster_start_s"] = time.monotonic() - t0
        names = [f"gpu-{i:03d}" for i in range(nodes)]
        (sb.workdir / "a").mkdir(exist_ok=True)
        env = dict(os.environ, KUBECONFIG=str(sb.kubeconfig), PYTHONPATH=str(REPO), SPILLWAY_LOG_LEVEL="WARNING")
        t0 = time.monotonic()
        for h in range(0, nodes, per_helper):
            spec = {
                "topology": str(REPO / "examples" / "topologies" / "dgx-h100.yaml"),
                "tls": {k: str(getattr(sb.server_tls, k)) for k in ("cert", "key", "ca")},
                "agents": [{"node": n, "endpoint": f"127.0.0.1:{free_port()}",
                            "socket": str(sb.workdir / "a" / f"{n}.sock")} for n in names[h:h + per_helper]],
            }
            endpoints.update({a["node"]: a["endpoint"] for a in spec["agents"]})
            spec_path = sb.workdir / f"agents-{h}.json"
            spec_path.write_text(json.dumps(spec))
            with (sb.workdir / f"agents-{h}.log").open("wb") as log:
                helpers.append(subprocess.Popen(
                    [sys.executable, "-m", "benchmarks.bench_scale", "--agents-host", str(spec_path)],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)))
        wait_until(lambda: len(sb.pools()) >= nodes, timeout=300, what=f"{nodes} MemoryPools", interval=1.0)
        results["agents_start_s"] = time.monotonic() - t0
        first = sb.pools()[names[0]]
        units = sum(int(g.get("lendableBytes", 0)) for g in first["status"]["gpus"]) >> 30
        t0 = time.monotonic()
        for n in names:
            cluster.add_node(n, {"nvidia.com/gpu": "8", "spillway.dev/peer-hbm": str(units)}, H100_LABELS, wait=False)
        _wait_count(cluster, nodes, 300, "nodes", "-l", "type=kwok",
                    jsonpath="{.items[*].status.conditions[?(@.type=='Ready')].status}", value="True")
        results["nodes_ready_s"] = time.monotonic() - t0

        # Baseline: kube-scheduler binds plain GPU pods (kwok runs them).
        cluster.create_namespace("plain")
        t0 = time.monotonic()
        cluster.kubectl("create", "-n", "plain", "-f", "-", input=_plain_pods(tenants), timeout=300)
        _wait_count(cluster, tenants, timeout, "pods", "-n", "plain", jsonpath="{.items[*].status.phase}",
                    value="Running")
        results["plain_pods_running_s"] = time.monotonic() - t0  # from the create call, as for the tenants
        cluster.kubectl("delete", "pods", "--all", "-n", "plain", "--wait=true", "--timeout=300s", timeout=400)

        operator_args = ["--resync-interval", "60s", "--lease-ttl", "5m"]
        if allocation in ("both", "deviceplugin"):
            # The device plugin path: the operator places, reserves at the agent, creates one pod per tenant.
            sb.start_operator([*operator_args, "--allocation", "auto"])
            results["tenants_running_s"] = _tenants_running(cluster, "bench", tenants, timeout)
            leases = 0
            for x in _count(cluster, "memorypools", jsonpath="{.items[*].status.totals.leased}"):
                leases += x not in ("0", "")
            results["pools_with_leases"] = float(leases)
            results["ratio"] = results["tenants_running_s"] / results["plain_pods_running_s"]
            t0 = time.monotonic()
            cluster.kubectl("delete", "inferencetenants", "--all", "-n", "bench", "--wait=true", "--timeout=600s",
                            timeout=700)
            wait_until(lambda: not _count(cluster, "pods", "-n", "bench", jsonpath="{.items[*].metadata.name}"),
                       timeout=600, what="the device plugin path's pods to go", interval=1.0)
            results["tenants_deleted_s"] = time.monotonic() - t0
            sb.stop_operator()
        if allocation in ("both", "dra"):
            # DRA: the DeviceClass and the slices, then the operator (auto picks dra) makes one claim per borrower.
            t0 = time.monotonic()
            cluster.kubectl("apply", "-f", "-", input=dra_class_manifest(cluster))
            slices = asyncio.run(_slices(endpoints, sb.client_tls))
            cluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                   "items": slices}), timeout=300)
            results["slices_s"] = time.monotonic() - t0
            sb.start_operator([*operator_args, "--allocation", "auto"])
            wait_until(lambda: "allocation dra" in sb.operator_log.read_text(), timeout=60,
                       what="the operator to pick allocation dra")
            results["dra_tenants_running_s"] = _tenants_running(cluster, "bench-dra", tenants, timeout)
            out = cluster.kubectl("get", "resourceclaims", "-n", "bench-dra", "-o", "json", timeout=120).stdout
            claims = json.loads(out)["items"]
            allocated = [c for c in claims if (c.get("status") or {}).get("allocation")]
            results["claims"] = float(len(claims))
            results["claims_allocated"] = float(len(allocated))
            results["dra_ratio"] = results["dra_tenants_running_s"] / results["plain_pods_running_s"]
        return results
    finally:
        sb.stop_operator()
        keep = os.environ.get("SPILLWAY_BENCH_LOGS")
        if keep and sb.operator_log.exists():   # none when the run failed before the operator started
            import shutil

            shutil.copy(sb.operator_log, keep)
        for helper in helpers:
            helper.terminate()
        for helper in helpers:
            try:
                helper.wait(timeout=20)
            except subprocess.TimeoutExpired:
                helper.kill()
        sb.stop()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_scale")
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--tenants", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--allocation", choices=("both", "deviceplugin", "dra"), default="both",
                        help="which operator path(s) to time after the plain pods (default both, one after the other)")
    parser.add_argument("--agents-host", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.agents_host:
        from spillway import logging as slog

        slog.setup("WARNING")
        host_spec = json.loads(Path(args.agents_host).read_text())

        async def serve() -> None:
            agents = await _agents_host(host_spec)
            print(f"{len(agents)} agents serving", flush=True)
            await asyncio.Event().wait()

        asyncio.run(serve())
        return 0
    with tempfile.TemporaryDirectory():
        r = run(args.nodes, args.tenants, args.timeout, allocation=args.allocation)
    print(f"{args.tenants} tenants on {args.nodes} kwok nodes x 8 simulated GPUs (agents in-process, 10 per helper)")
    print(f"  control plane start     {r['cluster_start_s']:7.1f} s")
    print(f"  {args.nodes} agents + MemoryPools {r['agents_start_s']:7.1f} s")
    print(f"  {args.nodes} nodes Ready          {r['nodes_ready_s']:7.1f} s")
    print(f"  plain pods Running      {r['plain_pods_running_s']:7.1f} s  (kube-scheduler alone, {args.tenants} pods)")
    if "tenants_running_s" in r:
        print(f"  tenants Running         {r['tenants_running_s']:7.1f} s  (device plugin path: place, reserve at the "
              "agent, create, status)")
        print(f"  ratio                   {r['ratio']:7.2f} x")
        print(f"  pools with leases       {int(r['pools_with_leases'])} of {args.nodes}")
        print(f"  tenants deleted         {r['tenants_deleted_s']:7.1f} s  (finalizers: pods deleted, leases released)")
    if "dra_tenants_running_s" in r:
        print(f"  DeviceClass + slices    {r['slices_s']:7.1f} s")
        print(f"  tenants Running (DRA)   {r['dra_tenants_running_s']:7.1f} s  (place, create claim, create pod; "
              f"kube-scheduler allocates; {int(r['claims_allocated'])} of {int(r['claims'])} claims allocated)")
        print(f"  ratio (DRA)             {r['dra_ratio']:7.2f} x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
