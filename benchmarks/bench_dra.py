"""DRA vs the device plugin, scheduler side: 500 borrower pods (8Gi or 16Gi of peer memory each)
on 100 kwok nodes standing for DGX H100s (8 **simulated** H100 80GB), all Running, timed.

    python -m benchmarks dra            # or: python -m benchmarks.bench_dra [--nodes 100 --pods 500]

Device plugin path: each node advertises `spillway.dev/peer-hbm` = its pool's lendable GiB (as
`spillway deviceplugin` does); each pod asks for 8 or 16 units. DRA path: each node has the
ResourceSlice that `spillway dra` writes for that pool (the driver's own `build_devices` /
`build_slice`, fed by one real agent's inventory of the dgx-h100 topology; 100 driver
processes do not fit 2 cores), and each pod has a ResourceClaim of 8Gi or 16Gi of `memory`
that the real kube-scheduler allocates against the devices' consumable capacity. Both clocks
start at the `kubectl create` and stop when every pod is Running (kwok runs them). Neither path
prepares anything on a node (no kubelet): this measures placement by kube-scheduler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _sizes(n: int) -> list[int]:
    return [8 if i % 2 == 0 else 16 for i in range(n)]


def _plugin_pods(n: int) -> str:
    items = [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i:04d}"},
              "spec": {"tolerations": [TOLERATION], "containers": [{
                  "name": "m", "image": "spillway/toy-server:0.1.0",
                  "resources": {"limits": {"spillway.dev/peer-hbm": str(gib)}}}]}}
             for i, gib in enumerate(_sizes(n))]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def _dra_objects(n: int) -> str:
    from spillway.dra import CAPACITY, DEVICE_CLASS

    items: list[dict[str, Any]] = []
    for i, gib in enumerate(_sizes(n)):
        items.append({"apiVersion": "resource.k8s.io/v1", "kind": "ResourceClaim", "metadata": {"name": f"c{i:04d}"},
                      "spec": {"devices": {"requests": [{"name": "peer-hbm", "exactly": {
                          "deviceClassName": DEVICE_CLASS, "capacity": {"requests": {CAPACITY: f"{gib}Gi"}}}}]}}})
        items.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i:04d}"},
                      "spec": {"tolerations": [TOLERATION],
                               "resourceClaims": [{"name": "hbm", "resourceClaimName": f"c{i:04d}"}],
                               "containers": [{"name": "m", "image": "spillway/toy-server:0.1.0",
                                               "resources": {"claims": [{"name": "hbm"}]}}]}})
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def _running(cluster: Any, ns: str) -> int:
    out = cluster.kubectl("get", "pods", "-n", ns, "-o", "jsonpath={.items[*].status.phase}", check=False,
                          timeout=120).stdout
    return sum(1 for x in out.split() if x == "Running")


def _wait_running(cluster: Any, ns: str, want: int, timeout: float) -> float:
    t0 = time.monotonic()
    while True:
        got = _running(cluster, ns)
        if got >= want:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"only {got} of {want} pods Running in namespace {ns} after {timeout:.0f} s")
        time.sleep(1.0)


def run(nodes: int, pods: int, timeout: float) -> dict[str, float]:
    from spillway.dra.slices import build_devices, build_slice
    from spillway.testing.agentproc import AgentProcess
    from spillway.testing.cluster import Cluster
    from spillway.testing.sandbox import H100_LABELS, dra_class_manifest

    results: dict[str, float] = {}
    with AgentProcess(topology=REPO / "examples" / "topologies" / "dgx-h100.yaml") as agent:
        async def pool() -> Any:
            async with agent.client() as c:
                return await c.inventory()
        inventory = asyncio.run(pool())
    units = sum(int(g.lendable_bytes) for g in inventory.gpus) >> 30
    with Cluster() as cluster:
        cluster.kubectl("apply", "-f", "-", input=dra_class_manifest(cluster))
        names = [f"gpu-{i:03d}" for i in range(nodes)]
        t0 = time.monotonic()
        for n in names:
            cluster.add_node(n, {"nvidia.com/gpu": "8", "spillway.dev/peer-hbm": str(units)}, H100_LABELS, wait=False)
        slices = [build_slice(n, build_devices(n, inventory, []), 1) for n in names]
        cluster.kubectl("create", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": slices}),
                        timeout=300)
        results["nodes_and_slices_s"] = time.monotonic() - t0

        cluster.create_namespace("plugin")
        t0 = time.monotonic()
        cluster.kubectl("create", "-n", "plugin", "-f", "-", input=_plugin_pods(pods), timeout=300)
        _wait_running(cluster, "plugin", pods, timeout)
        results["deviceplugin_running_s"] = time.monotonic() - t0
        cluster.kubectl("delete", "pods", "--all", "-n", "plugin", "--wait=true", "--timeout=300s", timeout=400)

        cluster.create_namespace("dra")
        t0 = time.monotonic()
        cluster.kubectl("create", "-n", "dra", "-f", "-", input=_dra_objects(pods), timeout=300)
        _wait_running(cluster, "dra", pods, timeout)
        results["dra_running_s"] = time.monotonic() - t0
        out = cluster.kubectl("get", "resourceclaims", "-n", "dra", "-o", "json", timeout=120).stdout
        allocated = [c for c in json.loads(out)["items"] if (c.get("status") or {}).get("allocation")]
        devices = {(r["pool"], r["device"]) for c in allocated for r in c["status"]["allocation"]["devices"]["results"]}
        results["claims_allocated"] = float(len(allocated))
        results["devices_used"] = float(len(devices))
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_dra", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--pods", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    r = run(args.nodes, args.pods, args.timeout)
    print(f"  {args.pods} borrower pods (8Gi/16Gi of peer memory) on {args.nodes} kwok nodes x 8 simulated H100")
    print(f"  nodes + slices created      {r['nodes_and_slices_s']:7.1f} s")
    print(f"  device plugin path Running  {r['deviceplugin_running_s']:7.1f} s  (units of spillway.dev/peer-hbm)")
    print(f"  DRA path Running            {r['dra_running_s']:7.1f} s  (ResourceClaims on consumable memory; "
          f"{int(r['claims_allocated'])} allocated on {int(r['devices_used'])} devices)")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
