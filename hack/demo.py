#!/usr/bin/env python3
"""`make demo`: the whole Spillway system on this machine, with simulated GPUs.

The local Kubernetes control plane (etcd, kube-apiserver, controller manager, scheduler, kwok),
the CRDs, two kwok nodes standing for DGX H100s (8 x H100 80GB each, SIMULATED: no GPU is used),
one Spillway agent per node (simulated backend, gRPC over TCP with mutual TLS, publishing its
MemoryPool), the operator, and the example tenants (`kubectl apply -f examples/tenants/`).
Beside them, the DRA driver (`spillway dra --publish-only` per node: kwok nodes have no kubelet)
publishes each node's ResourceSlice, and one borrower asks for peer memory with a ResourceClaim
that kube-scheduler allocates on a lender GPU (docs/dra.md).

By default everything keeps running until Ctrl-C; `--once` tears it down after printing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from spillway.testing.cluster import wait_until  # noqa: E402
from spillway.testing.sandbox import Sandbox  # noqa: E402

NODES = ("dgx-h100-0", "dgx-h100-1")
SETTLED = ("Running", "Degraded")


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(sb: Sandbox, *args: str) -> str:
    assert sb.cluster is not None
    out = sb.cluster.kubectl(*args).stdout
    print(f"$ kubectl {' '.join(args)}\n{out}", flush=True)
    return str(out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--once", action="store_true", help="tear everything down after printing the tables")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds to wait for the tenants to be placed")
    args = parser.parse_args(argv)

    state = Path(os.environ.get("SPILLWAY_DEMO_DIR", Path.home() / ".cache" / "spillway" / "demo"))
    if state.exists():
        import shutil

        shutil.rmtree(state, ignore_errors=True)
    sb = Sandbox(workdir=state)
    sb._own_cluster = True
    stop = False
    drivers: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    try:
        say("starting the local control plane (etcd, kube-apiserver, controller manager, scheduler, kwok)")
        sb.start()
        assert sb.cluster is not None
        say(f"adding {len(NODES)} kwok GPU nodes (SIMULATED DGX H100: 8 x H100 80GB each) and one Spillway agent "
            "per node (simulated GPU backend, gRPC over TCP + mutual TLS, publishing its MemoryPool)")
        sb.add_gpu_nodes(list(NODES))
        say("starting the DRA driver per node (spillway dra --publish-only: ResourceSlices with consumable memory)")
        chart = sb.cluster.helm("template", "spillway", str(REPO / "charts" / "spillway"), "--api-versions",
                                "resource.k8s.io/v1", "--set", "dra.enabled=true",
                                "--show-only", "templates/dra-deviceclass.yaml").stdout
        sb.cluster.kubectl("apply", "-f", "-", input=chart)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        for node in NODES:
            with (state / f"dra-{node}.log").open("ab") as log:
                drivers.append(subprocess.Popen(
                    [sys.executable, "-m", "spillway", "dra", "--publish-only", "--node-name", node,
                     "--agent-socket", str(sb.agents[node].socket), "--kubeconfig", str(sb.kubeconfig),
                     "--state-dir", str(state / f"dra-{node}"), "--metrics-port", "-1"],
                    stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)))
        say("starting the operator (python -m spillway operator)")
        sb.start_operator(["--resync-interval", "10s", "--lease-ttl", "2m"])
        say("kubectl apply -f examples/tenants/")
        print(sb.cluster.kubectl("apply", "-f", str(REPO / "examples" / "tenants")).stdout, flush=True)

        def placed() -> bool:
            items = sb.cluster.get_json("inferencetenants", "-A")["items"]  # type: ignore[union-attr]
            return bool(items) and all((t.get("status") or {}).get("phase") in SETTLED for t in items)

        say("waiting until every tenant is placed")
        t0 = time.monotonic()
        try:
            wait_until(placed, timeout=args.timeout, what="the tenants to be placed")
        except TimeoutError as exc:
            print(f"warning: {exc}; showing where things are", flush=True)
        else:
            print(f"placed in {time.monotonic() - t0:.1f} s", flush=True)

        say("a borrower through DRA: a ResourceClaim for 16Gi of a lender GPU's memory, and its pod")
        from spillway.dra.claims import borrower_claim

        borrower = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "dra-borrower", "namespace": "default"},
                    "spec": {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                             "resourceClaims": [{"name": "hbm", "resourceClaimName": "dra-borrower-kv"}],
                             "containers": [{"name": "server", "image": "spillway/toy-server:0.1.0",
                                             "resources": {"claims": [{"name": "hbm"}]}}]}}
        sb.cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            borrower_claim("default", "dra-borrower-kv", "16Gi"), borrower]}))
        try:
            wait_until(lambda: "allocation" in sb.cluster.kubectl(  # type: ignore[union-attr]
                "get", "resourceclaim", "dra-borrower-kv", "-o", "json").stdout, timeout=60,
                what="the claim to be allocated")
        except TimeoutError as exc:
            print(f"warning: {exc}", flush=True)

        say("the tenants, their pods, the node pools, the same pools as kube-scheduler sees them through DRA "
            "(ResourceSlices) and the DRA borrower's claim (GPUs are SIMULATED)")
        show(sb, "get", "inferencetenants", "-A")
        show(sb, "get", "pods", "-A", "-l", "spillway.dev/tenant", "-o", "wide")
        show(sb, "get", "memorypools")
        show(sb, "get", "resourceslices", "-o", "wide")
        show(sb, "get", "resourceslices", "-o", "jsonpath={range .items[*]}{.spec.nodeName}{range .spec.devices[*]}"
             "{\"\\n  \"}{.attributes.index.int}{\"  \"}{.attributes.uuid.string}{\"  memory=\"}"
             "{.capacity.memory.value}{end}{\"\\n\"}{end}")
        show(sb, "get", "resourceclaims", "-A")
        show(sb, "get", "resourceclaim", "dra-borrower-kv", "-o",
             "jsonpath={.status.allocation.devices.results}{\"\\n\"}")
        print("(kwok nodes run no kubelet, so nothing prepares this claim: the scheduler counts its 16Gi on the "
              "lender device, the agent holds no lease for it)", flush=True)
        node = NODES[0]
        a, tls = sb.agents[node], sb.client_tls
        cmd = [sys.executable, "-m", "spillway", "pool", "show", "--target", a.endpoint,
               "--tls-cert", str(tls.cert), "--tls-key", str(tls.key), "--tls-ca", str(tls.ca)]
        print(f"$ spillway pool show --target {a.endpoint} ...   # node {node} (simulated GPUs)", flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO), check=False)
        print(res.stdout + res.stderr, flush=True)
        events = sb.cluster.kubectl("get", "events", "-n", "default", "--field-selector",
                                    "involvedObject.kind=InferenceTenant", "-o", "json").stdout
        reasons: dict[str, int] = {}
        for e in json.loads(events)["items"]:
            reasons[e["reason"]] = reasons.get(e["reason"], 0) + int(e.get("count") or 1)
        print("operator events by reason: " + ", ".join(f"{k}={v}" for k, v in sorted(reasons.items())), flush=True)
        print("\nAll GPUs above are SIMULATED (the agents' simulated backend, examples/topologies/dgx-h100.yaml); "
              "the CUDA data path is not exercised by the demo.", flush=True)
        if args.once:
            return 0
        say("the system keeps running; in another terminal:")
        print(f"  export KUBECONFIG={sb.kubeconfig}\n"
              "  kubectl get it -A; kubectl describe it llama-70b-chat; kubectl get memorypools\n"
              "  kubectl get resourceslices -o yaml; kubectl get resourceclaims -A\n"
              f"  logs: {sb.workdir} (operator.log, agents/*/agent.log, cluster/logs)\n"
              "Press Ctrl-C to stop everything.", flush=True)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while not stop:
            time.sleep(0.5)
        return 0
    finally:
        say("stopping the DRA drivers, the operator, the agents and the control plane")
        for proc in drivers:
            proc.terminate()
        for proc in drivers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        sb.stop()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
